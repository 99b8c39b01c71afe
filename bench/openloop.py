"""Open-loop request arrivals for the request benches (``bench/scale.py --part e2e
--request-rate``).

A closed loop (``--inflight N``: a new request only when an answer came back) slows its own
sending down when the server slows down, so the requests that would have arrived during a stall
are never sent and never waited: the tail it reports hides the queueing delay (coordinated
omission). Real traffic arrives whether or not earlier requests were answered. Here the
arrivals are a Poisson process (exponential gaps from a seeded generator) scheduled before the
phase starts, and each request's latency is measured from its SCHEDULED send time, so a client
that falls behind its schedule counts the delay too (what wrk2 and HdrHistogram's corrected
recording do).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

K = TypeVar("K")


class PoissonArrivals:
    """Send times of one phase: Poisson at ``rate`` requests/s from ``start`` for ``seconds``.

    Args:
        rate: offered requests per second (> 0).
        seconds: length of the phase (>= 0); arrivals fall in ``[start, start + seconds)``.
        start: clock value of the phase's start (any clock; the caller's ``now`` uses the same).
        rng: the generator the exponential gaps are drawn from (seeded by the caller).
    """

    def __init__(self, rate: float, seconds: float, start: float,
                 rng: np.random.Generator) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {rate!r}")
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        self.rate = float(rate)
        self.seconds = float(seconds)
        self.start = float(start)
        # enough gaps for the phase at any realistic draw (mean + 10 sd + 16), extended if not
        n = int(rate * seconds + 10 * np.sqrt(rate * seconds) + 16)
        offsets = np.cumsum(rng.exponential(1.0 / rate, n))
        while n and offsets[-1] < seconds:
            offsets = np.concatenate([offsets, offsets[-1] + np.cumsum(
                rng.exponential(1.0 / rate, n))])
        self.times = start + offsets[offsets < seconds]
        self._next = 0
        self.lags: list[float] = []  # per request sent: seconds after its scheduled time

    def __len__(self) -> int:
        return int(self.times.size)

    @property
    def offered_rate(self) -> float:
        """Arrivals scheduled per second of the phase (the draw, not the nominal rate)."""
        return len(self) / self.seconds if self.seconds > 0 else float("nan")

    def due(self, now: float) -> np.ndarray:
        """Scheduled times of the arrivals at or before ``now`` not handed out yet, ascending.
        Each arrival is handed out once; a caller late by a whole gap gets several at once."""
        end = int(np.searchsorted(self.times, now, side="right"))
        out = self.times[self._next : end]
        self._next = max(self._next, end)
        return out

    def wait_s(self, now: float) -> float:
        """Seconds until the next arrival not handed out yet (0 when overdue, inf when none)."""
        if self._next >= self.times.size:
            return float("inf")
        return max(0.0, float(self.times[self._next]) - now)

    def send_due(self, now: float, send: Callable[[], K],
                 clock: Callable[[], float]) -> list[tuple[K, float]]:
        """Send every arrival due at ``now`` (``send()`` once each, returning the request's key)
        and return ``(key, scheduled time)`` pairs: the scheduled time, not the moment ``send``
        ran, is what the request's latency is measured from. How late each send was (``clock()``
        after it, minus its scheduled time) goes to :attr:`lags`: the client's own lateness."""
        out = []
        for t in self.due(now):
            key = send()
            self.lags.append(clock() - float(t))
            out.append((key, float(t)))
        return out


__all__ = ["PoissonArrivals"]
