"""A serving worker's CPU when few or no requests arrive: idle, 10 and 100 requests/s.

Starts its own Kafka and Redis (``bench.serve.bench_settings``: private run dir and ports),
publishes a small model (``--items`` item vectors, ``--users`` user vectors) straight into the
store, starts one worker as deployed (``python -m fmstream.cli serve``) and reads its CPU
(utime + stime of the process and of each thread, ``/proc/PID/task/TID/stat``) over
``--seconds`` in each phase: no requests, then a paced client (Poisson arrivals,
``bench.openloop.PoissonArrivals``) at each of ``--rates``. Latency is measured from each
request's scheduled send time to its reply (p50/p99). No event and no new version arrive: what
a worker of a shop at night spends.

Prints a table (cores used by the worker, its busiest threads, the broker and Redis), appends
it to ``bench/RESULTS.md`` unless ``--no-record``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import print_table, record, request_io  # noqa: E402
from bench.openloop import PoissonArrivals  # noqa: E402
from bench.serve import (  # noqa: E402
    TICKS,
    bench_settings,
    cpu_seconds,
    publish,
    service_pid,
    start_worker,
    stop_workers,
    wait_workers,
)
from fmstream import services  # noqa: E402
from serving.store import VectorStore  # noqa: E402
from stream.connect import redis_client  # noqa: E402
from train.store_writer import StoreWriter  # noqa: E402

log = logging.getLogger("bench.idle_cpu")
COLUMNS = ["phase", "req/s", "answered", "worker cores", "threads (cores, top 4)",
           "broker cores", "redis cores", "p50 ms", "p99 ms"]


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each live thread of ``pid`` (by thread id)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / TICKS
    return out


def paced(settings, users: int, rate: float, seconds: float, seed: int
          ) -> tuple[np.ndarray, int]:
    """Send u2i requests at ``rate``/s (Poisson) for ``seconds``; latencies (s) from each
    request's scheduled time, and how many were unanswered 3 s after the last send."""
    producer, consumer = request_io(settings, "bench-idle-client")
    rng = np.random.default_rng(seed)
    prefix = uuid.uuid4().hex[:8]
    arrivals = PoissonArrivals(rate, seconds, time.perf_counter(), rng)
    inflight: dict[bytes, float] = {}
    lat: list[float] = []
    n = 0

    def send() -> bytes:
        nonlocal n
        n += 1
        key = f"{prefix}-{n}".encode()
        value = b'{"request_id":"%s","type":"u2i","user_id":"u%d","k":10}' % (
            key, int(rng.integers(users)))
        producer.send(settings.topic_requests, key=key, value=value)
        return key

    end = arrivals.start + seconds
    while True:
        now = time.perf_counter()
        if now >= end + 3.0 or (now >= end and not inflight):
            break
        for key, t in arrivals.send_due(now, send, time.perf_counter):
            inflight[key] = t
        wait_ms = int(min(50.0, arrivals.wait_s(time.perf_counter()) * 1000))
        for records in consumer.poll(timeout_ms=max(0, wait_ms)).values():
            done = time.perf_counter()
            for r in records:
                t = inflight.pop(r.key, None)
                if t is not None:
                    lat.append(done - t)
    producer.close(timeout=5)
    consumer.close()
    return np.array(lat), len(inflight)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=34)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rates", default="10,100", help="paced request rates after idle")
    parser.add_argument("--label", default="", help="what this run measures (in the table)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)

    run_dir = Path(tempfile.mkdtemp(prefix="fmstream-bench-idle-"))
    base = bench_settings(run_dir, ports=(21192, 21193, 21479))
    rows = []
    ok = False
    worker = None
    try:
        log.info("services: %s", services.up(base))
        broker, redis = service_pid(base, "kafka"), service_pid(base, "redis")
        client = redis_client(base.redis_config())
        store = VectorStore(client, base.redis_keys())
        publish(StoreWriter(client, base.redis_keys(), base.keep_versions), args.items,
                args.users, args.dim, 1)
        settings = base.model_copy(update={"serving_group": f"bench-idle-{uuid.uuid4().hex[:6]}"})
        worker = start_worker(settings, run_dir / "worker.log")
        wait_workers(store, [worker], 1)
        paced(settings, args.users, 20.0, 3.0, seed=99)  # warm: joined, caches, reply path
        time.sleep(5.0)  # let the warm-up's tail settle before the idle phase
        phases = [("idle", 0.0)] + [(f"{r} req/s", float(r)) for r in args.rates.split(",")]
        for name, rate in phases:
            t0 = time.perf_counter()
            w0, th0 = cpu_seconds(worker.pid), thread_cpu(worker.pid)
            b0, r0 = cpu_seconds(broker or 0), cpu_seconds(redis or 0)
            if rate > 0:
                lat, left = paced(settings, args.users, rate, args.seconds, seed=int(rate))
            else:
                time.sleep(args.seconds)
                lat, left = np.array([]), 0
            wall = time.perf_counter() - t0
            w1, th1 = cpu_seconds(worker.pid), thread_cpu(worker.pid)
            b1, r1 = cpu_seconds(broker or 0), cpu_seconds(redis or 0)
            per = sorted(((th1[t] - th0.get(t, 0.0)) / wall, t) for t in th1)[::-1]
            top = " ".join(f"{c:.3f}" + ("(main)" if t == worker.pid else "")
                           for c, t in per[:4])
            ms = lat * 1000 if lat.size else np.array([np.nan])
            rows.append([name, f"{rate:g}", f"{lat.size}" + (f" ({left} late)" if left else ""),
                         f"{(w1 - w0) / wall:.3f}", top, f"{(b1 - b0) / wall:.3f}",
                         f"{(r1 - r0) / wall:.3f}", f"{np.percentile(ms, 50):.1f}",
                         f"{np.percentile(ms, 99):.1f}"])
            log.info("%s", rows[-1])
        ok = True
    finally:
        if worker is not None:
            stop_workers([worker])
        services.down(base)
        if ok:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            print(f"logs kept in {run_dir}", file=sys.stderr)
    title = "Serving worker CPU at low request rates" + (f" ({args.label})" if args.label else "")
    print_table(title, COLUMNS, rows)
    if not args.no_record:
        record(title, COLUMNS, rows, "", f"{args.items:,} items, {args.users:,} users, "
               f"{args.seconds:.0f} s a phase, one worker, no events, no versions; load "
               f"average at the end {os.getloadavg()[0]:.1f}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
