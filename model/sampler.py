"""Negative sampling over the item catalog: uniform or popularity^α, never the positive itself.

Popularity weights are ``(count + 1) ** alpha`` where ``count`` is the item's online number of
positive events (the +1 lets never-clicked items be sampled; ``alpha = 0`` is uniform). The
cumulative distribution is cached and rebuilt after ``max(1024, n_items // 8)`` positives (or
when the catalog grew by an eighth), so a rebuild costs amortised O(1) per event; until then new
items and new counts are not yet reflected (staleness of at most that many events).
"""

from __future__ import annotations

from typing import Any

import numpy as np

_MAX_REDRAWS = 8
# draw table (see NegativeSampler._draw_table): at most this many entries (int32), and at most
# this many per positive between two rebuilds (its build is O(entries), once per rebuild)
_TABLE_MAX = 1 << 21
_TABLE_PER_REBUILD = 256


class NegativeSampler:
    """Draws negative item entity indices for positive events."""

    def __init__(self, mode: str, alpha: float, rng: np.random.Generator) -> None:
        if mode not in ("uniform", "popularity"):
            raise ValueError(f"neg_sampling must be 'uniform' or 'popularity', got {mode!r}")
        self.mode = mode
        self.alpha = float(alpha)
        self.rng = rng
        self.cdf = np.zeros(0, dtype=np.float64)
        self._logq = np.zeros(0, dtype=np.float32)  # log q per item of the cdf it was made of
        self._logq_of: np.ndarray | None = None
        self._table: np.ndarray | None = None  # draw table of the cdf it was made of
        self._table_of: np.ndarray | None = None
        self.since_rebuild = 0

    def _refresh(self, counts: np.ndarray, n_items: int, n_pos: int) -> None:
        self.since_rebuild += n_pos
        size = self.cdf.size
        stale = self.since_rebuild >= max(1024, n_items // 8)
        grown = n_items > size + max(size // 8, 0) or size == 0
        if stale or grown:
            weights = np.power(counts[:n_items].astype(np.float64) + 1.0, self.alpha)
            self.cdf = np.cumsum(weights)
            self.since_rebuild = 0

    def sample(
        self, counts: np.ndarray, n_items: int, positives: np.ndarray, k: int, pool: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(negatives (B, k) int64, valid (B, k) bool)`` for positive item indices ``(B,)``.

        With ``pool > 0`` (and fewer than ``B·k``) the batch first draws ``pool`` items from the
        distribution and every negative is a uniform pick from that shared pool: each negative
        still follows the distribution, but a batch touches far fewer distinct items (cheaper
        steps). A negative never equals its row's positive; with a single known item no valid
        negative exists and ``valid`` is all False.
        """
        b = positives.size
        if k <= 0 or b == 0 or n_items < 2:
            return np.zeros((b, max(k, 0)), dtype=np.int64), np.zeros((b, max(k, 0)), dtype=bool)
        if self.mode == "popularity":
            self._refresh(counts, n_items, b)
        shared = 0 < pool < b * k

        def draw(shape: tuple[int, ...] | int) -> np.ndarray:
            if self.mode == "uniform":
                return self.rng.integers(0, n_items, size=shape)
            return self._draw(shape if isinstance(shape, tuple) else (shape,))

        if shared:
            items = draw(pool)

            def draw_neg(shape: tuple[int, ...] | int) -> np.ndarray:
                return items[self.rng.integers(0, pool, size=shape)]
        else:
            draw_neg = draw
        neg = draw_neg((b, k))
        pos = positives.reshape(b, 1)
        for _ in range(_MAX_REDRAWS):
            clash = neg == pos
            if not clash.any():
                break
            rows, cols = np.nonzero(clash)
            neg[rows, cols] = draw_neg(rows.size)
        clash = neg == pos
        if clash.any():  # a dominant item keeps hitting its own positive: shift uniformly
            rows, cols = np.nonzero(clash)
            shift = self.rng.integers(1, n_items, size=rows.size)
            neg[rows, cols] = (pos[rows, 0] + shift) % n_items
        return neg.astype(np.int64, copy=False), np.ones((b, k), dtype=bool)

    def draw_shared(
        self, counts: np.ndarray, n_items: int, m: int, n_pos: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``m`` items (with replacement) shared by a step of ``n_pos`` positives, and the log
        of each one's draw probability (for the sampled softmax's log-Q correction)."""
        if m <= 0 or n_items < 1:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        if self.mode == "uniform":
            items = self.rng.integers(0, n_items, size=m).astype(np.int64)
        else:
            self._refresh(counts, n_items, n_pos)
            items = self._draw((m,)).astype(np.int64, copy=False)
        return items, self.log_prob(items, n_items)

    def log_prob(self, items: np.ndarray, n_items: int) -> np.ndarray:
        """Log probability that one draw returns each of ``items`` (float32). Under popularity
        sampling it is the cached distribution's; an item newer than the cache gets the
        smallest weight (``1 ** alpha``)."""
        items = np.asarray(items, dtype=np.int64)
        if self.mode == "uniform" or self.cdf.size == 0:
            return np.full(items.shape, -np.log(max(n_items, 1)), dtype=np.float32)
        n = self.cdf.size
        if self._logq_of is not self.cdf:  # once per cdf: [log q of each item | of a newer one]
            w = np.empty(n + 1, dtype=np.float64)
            w[0] = self.cdf[0]
            np.subtract(self.cdf[1:], self.cdf[:-1], out=w[1:n])
            w[n] = 1.0
            self._logq = (np.log(w) - np.log(self.cdf[-1])).astype(np.float32)
            self._logq_of = self.cdf
        return self._logq.take(np.minimum(items, n))

    def _draw(self, shape: tuple[int, ...]) -> np.ndarray:
        total = self.cdf[-1]
        u = self.rng.random(shape) * total
        table = self._draw_table()
        if table is not None:  # the same indices as the search below, by one gather
            return table.take(np.minimum(u.astype(np.int64), table.size - 1)).astype(np.int64)
        return np.minimum(np.searchsorted(self.cdf, u, side="right"), self.cdf.size - 1)

    def _draw_table(self) -> np.ndarray | None:
        """``table[k] = #(cdf <= k)`` for ``k < cdf[-1]`` when the cdf holds small integers
        (popularity weights ``(count + 1) ** alpha`` with ``alpha`` 0 or 1), else None.

        Then ``searchsorted(cdf, u, side="right") == table[floor(u)]`` exactly (an integer
        ``c <= u`` iff ``c <= floor(u)``): a draw is one gather instead of a binary search
        (~70 ns per draw on ml-100k). Built once per cdf (O(cdf[-1])), and only while that
        stays within :data:`_TABLE_PER_REBUILD` entries per positive between rebuilds.
        """
        cdf = self.cdf
        if self._table_of is cdf:
            return self._table
        self._table, self._table_of = None, cdf
        n = cdf.size
        total = float(cdf[-1]) if n else 0.0
        cap = min(_TABLE_MAX, _TABLE_PER_REBUILD * max(1024, n // 8))
        if not 1.0 <= total <= cap:
            return None
        w = np.empty(n, dtype=np.float64)
        w[0] = cdf[0]
        np.subtract(cdf[1:], cdf[:-1], out=w[1:])
        if not (np.all(w >= 0.0) and np.array_equal(w, np.floor(w))):
            return None
        self._table = np.repeat(np.arange(n, dtype=np.int32), w.astype(np.int64))
        return self._table

    def state(self) -> dict[str, Any]:
        return {"mode": self.mode, "alpha": self.alpha, "since_rebuild": self.since_rebuild}
