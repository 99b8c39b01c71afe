"""``bench/scale.py --part republish``: what a full republish costs (Redis restarted empty).

With the local services' default persistence (``none``) a Redis restart, like a FLUSHALL, leaves an
empty store, and the publisher writes everything again from the model: a full item snapshot, the
record of every known user, every user's history (from the model's rings) and the offline i2i
from scratch (bounded per tick). This part measures that republish at ``--users`` x ``--items``
in one process: the trainer's model (``config/synthetic.toml``, the benches' synthetic shop,
``--warm-events`` events learned in the trainer's steps, so users have histories), the trainer's
``Publisher`` on a private Redis. It times, after one warm-up republish and a FLUSHALL each:
the whole ``Publisher.republish`` (wall, this thread's CPU, Redis' CPU, keys and memory written),
then its pieces one by one (item snapshot + every user's record; histories; i2i). CPU seconds
are the load-robust figures; the wall clock on a loaded box is not what a quiet host sees.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import print_table, record, summary_line
from bench.scale import learn_in_steps, load_note, others, synthetic_shop
from bench.serve import bench_settings, cpu_seconds
from fmstream import services

log = logging.getLogger("bench.scale")


def part_republish(args: argparse.Namespace) -> None:
    from fmstream.app import new_model, redis_client
    from stream.synthetic import SyntheticStream
    from train.publisher import Publisher
    from train.store_writer import StoreWriter

    started = time.perf_counter()
    root = Path(__file__).resolve().parents[1]
    run_dir = Path(tempfile.mkdtemp(prefix="fmstream-bench-republish-"))
    settings = bench_settings(run_dir, ports=(26092, 26093, 26379),
                              schema_path=root / "config" / "synthetic.toml")
    model = new_model(settings)
    t0 = time.perf_counter()
    synthetic_shop(model, args.users, args.items)
    stream = SyntheticStream(users=args.users, items=args.items, clusters=20)
    learn_in_steps(model, stream.events(args.warm_events), args.warm_events,
                   settings.step_events)
    log.info("model of %d users x %d items, %d events learned in %.0f s", args.users, args.items,
             args.warm_events, time.perf_counter() - t0)
    redis_pid = services.start_redis(settings)
    rows: list[list] = []
    try:
        client = redis_client(settings)
        writer = StoreWriter(client, settings.redis_keys(), settings.keep_versions)
        pub = Publisher(settings.publish_config(), writer, model)
        pub.tick(1e6)  # an empty Redis at the start: everything once (warm-up)
        users = model.known_users()

        def timed(name: str, fn) -> float:  # noqa: ANN001
            client.flushall()
            w0, c0, r0 = time.perf_counter(), time.thread_time(), cpu_seconds(redis_pid)
            fn()
            wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
            redis_cpu = cpu_seconds(redis_pid) - r0
            info = client.info("memory")
            rows.append([name, round(wall, 2), round(cpu, 2), round(redis_cpu, 2),
                         client.dbsize(), round(info.get("used_memory", 0) / 1e6)])
            log.info("%s: %s", name, rows[-1])
            return wall

        total = timed("Publisher.republish (all of it)", lambda: pub.republish(2e6))
        timed("  item snapshot + every user's record",
              lambda: pub.versions.republish(users, 3e6))
        timed("  every user's history", pub.republish_histories)
        timed("  offline i2i (first tick's budget)", lambda: pub.publish_offline_i2i(4e6))
        client.close()
    finally:
        services.stop_redis(settings)
        shutil.rmtree(run_dir, ignore_errors=True)
    cols = ["what (into an empty Redis)", "wall s", "publisher CPU s", "Redis CPU s", "keys",
            "Redis MB"]
    title = (f"Full republish at {args.users:,} users x {args.items:,} items "
             "(bench/scale.py --part republish)")
    print_table(title, cols, rows)
    notes = (
        f"In one process: the trainer's model (config/synthetic.toml, TrainConfig from the "
        f"settings, recent_items = history_len {settings.history_len}) over the benches' "
        f"synthetic shop, {args.warm_events:,} events learned in steps of "
        f"{settings.step_events}; {len(users):,} known users ({rows[2][4]:,} with a history); the "
        f"trainer's Publisher on a private Redis (persistence {settings.redis_persistence}). "
        "Each row starts from FLUSHALL; 'all of it' is what the publisher does when it finds "
        "its version gone (a Redis restarted empty); the rows below it are its pieces alone. "
        "Publisher CPU = this thread; the time until an arbitrary user's u2i is normal again "
        "is about the first row's wall plus a worker's poll and full load of the snapshot. "
        f"{load_note()} at the end; sharing the box: {others()}. "
        f"Wall {time.perf_counter() - started:.0f} s."
    )
    print(notes)
    line = summary_line(users=args.users, items=args.items, republish_wall_s=round(total, 2),
                        republish_cpu_s=rows[0][2], redis_cpu_s=rows[0][3],
                        publisher_us_per_user=round(rows[0][2] / max(len(users), 1) * 1e6, 1))
    print(line)
    if not args.no_record:
        record(title.split(" (")[0] + " (bench/scale.py --part republish)", cols, rows, line,
               notes)


__all__ = ["part_republish"]
