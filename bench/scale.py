"""Scale benchmark of publishing by change (issue 10): item deltas, user records, freshness.

Six parts (``--part``), each bounded in time:

- ``versions``: CPU, bytes and rows per version as the trainer makes them at ``--users`` x
  ``--items`` (planted segments/categories like the e2e stream), one version per
  ``--publish-items-s`` of ``--rate`` events, for each item ship policy in ``--policies``
  (``parts``: the default form; or ``tolerance:max_age_s`` of composed vectors), with the
  top-10 overlap of the served vectors against the model's
  (the price of a tolerance). In one process on a simulated clock: load-robust.

- ``publish``: 1M items in one model; each tick ``N`` item rows change (1k, 10k, 100k per
  second); the publisher finds them (:meth:`OnlineFM.items_reading` over the changed-row mask),
  composes and ships one delta; a worker-side :class:`~serving.follow.IndexFollower` applies it in
  place. Measured per tick: publish CPU (this process) and Redis CPU, bytes written, worker apply
  time; side by side with the full snapshot every tick that the publisher wrote before.
- ``users``: the user-vector strategy. 1M users with a shared profile field; after one second of
  training, how many users read a changed shared row, and what rewriting them would cost (the
  "track the users a changed shared row touches" option), against what composing at request
  time costs (shared rows shipped per version, and the worker's read+compose time per batch).
- ``follow``: in one process, a request thread answering batches while the worker's follow
  thread applies real parts-form versions, phases with and without versions alternating: the
  version handling's own share of the request tail (bench/scale_follow.py).
- ``bytes``: what the trainer's publisher writes into Redis per event, by kind (item deltas,
  full snapshots, user records, histories, ...), measured from Redis' AOF on a simulated clock
  (bench/scale_bytes.py; load-robust).
- ``e2e``: the whole loop as deployed (trainer + worker + producer, subprocesses), like
  ``bench/freshness.py`` but at ``--users`` x ``--items`` (default 1M x 100k) and with two
  kinds of freshness probes: *active* (a new user's first event -> its first u2i answer from its
  own vector) and *inactive* (users with a brand-new profile value who never click; one other
  user with that value clicks: the value's shared row is admitted and trained -> the first u2i
  answer for an inactive user that names a version carrying that row; the trigger's own record
  tells which version that is). Request p99 with versions arriving vs without, the requests
  driven as a closed loop (``--inflight`` in flight, the default) or, with ``--request-rate``,
  an open loop (Poisson arrivals, latency from each scheduled send: bench/openloop.py).

Appends each part's table to bench/RESULTS.md with the load average and what else ran.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import print_table, record, summary_line  # noqa: E402
from bench.serve import bench_settings, cpu_seconds  # noqa: E402
from fmstream import services  # noqa: E402
from fmstream.settings import Settings  # noqa: E402

log = logging.getLogger("bench.scale")


def load_note() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1/5/15 min)"


def others() -> str:
    """What else is running on the box (other helpers' tests and benches)."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True,
                             text=True, timeout=5).stdout.splitlines()[1:8]
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    me = os.getpid()
    busy = [line.strip()[:90] for line in out if str(me) not in line]
    return "; ".join(busy[:5])


def start_redis(run_dir: Path) -> tuple[Settings, int]:
    settings = bench_settings(run_dir, ports=(24092, 24093, 24379))
    pid = services.start_redis(settings)
    return settings, pid


def open_store(settings: Settings):
    """A Redis client, its keys, and a StoreWriter and a VectorStore on them."""
    from serving.store import VectorStore
    from stream.connect import redis_client
    from train.store_writer import StoreWriter

    client = redis_client(settings.redis_config())
    keys = settings.redis_keys()
    return client, keys, StoreWriter(client, keys, 2), VectorStore(client, keys)


def delta_publisher(writer, model, **config):  # noqa: ANN001
    """A VersionedPublisher that ships by change only (no periodic full snapshot)."""
    from train.deltas import DeltaConfig, VersionedPublisher

    return VersionedPublisher(writer, model, DeltaConfig(
        full_every_s=1e9, full_after_rows=1e9, full_after_bytes=1e9, **config))


def synthetic_shop(model, n_users: int, n_items: int) -> None:  # noqa: ANN001
    """Upsert the benches' catalogue into ``model``: items ``i0..`` in 20 categories, users
    ``u0..`` in 20 segments (in chunks: bounded temporaries at 1M)."""
    for lo in range(0, n_items, 100_000):
        hi = min(n_items, lo + 100_000)
        model.upsert_items([f"i{j}" for j in range(lo, hi)],
                           [{"category": f"c{j % 20}"} for j in range(lo, hi)])
    for lo in range(0, n_users, 200_000):
        hi = min(n_users, lo + 200_000)
        model.upsert_users([f"u{j}" for j in range(lo, hi)],
                           [{"segment": f"s{j % 20}"} for j in range(lo, hi)])


def learn_in_steps(model, events: Iterator[dict], n: int, step: int) -> list[dict]:  # noqa: ANN001
    """Take the next ``n`` events of a synthetic stream and learn them in steps of ``step``
    events, as the trainer does; returns the events."""
    batch = list(itertools.islice(events, n))
    for lo in range(0, len(batch), step):
        b = batch[lo : lo + step]
        model.learn_many([e["user_id"] for e in b], [e["item_id"] for e in b],
                         contexts=[e["context"] for e in b])
    return batch


def trained_model(n_users: int, n_items: int, schema: dict, *, events: int, seed: int = 0):
    from model import FeatureSchema
    from model.online import OnlineFM, TrainConfig

    model = OnlineFM(FeatureSchema.from_dict(schema), TrainConfig(dim=32, seed=seed))
    rng = np.random.default_rng(seed)
    users = np.array([f"u{j}" for j in range(n_users)])
    items = np.array([f"i{j}" for j in range(n_items)])
    if "segment" in schema.get("user", {}):
        for lo in range(0, n_users, 200_000):
            hi = min(n_users, lo + 200_000)
            model.upsert_users(list(users[lo:hi]), [{"segment": f"s{j % 20}"} for j in
                                                    range(lo, hi)])
    done = 0
    while done < events:  # every item seen at least once when events >= items
        b = min(50_000, events - done)
        it = np.arange(done, done + b) % n_items
        us = rng.integers(0, n_users, b)
        model.learn_many(list(users[us]), list(items[it]))
        done += b
    return model


# --- part: publish ------------------------------------------------------------------------


def part_publish(args: argparse.Namespace) -> None:
    from serving.follow import IndexFollower

    started = time.perf_counter()
    run_dir = Path(tempfile.mkdtemp(prefix="fmstream-bench-scale-"))
    settings, redis_pid = start_redis(run_dir)
    try:
        client, keys, writer, reader = open_store(settings)
        t0 = time.perf_counter()
        model = trained_model(10_000, args.items, {"user": {}}, events=args.items)
        log.info("model with %d items trained in %.0f s", args.items, time.perf_counter() - t0)
        pub = delta_publisher(writer, model)
        follower = IndexFollower(reader)
        # the old way, every tick: one full snapshot written, one full load and index build
        c0, r0, w0 = time.process_time(), cpu_seconds(redis_pid), time.perf_counter()
        first = pub.publish_items(now=time.time())
        full_cpu = time.process_time() - c0
        full_wall = time.perf_counter() - w0
        full_redis = cpu_seconds(redis_pid) - r0
        full_bytes = int(client.memory_usage(keys.items_chunk(first.version, 0)) or 0)
        manifest = orjson.loads(client.get(keys.items_manifest(first.version)))
        full_bytes = manifest["vector_bytes"] + manifest["ids_bytes"]
        w0 = time.perf_counter()
        follower.refresh()
        full_load = time.perf_counter() - w0
        rows = [[
            "full snapshot every tick (before)", f"{args.items:,}", f"{full_bytes / 1e6:,.1f} MB",
            f"{full_wall * 1e3:,.0f} ms", f"{(full_cpu) * 1e3:,.0f} ms",
            f"{full_redis * 1e3:,.0f} ms", f"{full_cpu / args.items * 1e6:.2f} us",
            f"{full_load * 1e3:,.0f} ms (load + build)",
        ]]
        ents_all = np.arange(args.items)
        rng = np.random.default_rng(1)
        table = model._table  # the bench plays the trainer: it writes rows as an update would
        id_rows = model.id_rows_at("item", ents_all)
        summary: dict[str, float] = {}
        for n in args.changed:
            samples = []
            model.drain_changed_rows()
            for _ in range(args.ticks):
                pick = rng.choice(args.items, size=n, replace=False)
                r = id_rows[pick]
                table.params[r] += rng.normal(0, 1e-3, (n, table.params.shape[1])).astype(
                    np.float32)
                table.mark_dirty(r)
                c0, r0, w0 = time.process_time(), cpu_seconds(redis_pid), time.perf_counter()
                got = pub.publish_items(now=time.time())
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                rcpu = cpu_seconds(redis_pid) - r0
                w0 = time.perf_counter()
                assert follower.refresh()
                apply = time.perf_counter() - w0
                assert got is not None and not got.full and got.rows == n, got
                samples.append((got.delta_bytes, wall, cpu, rcpu, apply))
            s = np.median(np.array(samples), axis=0)
            summary[f"us_per_row_{n}"] = s[2] / n * 1e6
            summary[f"apply_ms_{n}"] = s[4] * 1e3
            rows.append([
                f"delta, {n:,} changed items/s", f"{n:,}", f"{s[0] / 1e6:,.2f} MB",
                f"{s[1] * 1e3:,.1f} ms", f"{s[2] * 1e3:,.1f} ms", f"{s[3] * 1e3:,.1f} ms",
                f"{s[2] / n * 1e6:.2f} us", f"{s[4] * 1e3:,.1f} ms (in place, 2 copies)",
            ])
        # a worker starting now: the full snapshot and every delta since
        late = IndexFollower(reader)
        w0 = time.perf_counter()
        late.refresh()
        late_s = time.perf_counter() - w0
        client.close()
    finally:
        services.stop_redis(settings)
        shutil.rmtree(run_dir, ignore_errors=True)
    cols = ["publish per tick (1 tick/s)", "rows shipped", "Redis bytes/s", "publish wall",
            "publish CPU", "Redis CPU", "CPU per row", "worker apply"]
    title = f"Publishing by change at {args.items:,} items (bench/scale.py --part publish)"
    print_table(title, cols, rows)
    notes = (
        f"{args.items:,} items x 34 floats (dim 32), ids-only items (so N changed rows = N "
        f"changed items); {args.ticks} ticks per size, medians. The bench writes N random item "
        "rows per tick as the trainer's optimiser would (mark_dirty), then the real publisher "
        "finds them (changed-row mask gathered over the catalogue's keys), composes them and "
        "writes one delta; a worker-side IndexFollower applies it to its two copies. Publish "
        "CPU = this process (detect + compose + encode + client); Redis CPU = redis-server. "
        f"A worker starting at the end (full snapshot + {len(args.changed) * args.ticks} "
        f"deltas) was ready in {late_s:.1f} s. {load_note()} at the end; sharing the box: "
        f"{others()}. Wall {time.perf_counter() - started:.0f} s."
    )
    print(notes)
    line = summary_line(**{k: round(v, 3) for k, v in summary.items()})
    print(line)
    if not args.no_record:
        record("Scale: publishing by change at 1M items (bench/scale.py --part publish)", cols,
               rows, line, notes)


# --- part: versions ---------------------------------------------------------------------


def part_versions(args: argparse.Namespace) -> None:
    """CPU and bytes per version as the trainer makes them, per item ship policy (in process,
    simulated clock: load-robust figures; the e2e part measures wall-clock freshness)."""
    from model import FeatureSchema
    from model.online import OnlineFM, TrainConfig
    from serving.follow import IndexFollower
    from serving.store import VectorStore
    from stream.connect import redis_client
    from stream.synthetic import SyntheticStream
    from train.store_writer import StoreWriter

    started = time.perf_counter()
    schema = {"user": {"segment": {}}, "item": {"category": {}}, "context": {"hour": {}}}
    model = OnlineFM(FeatureSchema.from_dict(schema), TrainConfig(dim=32))
    synthetic_shop(model, args.users, args.items)
    per_tick = int(args.rate * args.publish_items_s)
    # "parts": the parts form (own parts + shared item rows; workers recompose); "tol:age":
    # composed vectors with that ship policy ("0:5" = every change, exact)
    policies = [("parts", 0.0, 0.0) if p == "parts"
                else ("vectors", *(float(x) for x in p.split(":"))) for p in args.policies]
    stream = SyntheticStream(users=args.users, items=args.items, clusters=20)
    events = stream.events(args.warm_events + per_tick * args.ticks * len(policies))

    def learn(n: int) -> list[str]:  # steps of 256 (FMSTREAM_STEP_EVENTS when measured)
        return sorted({e["user_id"] for e in learn_in_steps(model, events, n, 256)})

    t0 = time.perf_counter()
    learn(args.warm_events)
    log.info("model of %d users x %d items trained on %d events in %.0f s", args.users,
             args.items, args.warm_events, time.perf_counter() - t0)
    run_dir = Path(tempfile.mkdtemp(prefix="fmstream-bench-versions-"))
    settings, redis_pid = start_redis(run_dir)
    probe_users = [f"u{j}" for j in range(0, args.users, max(1, args.users // 200))][:200]
    rows_out, summary = [], {}
    try:
        client = redis_client(settings.redis_config())
        keys = settings.redis_keys()
        for form, tol, max_age in policies:
            client.flushall()
            writer, reader = StoreWriter(client, keys, 2), VectorStore(client, keys)
            pub = delta_publisher(writer, model, tolerance=tol, max_age_s=max_age, form=form)
            clock = 1e6
            pub.publish_items(now=clock)
            follower = IndexFollower(reader)
            follower.refresh()
            samples = []
            for _ in range(args.ticks):
                active = learn(per_tick)
                clock += args.publish_items_s
                c0 = time.thread_time()
                got = pub.publish_items(now=clock)
                c1 = time.thread_time()
                follower.refresh()
                c2 = time.thread_time()
                pub.publish_users(active, clock)
                pub.refresh_i2i()
                c3 = time.thread_time()
                assert got is not None and follower.version == got.version
                # the trade-off: top-10 from the served (shipped) vectors vs the model's now
                served = follower.current().loaded.snapshot.vectors
                q = model.user_vectors(probe_users)
                cur = model.item_vectors_at(np.arange(args.items))
                now_top = np.argpartition(-(q @ cur.T), 10, axis=1)[:, :10]
                srv_top = np.argpartition(-(q @ served[: args.items].T), 10, axis=1)[:, :10]
                overlap = np.mean([len(set(a[:10]) & set(b[:10])) / 10
                                   for a, b in zip(now_top, srv_top, strict=True)])
                samples.append((got.rows, got.delta_bytes, c1 - c0, c2 - c1, c3 - c2, overlap,
                                got.held))
            a = np.array(samples, dtype=np.float64)
            med = np.median(a, axis=0)
            name = ("parts: own rows + shared item rows, workers compose" if form == "parts"
                    else "vectors, every change (exact)" if tol == 0
                    else f"vectors, tolerance {tol:g}, max age {max_age:g} s")
            rows_out.append([
                name, f"{med[0]:,.0f} (max {a[:, 0].max():,.0f})", f"{med[1] / 1e6:.2f} MB",
                f"{med[2] * 1e3:.0f} ms", f"{med[2] / max(med[0], 1) * 1e6:.2f} us",
                f"{med[3] * 1e3:.0f} ms", f"{med[4] * 1e3:.0f} ms",
                f"{a[:, 5].mean():.3f} (min {a[:, 5].min():.2f})", f"{med[6]:,.0f}",
            ])
            tag = "parts" if form == "parts" else "exact" if tol == 0 else f"tol{tol:g}"
            summary[f"{tag}_rows"] = float(med[0])
            summary[f"{tag}_publish_ms"] = round(med[2] * 1e3, 1)
            summary[f"{tag}_apply_ms"] = round(med[3] * 1e3, 1)
            summary[f"{tag}_overlap10"] = round(float(a[:, 5].mean()), 3)
        client.close()
    finally:
        services.stop_redis(settings)
        shutil.rmtree(run_dir, ignore_errors=True)
    cols = ["item ship policy", "rows per version", "bytes per version", "publish CPU",
            "per shipped row", "worker apply CPU (2 copies)", "records + i2i CPU",
            "top-10 overlap served vs model", "rows held back"]
    title = (f"Versions at {args.users:,} users x {args.items:,} items, one per "
             f"{args.publish_items_s:g} s of {args.rate:,} events/s (bench/scale.py --part "
             "versions)")
    print_table(title, cols, rows_out)
    notes = (
        f"In one process on a simulated clock (CPU seconds of this thread, so load-robust): a "
        f"model with planted segments/categories (20 each, like the e2e stream) trained on "
        f"{args.warm_events:,} events, then per version {per_tick:,} events in steps of 256 "
        f"(TrainConfig defaults: loss {model.config.loss}), the publisher's version (candidates "
        f"found from the changed-row mask, composed, the ship policy, a positional delta into "
        f"Redis), a worker-side IndexFollower applying it to its 2 copies, then the records of "
        f"the tick's active users and one i2i refresh. Medians over {args.ticks} versions per "
        f"policy. Overlap = |top-10 from the served vectors & top-10 from the model's current "
        f"vectors| / 10 for 200 users. {load_note()} at the end; sharing the box: {others()}. "
        f"Wall {time.perf_counter() - started:.0f} s."
    )
    print(notes)
    line = summary_line(**summary)
    print(line)
    if not args.no_record:
        record(f"Scale: versions at {args.users:,} users x {args.items:,} items "
               "(bench/scale.py --part versions)", cols, rows_out, line, notes)


# --- part: users --------------------------------------------------------------------------


def part_users(args: argparse.Namespace) -> None:
    from serving.users import SharedRows, encode_rows, encode_user_records

    started = time.perf_counter()
    run_dir = Path(tempfile.mkdtemp(prefix="fmstream-bench-users-"))
    settings, redis_pid = start_redis(run_dir)
    try:
        client, keys, writer, reader = open_store(settings)
        t0 = time.perf_counter()
        model = trained_model(args.users, 1000, {"user": {"segment": {}}, "item": {}},
                              events=200_000)
        log.info("model with %d users ready in %.0f s", args.users, time.perf_counter() - t0)
        pub = delta_publisher(writer, model)
        pub.publish_items(now=time.time())
        # one second of training at the bench's rate: which users read a changed row?
        model.drain_changed_rows()
        rng = np.random.default_rng(3)
        n_ev = args.rate
        model.learn_many([f"u{k}" for k in rng.integers(0, args.users, n_ev)],
                         [f"i{k}" for k in rng.integers(0, 1000, n_ev)])
        changed = model.drain_changed_rows()
        affected = 0
        users = model.known_users()
        for lo in range(0, len(users), 200_000):
            part = users[lo : lo + 200_000]
            _, ukeys, uw = model.user_parts(part)
            own_rows = model.id_rows_at("user", np.arange(lo, lo + len(part)))
            rows = model.key_rows(ukeys)
            hit = (changed[rows] & (uw != 0)).any(axis=1) | changed[own_rows]
            affected += int(hit.sum())
        # option B: rewrite every affected user's vector (measured on a sample, scaled)
        sample = users[: args.sample]
        c0, r0, w0 = time.process_time(), cpu_seconds(redis_pid), time.perf_counter()
        for lo in range(0, len(sample), 8192):
            part = sample[lo : lo + 8192]
            writer.put_user_vectors(part, model.user_vectors(part), 1)
        b_wall = time.perf_counter() - w0
        b_cpu = time.process_time() - c0
        b_redis = cpu_seconds(redis_pid) - r0
        per_user = b_wall / len(sample)
        # option A: ship the changed shared rows with the version, compose at request time
        shared_keys = model.user_shared_keys()
        ship = changed[model.key_rows(shared_keys)]
        w, v = model.shared_params(shared_keys[ship])
        blob = encode_rows(shared_keys[ship], np.concatenate([w[:, None], v], axis=1))
        own, ukeys, uw = model.user_parts(sample[:64])
        record_bytes = len(encode_user_records(1, 0.0, own[:1], ukeys[:1], uw[:1])[0])
        pub.publish_users(sample)  # records (own part + shared keys) for the read test
        wa, va = model.shared_params(shared_keys)
        shared = SharedRows(shared_keys, np.concatenate([wa[:, None], va], axis=1))
        batch = sample[:64]
        reads_a, reads_plain = [], []
        plain_ids = [f"plain-{u}" for u in batch]
        writer.put_user_vectors(plain_ids, model.user_vectors(batch), 1)
        for _ in range(200):
            t = time.perf_counter()
            reader.get_user_vectors(batch, shared=shared)
            reads_a.append(time.perf_counter() - t)
            t = time.perf_counter()
            reader.get_user_vectors(plain_ids)
            reads_plain.append(time.perf_counter() - t)
        got = reader.get_user_vectors(batch, shared=shared)
        err = float(np.abs(got.vectors - model.user_vectors(batch)).max())
        client.close()
    finally:
        services.stop_redis(settings)
        shutil.rmtree(run_dir, ignore_errors=True)
    p = lambda xs, q: float(np.percentile(xs, q)) * 1e3  # noqa: E731
    cols = ["strategy", "work per second of training", "cost", "notes"]
    rows = [
        ["users reading a changed row", f"{affected:,} of {args.users:,}",
         f"after {n_ev:,} events", f"{int(ship.sum())} shared user rows changed (of "
         f"{len(shared_keys)})"],
        ["B: rewrite every affected user", f"{affected:,} vectors",
         f"{per_user * affected:,.1f} s wall (measured {per_user * 1e6:.1f} us/user on "
         f"{len(sample):,})", f"client CPU {b_cpu / len(sample) * 1e6:.1f} us/user, Redis "
         f"{b_redis / len(sample) * 1e6:.1f} us/user: {per_user * affected:,.0f}x the 1 s "
         "budget"],
        ["A: ship changed shared rows, compose at request", f"{int(ship.sum())} rows, "
         f"{len(blob):,} bytes", "records only for active users",
         f"record {record_bytes} B (own part + {ukeys.shape[1]} key); max |err| {err:.1e}"],
        ["A: worker read of 64 users (MGET + compose)", "per request batch",
         f"p50 {p(reads_a, 50):.2f} ms, p99 {p(reads_a, 99):.2f} ms",
         f"plain vectors: p50 {p(reads_plain, 50):.2f} ms, p99 {p(reads_plain, 99):.2f} ms"],
    ]
    title = f"User vectors exact for {args.users:,} users (bench/scale.py --part users)"
    print_table(title, cols, rows)
    notes = (
        f"{args.users:,} users with one shared profile field (segment, 20 values), 1,000 items, "
        f"dim 32; one second of training = {n_ev:,} events. {load_note()} at the end; sharing "
        f"the box: {others()}. Wall {time.perf_counter() - started:.0f} s."
    )
    print(notes)
    line = summary_line(affected=affected, rewrite_s=round(per_user * affected, 1),
                        shared_rows=int(ship.sum()), compose_p99_ms=round(p(reads_a, 99), 2),
                        plain_p99_ms=round(p(reads_plain, 99), 2))
    print(line)
    if not args.no_record:
        record("Scale: user vectors, rewrite vs compose (bench/scale.py --part users)", cols,
               rows, line, notes)


# --- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["publish", "users", "e2e", "versions", "follow",
                                                   "bytes", "republish"],
                        required=True)
    parser.add_argument("--rounds", type=int, default=2, help="follow: quiet/versions rounds")
    parser.add_argument("--switch-ms", nargs="+", default=["5"],
                        help="follow: GIL switch interval(s) in ms, each a quiet/versions pair")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--changed", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--ticks", type=int, default=5)
    parser.add_argument("--rate", type=int, default=5000, help="events/s")
    parser.add_argument("--sample", type=int, default=50_000, help="users rewritten (part users)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--quiet-seconds", type=float, default=20.0)
    parser.add_argument("--probe-every", type=float, default=1.0)
    parser.add_argument("--inflight", type=int, default=8,
                        help="e2e: requests kept in flight (the closed loop; ignored with "
                        "--request-rate)")
    parser.add_argument("--request-rate", type=float, default=None,
                        help="e2e: drive requests OPEN-loop at this many requests/s (Poisson "
                        "arrivals scheduled in advance, latency from each scheduled send time, "
                        "the same rate in both phases); default: the closed loop (--inflight)")
    parser.add_argument("--warmup", type=float, default=15.0, help="e2e: before measuring")
    parser.add_argument("--setup-timeout", type=float, default=900.0)
    parser.add_argument("--publish-items-s", type=float, default=0.5)
    parser.add_argument("--publish-active-s", type=float, default=0.1)
    parser.add_argument("--publish-shared-s", type=float, default=None,
                        help="e2e: FMSTREAM_PUBLISH_SHARED_S, shared-rows versions between item "
                        "versions (default: the settings' default, 0.1 s; 0 = none)")
    parser.add_argument("--offline-i2i-s", type=float, default=None,
                        help="e2e: FMSTREAM_OFFLINE_I2I_S (default: the settings' default, 1 s)")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--warm-events", type=int, default=200_000, help="versions: training first")
    parser.add_argument("--policies", nargs="+", default=["parts", "0:5", "0.05:10"],
                        help="versions: item ship policies: 'parts' (the default form) or "
                        "tolerance:max_age_s of composed vectors")
    parser.add_argument("--item-tolerance", type=float, default=0.0,
                        help="e2e: FMSTREAM_ITEM_TOLERANCE (0: every change ships at once)")
    parser.add_argument("--item-delta-form", choices=["parts", "vectors"], default="parts",
                        help="e2e: FMSTREAM_ITEM_DELTA_FORM (what an item version carries)")
    parser.add_argument("--item-max-age-s", type=float, default=5.0,
                        help="e2e: FMSTREAM_ITEM_MAX_AGE_S")
    parser.add_argument("--keep-logs", action="store_true", help="e2e: keep trainer/worker logs")
    parser.add_argument("--worker-slice-us", type=int, default=None,
                        help="e2e: FMSTREAM_WORKER_SLICE_US (the worker's scheduler slice; "
                        "default: the settings' default)")
    parser.add_argument("--redis-persistence", choices=["none", "aof"], default=None,
                        help="e2e: FMSTREAM_REDIS_PERSISTENCE of the bench's Redis (default: "
                        "the settings' default, none); 'aof' measures the AOF bytes by kind "
                        "and allows --redis-aof-rewrite")
    parser.add_argument("--redis-aof-rewrite", choices=["default", "off", "mid"],
                        default="default",
                        help="e2e: Redis' automatic AOF rewrite ('off': CONFIG SET "
                        "auto-aof-rewrite-percentage 0 on the bench's Redis; the AOF then grows "
                        "without bound, an A/B only; 'mid': the default plus one rewrite "
                        "(BGREWRITEAOF) halfway through the phase, the probes near it in rows "
                        "of their own)")
    args = parser.parse_args(argv)
    if args.request_rate is not None and not args.request_rate > 0:
        parser.error(f"--request-rate must be > 0 requests/s, got {args.request_rate}")
    if args.request_rate is not None and args.part != "e2e":
        parser.error("--request-rate drives the e2e part's requests: use it with --part e2e")
    if args.redis_aof_rewrite != "default" and args.redis_persistence != "aof":
        parser.error("--redis-aof-rewrite needs --redis-persistence aof (the default has no AOF)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    if args.part == "publish":
        part_publish(args)
    elif args.part == "users":
        part_users(args)
    elif args.part == "versions":
        part_versions(args)
    elif args.part == "bytes":
        from bench.scale_bytes import part_bytes

        part_bytes(args)
    elif args.part == "republish":
        from bench.scale_republish import part_republish

        part_republish(args)
    elif args.part == "follow":
        from bench.scale_follow import part_follow

        part_follow(args)
    else:
        from bench.scale_e2e import part_e2e

        part_e2e(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
