"""Robustness of serving under ordinary faults: broker restarts and two-worker starts under load.

Starts its own Kafka and Redis (``fmstream.services.up`` on a private run dir and ports), publishes
a random item snapshot, and runs workers as ``python -m fmstream.cli serve`` processes, exactly as
deployed:

1. **Broker restart** (SIGTERM and SIGKILL, ``--restarts`` each): one worker and one client; the
   broker is stopped and started again; measured: seconds from the broker accepting connections
   again to the first answer the client receives (issue 9 target: within 3 s).
2. **Two-worker starts under load** (``--starts``): worker A starts and joins, requests flow at
   ``--rate`` per second, worker B starts and joins (a rebalance under load), load goes on for a
   few seconds; counted from the responses topic: requests answered, answered more than once
   (a zombie member answers everything twice), never answered.

Prints a table and appends it to ``bench/RESULTS.md`` with the machine and its load average.
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
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
from kafka import TopicPartition

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: `python bench/robust.py`
    sys.path.insert(0, str(ROOT))

from bench.common import print_table, record, summary_line  # noqa: E402
from bench.serve import bench_settings, start_worker, stop_workers  # noqa: E402
from fmstream import app, services  # noqa: E402
from fmstream.settings import Settings  # noqa: E402
from serving.client import FmClient  # noqa: E402
from serving.errors import ClientTimeout  # noqa: E402
from serving.index import ItemSnapshot  # noqa: E402
from serving.store import VectorStore  # noqa: E402
from stream.connect import kafka_consumer, kafka_producer  # noqa: E402

log = logging.getLogger("bench.robust")

N_ITEMS = 1000


def listed(store: VectorStore, proc: subprocess.Popen) -> bool:
    return any(w.endswith(f":{proc.pid}") for w in store.worker_versions())


def wait_listed(store: VectorStore, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not listed(store, proc):
        if proc.poll() is not None:
            raise SystemExit(f"worker exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit("worker never joined")
        time.sleep(0.1)


def restarts(settings: Settings, store: VectorStore, run_dir: Path, n: int) -> list[list]:
    rows = []
    worker = start_worker(settings, run_dir / "restart-worker.log")
    try:
        wait_listed(store, worker)
        with FmClient(settings) as client:
            client.request({"type": "i2i", "item_id": "i1"}, timeout=30)
            for mode, rep in itertools.product(("SIGTERM", "SIGKILL"), range(n)):
                services.stop_kafka(settings, kill=mode == "SIGKILL")
                services.start_kafka(settings)
                back = time.monotonic()
                while True:
                    try:
                        response = client.request({"type": "i2i", "item_id": "i2"}, timeout=1)
                        break
                    except ClientTimeout:
                        if time.monotonic() - back > 120:
                            raise SystemExit("no answer within 120 s of the restart") from None
                seconds = time.monotonic() - back
                log.info("%s restart %d: first answer after %.2f s", mode, rep, seconds)
                rows.append(["broker restart", mode, rep + 1, "", "", "", f"{seconds:.2f}",
                             response.error is None])
        assert worker.poll() is None, "the worker died"
    finally:
        stop_workers([worker])
    return rows


def starts(settings: Settings, store: VectorStore, run_dir: Path, n: int, rate: float,
           load_s: float) -> list[list]:
    rows = []
    producer = kafka_producer(settings.kafka_config(), linger_ms=5, acks=1)
    counter = itertools.count()
    for start_no in range(n):
        s = settings.model_copy(update={"serving_group": f"bench-start-{start_no}"})
        sent: list[str] = []
        a = start_worker(s, run_dir / f"start{start_no}-a.log")
        b = None
        stop_load = threading.Event()

        def load(sent: list[str] = sent, start_no: int = start_no,
                 stop_load: threading.Event = stop_load) -> None:
            while not stop_load.is_set():
                n_ = next(counter)
                rid = f"s{start_no}-{n_}"
                producer.send(settings.topic_requests, key=rid.encode(), value=orjson.dumps(
                    {"request_id": rid, "type": "i2i", "item_id": f"i{n_ % N_ITEMS}", "k": 3}))
                sent.append(rid)
                stop_load.wait(1 / rate)

        loader = threading.Thread(target=load, daemon=True)
        try:
            wait_listed(store, a)
            loader.start()
            b = start_worker(s, run_dir / f"start{start_no}-b.log")
            wait_listed(store, b)
            time.sleep(load_s)
        finally:
            stop_load.set()
            loader.join(10)
            producer.flush()
        counts = wait_answers(settings, set(sent), timeout_s=60)
        stop_workers([p for p in (a, b) if p is not None])
        answered = sum(1 for rid in sent if counts.get(rid))
        twice = sum(1 for rid in sent if counts.get(rid, 0) > 1)
        rows.append(["2-worker start", "", start_no + 1, len(sent), answered, twice, "",
                     answered == len(sent) and twice == 0])
        log.info("start %d: %d sent, %d answered, %d twice", start_no, len(sent), answered, twice)
    producer.close()
    return rows


def wait_answers(settings: Settings, want: set[str], timeout_s: float) -> Counter:
    consumer = kafka_consumer(settings.kafka_config(), group_id=None,
                              enable_auto_commit=False, auto_offset_reset="earliest")
    tps = [TopicPartition(settings.topic_responses, p)
           for p in sorted(consumer.partitions_for_topic(settings.topic_responses) or ())]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    counts: Counter = Counter()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                counts.update(r.key.decode() for r in batch if r.key)
            if want <= set(counts):
                # read to the end once more: repeats arrive right after
                ends = consumer.end_offsets(tps)
                while any(consumer.position(tp) < ends[tp] for tp in tps):
                    for batch in consumer.poll(timeout_ms=200).values():
                        counts.update(r.key.decode() for r in batch if r.key)
                break
    finally:
        consumer.close()
    return counts


COLUMNS = ["scenario", "signal", "run", "requests", "answered", "answered twice",
           "s to first answer", "ok"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--restarts", type=int, default=3, help="broker restarts per signal")
    parser.add_argument("--starts", type=int, default=20, help="two-worker starts under load")
    parser.add_argument("--rate", type=float, default=50.0, help="requests/s during starts")
    parser.add_argument("--load-seconds", type=float, default=4.0, help="load after B joined")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)

    run_dir = Path(tempfile.mkdtemp(prefix="fmstream-bench-robust-"))
    settings = bench_settings(run_dir, ports=(23092, 23093, 23379), swap_poll_s=0.2)
    started = time.monotonic()
    ok = False
    try:
        log.info("services: %s", services.up(settings))
        store = app.store(settings)
        rng = np.random.default_rng(1)
        vectors = rng.standard_normal((N_ITEMS, 18)).astype(np.float32)
        ids = [f"i{j}" for j in range(N_ITEMS)]
        app.store_writer(settings).put_item_snapshot(ItemSnapshot(1, ids, vectors))
        load_before = os.getloadavg()[0]
        rows = restarts(settings, store, run_dir, args.restarts)
        rows += starts(settings, store, run_dir, args.starts, args.rate, args.load_seconds)
        load_after = os.getloadavg()[0]
        ok = True
    finally:
        services.down(settings)
        if ok:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            print(f"logs kept in {run_dir}", file=sys.stderr)
    print_table("Serving robustness", COLUMNS, rows)
    restart_s = {m: [float(r[6]) for r in rows if r[1] == m] for m in ("SIGTERM", "SIGKILL")}
    start_rows = [r for r in rows if r[0] == "2-worker start"]
    summary = summary_line(
        restart_max_s_term=max(restart_s["SIGTERM"] or [0]),
        restart_max_s_kill=max(restart_s["SIGKILL"] or [0]),
        starts=len(start_rows),
        starts_with_repeats=sum(1 for r in start_rows if r[5]),
        unanswered=sum(r[3] - r[4] for r in start_rows),
    )
    print(summary)
    if not args.no_record:
        notes = (
            "Broker restart: seconds from `start_kafka` returning (the broker accepts "
            "connections) to the first answer the client receives, requests retried with a 1 s "
            "timeout. Starts: worker A joins, requests at "
            f"{args.rate:.0f}/s, worker B joins, {args.load_seconds:.0f} s more load; counted "
            "from the responses topic. Workers are `fmstream serve` processes; broker, Redis, "
            f"workers and the bench share the machine. Load average {load_before:.2f} before, "
            f"{load_after:.2f} after; wall {time.monotonic() - started:.0f} s."
        )
        record("Serving robustness (bench/robust.py)", COLUMNS, rows, summary, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
