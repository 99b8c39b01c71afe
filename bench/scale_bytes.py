"""``bench/scale.py --part bytes``: what the publisher writes into Redis per event, by kind.

The trainer's own :class:`train.publisher.Publisher` (the settings' publish config: cadences,
full snapshot policy, history length, i2i) on the model the trainer builds from the settings
(``config/synthetic.toml``: user segment, item category, context hour), fed with the synthetic
stream of the e2e part in ticks of ``--publish-active-s`` on a simulated clock: the model learns
each tick's events in steps of ``step_events``, the publisher is handed them (histories, active
users) and ticks. Redis runs as the local services run it (AOF on); the bytes its AOF takes in
the measured window are counted by kind (:mod:`bench.aof_bytes`). In one process and on a
simulated clock, so bytes per event do not depend on the machine's load (CPU figures do, a
little). The bytes per event hardly depend on the user count (each event's user is drawn at
random: at 200k users or 1M, nearly every event of a 0.1 s tick has a user of its own).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.aof_bytes import AofWindow, short_note
from bench.aof_bytes import table as aof_table
from bench.common import print_table, record, summary_line
from bench.scale import learn_in_steps, load_note, others, synthetic_shop
from bench.serve import bench_settings, cpu_seconds
from fmstream import services

log = logging.getLogger("bench.scale")


@dataclass(frozen=True)
class _Event:
    user_id: str
    item_id: str
    label: int


def part_bytes(args: argparse.Namespace) -> None:
    from fmstream.app import new_model, redis_client
    from stream.synthetic import SyntheticStream
    from train.publisher import Publisher
    from train.store_writer import StoreWriter

    started = time.perf_counter()
    root = Path(__file__).resolve().parents[1]
    run_dir = Path(tempfile.mkdtemp(prefix="fmstream-bench-bytes-"))
    settings = bench_settings(
        run_dir, ports=(26092, 26093, 26379), schema_path=root / "config" / "synthetic.toml",
        publish_items_s=args.publish_items_s, publish_active_s=args.publish_active_s,
        redis_persistence="aof",  # the instrument: the bytes are read from the AOF
    )
    model = new_model(settings)
    synthetic_shop(model, args.users, args.items)
    tick_s = args.publish_active_s
    per_tick = int(round(args.rate * tick_s))
    warm_ticks = int(round(args.warmup / tick_s))
    ticks = int(round(args.seconds / tick_s))
    stream = SyntheticStream(users=args.users, items=args.items, clusters=20)
    events = stream.events(args.warm_events + per_tick * (warm_ticks + ticks))
    step = settings.step_events

    def learn(n: int) -> list[_Event]:
        return [_Event(e["user_id"], e["item_id"], e["label"])
                for e in learn_in_steps(model, events, n, step)]

    t0 = time.perf_counter()
    learn(args.warm_events)
    log.info("model of %d users x %d items trained on %d events in %.0f s", args.users,
             args.items, args.warm_events, time.perf_counter() - t0)
    redis_pid = services.start_redis(settings)
    try:
        client = redis_client(settings)
        writer = StoreWriter(client, settings.redis_keys(), settings.keep_versions)
        pub = Publisher(settings.publish_config(), writer, model)
        clock = 1e6
        pub.tick(clock)  # an empty Redis: everything is published once
        for _ in range(warm_ticks):
            pub.applied(learn(per_tick))
            clock += tick_s
            pub.tick(clock)
        v0 = pub.version
        window = AofWindow.start(client, settings.redis_prefix)
        redis0 = cpu_seconds(redis_pid)
        spent = 0.0
        for _ in range(ticks):
            batch = learn(per_tick)
            c0 = time.thread_time()
            pub.applied(batch)
            clock += tick_s
            pub.tick(clock)
            spent += time.thread_time() - c0
        redis_cpu = cpu_seconds(redis_pid) - redis0
        sizes, counts, rewrites = window.stop()
        versions = pub.version - v0
        used_mb = client.info("memory").get("used_memory", 0) / 1e6
        client.close()
    finally:
        services.stop_redis(settings)
        shutil.rmtree(run_dir, ignore_errors=True)
    seconds = ticks * tick_s
    n_events = per_tick * ticks
    total = sum(sizes.values())
    cols = ["kind", "MB/s", "bytes / event", "commands / s", "share"]
    rows = aof_table(sizes, counts, seconds, n_events)
    title = (f"Redis AOF bytes by kind at {args.users:,} users x {args.items:,} items, "
             f"{args.rate:,} events/s (bench/scale.py --part bytes)")
    print_table(title, cols, rows)
    notes = (
        f"In one process on a simulated clock ({seconds:.0f} s measured after {args.warmup:.0f} s "
        f"of warm-up and {args.warm_events:,} events of training): the trainer's model "
        f"(config/synthetic.toml, TrainConfig from the settings) learns each "
        f"{tick_s:g}-s tick's {per_tick:,} synthetic events in steps of {step}, then the "
        f"trainer's Publisher is handed them and ticks (publish_items_s={args.publish_items_s:g}, "
        f"publish_active_s={tick_s:g}, the other publish settings at their defaults). Bytes = "
        f"what Redis appended to its AOF (RESP of each write; a script's effects), by the key's "
        f"kind. {versions} versions; publisher CPU {spent / n_events * 1e6:.1f} us per event "
        f"(this thread), Redis CPU {redis_cpu / n_events * 1e6:.1f} us per event; Redis used "
        f"memory at the end {used_mb:.0f} MB; AOF rewrites in the window {rewrites}. "
        f"{load_note()} at the end; sharing the box: {others()}. "
        f"Wall {time.perf_counter() - started:.0f} s."
    )
    print(notes)
    line = summary_line(
        aof_mb_s=round(total / seconds / 1e6, 3), aof_bytes_per_event=round(total / n_events),
        versions=versions, publisher_us_per_event=round(spent / n_events * 1e6, 1),
        redis_us_per_event=round(redis_cpu / n_events * 1e6, 1), redis_used_mb=round(used_mb),
        **{"bytes_per_event_" + k.replace(" ", "_").replace(":", "_"): round(b / n_events)
           for k, b in sizes.most_common() if b >= 0.01 * total},
    )
    print(line)
    print("by kind, MB/s:", short_note(sizes, seconds), "| data set", f"{used_mb:.0f} MB")
    if not args.no_record:
        record(title.split(" (")[0] + " (bench/scale.py --part bytes)", cols, rows, line, notes)


__all__ = ["part_bytes"]
