"""Serving benchmark: u2i request/reply through Kafka at 100k and 1M items, 1 and 2 workers.

Starts its own Kafka and Redis (``fmstream.services.up`` on a private run dir and ports 21092 /
21093 / 21379, or ones the OS picks when those are taken), publishes random FM-like item vectors
straight into the store as an ``ItemSnapshot`` plus user vectors for ``--users`` users, and runs
serving workers as subprocesses (``python -m fmstream.cli serve``, exactly as deployed). A
closed-loop client keeps ``--inflight`` requests in flight (u2i, k=10, random users):
requests/s and p50/p99 latency from send to reply, as the client sees them. It also reads the
CPU seconds each process spent (workers, client, broker, Redis): on a 2-core box they share the
cores, which is where the time goes. The client is lean on purpose (pre-encoded requests,
replies matched by key) so that it costs less than ``FmClient``; its cost is reported.

Prints a table, appends it with the machine to ``bench/RESULTS.md``; the last line is
``rps=... p50_ms=... p99_ms=... inflight=...`` for 100k items and 1 worker: the in-flight level
with the most requests/s whose p99 meets the target, else the one with the most requests/s
(target: >= 2,000 requests/s per worker with p99 <= 50 ms). ``--profile`` runs the first worker
under cProfile and prints its top functions. Runs in about 3-4 minutes.
"""

from __future__ import annotations

import argparse
import logging
import os
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: `python bench/serve.py`
    sys.path.insert(0, str(ROOT))


from bench.common import print_table, record, request_io, summary_line  # noqa: E402
from bench.index import fm_like_vectors  # noqa: E402
from fmstream import services  # noqa: E402
from fmstream.settings import Settings  # noqa: E402
from serving.index import ItemSnapshot  # noqa: E402
from serving.store import VectorStore  # noqa: E402
from stream.connect import redis_client  # noqa: E402
from train.store_writer import StoreWriter  # noqa: E402

log = logging.getLogger("bench.serve")

TARGET = "target at 100k items: >= 2,000 requests/s per worker with p99 <= 50 ms"
COLUMNS = [
    "items",
    "workers",
    "in flight",
    "requests",
    "errors",
    "req/s",
    "p50 ms",
    "p99 ms",
    "max ms",
    "cpu ms/req: workers",
    "client",
    "broker",
    "redis",
    "idle",
]
TICKS = os.sysconf("SC_CLK_TCK")
P99_TARGET_MS = 50.0


def bench_settings(
    run_dir: Path, ports: tuple[int, int, int] = (21092, 21093, 21379), **update
) -> Settings:
    """Private services on their own run dir and ports, never a stack someone else runs.

    ``ports`` (kafka, controller, redis; below 32768, outside Linux's ephemeral range) are used
    where free (checked by binding), else the OS picks: on a shared machine another benchmark
    may hold them, and reusing its broker would mix the two runs' load.
    """
    preferred = dict(zip(("kafka", "controller", "redis"), ports, strict=True))
    picked = services.free_ports(preferred)
    if picked != preferred:
        log.warning("ports %s are taken; using %s", preferred, picked)
    kafka, controller, redis_port = picked["kafka"], picked["controller"], picked["redis"]
    return Settings(
        run_dir=run_dir,
        kafka_port=kafka,
        kafka_controller_port=controller,
        redis_port=redis_port,
        kafka_bootstrap=f"127.0.0.1:{kafka}",
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        kafka_libs=ROOT / "infra" / "kafka" / "target" / "libs",
        checkpoint_dir=run_dir / "checkpoints",
        redis_prefix="bench:",
        **update,
    )


# --- processes and their CPU -----------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def runq_seconds(pid: int, *, main_thread: bool = False) -> float:
    """Seconds a process' threads (or only its main thread) waited for a core so far: the
    second field of each ``/proc/PID/task/TID/schedstat`` (0 when gone or not Linux). Threads
    that ended before the call are not counted (a figure over a phase is a lower bound)."""
    tids = [str(pid)] if main_thread else None
    try:
        tids = tids or os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    total = 0
    for tid in tids:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def total_cpu_seconds() -> tuple[float, float]:
    """(busy, idle) seconds of the whole machine since boot."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    return (sum(parts) - idle) / TICKS, idle / TICKS


def service_pid(settings: Settings, name: str) -> int | None:
    path = Path(settings.run_dir) / name / f"{name}.pid"
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def start_worker(
    settings: Settings, log_path: Path, profile: Path | None = None
) -> subprocess.Popen:
    env = {**os.environ, **settings.to_env()}
    cmd = [sys.executable]
    if profile is not None:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    cmd += ["-m", "fmstream.cli", "-v", "serve"]
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=log_path.open("wb"), stderr=subprocess.STDOUT
    )


def stop_workers(workers: list[subprocess.Popen]) -> None:
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    for w in workers:
        try:
            w.wait(30)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait(10)


# --- the load ------------------------------------------------------------------------------


class LoadClient:
    """Closed loop: keeps ``inflight`` u2i requests in flight, matches replies by key."""

    def __init__(self, settings: Settings, users: int, k: int, seed: int = 0) -> None:
        self.settings = settings
        self.users = users
        self.k = k
        self.rng = np.random.default_rng(seed)
        self.producer, self.consumer = request_io(settings, "bench-client")
        self.prefix = uuid.uuid4().hex[:8]
        self.n = 0

    def _send(self, inflight: dict[bytes, float]) -> None:
        self.n += 1
        rid = f"{self.prefix}-{self.n}"
        user = int(self.rng.integers(self.users))
        value = b'{"request_id":"%s","type":"u2i","user_id":"u%d","k":%d}' % (
            rid.encode(),
            user,
            self.k,
        )
        key = rid.encode()
        inflight[key] = time.perf_counter()
        self.producer.send(self.settings.topic_requests, key=key, value=value)

    def run(self, seconds: float, inflight_n: int) -> tuple[np.ndarray, int, int]:
        """Latencies (s) of the replies received within ``seconds``, errors, and stragglers."""
        inflight: dict[bytes, float] = {}
        lat: list[float] = []
        errors = 0
        end = time.perf_counter() + seconds
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            while len(inflight) < inflight_n:
                self._send(inflight)
            # returns as soon as replies arrive; a long timeout only saves idle polling
            for records in self.consumer.poll(timeout_ms=50).values():
                done = time.perf_counter()
                for r in records:
                    sent = inflight.pop(r.key, None)
                    if sent is None:
                        continue  # a reply to an earlier phase
                    lat.append(done - sent)
                    if b'"error":null' not in r.value:
                        errors += 1
                        if errors <= 3:
                            log.warning("error reply: %s", orjson.loads(r.value)["error"])
        return np.array(lat), errors, len(inflight)

    def warm_up(self, inflight_n: int, timeout_s: float = 60.0) -> None:
        """Until the group is settled: a 2 s run answers nearly all it sent (a request sent
        before a worker has its partitions is never answered)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            lat, _, left = self.run(2.0, inflight_n)
            if len(lat) >= 9 * left:
                return
            log.info("warming up: %d answered, %d unanswered", len(lat), left)
        raise SystemExit(f"workers did not answer steadily within {timeout_s:.0f} s")

    def drain(self, seconds: float = 2.0) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            self.consumer.poll(timeout_ms=50)

    def close(self) -> None:
        self.producer.close(timeout=5)
        self.consumer.close()


# --- one configuration ---------------------------------------------------------------------


@dataclass
class Result:
    items: int
    workers: int
    inflight: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_workers: float
    cpu_client: float
    cpu_broker: float
    cpu_redis: float
    idle: float

    def row(self) -> list[str]:
        return [
            f"{self.items:,}",
            str(self.workers),
            str(self.inflight),
            f"{self.requests:,}",
            str(self.errors),
            f"{self.rps:,.0f}",
            f"{self.p50_ms:.1f}",
            f"{self.p99_ms:.1f}",
            f"{self.max_ms:.0f}",
            f"{self.cpu_workers:.3f}",
            f"{self.cpu_client:.3f}",
            f"{self.cpu_broker:.3f}",
            f"{self.cpu_redis:.3f}",
            f"{self.idle:.0%}",
        ]


def wait_workers(
    store: VectorStore, workers: list[subprocess.Popen], version: int, timeout_s: float = 180
) -> None:
    """Until each of these worker processes reports serving ``version`` (ids are host:pid)."""
    deadline = time.monotonic() + timeout_s
    ids = {f"{socket.gethostname()}:{w.pid}" for w in workers}
    while True:
        serving = {w for w, v in store.worker_versions().items() if v == version}
        if ids <= serving:
            return
        for w in workers:
            if w.poll() is not None:
                raise SystemExit(f"a worker exited with {w.returncode} while loading")
        if time.monotonic() > deadline:
            raise SystemExit(f"workers did not load v{version} within {timeout_s:.0f} s")
        time.sleep(0.2)


def measure(
    settings: Settings,
    client: LoadClient,
    pids: dict[str, list[int]],
    items: int,
    workers: int,
    inflight: int,
    seconds: float,
) -> Result:
    before = {name: sum(cpu_seconds(p) for p in ps) for name, ps in pids.items()}
    busy0, idle0 = total_cpu_seconds()
    t0 = time.perf_counter()
    lat, errors, stragglers = client.run(seconds, inflight)
    wall = time.perf_counter() - t0
    busy1, idle1 = total_cpu_seconds()
    after = {name: sum(cpu_seconds(p) for p in ps) for name, ps in pids.items()}
    client.drain(1.0)
    n = max(1, len(lat))
    per_req = {name: (after[name] - before[name]) * 1000 / n for name in pids}
    ms = lat * 1000 if len(lat) else np.array([np.nan])
    return Result(
        items=items,
        workers=workers,
        inflight=inflight,
        requests=len(lat),
        errors=errors,
        rps=len(lat) / wall,
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
        max_ms=float(ms.max()),
        cpu_workers=per_req["workers"],
        cpu_client=per_req["client"],
        cpu_broker=per_req["broker"],
        cpu_redis=per_req["redis"],
        idle=(idle1 - idle0) / max(1e-9, (busy1 - busy0) + (idle1 - idle0)),
    )


def publish(store: StoreWriter, items: int, users: int, dim: int, version: int) -> None:
    t0 = time.perf_counter()
    vectors = fm_like_vectors(items, dim, seed=1)
    snapshot = ItemSnapshot(
        version=version, item_ids=[f"i{j}" for j in range(items)], vectors=vectors, bias=-1.0
    )
    store.put_item_snapshot(snapshot)
    user_ids = [f"u{j}" for j in range(users)]
    store.put_user_vectors(user_ids, fm_like_vectors(users, dim, seed=2, query=True), version)
    log.info(
        "published %d items x %d (v%d) and %d users in %.1fs",
        items,
        dim,
        version,
        users,
        time.perf_counter() - t0,
    )


# (label, file suffix, function) whose cumulative time is reported; "minus" rows subtract
PROFILE_PARTS = [
    ("poll: fetch + unpack records (+ idle wait)", "kafka/consumer/group.py", "poll"),
    ("decode requests (pydantic)", "serving/answering.py", "decode_request"),
    ("Redis: user vectors (+ histories)", "serving/answering.py", "__init__"),
    ("faiss search", "serving/index.py", "_search"),
    ("encode replies + producer.send", "serving/worker.py", "send"),
    ("settle acks + commit offsets", "serving/worker.py", "settle"),
    ("", "serving/worker.py", "commit"),
]


def profile_breakdown(path: Path) -> list[tuple[str, float]]:
    """Seconds of the worker's request thread by part (cProfile cumulative times)."""
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]

    def cum(suffix: str, func: str) -> float:
        return sum(v[3] for (f, _, fn), v in stats.items() if f.endswith(suffix) and fn == func)

    total = cum("serving/worker.py", "run")
    parts: list[tuple[str, float]] = []
    for label, suffix, func in PROFILE_PARTS:
        if label:
            parts.append((label, cum(suffix, func)))
        else:
            parts[-1] = (parts[-1][0], parts[-1][1] + cum(suffix, func))
    handle = cum("serving/worker.py", "handle")
    inside = sum(v for label, v in parts[1:4])
    parts.insert(4, ("rest of answering (numpy, exclusions, reply lists)", handle - inside))
    parts.append(("other (loop, metrics, ...)", total - sum(v for _, v in parts)))
    parts.append(("request thread total", total))
    return parts


def profile_pass(
    base: Settings, store: VectorStore, run_dir: Path, version: int, args: argparse.Namespace
) -> list[tuple[str, float]]:
    """One worker under cProfile at 100k items: where its request thread spends the time."""
    settings = base.model_copy(update={"serving_group": f"bench-profile-{uuid.uuid4().hex[:6]}"})
    path = run_dir / "worker.prof"
    workers = [start_worker(settings, run_dir / "worker-profiled.log", path)]
    client = None
    try:
        wait_workers(store, workers, version)
        client = LoadClient(settings, args.users, args.k)
        client.warm_up(64)
        lat, _, _ = client.run(args.seconds, 64)
        log.info("profiled pass: %d answers in %.0f s", len(lat), args.seconds)
    finally:
        if client is not None:
            client.close()
        stop_workers(workers)
    if not path.exists():
        return []
    pstats.Stats(str(path)).sort_stats("tottime").print_stats(20)
    return profile_breakdown(path)


def headline(results: list[Result]) -> dict[str, float | int]:
    """100k items, 1 worker: the most requests/s with p99 within the target, else the most."""
    rows = [r for r in results if r.items == 100_000 and r.workers == 1] or results
    within = [r for r in rows if r.p99_ms <= P99_TARGET_MS]
    best = max(within or rows, key=lambda r: r.rps)
    return {
        "rps": round(best.rps),
        "p50_ms": round(best.p50_ms, 1),
        "p99_ms": round(best.p99_ms, 1),
        "inflight": best.inflight,
    }


# --- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--items", default="100000,1000000", help="item counts")
    parser.add_argument("--workers", default="1,2", help="worker process counts")
    parser.add_argument(
        "--inflight", default="16,64,256", help="requests kept in flight (a list is swept)"
    )
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=34, help="vector width (32 factors + 2)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per row")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run one worker under cProfile (100k items, 64 in flight; "
        "not in the table) and report where its time goes",
    )
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)

    run_dir = Path(tempfile.mkdtemp(prefix="fmstream-bench-serve-"))
    base = bench_settings(run_dir)
    started = time.perf_counter()
    results: list[Result] = []
    breakdown: list[tuple[str, float]] = []
    ok = False
    try:
        log.info("services: %s", services.up(base))
        pids = {
            "broker": [p for p in [service_pid(base, "kafka")] if p],
            "redis": [p for p in [service_pid(base, "redis")] if p],
            "client": [os.getpid()],
        }
        client = redis_client(base.redis_config())
        store = VectorStore(client, base.redis_keys())
        writer = StoreWriter(client, base.redis_keys(), base.keep_versions)
        version = 0
        for items in [int(x) for x in args.items.split(",")]:
            version += 1
            publish(writer, items, args.users, args.dim, version)
            for n_workers in [int(x) for x in args.workers.split(",")]:
                settings = base.model_copy(
                    update={
                        "serving_group": f"bench-serving-{items}-{n_workers}-{uuid.uuid4().hex[:6]}"
                    }
                )
                workers = [
                    start_worker(settings, run_dir / f"worker-{items}-{j}.log", None)
                    for j in range(n_workers)
                ]
                client = None
                try:
                    wait_workers(store, workers, version)
                    client = LoadClient(settings, args.users, args.k)
                    pids["workers"] = [w.pid for w in workers]
                    sweep = [int(x) for x in args.inflight.split(",")]
                    client.warm_up(sweep[0])  # group settled, caches warm
                    client.drain(1.0)
                    for inflight in sweep:
                        res = measure(
                            settings, client, pids, items, n_workers, inflight, args.seconds
                        )
                        log.info("%s", res)
                        results.append(res)
                finally:
                    if client is not None:
                        client.close()
                    stop_workers(workers)
            if args.profile and items == 100_000:
                breakdown = profile_pass(base, store, run_dir, version, args)
        ok = True
    finally:
        services.down(base)
        if ok:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            print(f"logs kept in {run_dir}", file=sys.stderr)

    rows = [r.row() for r in results]
    print_table("Serving through Kafka: u2i k=10, closed loop (" + TARGET + ")", COLUMNS, rows)
    summary = summary_line(**headline(results))
    notes = (
        f"{TARGET}. Client: one process, closed loop, pre-encoded u2i requests; cpu ms/req "
        "= CPU time each process spent per answered request while measured (2 cores "
        f"shared by workers, client, broker and Redis). Wall time "
        f"{time.perf_counter() - started:.0f} s. Load average at the end "
        f"{os.getloadavg()[0]:.1f} (idle = share of the machine's CPU time left idle while "
        "measured; other tenants may share it). OPENBLAS_CORETYPE="
        f"{os.environ.get('OPENBLAS_CORETYPE', '(unset)')}."
    )
    if breakdown:
        total = breakdown[-1][1] or 1.0
        print_table(
            "Where one worker's request thread spends its time (cProfile, 100k items, "
            "64 in flight)",
            ["part", "seconds", "share"],
            [[label, f"{sec:.2f}", f"{sec / total:.0%}"] for label, sec in breakdown],
        )
        notes += (
            " Worker request thread under cProfile (100k items, 64 in flight): "
            + "; ".join(f"{label} {sec / total:.0%}" for label, sec in breakdown[:-1])
            + "."
        )
    if not args.no_record:
        record("Serving (bench/serve.py)", COLUMNS, rows, summary, notes)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
