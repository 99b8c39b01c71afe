"""``bench.quality.run``'s CPU accounting (pure logic, no I/O): an online model's CPU per
interval is averaged over the intervals that brought it events to learn, a batch peer's over
its refits (the first interval included), so neither side's figure is diluted."""

from __future__ import annotations

import numpy as np

from bench.quality import Data, Model, period, run


def tiny_data(n: int = 600, users: int = 30, items: int = 20) -> Data:
    rng = np.random.default_rng(0)
    return Data(
        u=rng.integers(0, users, n),
        i=rng.integers(0, items, n),
        ts=np.arange(n, dtype=np.float64) * 60.0,
        pos=np.ones(n, dtype=bool),
        user_ids=[f"u{j}" for j in range(users)],
        item_ids=[f"i{j}" for j in range(items)],
        user_profiles=[{} for _ in range(users)],
        item_profiles=[{} for _ in range(items)],
        segment=np.zeros(users, dtype=np.int64),
    )


class Recorder(Model):
    """Counts the calls that do work; scores every item the same."""

    def __init__(self, name: str, online: bool, n_items: int) -> None:
        self.name, self.learns_online, self.n_items = name, online, n_items
        self.observed: list[tuple[int, int]] = []
        self.refits = 0
        self.fitted_upto = -1

    def observe(self, d: Data, lo: int, hi: int) -> None:
        self.observed.append((lo, hi))

    def refresh(self, d: Data, upto: int) -> None:
        if not self.learns_online and upto != self.fitted_upto:
            self.refits += 1
            self.fitted_upto = upto

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.zeros((users.size, self.n_items))


def test_cpu_per_interval_counts_updates_not_intervals() -> None:
    d = tiny_data()
    start, end = period(d, 0.5, 1.0)
    online, batch = Recorder("online", True, 20), Recorder("batch", False, 20)
    out = run(d, [online, batch], start, end, "50", 20)
    timed_observes = [span for span in online.observed if span[0] >= start]  # [0, start) untimed
    assert len(timed_observes) >= 2
    # the first interval brings the online model nothing new: not an update
    assert out["online"].intervals == len(timed_observes)
    # every interval refits the batch peer, the first one too
    assert out["batch"].intervals == batch.refits == len(timed_observes) + 1
