"""Parameter rows and the row-wise Adagrad optimiser, on plain arrays that grow online.

Every feature value that owns a row has ``[w | v_1 .. v_d]`` (float32, ``d + 1`` numbers) in
:attr:`RowTable.params` and two float32 accumulators in :attr:`RowTable.acc`: one for ``w`` and
one shared by the ``d`` latent numbers (TorchRec/FBGEMM "row-wise Adagrad": the mean of the
squared gradient over the row). That keeps optimiser state at 8 bytes per row instead of
``4 (d + 1)``. Capacity doubles when full, so growth costs amortised O(1) per new row and no
event ever copies the whole table.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-8

try:  # what np.einsum calls without `optimize` (its Python checks cost ~1 µs a call)
    from numpy._core.multiarray import c_einsum as einsum
except ImportError:  # pragma: no cover - numpy moved it: the public function, same results
    einsum = np.einsum
_UINT_OF_WIDTH = {4: np.dtype(np.uint32), 8: np.dtype(np.uint64)}


def scratch_unique(values: np.ndarray, scratch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(uniq, inverse)`` of non-negative ints in O(n), no sort: ``uniq[inverse] == values``.

    ``scratch`` (int32, larger than every value) is overwritten; ``uniq`` lists each value at
    its last occurrence, in order (deterministic).
    """
    values = np.asarray(values, dtype=np.int64).ravel()
    n = values.size
    pos = np.arange(n, dtype=np.int32)
    scratch[values] = pos  # the last occurrence of each value wins
    uniq = values.take((scratch.take(values) == pos).nonzero()[0])
    scratch[uniq] = np.arange(uniq.size, dtype=np.int32)
    inverse = scratch.take(values).astype(np.int64)
    return uniq, inverse


def set_rows(table: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
    """``table[rows] = values`` for a C-contiguous 2-D ``table`` and ``values`` of its dtype.

    The same bytes as the fancy assignment, copied as one opaque item per row (a ``void``
    view): numpy's fancy row assignment iterates element by element, ~5-20x slower for the
    row widths here.
    """
    values = np.ascontiguousarray(values, dtype=table.dtype)
    if not table.flags.c_contiguous or values.shape[1:] != table.shape[1:] or table.ndim != 2:
        table[rows] = values  # views need a C-contiguous table
        return
    width = table.dtype.itemsize * table.shape[1]
    # rows of 4 or 8 bytes as one unsigned integer each (a plain copy, ~25% less than void)
    row = _UINT_OF_WIDTH.get(width) or np.dtype((np.void, width))
    table.view(row).reshape(-1).put(rows, values.view(row).reshape(-1))


class RowTable:
    """Growable ``(capacity, dim + 1)`` float32 parameter table plus row-wise Adagrad state.

    Row 0 is the padding row: all zeros, never updated (``weight 0`` entries point at it).
    """

    def __init__(
        self, dim: int, init_std: float, rng: np.random.Generator, capacity: int = 1024
    ) -> None:
        self.dim = int(dim)
        self.init_std = float(init_std)
        self.rng = rng
        cap = max(int(capacity), 16)
        self.params = np.zeros((cap, self.dim + 1), dtype=np.float32)
        self.acc = np.zeros((cap, 2), dtype=np.float32)
        self.n_rows = 0
        self.free: list[int] = []
        self._scratch = np.zeros(cap, dtype=np.int32)
        self.dirty = np.zeros(cap, dtype=bool)  # rows written since the last drain_dirty()
        self.alloc(1)  # row 0: padding
        self.params[0] = 0.0

    @property
    def capacity(self) -> int:
        return int(self.params.shape[0])

    @property
    def n_live(self) -> int:
        """Rows in use (allocated minus freed)."""
        return self.n_rows - len(self.free)

    def _grow(self, need: int) -> None:
        cap = self.capacity
        if need <= cap:
            return
        new_cap = cap
        while new_cap < need:
            new_cap *= 2
        params = np.zeros((new_cap, self.dim + 1), dtype=np.float32)
        params[: self.n_rows] = self.params[: self.n_rows]
        acc = np.zeros((new_cap, 2), dtype=np.float32)
        acc[: self.n_rows] = self.acc[: self.n_rows]
        self.params, self.acc = params, acc
        self._scratch = np.zeros(new_cap, dtype=np.int32)
        dirty = np.zeros(new_cap, dtype=bool)
        dirty[:cap] = self.dirty
        self.dirty = dirty

    def alloc(self, n: int) -> np.ndarray:
        """``n`` fresh rows (freed rows first, then new ones), reset to their initial values."""
        n = int(n)
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        if not self.free and self.n_rows + n <= self.capacity:  # the usual case: fresh rows
            lo = self.n_rows
            self.n_rows += n
            self._reset_range(lo, lo + n)  # = reset(arange(lo, lo + n)), by slices
            return np.arange(lo, lo + n, dtype=np.int64)
        take = min(n, len(self.free))
        reused = self.free[len(self.free) - take :]
        del self.free[len(self.free) - take :]
        fresh = n - take
        self._grow(self.n_rows + fresh)
        rows = np.empty(n, dtype=np.int64)
        rows[:take] = reused
        rows[take:] = np.arange(self.n_rows, self.n_rows + fresh)
        self.n_rows += fresh
        self.reset(rows)
        return rows

    def release(self, rows: np.ndarray) -> None:
        """Give rows back; they are reset when handed out again."""
        self.free.extend(int(r) for r in rows)

    def reset(self, rows: np.ndarray) -> None:
        """``w = 0``, ``v ~ N(0, init_std)``, accumulators 0."""
        rows = np.asarray(rows, dtype=np.int64)
        self.params[rows, 0] = 0.0
        self.params[rows, 1:] = self.rng.normal(0.0, self.init_std, (rows.size, self.dim)).astype(
            np.float32
        )
        self.acc[rows] = 0.0
        self.dirty[rows] = True

    def _reset_range(self, lo: int, hi: int) -> None:
        """:meth:`reset` of rows ``lo..hi - 1`` (the same draws), written by slices."""
        self.params[lo:hi, 0] = 0.0
        self.params[lo:hi, 1:] = self.rng.normal(0.0, self.init_std, (hi - lo, self.dim)).astype(
            np.float32
        )
        self.acc[lo:hi] = 0.0
        self.dirty[lo:hi] = True

    def mark_dirty(self, rows: np.ndarray) -> None:
        """Record that ``rows`` changed (every write to :attr:`params` must call this)."""
        self.dirty[np.asarray(rows, dtype=np.int64)] = True

    def drain_dirty(self) -> np.ndarray:
        """Rows written since the previous call (int64, ascending); clears the record.

        O(rows) bit scan: how a publisher learns what changed without diffing the whole table.
        """
        rows = np.flatnonzero(self.dirty[: self.n_rows])
        self.dirty[rows] = False
        return rows

    def unique(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(uniq, inverse)`` of a flat int array in O(n), no sort: ``uniq[inverse] == rows``.

        Uses a scratch array the size of the table; the order of ``uniq`` is deterministic.
        """
        return scratch_unique(rows, self._scratch)

    def adagrad_step(
        self,
        rows: np.ndarray,
        values: np.ndarray,
        grad: np.ndarray,
        lr: float,
        l2: float,
        counts: np.ndarray | None = None,
        decay: float | np.ndarray = 1.0,
    ) -> None:
        """Row-wise Adagrad on unique ``rows`` whose current values are ``values``.

        ``grad`` is the summed loss gradient of each row; L2 (``l2 * row``) is added once per
        row per batch (lazy L2 on the touched rows only). ``values`` and ``grad`` are used as
        scratch (overwritten).

        ``counts`` (events behind each row's summed gradient, >= 1) makes one step of ``n``
        events act like ``n`` small steps: the accumulator grows by ``|g|²/n`` (the squared
        gradient of one event when the ``n`` agree), so the row moves ``√n`` times further than
        a plain Adagrad step of the sum (sequential steps would move about ``2√n``). Without
        it, a burst of ``n`` events of one row moves it like one event.

        ``decay < 1`` multiplies a row's accumulator by ``decay`` at each of its updates before
        adding the new squared gradient (RMSprop-like, lazy: only touched rows): steps stop
        shrinking towards zero, so a row can follow a change of taste; ``1`` = Adagrad. An
        array gives each row its own decay.
        """
        g = grad
        if l2 != 0.0:
            g += np.float32(l2) * values
        gw = g[:, 0]
        gv = g[:, 1:]
        acc = self.acc.take(rows, axis=0)
        if type(decay) is not float and np.ndim(decay):  # one decay per row
            acc *= np.asarray(decay, dtype=np.float32)[:, None]
        elif decay != 1.0:
            acc *= np.float32(decay)
        if counts is None:
            acc[:, 0] += gw * gw
            acc[:, 1] += einsum("ij,ij->i", gv, gv) / np.float32(self.dim)
        else:
            inv_n = (1.0 / np.maximum(counts, 1.0)).astype(np.float32)
            acc[:, 0] += gw * gw * inv_n
            acc[:, 1] += einsum("ij,ij->i", gv, gv) * (inv_n / np.float32(self.dim))
        set_rows(self.acc, rows, acc)
        scale = np.sqrt(acc)
        scale += np.float32(EPS)
        np.divide(np.float32(lr), scale, out=scale)
        w_step = gw * scale[:, 0]
        g *= scale[:, 1:2]  # full rows (contiguous: ~2x the strided gv), then w's own scale
        g[:, 0] = w_step
        values -= g
        set_rows(self.params, rows, values)
        self.dirty[rows] = True
        self.params[0] = 0.0  # padding stays zero
        self.acc[0] = 0.0

    def nbytes(self) -> int:
        """Bytes held by parameters, accumulators and the scratch array (capacity, not use)."""
        return int(self.params.nbytes + self.acc.nbytes + self._scratch.nbytes)
