"""Where a worker's time goes: per-batch request-path pieces and per-version apply costs.

The request thread records one :class:`BatchTimes` per answered batch and the follow thread one
:class:`ApplyTimes` per version it moved to; :class:`PathLog` logs a summary of both every
``every_s`` seconds (``request path, last 10 s: ...``), which the scale bench reads back. Wall
and thread-CPU times are both kept: wall minus CPU of a piece is time the thread waited (I/O,
the GIL, or a core), which is what versions arriving on another thread can add.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchTimes:
    """One answered batch (seconds)."""

    requests: int
    queued: float  # oldest record: its Kafka timestamp -> the poll that returned it
    decode: float
    store: float  # user records / histories from Redis (and composing users)
    answer: float  # the rest of answering (searches, lists)
    send: float  # handing the replies to the producer
    cpu: float  # thread CPU of decode + answer + send
    runq: float = 0.0  # of the same span, waiting for a core (Linux schedstat; else 0)
    store_idle: float = 0.0  # of ``store``, neither running nor waiting for a core

    @property
    def blocked(self) -> float:
        """Neither running nor waiting for a core: the store's round trips and the GIL."""
        return max(0.0, self.decode + self.store + self.answer + self.send - self.cpu - self.runq)

    @property
    def blocked_store(self) -> float:
        """Of :attr:`blocked`, the part inside the store reads (Redis round trips, Redis busy
        with other clients' commands, the GIL on the way back)."""
        return min(self.store_idle, self.blocked)

    @property
    def blocked_other(self) -> float:
        """Of :attr:`blocked`, the rest: decode, search and send waiting for the GIL (another
        thread of the process: the follower's apply, Kafka's IO threads) or BLAS threads."""
        return self.blocked - self.blocked_store


@dataclass(frozen=True)
class ApplyTimes:
    """One move of the follower to a newer version (seconds)."""

    versions: int  # deltas applied (1 per published version when it keeps up)
    wall: float
    cpu: float
    fetch: float  # reading (and decoding) the deltas from Redis
    wait: float  # waiting for the standby copy's readers


def thread_clock() -> tuple[float, float]:
    """(CPU seconds, seconds waiting for a core) of the calling thread so far.

    From ``/proc/thread-self/schedstat`` on Linux; elsewhere ``time.thread_time()`` and 0.
    """
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            run, wait, _ = f.read().split(maxsplit=2)
        return int(run) / 1e9, int(wait) / 1e9
    except (OSError, ValueError):
        return time.thread_time(), 0.0


class PathLog:
    """Collects :class:`BatchTimes` and :class:`ApplyTimes`; :meth:`maybe_log` summarises."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._batches: deque[BatchTimes] = deque(maxlen=100_000)
        self._applies: deque[ApplyTimes] = deque(maxlen=10_000)
        self._lock = threading.Lock()
        self._since = time.monotonic()

    def batch(self, times: BatchTimes) -> None:
        self._batches.append(times)

    def applied(self, times: ApplyTimes) -> None:
        with self._lock:
            self._applies.append(times)

    def maybe_log(self) -> str | None:
        """Log (and return) the summary when ``every_s`` passed since the last one."""
        now = time.monotonic()
        if now - self._since < self.every_s:
            return None
        span, self._since = now - self._since, now
        batches = list(self._batches)
        self._batches.clear()
        with self._lock:
            applies = list(self._applies)
            self._applies.clear()
        if not batches and not applies:
            return None
        line = summarise(span, batches, applies)
        log.info("%s", line)
        return line


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    a = np.asarray(values) * 1000
    return f"{np.percentile(a, 50):.1f}/{np.percentile(a, 99):.1f}/{a.max():.1f}"


def summarise(span: float, batches: list[BatchTimes], applies: list[ApplyTimes]) -> str:
    """One line: per-batch pieces as p50/p99/max ms, then the follower's applies."""
    n = sum(b.requests for b in batches)
    parts = [f"request path, last {span:.0f} s: {n} requests in {len(batches)} batches"]
    if batches:
        parts.append("per batch p50/p99/max ms: " + ", ".join(
            f"{name} {_ms([getattr(b, name) for b in batches])}"
            for name in ("queued", "decode", "store", "answer", "send", "cpu", "runq", "blocked",
                         "blocked_store", "blocked_other")
        ))
        busy = [b.decode + b.store + b.answer + b.send for b in batches]
        parts.append(f"busy {_ms(busy)}")
    if applies:
        parts.append(
            f"follow: {len(applies)} moves, {sum(a.versions for a in applies)} versions; wall "
            f"{_ms([a.wall for a in applies])}, cpu {_ms([a.cpu for a in applies])}, fetch "
            f"{_ms([a.fetch for a in applies])}, reader wait {_ms([a.wait for a in applies])}; "
            f"follow cpu {sum(a.cpu for a in applies) / span * 100:.1f}% of a core"
        )
    stats = {"batches": len(batches), "requests": n}
    if batches:
        for name in ("queued", "busy", "blocked", "blocked_store", "blocked_other", "runq", "cpu"):
            values = busy if name == "busy" else [getattr(b, name) for b in batches]
            stats[f"{name}_p99_ms"] = round(float(np.percentile(values, 99)) * 1000, 2)
    if applies:
        stats["apply_cpu_p50_ms"] = round(float(np.median([a.cpu for a in applies])) * 1000, 2)
        stats["apply_wall_p99_ms"] = round(
            float(np.percentile([a.wall for a in applies], 99)) * 1000, 2)
        stats["versions"] = sum(a.versions for a in applies)
    parts.append("stats: " + " ".join(f"{k}={v}" for k, v in stats.items()))
    return "; ".join(parts)


def parse_stats(line: str) -> dict[str, float]:
    """The ``stats: k=v ...`` tail of a :func:`summarise` line (empty if none)."""
    _, _, tail = line.partition("stats: ")
    out = {}
    for token in tail.split():
        key, _, value = token.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


__all__ = ["ApplyTimes", "BatchTimes", "PathLog", "parse_stats", "summarise", "thread_clock"]
