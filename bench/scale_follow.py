"""``bench/scale.py --part follow``: what versions arriving cost the worker's request thread.

In one process, as the worker runs them: a request thread answering batches of ``--inflight``
u2i (user records from Redis, composed with the version's shared rows, flat search over
``--items``, the replies encoded) and a follow thread (:class:`serving.follow.IndexFollower`,
polling every 0.1 s like ``FMSTREAM_SWAP_POLL_S``) moving to a new parts-form version every
``--publish-items-s``. The versions are real: a model with planted segments/categories (like
the e2e stream) learns ``--rate x --publish-items-s`` events per version and the trainer's
publisher writes them to a private Redis first; each phase then replays them from the same full
snapshot. Phases alternate (``--rounds`` times): *quiet* (no new version) and *versions*.

Per phase: batch wall p50/p99, and of each batch (Linux schedstat of the request thread): CPU,
time waiting for a core (run queue: the machine's load) and time blocked (neither running nor
runnable: Redis round trips, BLAS threads, the GIL held by the follow thread). Blocked and CPU
are what the worker's own version handling can add; the run queue is the box. Load-robust
figures: apply CPU per version (follow thread CPU) and the blocked/CPU percentiles.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import print_table, record, summary_line
from bench.scale import (
    delta_publisher,
    learn_in_steps,
    load_note,
    others,
    start_redis,
    synthetic_shop,
)
from fmstream import services
from serving.timing import thread_clock

log = logging.getLogger("bench.scale")


class _Head:
    """The store as the follower sees it, with the newest version held back to ``v``."""

    def __init__(self, store, v: int) -> None:  # noqa: ANN001 - a VectorStore
        self.store, self.v = store, v
        self.redis, self.key, self.keys = store.redis, store.key, store.keys

    def current_item_version(self) -> int:
        return self.v

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else as the store has it
        return getattr(self.store, name)


def part_follow(args: argparse.Namespace) -> None:
    from model import FeatureSchema
    from model.online import OnlineFM, TrainConfig
    from serving.answering import Answerer, Pending
    from serving.config import ServingConfig
    from serving.follow import IndexFollower
    from serving.index import configure_faiss
    from serving.store import VectorStore
    from serving.worker import BLAS_THRESHOLD
    from stream.connect import redis_client
    from stream.schemas import Request
    from stream.synthetic import SyntheticStream
    from train.store_writer import StoreWriter

    started = time.perf_counter()
    schema = {"user": {"segment": {}}, "item": {"category": {}}, "context": {"hour": {}}}
    model = OnlineFM(FeatureSchema.from_dict(schema), TrainConfig(dim=32))
    synthetic_shop(model, args.users, args.items)
    events = SyntheticStream(users=args.users, items=args.items, clusters=20).events(10**9)
    step = 128  # the trainer's steps (FMSTREAM_STEP_EVENTS)

    def learn(n: int) -> list[str]:
        return sorted({e["user_id"] for e in learn_in_steps(model, events, n, step)})

    learn(args.warm_events)
    per_version = int(args.rate * args.publish_items_s)
    n_versions = int(args.seconds / args.publish_items_s) + 1
    run_dir = Path(tempfile.mkdtemp(prefix="fmstream-bench-follow-"))
    settings, _ = start_redis(run_dir)
    switches = [float(x) for x in args.switch_ms]
    names = [f"{p} @ {s:g} ms" if len(switches) > 1 else p
             for s in switches for p in ("quiet", "versions")]
    phases: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in names}
    default_switch = sys.getswitchinterval()
    try:
        client = redis_client(settings.redis_config())
        keys = settings.redis_keys()
        writer, reader = StoreWriter(client, keys, 2), VectorStore(client, keys)
        pub = delta_publisher(writer, model, form="parts")
        clock = 1e6
        first = pub.publish_items(now=clock)
        assert first is not None
        v0 = first.version
        users: set[str] = set()
        rows = []
        for _ in range(n_versions):
            active = learn(per_version)
            clock += args.publish_items_s
            got = pub.publish_items(now=clock)
            assert got is not None
            rows.append(got.rows)
            pub.publish_users(active, clock)
            users.update(active)
        served = sorted(users)
        log.info("%d versions of ~%d own rows published; measuring", n_versions,
                 int(np.median(rows)))
        configure_faiss(1, blas_threshold=BLAS_THRESHOLD)
        answerer = Answerer(reader, ServingConfig())
        rng = np.random.default_rng(0)
        for name in names * args.rounds:
            phase = name.split(" @ ")[0]
            switch = switches[names.index(name) // 2]
            sys.setswitchinterval(switch / 1000)  # the GIL's hand-over interval (process-wide)
            head = _Head(reader, v0)
            follower = IndexFollower(head)
            follower.refresh()
            stop = threading.Event()
            applied: list[float] = []

            def follow(follower=follower, stop=stop, applied=applied) -> None:  # noqa: ANN001
                while not stop.is_set():
                    c0 = time.thread_time()
                    if follower.refresh():
                        applied.append(time.thread_time() - c0)
                    stop.wait(0.1)

            thread = threading.Thread(target=follow, daemon=True)
            thread.start()
            end = time.perf_counter() + args.seconds
            due = time.perf_counter() + args.publish_items_s
            wall, cpu, runq = [], [], []
            while time.perf_counter() < end:
                if phase == "versions" and time.perf_counter() >= due and (
                    head.v < v0 + n_versions
                ):
                    head.v += 1
                    due += args.publish_items_s
                batch = [Pending(Request(request_id=str(i), type="u2i", k=10,
                                         user_id=served[int(rng.integers(len(served)))]), "r")
                         for i in range(args.inflight)]
                w0, (c0, r0) = time.perf_counter(), thread_clock()
                with follower.busy(), follower.pinned() as state:
                    answerer.answer(batch, state)
                    for p in batch:
                        p.encode()
                w1, (c1, r1) = time.perf_counter(), thread_clock()
                if any(p.error is not None for p in batch):
                    raise SystemExit(f"a request failed: {batch[0].error}")
                wall.append(w1 - w0)
                cpu.append(c1 - c0)
                runq.append(r1 - r0)
                time.sleep(0.003)  # the worker's poll: the GIL is free meanwhile
            stop.set()
            thread.join()
            w, c, r = (np.array(x) * 1e3 for x in (wall, cpu, runq))
            phases[name].append({"wall": w, "cpu": c, "runq": r,
                                  "blocked": np.maximum(w - c - r, 0),
                                  "apply": np.array(applied) * 1e3})
            log.info("%s: %d batches, wall p99 %.1f ms, %d versions applied", name, len(w),
                     np.percentile(w, 99), len(applied))
        client.close()
    finally:
        sys.setswitchinterval(default_switch)
        services.stop_redis(settings)
        shutil.rmtree(run_dir, ignore_errors=True)

    def cat(phase: str, key: str) -> np.ndarray:
        return np.concatenate([p[key] for p in phases[phase]])

    def pc(a: np.ndarray, q: float) -> float:
        return float(np.percentile(a, q)) if a.size else float("nan")

    cols = ["phase", "batches", "wall p50 / p99", "CPU p50 / p99", "waiting for a core p99",
            "blocked p50 / p99", "versions applied", "apply CPU per version"]
    out = []
    for phase in names:
        w, c, r, b, a = (cat(phase, k) for k in ("wall", "cpu", "runq", "blocked", "apply"))
        out.append([phase, f"{w.size:,}", f"{pc(w, 50):.1f} / {pc(w, 99):.1f} ms",
                    f"{pc(c, 50):.1f} / {pc(c, 99):.1f} ms", f"{pc(r, 99):.1f} ms",
                    f"{pc(b, 50):.2f} / {pc(b, 99):.1f} ms", f"{a.size}",
                    f"{pc(a, 50):.1f} ms (p99 {pc(a, 99):.1f})" if a.size else "-"])
    title = (f"Request batches while versions arrive, {args.items:,} items, one parts-form "
             f"version per {args.publish_items_s:g} s of {args.rate:,} events/s (bench/scale.py "
             "--part follow)")
    print_table(title, cols, out)
    first, second = names[0], names[1]  # quiet / versions at the first switch interval
    quiet_w, busy_w = cat(first, "wall"), cat(second, "wall")
    notes = (
        f"In one process: a request thread answering batches of {args.inflight} u2i (user "
        f"records from Redis composed with the version's shared rows, exact flat search, replies "
        f"encoded; 3 ms between batches as the worker's poll) and the worker's follow thread "
        f"(serving.follow.IndexFollower, polling every 0.1 s) moving to a new version every "
        f"{args.publish_items_s:g} s; versions made by the trainer's publisher from a model "
        f"({args.users:,} users, {args.items:,} items, planted segments/categories) learning "
        f"{per_version:,} events each (every category row moves: every item is recomposed). "
        f"Phases of {args.seconds:g} s alternate quiet / versions, {args.rounds} rounds, at "
        f"GIL switch interval(s) {', '.join(f'{x:g}' for x in switches)} ms (sys."
        "setswitchinterval; Python's default 5 ms). "
        f"CPU, run-queue wait and blocked time from /proc/thread-self/schedstat of the request "
        f"thread (blocked: Redis round trips, BLAS threads, the GIL). {load_note()} at the end; "
        f"sharing the box: {others()}. Wall {time.perf_counter() - started:.0f} s."
    )
    print(notes)
    line = summary_line(
        p99_ratio=round(pc(busy_w, 99) / pc(quiet_w, 99), 2),
        wall_p99_ms_versions=round(pc(busy_w, 99), 1), wall_p99_ms_quiet=round(pc(quiet_w, 99), 1),
        blocked_p99_ms_versions=round(pc(cat(second, "blocked"), 99), 2),
        blocked_p99_ms_quiet=round(pc(cat(first, "blocked"), 99), 2),
        cpu_p99_ms_versions=round(pc(cat(second, "cpu"), 99), 2),
        cpu_p99_ms_quiet=round(pc(cat(first, "cpu"), 99), 2),
        apply_cpu_ms=round(pc(cat(second, "apply"), 50), 1),
        **{f"blocked_p99_ms_versions_{s:g}ms": round(pc(cat(names[2 * i + 1], "blocked"), 99), 2)
           for i, s in enumerate(switches) if len(switches) > 1},
    )
    print(line)
    if not args.no_record:
        record("Scale: request batches while versions arrive (bench/scale.py --part follow)",
               cols, out, line, notes)


__all__ = ["part_follow"]
