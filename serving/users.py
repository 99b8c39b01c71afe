"""User vectors composed where they are served: own part per user + shared rows per version.

A user's ``E_user`` reads its own id row and rows it shares with other users (profile values,
history items, the id fallback). Shared rows change with almost every event, so rewriting every
user who reads them would mean rewriting nearly every user every second (measured at 1M users:
bench/RESULTS.md, "user vectors"). Instead:

- the publisher writes a user's **record** only when that user's own data changed (it was active,
  or its profile changed): the own part ``[W_o, S_o, V_o]`` (:func:`model.compose.split_user`)
  and the shared keys it reads with their weights;
- the shared rows (``key -> [w | v]``) travel with the item versions: all of them in a full
  snapshot and the changed ones in each delta (extra blob ``user_rows``), so a worker holds
  them for exactly the version it serves;
- the worker composes ``E_user = compose_user_parts(own, shared rows of keys, weights)`` at
  request time: exact for every user, however long inactive.

Record layout (value of ``user:{id}``): magic ``FMU2``, ``<qdHH`` (int64 version, float64 publish
time, uint16 width ``d + 2``, uint16 ``L``), float32 own part ``(d + 2)``, int64 keys ``(L)``,
float32 weights ``(L)``. A value without the magic is a plain vector (the older layout: header
``<qd`` + float32 ``E_user``) and is used as it is.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from model.compose import compose_user_parts
from serving.errors import SnapshotCorrupt

USER_MAGIC = b"FMU2"
_REC = struct.Struct("<qdHH")
USER_ROWS = "user_rows"
"""Name of the extra blob (snapshot and delta) carrying shared user rows."""


def encode_user_records(
    version: int, published_at: float, own: np.ndarray, keys: np.ndarray, weights: np.ndarray
) -> list[bytes]:
    """One record per row of ``own`` (see the module docstring); padding keys (0) dropped.

    Built without a Python object per field: the records of users reading the same number of
    shared keys are one numpy structured array (the ``<qdHH`` header packed as its fields), cut
    into values.
    """
    own = np.asarray(own, dtype="<f4")
    keys, weights = np.asarray(keys), np.asarray(weights)
    n, width = own.shape
    kept = keys != 0
    counts = kept.sum(axis=1)
    out: list[bytes] = [b""] * n
    for count in np.unique(counts).tolist():
        rows = np.flatnonzero(counts == count)
        rec = np.empty(rows.size, dtype=np.dtype([
            ("magic", "S4"), ("version", "<i8"), ("at", "<f8"), ("width", "<u2"),
            ("n_keys", "<u2"), ("own", "<f4", (width,)), ("keys", "<i8", (count,)),
            ("weights", "<f4", (count,)),
        ]))
        rec["magic"], rec["version"], rec["at"] = USER_MAGIC, int(version), published_at
        rec["width"], rec["n_keys"] = width, count
        rec["own"] = own[rows]
        sel = kept[rows]
        rec["keys"] = keys[rows][sel].reshape(rows.size, count)
        rec["weights"] = weights[rows][sel].reshape(rows.size, count)
        blob, size = rec.tobytes(), rec.dtype.itemsize
        for j, r in enumerate(rows.tolist()):
            out[r] = blob[j * size : (j + 1) * size]
    return out


@dataclass(frozen=True, eq=False)
class UserRecord:
    version: int
    published_at: float
    own: np.ndarray  # float32 (d + 2,)
    keys: np.ndarray  # int64 (L,)
    weights: np.ndarray  # float32 (L,)


def decode_user_record(raw: bytes) -> UserRecord | None:
    """A composed-layout record, or None when ``raw`` is a plain vector (older layout).

    Raises:
        SnapshotCorrupt: the magic is there but the sizes do not add up.
    """
    if raw[:4] != USER_MAGIC:
        return None
    if len(raw) < 4 + _REC.size:
        raise SnapshotCorrupt(f"user record of {len(raw)} bytes is truncated")
    version, at, width, n_keys = _REC.unpack_from(raw, 4)
    start = 4 + _REC.size
    if len(raw) != start + 4 * width + 12 * n_keys:
        raise SnapshotCorrupt(
            f"user record: {len(raw)} bytes, expected {start + 4 * width + 12 * n_keys} "
            f"for width {width} and {n_keys} keys"
        )
    own = np.frombuffer(raw, dtype="<f4", count=width, offset=start)
    keys = np.frombuffer(raw, dtype="<i8", count=n_keys, offset=start + 4 * width)
    weights = np.frombuffer(raw, dtype="<f4", count=n_keys, offset=start + 4 * width + 8 * n_keys)
    return UserRecord(version, at, own, keys, weights)


def encode_rows(keys: np.ndarray, params: np.ndarray) -> bytes:
    """Shared rows as bytes: uint32 count, uint32 width, int64 keys, float32 params."""
    keys = np.ascontiguousarray(keys, dtype="<i8")
    params = np.ascontiguousarray(params, dtype="<f4").reshape(keys.size, -1)
    return struct.pack("<II", keys.size, params.shape[1]) + keys.tobytes() + params.tobytes()


def decode_rows(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_rows`.

    Raises:
        SnapshotCorrupt: the sizes do not add up.
    """
    if len(blob) < 8:
        raise SnapshotCorrupt("shared user rows: truncated header")
    n, width = struct.unpack_from("<II", blob)
    if len(blob) != 8 + 8 * n + 4 * n * width:
        raise SnapshotCorrupt(f"shared user rows: {len(blob)} bytes for {n} rows of {width}")
    keys = np.frombuffer(blob, dtype="<i8", count=n, offset=8).astype(np.int64)
    params = np.frombuffer(blob, dtype="<f4", count=n * width, offset=8 + 8 * n)
    return keys, params.reshape(n, width).astype(np.float32)


class SharedRows:
    """``key -> [w | v]`` for the shared user rows of one served version (mutable in place)."""

    def __init__(self, keys: np.ndarray | None = None, params: np.ndarray | None = None) -> None:
        self.keys = np.zeros(0, dtype=np.int64)  # sorted
        self.params = np.zeros((0, 0), dtype=np.float32)
        if keys is not None and params is not None:
            self.update(keys, params)

    def __len__(self) -> int:
        return int(self.keys.size)

    def update(self, keys: np.ndarray, params: np.ndarray) -> None:
        """Overwrite known keys in place; new keys are merged in (kept sorted)."""
        keys = np.asarray(keys, dtype=np.int64)
        params = np.asarray(params, dtype=np.float32)
        if keys.size == 0:
            return
        if self.keys.size == 0:
            order = np.argsort(keys, kind="stable")
            self.keys, self.params = keys[order].copy(), params[order].copy()
            return
        pos = np.searchsorted(self.keys, keys)
        pos_c = np.minimum(pos, self.keys.size - 1)
        known = self.keys[pos_c] == keys
        self.params[pos_c[known]] = params[known]
        if not known.all():
            all_keys = np.concatenate([self.keys, keys[~known]])
            all_params = np.concatenate([self.params, params[~known]])
            order = np.argsort(all_keys, kind="stable")
            self.keys, self.params = all_keys[order], all_params[order]

    def copy(self) -> SharedRows:
        out = SharedRows()
        out.keys, out.params = self.keys.copy(), self.params.copy()
        return out

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(w, v, found)`` for a key array of any shape (zeros where not held)."""
        keys = np.asarray(keys, dtype=np.int64)
        d = max(self.params.shape[1] - 1, 0) if self.params.ndim == 2 else 0
        if self.keys.size == 0:
            return (np.zeros(keys.shape, np.float32), np.zeros((*keys.shape, d), np.float32),
                    np.zeros(keys.shape, bool))
        pos = np.minimum(np.searchsorted(self.keys, keys), self.keys.size - 1)
        found = self.keys[pos] == keys
        p = self.params[pos]
        p[~found] = 0.0
        return p[..., 0], p[..., 1:], found

    def compose(self, records: list[UserRecord]) -> tuple[np.ndarray, int]:
        """``E_user`` of each record (float32 ``(n, d + 2)``) and how many keys were missing."""
        n = len(records)
        width = records[0].own.shape[0]
        L = max((r.keys.size for r in records), default=0)
        own = np.stack([r.own for r in records]).astype(np.float32)
        keys = np.zeros((n, L), dtype=np.int64)
        x = np.zeros((n, L), dtype=np.float32)
        for j, r in enumerate(records):
            keys[j, : r.keys.size] = r.keys
            x[j, : r.weights.size] = r.weights
        w, v, found = self.lookup(keys)
        if v.shape[-1] != width - 2:
            v = np.zeros((n, L, width - 2), np.float32)
            found[:] = False
        missing = int((~found & (x != 0)).sum())
        x = np.where(found, x, 0.0)
        return compose_user_parts(own, w, v, x), missing


__all__ = [
    "USER_MAGIC",
    "USER_ROWS",
    "SharedRows",
    "UserRecord",
    "decode_rows",
    "decode_user_record",
    "encode_rows",
    "encode_user_records",
]
