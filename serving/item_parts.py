"""Item vectors composed where they are served: own part per item + shared item rows.

An item's ``E_item = [W_i + cross_i, 1, V_i]`` (:mod:`model.compose`) reads its own id row and
rows it shares with other items (profile values such as a category, the id fallback). A shared
row moves with almost every event, so shipping composed vectors means shipping every item that
reads it: at 100k items, every version carried all 100k vectors (14 MB; bench/RESULTS.md). In
the *parts* form a version carries parameter rows instead:

- per changed item (its own id row written, a new item, or its keys changed): its own part
  ``[W_o, S_o, V_o]`` (:func:`model.compose.split_item`) as the delta's ``vectors`` and, in the
  extra blob ``item_keys``, the shared keys it reads with their weights;
- the shared item rows that changed, ``key -> [w | v]``, in the extra blob ``item_rows``;
- a full snapshot holds every item's composed vector (the index) plus ``item_parts`` (all own
  parts, keys, weights) and ``item_rows`` (every shared item row).

The reader (:class:`serving.follow.ItemCopy`) recomposes, with :func:`compose_rows`, exactly the
items named by the delta and those reading a shared key the delta changed (a gather and a sum in
numpy), in place. Row ``i`` of a composition depends only on row ``i``'s inputs, so the publisher's
mirror and every worker hold the same bits at each version.

Blob layouts (little endian): ``item_keys`` = uint32 ``n``, uint32 ``L``, int64 keys ``(n, L)``,
float32 weights ``(n, L)``; ``item_parts`` = uint32 ``n``, uint32 ``width`` (``d + 2``),
uint32 ``L``, float32 own ``(n, width)``, int64 keys ``(n, L)``, float32 weights ``(n, L)``;
``item_rows`` = :func:`serving.users.encode_rows`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np

from model.compose import compose_item
from serving.errors import SnapshotCorrupt
from serving.users import SharedRows

ITEM_KEYS = "item_keys"
"""Delta blob: the shared keys and weights of the items whose parts the delta carries."""
ITEM_ROWS = "item_rows"
"""Delta and snapshot blob: shared item rows (``key -> [w | v]``)."""
ITEM_PARTS = "item_parts"
"""Snapshot blob: every item's own part, shared keys and weights."""

COMPOSE_CHUNK = 16_384
"""Rows composed between two pauses of a sliced composition (~2-3 ms of CPU at d = 32)."""
MAX_KEYS = 4096
"""Most shared keys one item may read (a bigger header is a corrupt blob, not an allocation)."""


def encode_item_keys(keys: np.ndarray, weights: np.ndarray) -> bytes:
    """``item_keys`` blob of ``(n, L)`` keys and weights."""
    keys = np.ascontiguousarray(keys, dtype="<i8")
    n, width = keys.shape
    w = np.ascontiguousarray(weights, dtype="<f4").reshape(n, width)
    return struct.pack("<II", n, width) + keys.tobytes() + w.tobytes()


def decode_item_keys(blob: bytes, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_item_keys`, for a delta of ``n`` rows.

    Raises:
        SnapshotCorrupt: truncated, sizes that do not add up, or not ``n`` rows.
    """
    if len(blob) < 8:
        raise SnapshotCorrupt(f"item keys: {len(blob)} bytes, truncated header")
    rows, width = struct.unpack_from("<II", blob)
    if rows != n or width > MAX_KEYS or len(blob) != 8 + 12 * rows * width:
        raise SnapshotCorrupt(
            f"item keys: {len(blob)} bytes for {rows} x {width}, expected {n} rows of at most "
            f"{MAX_KEYS} keys"
        )
    keys = np.frombuffer(blob, dtype="<i8", count=rows * width, offset=8).reshape(rows, width)
    w = np.frombuffer(blob, dtype="<f4", count=rows * width, offset=8 + 8 * rows * width)
    return keys.astype(np.int64), w.reshape(rows, width).astype(np.float32)


def encode_item_parts(own: np.ndarray, keys: np.ndarray, weights: np.ndarray) -> bytes:
    """``item_parts`` blob (a full snapshot's own parts, keys and weights)."""
    own = np.ascontiguousarray(own, dtype="<f4")
    n, width = own.shape
    keys = np.ascontiguousarray(keys, dtype="<i8").reshape(n, -1)
    w = np.ascontiguousarray(weights, dtype="<f4").reshape(keys.shape)
    return struct.pack("<III", n, width, keys.shape[1]) + own.tobytes() + keys.tobytes() + (
        w.tobytes()
    )


def decode_item_parts(blob: bytes, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_item_parts` for a snapshot of ``n`` items.

    Raises:
        SnapshotCorrupt: truncated, sizes that do not add up, or not ``n`` items.
    """
    if len(blob) < 12:
        raise SnapshotCorrupt(f"item parts: {len(blob)} bytes, truncated header")
    rows, width, nk = struct.unpack_from("<III", blob)
    if rows != n or nk > MAX_KEYS or len(blob) != 12 + 4 * rows * width + 12 * rows * nk:
        raise SnapshotCorrupt(
            f"item parts: {len(blob)} bytes for {rows} items of width {width} with {nk} keys; "
            f"expected {n} items"
        )
    pos = 12
    own = np.frombuffer(blob, dtype="<f4", count=rows * width, offset=pos).reshape(rows, width)
    pos += 4 * rows * width
    keys = np.frombuffer(blob, dtype="<i8", count=rows * nk, offset=pos).reshape(rows, nk)
    pos += 8 * rows * nk
    w = np.frombuffer(blob, dtype="<f4", count=rows * nk, offset=pos).reshape(rows, nk)
    return own.astype(np.float32), keys.astype(np.int64), w.astype(np.float32)


def compose_rows(
    own: np.ndarray, keys: np.ndarray, weights: np.ndarray, shared: SharedRows
) -> tuple[np.ndarray, int]:
    """``E_item`` float32 ``(n, d + 2)`` of items from their parts and the shared rows held,
    and how many (key, weight != 0) pairs named a row not held (0 in a consistent version).

    The sums of :func:`model.compose.compose_item_parts`, one key column at a time (no
    ``(n, L, d)`` temporary; columns nobody reads are skipped), ``V`` accumulated in float32
    (the output's precision; ``W``, ``S`` and ``|V|²`` in float64): ~10-20 ms per 100k items.
    Row ``i`` depends only on row ``i``'s inputs (the same bits for any subset).
    """
    n, width = own.shape
    own = np.asarray(own, dtype=np.float32)
    vec: np.ndarray | None = None  # float32 accumulation of V (3x faster; E_item is float32)
    lin = own[:, 0].astype(np.float64)
    sq = own[:, 1].astype(np.float64)
    missing = 0
    table = np.asarray(shared.params, dtype=np.float32)
    if keys.shape[1] and shared.keys.size and table.shape[1] == width - 1:
        t_w = table[:, 0].astype(np.float64)
        t_v = np.ascontiguousarray(table[:, 1:])
        tsq = np.einsum("md,md->m", t_v, t_v, dtype=np.float64)
        pos = np.minimum(np.searchsorted(shared.keys, keys), shared.keys.size - 1)
        found = shared.keys[pos] == keys
        x = np.where(found, weights, np.float32(0.0)).astype(np.float32)
        missing = int((~found & (weights != 0) & (keys != 0)).sum())
        for col in range(keys.shape[1]):
            xl = x[:, col]
            if not xl.any():
                continue
            p = pos[:, col]
            part = np.take(t_v, p, axis=0)
            part *= xl[:, None]
            if vec is None:
                part += own[:, 2:]
                vec = part
            else:
                vec += part
            x64 = xl.astype(np.float64)
            lin += x64 * t_w[p]
            sq += x64 * x64 * tsq[p]
    elif keys.shape[1]:
        missing = int(((weights != 0) & (keys != 0)).sum())
    if vec is None:
        vec = own[:, 2:].copy()
    cross = 0.5 * (np.einsum("nd,nd->n", vec, vec, dtype=np.float64) - sq)
    return compose_item(lin, cross, vec), missing


class ItemParts:
    """Every item's own part, shared keys and weights, and the shared item rows (mutable)."""

    def __init__(
        self, own: np.ndarray, keys: np.ndarray, weights: np.ndarray, shared: SharedRows
    ) -> None:
        self.own = np.array(own, dtype=np.float32)
        self.keys = np.array(keys, dtype=np.int64).reshape(self.own.shape[0], -1)
        self.weights = np.array(weights, dtype=np.float32).reshape(self.keys.shape)
        self.shared = shared
        self.version: int | None = None
        """The item version these parts are at (set by the holder: serving.follow.ItemCopy)."""

    @property
    def n(self) -> int:
        return int(self.own.shape[0])

    def _fit(self, width: int) -> None:
        """Widen the key matrix to ``width`` columns (zeros pad)."""
        if width > self.keys.shape[1]:
            pad = width - self.keys.shape[1]
            self.keys = np.pad(self.keys, ((0, 0), (0, pad)))
            self.weights = np.pad(self.weights, ((0, 0), (0, pad)))

    def apply(
        self, rows: np.ndarray, own: np.ndarray, keys: np.ndarray, weights: np.ndarray,
        shared_keys: np.ndarray, shared_params: np.ndarray,
    ) -> np.ndarray:
        """Write the parts of items at ``rows`` (ascending; rows >= n append in order) and
        the changed shared rows; returns the positions (ascending) whose vector must be
        recomposed: the rows written and every item reading a changed shared key.

        Raises:
            SnapshotCorrupt: widths that do not match what is held.
        """
        if own.shape[0] and own.shape[1] != self.own.shape[1]:
            raise SnapshotCorrupt(
                f"item parts of width {own.shape[1]}, held {self.own.shape[1]}"
            )
        n = self.n
        self._fit(keys.shape[1])
        k = np.zeros((keys.shape[0], self.keys.shape[1]), dtype=np.int64)
        x = np.zeros(k.shape, dtype=np.float32)
        k[:, : keys.shape[1]] = keys
        x[:, : keys.shape[1]] = weights
        split = int(np.searchsorted(rows, n))
        at = rows[:split]
        self.own[at], self.keys[at], self.weights[at] = own[:split], k[:split], x[:split]
        if split < rows.size:
            self.own = np.concatenate([self.own, own[split:]])
            self.keys = np.concatenate([self.keys, k[split:]])
            self.weights = np.concatenate([self.weights, x[split:]])
        touched = np.zeros(self.n, dtype=bool)
        touched[rows] = True
        if shared_keys.size:
            self.shared.update(shared_keys, shared_params)
            # which items read a changed key: a lookup table over the key space (a few MB at
            # most; np.isin sorts the whole key matrix)
            table = np.zeros(max(int(shared_keys.max()), int(self.keys.max(initial=0))) + 1,
                             dtype=bool)
            table[shared_keys] = True
            table[0] = False  # padding
            for col in range(self.keys.shape[1]):
                touched |= table[self.keys[:, col]] & (self.weights[:, col] != 0)
        return np.flatnonzero(touched)

    def compose(
        self, at: np.ndarray, *, pause: Callable[[], None] | None = None,
        chunk: int | None = None,
    ) -> tuple[np.ndarray, int]:
        """``E_item`` of the items at positions ``at`` (ascending; see :func:`compose_rows`).

        With ``pause``, composed ``chunk`` rows at a time with ``pause()`` called between
        chunks (the worker answers requests there); the same bits either way (row ``i``
        depends only on row ``i``'s inputs).
        """
        chunk = chunk or COMPOSE_CHUNK
        if pause is None or at.size <= chunk:
            return self._compose(at)
        out = np.empty((at.size, self.own.shape[1]), dtype=np.float32)
        missing = 0
        for lo in range(0, at.size, chunk):
            if lo:
                pause()
            out[lo : lo + chunk], miss = self._compose(at[lo : lo + chunk])
            missing += miss
        return out, missing

    def _compose(self, at: np.ndarray) -> tuple[np.ndarray, int]:
        sel: np.ndarray | slice = at
        if at.size and int(at[-1]) - int(at[0]) == at.size - 1:
            sel = slice(int(at[0]), int(at[-1]) + 1)  # dense: views, no gather
        return compose_rows(self.own[sel], self.keys[sel], self.weights[sel], self.shared)

    def to_blobs(self) -> dict[str, bytes]:
        """The snapshot blobs (``item_parts``, ``item_rows``)."""
        from serving.users import encode_rows

        return {
            ITEM_PARTS: encode_item_parts(self.own, self.keys, self.weights),
            ITEM_ROWS: encode_rows(self.shared.keys, self.shared.params),
        }

    def copy(self) -> ItemParts:
        out = ItemParts(self.own, self.keys, self.weights, self.shared.copy())
        out.version = self.version
        return out


__all__ = [
    "ITEM_KEYS",
    "ITEM_PARTS",
    "ITEM_ROWS",
    "ItemParts",
    "compose_rows",
    "decode_item_keys",
    "decode_item_parts",
    "encode_item_keys",
    "encode_item_parts",
]
