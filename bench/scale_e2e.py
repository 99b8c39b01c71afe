"""``bench/scale.py --part e2e``: freshness of active and inactive users at scale, as deployed.

See the docstring of bench/scale.py. Processes: Kafka, Redis, ``fmstream train``, ``fmstream
serve`` and ``fmstream replay --rate`` (synthetic users with a ``segment`` profile, items with a
``category``). This process runs one loop: load requests (``--inflight`` in flight, or
``--request-rate`` Poisson arrivals a second: the open loop of bench/openloop.py), active probes
(a new user's first event) and inactive probes (see :class:`InactiveProbe`).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import struct
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from bench.aof_bytes import AofWindow, short_note
from bench.aof_bytes import table as aof_table
from bench.common import print_table, record, summary_line
from bench.freshness import (
    Loop,
    Sample,
    end_offsets,
    latency_ms,
    pct,
    spawn,
    split_near_swaps,
    swap_times,
    tear_down,
    wait_versions_settle,
)
from bench.openloop import PoissonArrivals
from bench.scale import load_note, others
from bench.serve import bench_settings, cpu_seconds, runq_seconds, service_pid, stop_workers
from fmstream import services
from serving.deltas import DELTA_MAGIC, DeltaLog
from serving.store import VectorStore
from serving.users import decode_user_record
from stream.connect import kafka_consumer, redis_client

log = logging.getLogger("bench.scale")

INACTIVE_PER_PROBE = 3
"""Inactive users sharing each probe's brand-new segment value."""


@dataclass
class InactiveProbe:
    """Users ``members`` share a new segment value and never click; ``trigger`` (same value)
    clicks once at ``produced``. Done when a u2i answer for a member names a version >= the one
    that carried the value's row (the trigger's record version)."""

    trigger: str
    members: list[str]
    produced: float
    clicked: float = 0.0  # wall time of the click (time.time())
    carried: int | None = None  # the version whose delta carries the row
    record_at: float | None = None  # wall time the trigger's record was written (published_at)
    asking: dict[bytes, str] = field(default_factory=dict)
    done: float | None = None


class ScaleLoop(Loop):
    """freshness.Loop plus inactive-user probes."""

    def __init__(self, settings, users: int, items: int, store: VectorStore,
                 request_rate: float | None = None) -> None:
        super().__init__(settings, users, items, request_rate=request_rate)
        self.store = store
        self.inactive: list[InactiveProbe] = []
        self.inactive_fresh: list[float] = []
        self.inactive_lost = 0
        self._pending: list[tuple[str, list[str]]] = []
        self.probe_walls: list[tuple[str, float]] = []  # active probes: user, click wall time
        # (click perf_counter, freshness s) of active probes reflected; clicks of inactive ones
        self.fresh_at: list[tuple[float, float]] = []
        self.inactive_at: list[float] = []

    def prepare_inactive(self, n: int) -> None:
        """Profiles for ``n`` probes' users (each with its own new segment value), sent now so
        that they are applied (and their records published) before the probes start."""
        for j in range(n):
            seg = f"probe-{self.prefix}-{j}"
            trigger = f"trig-{self.prefix}-{j}"
            members = [f"inact-{self.prefix}-{j}-{m}" for m in range(INACTIVE_PER_PROBE)]
            for uid in [trigger, *members]:
                msg = {"user_id": uid, "features": {"segment": seg}}
                self.producer.send(self.settings.topic_users, key=uid.encode(),
                                   value=orjson.dumps(msg))
            self._pending.append((trigger, members))
        self.producer.flush()

    def _probe_event(self):  # noqa: ANN202 - as in Loop
        probe = super()._probe_event()
        self.probe_walls.append((probe.user, time.time() - (time.perf_counter() - probe.produced)))
        return probe

    def breakdown(self) -> dict[str, list[float]]:
        """Where the active probes' time went, from what Redis holds after the run: click ->
        the user's record written (trainer + the publisher's user cadence), click -> the start
        of the version the record is stamped with (its ``created_at``)."""
        log_ = DeltaLog(self.store.redis, self.store.key)
        out: dict[str, list[float]] = {"record": [], "version": []}
        created: dict[int, float | None] = {}
        for user, wall in self.probe_walls:
            raw = self.store.redis.get(self.store.keys.user(user))
            rec = decode_user_record(raw) if raw else None
            if rec is None:
                continue
            out["record"].append(rec.published_at - wall)
            if rec.version not in created:
                got = log_.get(rec.version, rec.version)
                created[rec.version] = got[0].created_at if got else None
            if created[rec.version] is not None:
                out["version"].append(created[rec.version] - wall)
        return out

    def fire_inactive(self) -> InactiveProbe | None:
        if not self._pending:
            return None
        trigger, members = self._pending.pop(0)
        event = {"user_id": trigger, "item_id": f"i{int(self.rng.integers(self.items))}",
                 "label": 1, "ts": time.time(), "context": {"hour": "12"}}
        produced, clicked = time.perf_counter(), time.time()
        self.producer.send(self.settings.topic_events, key=trigger.encode(),
                           value=orjson.dumps(event))
        probe = InactiveProbe(trigger, members, produced, clicked)
        self.inactive.append(probe)
        return probe

    def poll_inactive(self, now: float) -> None:
        for probe in self.inactive:
            if probe.done is not None:
                continue
            if probe.carried is None:
                raw = self.store.redis.get(self.store.keys.user(probe.trigger))
                rec = decode_user_record(raw) if raw else None
                # its record from before the click (the profile) is older: wait for a newer one
                clicked_at = time.time() - (time.perf_counter() - probe.produced)
                if rec is not None and rec.published_at >= clicked_at:
                    probe.carried = rec.version
                    probe.record_at = rec.published_at
            if not probe.asking:
                for m in probe.members:
                    probe.asking[self._request(m)] = m

    def answer_inactive(self, key: bytes, resp: dict, done: float) -> bool:
        for probe in self.inactive:
            if key in probe.asking:
                probe.asking.pop(key)
                v = resp.get("model_version")
                if (probe.done is None and probe.carried is not None and resp.get("error") is None
                        and resp.get("fallback") is None and v is not None and v >= probe.carried):
                    probe.done = done
                    self.inactive_fresh.append(done - probe.produced)
                return True
        return False

    def _answer(self, key, value, done, probes) -> None:  # noqa: ANN001 - as in Loop
        if self.inactive:
            resp = orjson.loads(value)
            n = len(self.inactive_fresh)
            if self.answer_inactive(key, resp, done):
                if len(self.inactive_fresh) > n:
                    self.inactive_at.append(done - self.inactive_fresh[-1])
                return
        probe = self.probe_of.get(key)
        n = len(self.fresh)
        super()._answer(key, value, done, probes)
        if probe is not None and len(self.fresh) > n:
            self.fresh_at.append((probe.produced, self.fresh[-1]))

    def run(self, seconds: float, inflight_n: int, probe_every: float | None) -> None:
        """Loop.run plus an inactive probe fired between two active ones."""
        end = self._start_phase(seconds)
        probes: list = []
        next_probe = time.perf_counter()
        next_fire = next_probe + (probe_every or 0) / 2
        while True:
            now = time.perf_counter()
            waiting = probes or any(p.done is None for p in self.inactive)
            if now >= end and not (waiting and now < end + 10):
                break
            if probe_every is not None and now < end:
                if now >= next_probe:
                    probes.append(self._probe_event())
                    next_probe += probe_every
                if now >= next_fire and self._pending:
                    self.fire_inactive()
                    next_fire += probe_every
            self._ask_probes(now, probes)
            self.poll_inactive(now)
            self._load_and_answer(now, end, inflight_n, probes)
        if probes:
            log.warning("%d active probes never reflected within 10 s", len(probes))
            self.fresh += [float("inf")] * len(probes)
        self.inactive_lost = sum(p.done is None for p in self.inactive)


class VersionWatch:
    """When each item version first showed up in Redis (``items:current``) and first served
    by the worker (its ``worker:{id}`` report, written right after its swap): wall times,
    polled every ``every_s`` from a thread of its own (the inactive-probe breakdown)."""

    def __init__(self, store: VectorStore, every_s: float = 0.005) -> None:
        self.store = store
        self.every_s = every_s
        self.head: list[tuple[int, float]] = []  # (version, wall first seen), versions ascending
        self.served: list[tuple[int, float]] = []
        self.created: dict[int, float] = {}  # version -> its delta's created_at (build start)
        self._log = DeltaLog(store.redis, store.key)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        r = self.store.redis
        keys = [self.store.keys.items_current()] + [
            self.store.keys.worker(w) for w in sorted(self.store.worker_versions())]
        while not self._stop.wait(self.every_s):
            try:
                values = r.mget(keys)
            except Exception as exc:  # noqa: BLE001 - a bench helper: say it, keep measuring
                log.warning("version watch: %r", exc)
                continue
            now = time.time()
            head = int(values[0]) if values[0] is not None else None
            served = [int(v) for v in values[1:] if v is not None]
            if head is not None and self.head and head > self.head[-1][0]:
                self._read_created(self.head[-1][0] + 1, head)
            for seen, v in ((self.head, head), (self.served, min(served, default=None))):
                if v is not None and (not seen or v > seen[-1][0]):
                    seen.append((v, now))

    def _read_created(self, first: int, last: int) -> None:
        """``created_at`` of deltas ``first .. last`` from their headers (GETRANGE: the
        blobs are MBs; deltas get trimmed after the next full snapshot, so read them now)."""
        magic = len(DELTA_MAGIC) + 4
        for v in range(first, last + 1):
            raw = self.store.redis.getrange(self._log.key(v), 0, 4095)
            if len(raw) < magic or not raw.startswith(DELTA_MAGIC):
                continue
            (n,) = struct.unpack_from("<I", raw, len(DELTA_MAGIC))
            try:
                self.created[v] = float(orjson.loads(raw[magic : magic + n])["created_at"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue

    @staticmethod
    def first_at(seen: list[tuple[int, float]], version: int) -> float | None:
        """Wall time a version >= ``version`` was first seen (None: never)."""
        for v, at in seen:
            if v >= version:
                return at
        return None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def inactive_breakdown(probes: list[InactiveProbe], watch: VersionWatch, store: VectorStore
                       ) -> dict[str, list[float]]:
    """Per reflected inactive probe, seconds from the click to each step of its path: the
    trigger's record written (trainer apply + the publisher's user cadence), the version that
    carries its row starts building (its delta's ``created_at``), that version in Redis
    (``items:current``), the worker serving it (its report after the swap), the member's
    answer naming it (the probe done)."""
    log_ = DeltaLog(store.redis, store.key)
    created: dict[int, float | None] = {}
    out: dict[str, list[float]] = {k: [] for k in ("record", "build", "redis", "worker",
                                                   "answer")}
    for p in probes:
        if p.done is None or p.carried is None or p.record_at is None:
            continue
        if p.carried not in created:
            if p.carried in watch.created:
                created[p.carried] = watch.created[p.carried]
            else:
                got = log_.get(p.carried, p.carried)
                created[p.carried] = got[0].created_at if got else None
        build, redis_at = created[p.carried], watch.first_at(watch.head, p.carried)
        worker_at = watch.first_at(watch.served, p.carried)
        if build is None or redis_at is None or worker_at is None:
            continue
        out["record"].append(p.record_at - p.clicked)
        out["build"].append(build - p.clicked)
        out["redis"].append(redis_at - p.clicked)
        out["worker"].append(worker_at - p.clicked)
        out["answer"].append(p.done - p.produced)
    return out


def breakdown_rows(parts: dict[str, list[float]], apply_wall_ms: float) -> list[list]:
    """Table rows: the inactive path's steps (cumulative from the click) and the step
    between each and the one before (p50 of the per-probe differences)."""
    names = [
        ("record", "the trigger's record written",
         "trainer apply + the publisher's tick; a record naming a key no version carries yet "
         "is written right after the version that ships it, with that tick's time"),
        ("build", "the version carrying its row starts building",
         "wait for the version tick (0 when the record waited for it)"),
        ("redis", "that version in Redis (items:current)", "the version's build + writes"),
        ("worker", "the worker serves it (its report after the swap)",
         f"worker poll + fetch + apply (apply wall p50 {apply_wall_ms:.0f} ms)"),
        ("answer", "a member's u2i answer names it", "requests in flight + answer"),
    ]
    rows = []
    prev: np.ndarray | None = None
    for key, what, step in names:
        v = np.asarray(parts[key], dtype=np.float64)
        d = v - prev if prev is not None else v
        rows.append([f"  click -> {what}", int(v.size), f"{pct(v, 50):.3f} s",
                     f"{pct(v, 99):.3f} s", "",
                     f"step p50 {pct(d, 50) * 1000:.0f} ms, p90 {pct(d, 90) * 1000:.0f} ms: "
                     f"{step}"])
        prev = v
    return rows


class RewriteWatch:
    """When Redis' AOF rewrites ran during a phase (``perf_counter`` start, end), polled every
    0.1 s from a thread of its own; with ``force_at`` it also starts one (BGREWRITEAOF) then."""

    def __init__(self, client, force_at: float | None = None) -> None:  # noqa: ANN001
        self.client = client
        self.force_at = force_at
        self.windows: list[tuple[float, float]] = []
        self.forced = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started: float | None = None
        done = None  # rewrites Redis counts as done (one shorter than a poll is seen by it)
        while not self._stop.wait(0.1):
            now = time.perf_counter()
            try:
                if self.force_at is not None and not self.forced and now >= self.force_at:
                    self.client.bgrewriteaof()
                    self.forced = True
                info = self.client.info("persistence")
            except Exception as exc:  # noqa: BLE001 - a bench helper: say it, keep measuring
                log.warning("AOF rewrite watch: %r", exc)
                continue
            busy = info.get("aof_rewrite_in_progress", 0)
            count = int(info.get("aof_rewrites", 0))
            if busy and started is None:
                started = now
            elif not busy and started is not None:
                self.windows.append((started, now))
                started = None
            elif not busy and done is not None and count > done:
                self.windows.append((now - 0.1, now))  # began and ended between two polls
            done = count
        if started is not None:
            self.windows.append((started, time.perf_counter()))

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join()
        return self.windows


def near_rewrite(clicks: list[float], windows: list[tuple[float, float]], before: float = 2.0
                 ) -> np.ndarray:
    """Which clicks came from ``before`` s ahead of a rewrite to its end (its tail reaches
    them)."""
    at = np.asarray(clicks, dtype=np.float64)
    hit = np.zeros(at.size, dtype=bool)
    for start, end in windows:
        hit |= (at >= start - before) & (at <= end)
    return hit


def worker_windows(log_path: Path, start: int, end: int | None = None) -> list[dict[str, float]]:
    """The worker's 10-s request-path summaries (serving/timing.py) logged between byte
    offsets ``start`` and ``end`` of its log."""
    from serving.timing import parse_stats

    with log_path.open("rb") as f:
        f.seek(start)
        text = f.read(None if end is None else max(0, end - start)).decode(errors="replace")
    return [parse_stats(line) for line in text.splitlines() if "request path, last" in line]


def apply_wall_p50_ms(log_path: Path, start: int, end: int | None = None) -> float:
    """Median over the worker's 10-s windows of its follower's apply wall p50 (ms)."""
    with log_path.open("rb") as f:
        f.seek(start)
        text = f.read(None if end is None else max(0, end - start)).decode(errors="replace")
    found = [float(m) for m in re.findall(r"follow: \d+ moves, \d+ versions; wall ([0-9.]+)/",
                                          text)]
    return float(np.median(found)) if found else float("nan")


def worker_note(windows: list[dict[str, float]]) -> tuple[str, dict[str, float]]:
    """Worst 10-s window of the worker's own request path, and the follower's apply cost."""
    def worst(key: str) -> float:
        return max((w[key] for w in windows if key in w), default=float("nan"))

    applies = [w["apply_cpu_p50_ms"] for w in windows if "apply_cpu_p50_ms" in w]
    stats = {
        "busy_p99_ms": worst("busy_p99_ms"), "blocked_p99_ms": worst("blocked_p99_ms"),
        "runq_p99_ms": worst("runq_p99_ms"), "queued_p99_ms": worst("queued_p99_ms"),
        "blocked_store_p99_ms": worst("blocked_store_p99_ms"),
        "blocked_other_p99_ms": worst("blocked_other_p99_ms"),
        "apply_cpu_ms": float(np.median(applies)) if applies else float("nan"),
        "versions": sum(w.get("versions", 0) for w in windows),
    }
    text = (f"worst 10-s window of {len(windows)}: batch busy p99 {stats['busy_p99_ms']:.1f} "
            f"ms (of which blocked on the store/GIL p99 {stats['blocked_p99_ms']:.1f} [in the "
            f"store reads {stats['blocked_store_p99_ms']:.1f}, elsewhere "
            f"{stats['blocked_other_p99_ms']:.1f}], waiting for a core p99 "
            f"{stats['runq_p99_ms']:.1f}), request queued in Kafka before its "
            f"poll p99 {stats['queued_p99_ms']:.1f} ms; follower apply CPU per move (median "
            f"of windows) {stats['apply_cpu_ms']:.1f} ms")
    return text, stats


def rewrite_rows(fresh_at: list[tuple[float, float]], inactive_at: list[float],
                 inactive: np.ndarray, windows: list[tuple[float, float]]) -> list[list]:
    """Freshness of the probes clicked from 2 s before an AOF rewrite to its end, and of the
    others (rows only when a rewrite ran in the phase)."""
    if not windows:
        return []
    rows = []
    clicks = [c for c, _ in fresh_at]
    active = np.array([f for _, f in fresh_at])
    for name, values, hit in (
        ("active", active, near_rewrite(clicks, windows)),
        ("inactive", np.asarray(inactive, dtype=np.float64)[: len(inactive_at)],
         near_rewrite(inactive_at, windows)),
    ):
        for label, sel in ((f"within a Redis AOF rewrite (2 s before it to its end; "
                            f"{len(windows)} rewrite(s), "
                            f"{sum(e - s for s, e in windows):.1f} s)", hit),
                           ("outside the rewrites", ~hit)):
            v = values[sel] if values.size == sel.size else np.zeros(0)
            rows.append([f"  {name} probes {label}", int(v.size),
                         f"{pct(v, 50):.2f} s" if v.size else "-",
                         f"{pct(v, 99):.2f} s" if v.size else "-",
                         f"{v.max():.2f} s" if v.size else "-", ""])
    return rows


LOAD_NOTE = (
    "Load rows: 'answered' = requests answered (an answer, error or not) per second of the "
    "phase; 'late' = how long after its scheduled time the client sent a request (open loop "
    "only: every latency there runs from the scheduled time, so that lateness is in it); CPU "
    "per answered request = the phase's CPU seconds of the worker, this client process and the "
    "broker over the load requests answered (probes not counted; with versions the worker's "
    "includes its follower, the client's its version and rewrite watchers, the broker's the "
    "5,000 events/s: an upper bound there; without events, request work alone). "
)


def load_model(request_rate: float | None, inflight: int) -> str:
    """How the bench's requests were driven, as the table and the record name it."""
    if request_rate is None:
        return f"closed loop, {inflight} in flight"
    return f"open loop, Poisson {request_rate:g} req/s, latency from the scheduled send"


def phase_load(samples: list[Sample], seconds: float, arrivals: PoissonArrivals | None,
               cpu_s: dict[str, float]) -> dict:
    """One phase's load figures: offered and answered rates, latency percentiles (answers
    without error), failed and unanswered counts, the client's lateness, CPU per answer."""
    answered = sum(1 for s in samples if np.isfinite(s.answered))
    lat = latency_ms(samples)
    from_send = np.array([(s.answered - s.issued) * 1000 for s in samples
                          if s.error is None and s.issued is not None])
    lags = np.asarray(arrivals.lags if arrivals is not None else [], dtype=np.float64) * 1000
    return {
        "offered_rps": round(arrivals.offered_rate, 1) if arrivals is not None else None,
        "answered_rps": round(answered / seconds, 1),
        "p50_ms": round(pct(lat, 50), 1), "p99_ms": round(pct(lat, 99), 1),
        "p999_ms": round(pct(lat, 99.9), 1),
        "failed": sum(s.error is not None for s in samples),
        "no_answer": sum(1 for s in samples if not np.isfinite(s.answered)),
        "late_p99_ms": round(pct(lags, 99), 2) if lags.size else None,
        # the same answers timed from the actual send (what an uncorrected client reports)
        "p99_from_send_ms": round(pct(from_send, 99), 1) if from_send.size else None,
        "cpu_ms": {n: v * 1000 / max(answered, 1) for n, v in cpu_s.items()},
    }


def load_row(model: str, load: dict) -> list:
    """A table row under a phase's requests row: the load it ran at and what it got."""
    offered = ("" if load["offered_rps"] is None
               else f"offered {load['offered_rps']:,.1f} req/s (drawn), ")
    late = ("" if load["late_p99_ms"] is None else
            f"; sent late p99 {load['late_p99_ms']} ms (p99 from the actual send "
            f"{load['p99_from_send_ms']} ms)")
    cpu = " / ".join(f"{v:.2f}" for v in load["cpu_ms"].values())
    return [f"  load: {model}", "", "", "", "",
            f"{offered}answered {load['answered_rps']:,.1f} req/s; p99.9 "
            f"{load['p999_ms']} ms; {load['failed']} failed ({load['no_answer']} no answer)"
            f"{late}; CPU ms per answered request worker / client / broker {cpu}"]


def part_e2e(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    run_dir = Path(tempfile.mkdtemp(prefix="fmstream-bench-scale-e2e-"))
    root = Path(__file__).resolve().parents[1]
    settings = bench_settings(
        run_dir, ports=(25092, 25093, 25379), schema_path=root / "config" / "synthetic.toml",
        publish_items_s=args.publish_items_s, publish_active_s=args.publish_active_s,
        swap_poll_s=0.1, item_tolerance=args.item_tolerance, item_max_age_s=args.item_max_age_s,
        item_delta_form=args.item_delta_form,
        **({} if args.redis_persistence is None else {"redis_persistence": args.redis_persistence}),
        **({} if args.offline_i2i_s is None else {"offline_i2i_s": args.offline_i2i_s}),
        **({} if args.publish_shared_s is None
           else {"publish_shared_s": args.publish_shared_s}),
        **({} if args.worker_slice_us is None else {"worker_slice_us": args.worker_slice_us}),
    )
    aof_on = settings.redis_persistence == "aof"
    procs = {}
    ok = False
    loop = None
    try:
        log.info("services: %s", services.up(settings))
        store = VectorStore(redis_client(settings.redis_config()), settings.redis_keys())
        if args.redis_aof_rewrite == "off":  # the A/B of RESULTS.md 'Redis' AOF rewrites'
            store.redis.config_set("auto-aof-rewrite-percentage", 0)
        procs["trainer"] = spawn(settings, ["-v", "train"], run_dir / "trainer.log")
        # unwrapped log lines: the request-path summaries are read back (worker_windows)
        procs["worker"] = spawn(settings, ["-v", "serve"], run_dir / "worker.log",
                                env={"COLUMNS": "2000"})
        # enough events for the longest setup too: the producer must outlive the measurement
        total = int(args.rate * (args.seconds + args.warmup + args.quiet_seconds
                                 + args.setup_timeout + 120))
        procs["producer"] = spawn(settings, [
            "replay", "--events", str(total), "--rate", str(args.rate), "--users",
            str(args.users), "--items", str(args.items), "--clusters", "20",
        ], run_dir / "producer.log")
        deadline = time.monotonic() + args.setup_timeout
        while not store.worker_versions():
            for name, p in procs.items():
                if p.poll() is not None:
                    raise SystemExit(f"{name} exited with {p.returncode}; see {run_dir}")
            if time.monotonic() > deadline:
                raise SystemExit(f"the worker never loaded a version; see {run_dir}")
            time.sleep(1.0)
        # wait until the trainer has caught up with the profiles (1M users take minutes)
        from fmstream.monitor import read_lag

        while True:
            lag = read_lag(settings).total(settings.trainer_group)
            log.info("trainer lag %d records", lag)
            if lag < args.rate * 12 or time.monotonic() > deadline:  # commits every 10 s
                break
            for name, p in procs.items():
                if p.poll() is not None:
                    raise SystemExit(f"{name} exited with {p.returncode}; see {run_dir}")
            time.sleep(3.0)
        setup_s = time.perf_counter() - started
        log.info("serving and caught up after %.0f s", setup_s)
        loop = ScaleLoop(settings, args.users, args.items, store, request_rate=args.request_rate)
        n_probes = int(args.seconds / args.probe_every) + 1
        loop.prepare_inactive(n_probes)
        loop.run(args.warmup, args.inflight, None)  # profiles applied, records published
        loop.drain()
        loop.take()
        offsets = kafka_consumer(settings.kafka_config())
        pids = {n: p.pid for n, p in procs.items()}
        cpu0 = {n: cpu_seconds(p) for n, p in pids.items()}
        redis_pid = service_pid(settings, "redis") or 0
        cpu0["redis"] = cpu_seconds(redis_pid)
        kafka_pid = service_pid(settings, "kafka") or 0
        # CPU per answered request, each phase: the worker, this client, the broker
        path_pids = {"worker": pids["worker"], "client": os.getpid(), "broker": kafka_pid}
        path0 = {n: cpu_seconds(p) for n, p in path_pids.items()}
        # seconds each waited for a core (Redis: its event-loop thread, which answers reads)
        waits = {**pids, "redis": redis_pid, "broker": kafka_pid}
        runq0 = {n: runq_seconds(p, main_thread=n == "redis") for n, p in waits.items()}
        events0, t0 = end_offsets(offsets, settings.topic_events), time.perf_counter()
        v0 = store.current_item_version() or 0
        mem0 = store.redis.info("stats").get("total_net_input_bytes", 0)
        rewrites0 = store.redis.info("persistence").get("aof_rewrites", 0)
        aof = AofWindow.start(store.redis, settings.redis_prefix) if aof_on else None
        saves0 = store.redis.info("persistence").get("rdb_saves", 0)

        worker_log = run_dir / "worker.log"
        at_busy = worker_log.stat().st_size
        # "mid": one rewrite forced halfway through the phase (what a user meets every few
        # minutes at the local services' threshold; README 'Redis persistence and AOF rewrites')
        watch = RewriteWatch(
            redis_client(settings.redis_config()),
            time.perf_counter() + args.seconds / 2 if args.redis_aof_rewrite == "mid" else None,
        )
        versions_watch = VersionWatch(store)
        sent0 = loop.n
        loop.run(args.seconds, args.inflight, args.probe_every)
        rewrite_windows = watch.stop()
        versions_watch.stop()
        loop.drain()
        busy = loop.take()
        busy_arrivals = loop.arrivals
        # probes' u2i requests on top of the load (loop.n also counts each active probe's event)
        probe_rps = (loop.n - sent0 - len(busy) - len(loop.probe_walls)) / args.seconds
        at_quiet_end = worker_log.stat().st_size
        wall = time.perf_counter() - t0
        path_busy_cpu = {n: cpu_seconds(p) - path0[n] for n, p in path_pids.items()}
        events = (end_offsets(offsets, settings.topic_events) - events0) / wall
        cpu = {n: (cpu_seconds(p) - cpu0[n]) / wall for n, p in pids.items()}
        cpu["redis"] = (cpu_seconds(redis_pid) - cpu0["redis"]) / wall
        runq = {n: (runq_seconds(p, main_thread=n == "redis") - runq0[n]) / wall
                for n, p in waits.items()}
        redis_in = (store.redis.info("stats").get("total_net_input_bytes", 0) - mem0) / wall
        aof_rewrites = store.redis.info("persistence").get("aof_rewrites", 0) - rewrites0
        aof_sizes, aof_counts, _ = aof.stop() if aof is not None else (Counter(), Counter(), 0)
        forks = store.redis.info("persistence").get("rdb_saves", 0) - saves0 + aof_rewrites
        persistence = store.redis.info("persistence")
        redis_mb = (store.redis.info("memory").get("used_memory", 0) / 1e6,
                    persistence.get("aof_current_size", 0) / 1e6)
        parts = loop.breakdown()
        inactive_parts = inactive_breakdown(loop.inactive, versions_watch, store)
        versions = (store.current_item_version() or 0) - v0
        fresh, probe_errors = list(loop.fresh), loop.probe_errors
        inactive, inactive_lost = list(loop.inactive_fresh), loop.inactive_lost

        stop_workers([procs["producer"]])
        # a trainer still draining a backlog (an overloaded box) keeps publishing: bounded
        settled = wait_versions_settle(store, timeout_s=120)
        loop.inactive = []
        at_quiet = worker_log.stat().st_size
        path0 = {n: cpu_seconds(p) for n, p in path_pids.items()}
        loop.run(args.quiet_seconds, args.inflight, None)
        loop.drain()
        quiet = loop.take()
        path_quiet_cpu = {n: cpu_seconds(p) - path0[n] for n, p in path_pids.items()}
        quiet_arrivals = loop.arrivals
        offsets.close()
        # the worker logs a window every 10 s: wait for the one that closes the quiet phase
        deadline = time.monotonic() + 15
        while (len(worker_windows(worker_log, at_quiet)) < 2 and time.monotonic() < deadline):
            time.sleep(0.5)
        path_busy = worker_note(worker_windows(worker_log, at_busy, at_quiet_end))
        apply_wall = apply_wall_p50_ms(worker_log, at_busy, at_quiet_end)
        path_quiet = worker_note(worker_windows(worker_log, at_quiet))
        ok = True
    finally:
        tear_down(loop, list(procs.values()), settings, run_dir,
                  keep_logs=not ok or args.keep_logs)

    swaps = swap_times(busy)
    failed = sum(s.error is not None for s in busy) + probe_errors
    lost = sum(1 for f in fresh if not np.isfinite(f))
    near, away = split_near_swaps(busy, swaps)
    lat_busy, lat_quiet = latency_ms(busy), latency_ms(quiet)
    quiet_versions = len(swap_times(quiet))
    fresh_ok = np.array([f for f in fresh if np.isfinite(f)])
    inact = np.array(inactive)
    ratio = pct(lat_busy, 99) / pct(lat_quiet, 99)
    model = load_model(args.request_rate, args.inflight)
    load_busy = phase_load(busy, args.seconds, busy_arrivals, path_busy_cpu)
    load_quiet = phase_load(quiet, args.quiet_seconds, quiet_arrivals, path_quiet_cpu)
    cols = ["measure", "count", "p50", "p99", "max", "notes"]
    rows = [
        ["freshness, active (new user's click -> u2i from its own vector)", len(fresh),
         f"{pct(fresh_ok, 50):.2f} s", f"{pct(fresh_ok, 99):.2f} s",
         f"{fresh_ok.max() if len(fresh_ok) else float('nan'):.2f} s",
         f"{lost} lost, {probe_errors} probe errors"],
        ["  click -> the probe user's record written", len(parts["record"]),
         f"{pct(parts['record'], 50):.2f} s", f"{pct(parts['record'], 99):.2f} s", "",
         "trainer + publisher's user cadence"],
        ["  click -> its record's version starts publishing", len(parts["version"]),
         f"{pct(parts['version'], 50):.2f} s", f"{pct(parts['version'], 99):.2f} s", "",
         "then: publish, worker poll + apply, answer"],
        ["freshness, inactive (shared row changed -> u2i naming a version that carries it)",
         len(inact) + inactive_lost, f"{pct(inact, 50):.2f} s", f"{pct(inact, 99):.2f} s",
         f"{inact.max() if len(inact) else float('nan'):.2f} s", f"{inactive_lost} lost"],
        *breakdown_rows(inactive_parts, apply_wall),
        *rewrite_rows(loop.fresh_at, loop.inactive_at, inact, rewrite_windows),
        [f"requests, {len(swaps)} versions in {args.seconds:.0f} s ({versions} published)",
         len(busy), f"{pct(lat_busy, 50):.1f} ms", f"{pct(lat_busy, 99):.1f} ms",
         f"{lat_busy.max() if len(lat_busy) else float('nan'):.0f} ms",
         f"{failed} failed; events {events:,.0f}/s achieved; probes' own u2i requests "
         f"{probe_rps:,.0f}/s on top of the load"],
        load_row(model, load_busy),
        ["  of which near a version change", len(near), f"{pct(latency_ms(near), 50):.1f} ms",
         f"{pct(latency_ms(near), 99):.1f} ms", "", ""],
        [f"requests, no events, {quiet_versions} versions (0 unless the trainer lagged), "
         f"{args.quiet_seconds:.0f} s", len(quiet),
         f"{pct(lat_quiet, 50):.1f} ms", f"{pct(lat_quiet, 99):.1f} ms",
         f"{lat_quiet.max() if len(lat_quiet) else float('nan'):.0f} ms",
         f"p99 with versions / without = {ratio:.2f}"],
        load_row(model, load_quiet),
    ]
    title = (f"Freshness at {args.users:,} users x {args.items:,} items (bench/scale.py --part "
             f"e2e; requests: {model})")
    print_table(title, cols, rows)
    aof_total = sum(aof_sizes.values())
    if aof_on:
        print_table("Redis AOF bytes appended in the measured phase, by kind of write",
                    ["kind", "MB/s", "bytes / event", "commands / s", "share"],
                    aof_table(aof_sizes, aof_counts, wall, events * wall))
        persisted = (
            f"Redis AOF appended {aof_total / wall / 1e6:.2f} MB/s = "
            f"{aof_total / max(events * wall, 1):.0f} bytes per event (by kind, MB/s: "
            f"{short_note(aof_sizes, wall)}); Redis data set {redis_mb[0]:.0f} MB, AOF "
            f"{redis_mb[1]:.0f} MB at the end of the phase; Redis AOF rewrites in the measured "
            f"phase {aof_rewrites} (automatic rewrite {args.redis_aof_rewrite}; each forks Redis "
            "and runs a rewrite child on the same cores, not in Redis' CPU figure)"
        )
    else:
        persisted = (
            f"Redis persistence none (no AOF, no RDB): Redis data set {redis_mb[0]:.0f} MB at "
            f"the end of the phase; forks of Redis (AOF rewrites + RDB saves) in the measured "
            f"phase {forks}"
        )
    notes = (
        "Targets (issue 10): active p50 <= 0.5 s, p99 <= 1.5 s, 0 probes lost, 0 failed over "
        ">= 30 versions, p99 with versions <= 2x without. CPU cores in the measured phase: "
        + ", ".join(f"{n} {v:.2f}" for n, v in cpu.items())
        + "; seconds per second waiting for a core (run queue, all threads): "
        + ", ".join(f"{n} {v:.3f}" for n, v in runq.items())
        + " (redis: its event-loop thread)"
        + f"; Redis input {redis_in / 1e6:.1f} MB/s = {redis_in / max(events, 1):.0f} bytes "
        f"per event; {persisted}. Settings: redis_persistence={settings.redis_persistence}, "
        f"publish_items_s={settings.publish_items_s}, "
        f"publish_shared_s={settings.publish_shared_s}, offline_i2i_s={settings.offline_i2i_s}, "
        f"publish_active_s="
        f"{settings.publish_active_s}, swap_poll_s={settings.swap_poll_s}, "
        f"item_delta_form={settings.item_delta_form}, item_tolerance={settings.item_tolerance}, "
        f"item_max_age_s={settings.item_max_age_s}, trainer_nice={settings.trainer_nice}, "
        f"worker_slice_us={settings.worker_slice_us}, "
        f"{args.rate:,} events/s, requests: {model}. Setup (profiles of "
        f"{args.users:,} users applied, first version served) {setup_s:.0f} s. "
        + ("" if settled else "Versions had NOT settled 120 s after the producer stopped "
           "(the trainer was still draining a backlog): the phase without events still had "
           "versions and a busy trainer. ")
        + f"Worker's own request path (serving/timing.py), with versions: {path_busy[0]}; "
        f"without: {path_quiet[0]}. "
        + LOAD_NOTE
        + f"{load_note()} at the end; sharing the box: {others()}. Wall "
        f"{time.perf_counter() - started:.0f} s. Worker, trainer and Redis logs: {run_dir} "
        + ("(kept)." if args.keep_logs else "(removed).")
    )
    print(notes)
    line = summary_line(
        load_model="closed" if args.request_rate is None else "open",
        probe_rps_busy=round(probe_rps, 1),
        request_rate=args.inflight if args.request_rate is None else args.request_rate,
        **{f"{k}_{phase}": v for phase, d in (("busy", load_busy), ("quiet", load_quiet))
           for k, v in d.items() if k != "cpu_ms"},
        **{f"cpu_ms_per_request_{n}_{phase}": round(v, 2)
           for phase, d in (("busy", load_busy), ("quiet", load_quiet))
           for n, v in d["cpu_ms"].items()},
        active_p50_s=round(pct(fresh_ok, 50), 2), active_p99_s=round(pct(fresh_ok, 99), 2),
        active_lost=lost, inactive_p50_s=round(pct(inact, 50), 2),
        inactive_p99_s=round(pct(inact, 99), 2), inactive_lost=inactive_lost, failed=failed,
        versions=len(swaps), p99_ratio=round(ratio, 2), redis_forks=forks,
        redis_in_bytes_per_event=round(redis_in / max(events, 1)), aof_rewrites=aof_rewrites,
        rewrite_seconds=round(sum(e - b for b, e in rewrite_windows), 1),
        aof_mb_s=round(aof_total / wall / 1e6, 2),
        aof_bytes_per_event=round(aof_total / max(events * wall, 1)),
        worker_busy_p99_ms=path_busy[1]["busy_p99_ms"],
        worker_busy_p99_ms_quiet=path_quiet[1]["busy_p99_ms"],
        worker_blocked_p99_ms=path_busy[1]["blocked_p99_ms"],
        worker_queued_p99_ms=path_busy[1]["queued_p99_ms"],
        worker_queued_p99_ms_quiet=path_quiet[1]["queued_p99_ms"],
        apply_cpu_ms=path_busy[1]["apply_cpu_ms"],
        **{f"inactive_{k}_p50_s": round(pct(v, 50), 3) for k, v in inactive_parts.items()},
    )
    print(line)
    if not args.no_record:
        record(f"Scale: freshness at {args.users:,} users x {args.items:,} items "
               f"(bench/scale.py --part e2e; requests: {model})", cols, rows, line, notes)


__all__ = ["part_e2e"]
