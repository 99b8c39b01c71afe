"""Freshness and hot-swap benchmark: the whole loop under a steady event stream.

Starts its own Kafka and Redis (``fmstream.services.up`` on a private run dir and ports 22092 /
22093 / 22379, or ones the OS picks when those are taken), then as subprocesses, exactly as
deployed: the trainer with its publisher (``fmstream train``), one serving worker
(``fmstream serve``) and a producer of synthetic events at ``--rate`` events/s
(``fmstream replay --rate``). In this process one single-threaded loop runs two things side by side:

- **freshness probes**: every ``--probe-every`` seconds one event of a brand-new user (no vector,
  no profile, so u2i answers with ``"fallback": "popular"``) is produced, then u2i for that user
  is asked again and again until an answer has no fallback: the user's vector, learned from that
  very event, has been published and read. Freshness = produce to that first answer.
- **request load**: ``--inflight`` u2i requests for known users kept in flight, each recorded
  with its latency, error and the model version it names.

Phase 1 (``--seconds``): with ``publish_items_s=1`` the index swaps about every second under
load; every failed request (error or no answer) is counted. Phase 2: the event producer is
stopped, the trainer goes idle and no snapshot is published; the same load runs for
``--quiet-seconds``. The request p99 with swaps is compared with the p99 without (target: within
2x); so is, within phase 1 (same load), the p99 of requests sent near a swap with the others'.

Prints a table, appends it with the machine to ``bench/RESULTS.md``; the last line is
``fresh_p50_s=... fresh_p99_s=... swap_failed=...`` (targets: p50 <= 1 s, p99 <= 3 s, 0 failed).
Runs in about 3 minutes.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
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
if str(ROOT) not in sys.path:  # run as a script from anywhere: `python bench/freshness.py`
    sys.path.insert(0, str(ROOT))

from kafka import KafkaConsumer, TopicPartition  # noqa: E402

from bench.common import print_table, record, request_io, summary_line  # noqa: E402
from bench.openloop import PoissonArrivals  # noqa: E402
from bench.serve import bench_settings, cpu_seconds, service_pid, stop_workers  # noqa: E402
from fmstream import services  # noqa: E402
from fmstream.settings import Settings  # noqa: E402
from serving.store import VectorStore  # noqa: E402
from stream.connect import kafka_consumer, redis_client  # noqa: E402

log = logging.getLogger("bench.freshness")

TARGETS = (
    "targets: freshness p50 <= 1 s, p99 <= 3 s; 0 failed requests over >= 20 swaps; "
    "request p99 with swaps within 2x of p99 without"
)
COLUMNS = ["measure", "count", "p50", "p99", "max", "notes"]
SWAP_WINDOW_S = (0.2, 0.1)
"""A request sent from 200 ms before to 100 ms after a swap (the first answer naming the new
version) is "near a swap": the snapshot is loaded and indexed just before that answer."""
ANSWER_TIMEOUT_S = 10.0
"""A request without an answer after this long counts as failed."""


# --- processes -----------------------------------------------------------------------------


def spawn(settings: Settings, args: list[str], log_path: Path,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m fmstream.cli ARGS`` with the settings (and ``env``) in its environment."""
    env = {**os.environ, **settings.to_env(), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "fmstream.cli", *args],
        env=env,
        cwd=ROOT,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )


def end_offsets(consumer: KafkaConsumer, topic: str) -> int:
    parts = consumer.partitions_for_topic(topic) or set()
    ends = consumer.end_offsets([TopicPartition(topic, p) for p in parts])
    return int(sum(ends.values()))


# --- the measuring loop --------------------------------------------------------------------


@dataclass
class Sample:
    sent: float  # open loop: the scheduled send time
    answered: float
    version: int | None
    error: str | None
    issued: float | None = None  # open loop: when the client actually sent it


@dataclass
class Probe:
    user: str
    produced: float
    asking: bytes | None = None  # request id in flight
    asked_at: float = 0.0
    asks: int = 0


class Loop:
    """Load requests and freshness probes over one producer and one reply reader (no threads)."""

    def __init__(self, settings: Settings, users: int, items: int,
                 request_rate: float | None = None, seed: int = 0) -> None:
        """``request_rate``: None keeps ``inflight_n`` requests in flight (closed loop); a rate
        sends Poisson arrivals at that many requests/s whatever the answers do (open loop,
        :class:`bench.openloop.PoissonArrivals`, gaps drawn from ``seed``), each request's
        latency counted from its scheduled send time."""
        self.settings = settings
        self.request_rate = request_rate
        self.arrival_rng = np.random.default_rng(seed)
        self.arrivals: PoissonArrivals | None = None  # the current (or last) phase's, open loop
        self.users = users
        self.items = items
        self.rng = np.random.default_rng(0)
        self.producer, self.consumer = request_io(settings, "bench-freshness")
        self.prefix = uuid.uuid4().hex[:8]
        self.n = 0
        self.inflight: dict[bytes, float] = {}  # load request id -> sent (open: scheduled)
        self.issued: dict[bytes, float] = {}  # open loop: load request id -> actually sent
        self.probe_of: dict[bytes, Probe] = {}  # probe request id -> its probe
        self.samples: list[Sample] = []
        self.fresh: list[float] = []
        self.probe_errors = 0

    def _request(self, user: str) -> bytes:
        self.n += 1
        rid = f"{self.prefix}-{self.n}".encode()
        value = b'{"request_id":"%s","type":"u2i","user_id":"%s","k":10}' % (rid, user.encode())
        self.producer.send(self.settings.topic_requests, key=rid, value=value)
        return rid

    def _load_request(self) -> bytes:
        return self._request(f"u{int(self.rng.integers(self.users))}")

    def _start_phase(self, seconds: float) -> float:
        """The phase's end (perf_counter); open loop: its arrivals, drawn now."""
        start = time.perf_counter()
        if self.request_rate is not None:
            self.arrivals = PoissonArrivals(self.request_rate, seconds, start, self.arrival_rng)
        return start + seconds

    def _send_due(self) -> None:
        """Open loop: send the arrivals due now, each in flight since its scheduled time."""
        sent = self.arrivals.send_due(time.perf_counter(), self._load_request, time.perf_counter)
        lags = self.arrivals.lags[len(self.arrivals.lags) - len(sent):]
        for (rid, scheduled), lag in zip(sent, lags, strict=True):
            self.inflight[rid] = scheduled
            self.issued[rid] = scheduled + lag

    def _probe_event(self) -> Probe:
        user = f"probe-{self.prefix}-{self.n}"
        item = f"i{int(self.rng.integers(self.items))}"
        event = {
            "user_id": user,
            "item_id": item,
            "label": 1,
            "ts": time.time(),
            "context": {"hour": "12"},
        }
        produced = time.perf_counter()
        self.producer.send(self.settings.topic_events, key=user.encode(), value=orjson.dumps(event))
        self.n += 1
        return Probe(user, produced)

    def run(self, seconds: float, inflight_n: int, probe_every: float | None) -> None:
        """Keep ``inflight_n`` load requests in flight (open loop: send the phase's arrivals)
        and probes going for ``seconds``."""
        end = self._start_phase(seconds)
        probes: list[Probe] = []
        next_probe = time.perf_counter()
        while time.perf_counter() < end or (probes and time.perf_counter() < end + 10):
            now = time.perf_counter()
            if probe_every is not None and now < end and now >= next_probe:
                probes.append(self._probe_event())
                next_probe += probe_every
            self._ask_probes(now, probes)
            self._load_and_answer(now, end, inflight_n, probes)
        if probes:
            log.warning("%d probes never reflected within 10 s after the phase", len(probes))
            self.fresh += [float("inf")] * len(probes)

    def _ask_probes(self, now: float, probes: list[Probe]) -> None:
        """Ask for every probe's user that has no request out (again after a timeout)."""
        for probe in probes:
            if probe.asking is not None and now - probe.asked_at > ANSWER_TIMEOUT_S:
                self.probe_of.pop(probe.asking, None)  # unanswered: failed, ask again
                self.probe_errors += 1
                probe.asking = None
            if probe.asking is None:
                probe.asking = self._request(probe.user)
                probe.asked_at = now
                probe.asks += 1
                self.probe_of[probe.asking] = probe

    def _load_and_answer(self, now: float, end: float, inflight_n: int,
                         probes: list[Probe]) -> None:
        """Top the load up to ``inflight_n`` (until ``end``), take the answers, expire the rest.
        Open loop: send the arrivals due instead, each in flight since its scheduled time, and
        wait for answers no longer than until the next arrival."""
        if self.arrivals is None:
            while now < end and len(self.inflight) < inflight_n:
                user = f"u{int(self.rng.integers(self.users))}"
                self.inflight[self._request(user)] = time.perf_counter()
            poll_ms = 5
        else:
            self._send_due()
            # whole ms, rounded up: a send is late by < 1 ms plus the poll's overshoot (both
            # counted in the latency and in arrivals.lags) rather than spin on a 0-ms poll
            wait = self.arrivals.wait_s(time.perf_counter())
            poll_ms = 5 if wait >= 0.005 else math.ceil(wait * 1000)
        for records in self.consumer.poll(timeout_ms=poll_ms).values():
            done = time.perf_counter()
            for r in records:
                self._answer(r.key, r.value, done, probes)
        self._expire(time.perf_counter())

    def _answer(self, key: bytes, value: bytes, done: float, probes: list[Probe]) -> None:
        sent = self.inflight.pop(key, None)
        probe = self.probe_of.pop(key, None)
        if sent is None and probe is None:
            return  # an answer from an earlier phase
        resp = orjson.loads(value)
        error = resp["error"]["code"] if resp.get("error") else None
        if sent is not None:
            self.samples.append(Sample(sent, done, resp.get("model_version"), error,
                                       self.issued.pop(key, None)))
            return
        probe.asking = None
        if probe not in probes:
            return  # a probe of an earlier phase, already counted there (as lost)
        if error is not None:
            self.probe_errors += 1
        elif resp.get("fallback") is None:
            self.fresh.append(done - probe.produced)
            probes.remove(probe)

    def _expire(self, now: float) -> None:
        late = [k for k, t in self.inflight.items() if now - t > ANSWER_TIMEOUT_S]
        for k in late:
            self.samples.append(Sample(self.inflight.pop(k), float("nan"), None, "no answer",
                                       self.issued.pop(k, None)))

    def drain(self, seconds: float = 3.0) -> None:
        """Wait for the load requests still in flight; the unanswered count as failed. Open
        loop: the phase's arrivals not sent yet (due between the loop's last turn and the
        phase's end) are sent first, late, their latency still from their schedule."""
        if self.arrivals is not None:
            self._send_due()
        end = time.perf_counter() + seconds
        while self.inflight and time.perf_counter() < end:
            for records in self.consumer.poll(timeout_ms=20).values():
                done = time.perf_counter()
                for r in records:
                    self._answer(r.key, r.value, done, [])
        for k, t in list(self.inflight.items()):
            self.samples.append(Sample(t, float("nan"), None, "no answer",
                                       self.issued.pop(k, None)))
            del self.inflight[k]

    def take(self) -> list[Sample]:
        out, self.samples = self.samples, []
        return out

    def close(self) -> None:
        self.producer.close(timeout=5)
        self.consumer.close()


# --- analysis ------------------------------------------------------------------------------


def pct(values: list[float] | np.ndarray, q: float) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.percentile(arr, q)) if len(arr) else float("nan")


def swap_times(samples: list[Sample]) -> list[float]:
    """When each newer version was first seen in an answer."""
    seen: list[float] = []
    last = None
    for s in sorted((s for s in samples if s.version is not None), key=lambda s: s.answered):
        if last is not None and s.version > last:
            seen.append(s.answered)
        last = s.version if last is None else max(last, s.version)
    return seen


def latency_ms(samples: list[Sample]) -> np.ndarray:
    return np.array([(s.answered - s.sent) * 1000 for s in samples if s.error is None])


def split_near_swaps(
    samples: list[Sample], swaps: list[float]
) -> tuple[list[Sample], list[Sample]]:
    """(sent near a swap, the others): see SWAP_WINDOW_S."""
    before, after = SWAP_WINDOW_S
    at = np.array(swaps)
    near, away = [], []
    for s in samples:
        i = np.searchsorted(at, s.sent - after)  # first swap at or after sent - after
        hit = i < len(at) and at[i] - s.sent <= before
        (near if hit else away).append(s)
    return near, away


# --- main ----------------------------------------------------------------------------------


def wait_versions_settle(store, quiet_s: float = 3.0, timeout_s: float | None = None) -> bool:
    """Return True once the store's item version has not moved for ``quiet_s`` seconds; False
    when ``timeout_s`` passed first (a trainer still draining a backlog keeps publishing)."""
    started = idle_since = time.monotonic()
    last = store.current_item_version()
    while time.monotonic() - idle_since < quiet_s:
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            log.warning("item versions still moving after %.0f s; measuring anyway", timeout_s)
            return False
        time.sleep(0.2)
        now_version = store.current_item_version()
        if now_version != last:
            idle_since, last = time.monotonic(), now_version
    return True


def tear_down(loop, procs: list, settings: Settings, run_dir: Path, *, keep_logs: bool) -> None:
    """Close the request loop, stop the processes and services; keep the logs after a failure."""
    if loop is not None:
        loop.close()
    stop_workers(procs)
    services.down(settings)
    if keep_logs:
        print(f"logs kept in {run_dir}", file=sys.stderr)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=5000.0, help="background events/s")
    parser.add_argument("--users", type=int, default=20_000, help="synthetic users")
    parser.add_argument("--items", type=int, default=5_000, help="synthetic items")
    parser.add_argument("--seconds", type=float, default=60.0, help="phase 1: swaps and probes")
    parser.add_argument("--quiet-seconds", type=float, default=20.0, help="phase 2: no swaps")
    parser.add_argument("--probe-every", type=float, default=0.5)
    parser.add_argument("--inflight", type=int, default=8, help="load requests in flight")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)

    run_dir = Path(tempfile.mkdtemp(prefix="fmstream-bench-fresh-"))
    settings = bench_settings(
        run_dir,
        ports=(22092, 22093, 22379),
        schema_path=ROOT / "config" / "synthetic.toml",
        publish_items_s=1.0,
        publish_active_s=1.0,
    )
    started = time.perf_counter()
    procs: dict[str, subprocess.Popen] = {}
    ok = False
    loop: Loop | None = None
    try:
        log.info("services: %s", services.up(settings))
        store = VectorStore(redis_client(settings.redis_config()), settings.redis_keys())
        procs["trainer"] = spawn(settings, ["-v", "train"], run_dir / "trainer.log")
        procs["worker"] = spawn(settings, ["-v", "serve"], run_dir / "worker.log")
        total = int(args.rate * (args.seconds + 60))
        procs["producer"] = spawn(
            settings,
            [
                "replay",
                "--events",
                str(total),
                "--rate",
                str(args.rate),
                "--users",
                str(args.users),
                "--items",
                str(args.items),
                "--clusters",
                "20",
            ],
            run_dir / "producer.log",
        )
        deadline = time.monotonic() + 120
        while not store.worker_versions():
            for name, p in procs.items():
                if p.poll() is not None:
                    raise SystemExit(f"{name} exited with {p.returncode}; see {run_dir}")
            if time.monotonic() > deadline:
                raise SystemExit(f"the worker never loaded a snapshot; see {run_dir}")
            time.sleep(0.5)
        loop = Loop(settings, args.users, args.items)
        loop.run(5.0, args.inflight, None)  # warm up: group settled, first versions out
        loop.drain()
        loop.take()
        offsets = kafka_consumer(settings.kafka_config())
        pids = {n: p.pid for n, p in procs.items()}
        cpu0 = {n: cpu_seconds(p) for n, p in pids.items()}
        cpu0["broker"] = cpu_seconds(service_pid(settings, "kafka") or 0)
        events0, t0 = end_offsets(offsets, settings.topic_events), time.perf_counter()

        # Phase 1: steady events, a snapshot about every second, probes and load.
        loop.run(args.seconds, args.inflight, args.probe_every)
        loop.drain()
        busy = loop.take()
        wall = time.perf_counter() - t0
        events = (end_offsets(offsets, settings.topic_events) - events0) / wall
        cpu = {n: (cpu_seconds(p) - cpu0[n]) / wall for n, p in pids.items()}
        cpu["broker"] = (cpu_seconds(service_pid(settings, "kafka") or 0) - cpu0["broker"]) / wall
        fresh, probe_errors = list(loop.fresh), loop.probe_errors

        # Phase 2: no events, so no new snapshot: the same load without swaps.
        stop_workers([procs["producer"]])
        wait_versions_settle(store)
        loop.run(args.quiet_seconds, args.inflight, None)
        loop.drain()
        quiet = loop.take()
        offsets.close()
        ok = True
    finally:
        tear_down(loop, list(procs.values()), settings, run_dir, keep_logs=not ok)

    swaps = swap_times(busy)
    quiet_swaps = swap_times(quiet)
    failed = sum(s.error is not None for s in busy) + probe_errors
    near, away = split_near_swaps(busy, swaps)
    lat_busy, lat_quiet = latency_ms(busy), latency_ms(quiet)
    lat_near, lat_away = latency_ms(near), latency_ms(away)
    fresh_s = np.array(fresh)
    ratio = pct(lat_busy, 99) / pct(lat_quiet, 99)
    near_ratio = pct(lat_near, 99) / pct(lat_away, 99)
    rows = [
        [
            "freshness (produce -> first u2i answer with the new user's vector)",
            len(fresh_s),
            f"{pct(fresh_s, 50):.2f} s",
            f"{pct(fresh_s, 99):.2f} s",
            f"{fresh_s.max():.2f} s",
            f"{probe_errors} probe errors; events {events:,.0f}/s achieved",
        ],
        [
            f"requests, {len(swaps)} swaps in {args.seconds:.0f} s (trainer + {args.rate:,.0f} "
            "events/s)",
            len(busy),
            f"{pct(lat_busy, 50):.1f} ms",
            f"{pct(lat_busy, 99):.1f} ms",
            f"{lat_busy.max():.0f} ms",
            f"{failed} failed",
        ],
        [
            "  of which sent near a swap (-200 ms .. +100 ms)",
            len(near),
            f"{pct(lat_near, 50):.1f} ms",
            f"{pct(lat_near, 99):.1f} ms",
            f"{lat_near.max() if len(lat_near) else float('nan'):.0f} ms",
            f"p99 {near_ratio:.2f}x the others' (same load)",
        ],
        [
            "  the others (away from swaps)",
            len(away),
            f"{pct(lat_away, 50):.1f} ms",
            f"{pct(lat_away, 99):.1f} ms",
            f"{lat_away.max() if len(lat_away) else float('nan'):.0f} ms",
            "",
        ],
        [
            f"requests, no swaps ({len(quiet_swaps)}), no events, {args.quiet_seconds:.0f} s",
            len(quiet),
            f"{pct(lat_quiet, 50):.1f} ms",
            f"{pct(lat_quiet, 99):.1f} ms",
            f"{lat_quiet.max():.0f} ms",
            f"{sum(s.error is not None for s in quiet)} failed; swap p99 / this p99 = {ratio:.2f}",
        ],
    ]
    print_table("Freshness and hot swap (" + TARGETS + ")", COLUMNS, rows)
    summary = summary_line(
        fresh_p50_s=round(pct(fresh_s, 50), 2),
        fresh_p99_s=round(pct(fresh_s, 99), 2),
        swap_failed=failed,
        swaps=len(swaps),
        p99_ratio=round(ratio, 2),
        near_swap_p99_ratio=round(near_ratio, 2),
    )
    load = os.getloadavg()
    notes = (
        f"{TARGETS}. CPU cores used in phase 1: "
        + ", ".join(f"{n} {v:.2f}" for n, v in cpu.items())
        + f". Load average at the end {load[0]:.1f} (other tenants share this box). "
        f"Settings: publish_active_s={settings.publish_active_s}, publish_items_s="
        f"{settings.publish_items_s}, {args.users} users, {args.items} items, "
        f"{args.inflight} load requests in flight. Wall time "
        f"{time.perf_counter() - started:.0f} s."
    )
    if not args.no_record:
        record("Freshness and hot swap (bench/freshness.py)", COLUMNS, rows, summary, notes)
    print(notes)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
