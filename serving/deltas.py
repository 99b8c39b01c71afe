"""Item deltas: the rows that changed between two published versions, and how they are stored.

A delta ``v`` turns version ``v - 1`` into version ``v``: it carries the ids and new vectors of the
items whose vector changed (items the base does not hold are new and are appended, in order),
the global bias of ``v`` and the opaque blobs (``extra``, e.g. the context table) that changed.
Items are never removed by a delta (the model's catalogue only grows); a publisher that must drop
or reorder items writes a full snapshot instead.

Redis layout (beside the full snapshots of :mod:`serving.store`):

========================== ======= =====================================================
key                        type    value
========================== ======= =====================================================
``items:delta:{v}``        string  one encoded delta (:func:`encode_delta`), base ``v - 1``
``items:deltas``           zset    delta versions written (score = version)
========================== ======= =====================================================

Two forms of delta (header ``kind``): ``vectors`` (composed ``E_item`` rows) and ``parts``
(:mod:`serving.item_parts`: the changed items' own parts as ``vectors``, their shared keys in
the extra blob ``item_keys``, the changed shared item rows in ``item_rows``; the reader
recomposes the items they touch). A full snapshot of the parts form carries the extra blobs
``item_parts`` and ``item_rows`` beside the composed vectors.

``items:current`` names the newest version, reached by a full snapshot or by a delta. A reader at
version ``c`` follows deltas ``c+1 .. current``; when one is missing (retention, Redis loss) it
loads the newest full snapshot and the deltas after it.

Retention: a delta is kept while it is newer than the oldest full snapshot kept (so every kept
full snapshot can be brought to the head), and at most ``keep_deltas`` of them.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson

from serving.errors import IndexInputError, SnapshotCorrupt, SnapshotError
from serving.index import rows_for_ids
from serving.item_parts import ITEM_KEYS, decode_item_keys
from serving.keys import CAS_FORWARD

logger = logging.getLogger(__name__)


DELTA_MAGIC = b"FMDELTA1"
_HEAD = struct.Struct("<I")  # length of the JSON header that follows the magic


@dataclass(frozen=True, eq=False)
class ItemDelta:
    """Changed rows from version ``version - 1`` to ``version``.

    Two forms. By id (``rows`` None): ``item_ids`` names every row of ``vectors``; a reader finds
    each id's row in its map. By position (``rows`` given; what the publisher writes): ``rows``
    are the rows' positions in the catalogue order of the full snapshot the delta descends from
    (ascending; an index built in that order applies them with no id lookup), ``base_n`` is
    the number of items the base version holds, and ``item_ids`` names only the appended rows
    (``rows >= base_n``, which must be ``base_n, base_n + 1, ...``, in order).

    Attributes:
        version: the version this delta produces (its base is ``version - 1``).
        item_ids: ids of the changed or new items (each at most once); positional: new only.
        vectors: float32 ``(m, d)``, the new vector of each row (parts form: its own part).
        bias: the global bias of ``version``.
        extra: blobs replaced at this version (absent names keep their previous value).
        created_at: publisher wall-clock time, seconds since epoch.
        rows: int64 ``(m,)`` catalogue positions, or None (by id).
        base_n: items held by the base version (positional deltas).
        parts: the parts form (:mod:`serving.item_parts`): ``vectors`` are the items' own
            parts, ``extra`` carries their keys (``item_keys``) and the changed shared item
            rows (``item_rows``); the reader recomposes the items they touch.
        item_version: the item version whose items ``version`` serves (None: ``version``
            itself, an item version). A shared-rows version (no item row, only shared user
            rows) names the item version it descends from: its items are that version's, its
            user side is newer (the version contract, README "Versions").
    """

    version: int
    item_ids: list[str]
    vectors: np.ndarray
    bias: float = 0.0
    extra: dict[str, bytes] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    rows: np.ndarray | None = None
    base_n: int = 0
    parts: bool = False
    item_version: int | None = None
    composed: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    """A reader's cache, not wire data: the positions (``touched``) and vectors (``vectors``)
    the first index copy composed from this parts delta, written as they are by the second
    copy of the same item parts (:mod:`serving.follow`)."""

    def __post_init__(self) -> None:
        what = f"delta v{self.version}"
        if self.item_version is None:
            object.__setattr__(self, "item_version", int(self.version))
        elif not 0 <= int(self.item_version) <= int(self.version):
            raise IndexInputError(
                f"{what}: item_version must be in 0..{self.version}, got {self.item_version}"
            )
        if self.parts:
            # parts form (serving/item_parts.py): vectors are own parts, positional only
            blob = self.extra.get(ITEM_KEYS)
            if self.rows is None or blob is None:
                raise IndexInputError(
                    f"{what}: a parts delta needs positional rows and the {ITEM_KEYS!r} blob"
                )
            try:
                decode_item_keys(blob, int(np.asarray(self.vectors).shape[0]))
            except SnapshotCorrupt as exc:
                raise IndexInputError(f"{what}: {exc}") from None
        if self.rows is None:
            object.__setattr__(self, "vectors", rows_for_ids(what, self.item_ids, self.vectors))
            return
        rows = np.asarray(self.rows, dtype=np.int64).reshape(-1)
        vectors = np.asarray(self.vectors)
        if vectors.ndim != 2 or vectors.dtype != np.float32 or vectors.shape[0] != rows.size:
            raise IndexInputError(
                f"{what}: expected float32 ({rows.size}, d) vectors for {rows.size} rows, got "
                f"{vectors.dtype} {vectors.shape}"
            )
        new = rows[rows >= self.base_n]
        if (
            (rows.size and rows.min() < 0)
            or (rows.size > 1 and not (np.diff(rows) > 0).all())
            or len(self.item_ids) != new.size
            or not np.array_equal(new, self.base_n + np.arange(new.size))
        ):
            raise IndexInputError(
                f"{what}: positional rows must ascend, be >= 0 and append base_n={self.base_n}, "
                f"base_n + 1, ... with one id each ({len(self.item_ids)} ids for {new.size} "
                "appended rows)"
            )
        object.__setattr__(self, "rows", rows)

    @property
    def base(self) -> int:
        """The version this delta applies to."""
        return self.version - 1

    @property
    def n(self) -> int:
        """Number of changed rows."""
        return int(self.vectors.shape[0])


def encode_delta(delta: ItemDelta) -> bytes:
    """One self-checking value: magic, header length, JSON header, ids, vectors, [rows], extras."""
    ids = orjson.dumps(list(delta.item_ids))
    vec = np.ascontiguousarray(delta.vectors, dtype="<f4").tobytes()
    rows = b"" if delta.rows is None else np.ascontiguousarray(delta.rows, "<i8").tobytes()
    names = sorted(delta.extra)
    digest = hashlib.sha256(ids)
    digest.update(vec)
    digest.update(rows)
    for name in names:
        digest.update(delta.extra[name])
    head = {
        "version": int(delta.version),
        "n": delta.n,
        "dim": int(delta.vectors.shape[1]),
        "bias": float(delta.bias),
        "ids_bytes": len(ids),
        "vector_bytes": len(vec),
        "extra": {name: len(delta.extra[name]) for name in names},
        "created_at": float(delta.created_at),
        "sha256": digest.hexdigest(),
    }
    if delta.rows is not None:
        head["rows_bytes"] = len(rows)
        head["base_n"] = int(delta.base_n)
    if delta.parts:
        head["kind"] = "parts"
    if delta.item_version != delta.version:  # a shared-rows version (absent: an item version)
        head["item_version"] = int(delta.item_version)
    header = orjson.dumps(head)
    parts = [DELTA_MAGIC, _HEAD.pack(len(header)), header, ids, vec, rows]
    parts += [delta.extra[name] for name in names]
    return b"".join(parts)


def decode_delta(raw: bytes, version: int) -> ItemDelta:
    """Inverse of :func:`encode_delta`, checked.

    Raises:
        SnapshotCorrupt: not a delta, truncated, another version than ``version``, or the
            checksum does not match.
    """
    start = len(DELTA_MAGIC) + _HEAD.size
    if len(raw) < start or raw[: len(DELTA_MAGIC)] != DELTA_MAGIC:
        raise SnapshotCorrupt(
            f"item delta v{version}: not an fmstream delta ({len(raw)} bytes); republish"
        )
    (hlen,) = _HEAD.unpack_from(raw, len(DELTA_MAGIC))
    try:
        h = orjson.loads(raw[start : start + hlen])
        n, dim, ids_len, vec_len = h["n"], h["dim"], h["ids_bytes"], h["vector_bytes"]
        extra_sizes: Mapping[str, int] = h["extra"]
        rows_len = h.get("rows_bytes")
        kind = h.get("kind", "vectors")
        item_version = h.get("item_version", version)
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise SnapshotCorrupt(f"item delta v{version}: bad header ({exc})") from None
    if not isinstance(extra_sizes, Mapping):
        raise SnapshotCorrupt(f"item delta v{version}: bad header (extra is not a mapping)")
    sizes = (n, dim, ids_len, vec_len, rows_len or 0, *extra_sizes.values())
    if not all(type(x) is int and x >= 0 for x in sizes):
        raise SnapshotCorrupt(f"item delta v{version}: sizes must be non-negative integers")
    if type(item_version) is not int:
        raise SnapshotCorrupt(f"item delta v{version}: item_version must be an integer")
    if kind not in ("vectors", "parts"):
        raise SnapshotCorrupt(f"item delta v{version}: unknown kind {kind!r}; republish")
    if (
        h.get("version") != version
        or vec_len != n * dim * 4
        or (rows_len is not None and rows_len != n * 8)
    ):
        raise SnapshotCorrupt(
            f"item delta v{version}: header says version {h.get('version')}, {n} x {dim} in "
            f"{vec_len} bytes; expected version {version} and n * dim * 4 bytes"
        )
    pos = start + hlen
    view = memoryview(raw)  # slices without copies (a version of 100k rows is ~14 MB)
    ids_raw = view[pos : pos + ids_len]
    pos += ids_len
    vec_raw = view[pos : pos + vec_len]
    pos += vec_len
    rows_raw = view[pos : pos + (rows_len or 0)]
    pos += rows_len or 0
    extra: dict[str, bytes] = {}
    for name in sorted(extra_sizes):
        extra[name] = bytes(view[pos : pos + extra_sizes[name]])
        pos += extra_sizes[name]
    digest = hashlib.sha256(ids_raw)
    digest.update(vec_raw)
    digest.update(rows_raw)
    for name in sorted(extra):
        digest.update(extra[name])
    if pos != len(raw) or digest.hexdigest() != h.get("sha256"):
        raise SnapshotCorrupt(
            f"item delta v{version}: {len(raw)} bytes do not match the header (size or sha256); "
            "reload the full snapshot"
        )
    try:
        ids = orjson.loads(ids_raw)
    except orjson.JSONDecodeError as exc:
        raise SnapshotCorrupt(f"item delta v{version}: ids are not JSON ({exc})") from None
    if not isinstance(ids, list) or (rows_len is None and len(ids) != n):
        raise SnapshotCorrupt(f"item delta v{version}: expected a list of {n} ids")
    # read-only views of ``raw`` (no copy): a delta's vectors are only ever read
    vectors = np.frombuffer(vec_raw, dtype="<f4").astype(np.float32, copy=False).reshape(n, dim)
    rows = None if rows_len is None else np.frombuffer(rows_raw, dtype="<i8").astype(np.int64)
    try:
        return ItemDelta(
            version=version,
            item_ids=[str(i) for i in ids],
            vectors=vectors,
            bias=float(h["bias"]),
            extra=extra,
            created_at=float(h["created_at"]),
            rows=rows,
            base_n=int(h.get("base_n", 0)),
            parts=kind == "parts",
            item_version=item_version,
        )
    except IndexInputError as exc:
        raise SnapshotCorrupt(f"item delta v{version}: {exc}") from None


def plan_delta(
    row_of: Mapping[str, int], item_ids: Sequence[str], n_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Where each row of a delta goes in an index of ``n_rows`` rows mapped by ``row_of``.

    Returns:
        ``(rows, changed, new, new_ids)``: ``rows`` int64, the index row of each delta row
        (existing rows, or ``n_rows, n_rows + 1, ...`` for new items in delta order);
        ``changed`` / ``new``: positions in the delta of updated / appended rows;
        ``new_ids``: the appended ids, in order.

    Raises:
        IndexInputError: an id appears twice in the delta.
    """
    get = row_of.get
    m = len(item_ids)
    rows = np.fromiter((get(i, -1) for i in item_ids), dtype=np.int64, count=m)
    new = np.flatnonzero(rows < 0)
    new_ids = [item_ids[j] for j in new.tolist()]
    if len(set(new_ids)) != len(new_ids):
        raise IndexInputError("delta: an item id appears twice among the new items")
    rows[new] = n_rows + np.arange(new.size, dtype=np.int64)
    changed = np.flatnonzero(rows < n_rows)
    if np.unique(rows[changed]).size != changed.size:
        raise IndexInputError("delta: an item id appears twice among the changed items")
    return rows, changed, new, new_ids


def plan_positional(
    delta: ItemDelta, n_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """:func:`plan_delta` for a positional delta (no id lookup: O(changed rows) in numpy).

    Raises:
        SnapshotError: the index does not hold ``delta.base_n`` rows (not the delta's base:
            reload the full snapshot).
    """
    if delta.rows is None:
        raise IndexInputError(f"delta v{delta.version} is not positional")
    if n_rows != delta.base_n:
        raise SnapshotError(
            f"delta v{delta.version} applies to {delta.base_n} items, this copy holds {n_rows}; "
            "reload the full snapshot"
        )
    rows = delta.rows
    split = int(np.searchsorted(rows, n_rows))
    return rows, np.arange(split), np.arange(split, rows.size), list(delta.item_ids)


def delta_rows(
    ids: Sequence[str], vectors: np.ndarray, last: Mapping[str, int], last_vectors: np.ndarray
) -> np.ndarray:
    """Positions of ``ids`` whose vector differs from the last published one (or is new).

    ``last`` maps an id to its row in ``last_vectors``. Bit-exact comparison: a delta carries
    every change, however small, so a worker's index equals the model's at each version.
    """
    m = len(ids)
    rows = np.fromiter((last.get(i, -1) for i in ids), dtype=np.int64, count=m)
    known = rows >= 0
    diff = ~known
    if known.any():
        old = last_vectors[rows[known]]
        diff[known] = (old != vectors[known]).any(axis=1)
    return np.flatnonzero(diff)


class DeltaLog:
    """The deltas of one deployment in Redis (``items:delta:{v}``, ``items:deltas``).

    Args:
        client: a ``redis.Redis`` (bytes in, bytes out).
        key: the deployment's key builder (``key("items", "deltas")`` -> ``fm:items:deltas``).
        keep: most deltas kept (the oldest are dropped first).
    """

    def __init__(self, client, key, keep: int = 600) -> None:
        if keep < 1:
            raise IndexInputError(f"keep_deltas must be >= 1, got {keep}")
        self.redis = client
        self._key = key
        self.keep = int(keep)
        self._cas_forward = self.redis.register_script(CAS_FORWARD)

    def key(self, version: int) -> str:
        return self._key("items", "delta", int(version))

    def versions(self) -> list[int]:
        """Delta versions in Redis, ascending."""
        return [int(v) for v in self.redis.zrange(self._key("items", "deltas"), 0, -1)]

    def put(self, delta: ItemDelta, *, move_pointer: bool = True, trim: bool = True) -> int:
        """Write delta ``v`` and (by default) move ``items:current`` forward to ``v``, then
        :meth:`trim` (``trim=False``: the caller trims later, e.g. after announcing ``v``:
        trimming drops only older deltas, and costs 2-3 round trips).

        Returns:
            The bytes written.
        """
        v = int(delta.version)
        blob = encode_delta(delta)
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.key(v), blob)
        pipe.zadd(self._key("items", "deltas"), {str(v): v})
        pipe.execute()
        if move_pointer and not self._cas_forward(keys=[self._key("items", "current")], args=[v]):
            logger.warning("item delta v%d written but Redis points at a newer version", v)
        if trim:
            self.trim()
        logger.debug("item delta v%d: %d rows, %d bytes", v, delta.n, len(blob))
        return len(blob)

    def trim(self) -> int:
        """Drop deltas not newer than the oldest full snapshot kept, and beyond ``keep``."""
        versions = self.versions()
        fulls = self.redis.zrange(self._key("items", "versions"), 0, 0)
        floor = int(fulls[0]) if fulls else None
        drop = [v for v in versions if floor is not None and v <= floor]
        rest = [v for v in versions if floor is None or v > floor]
        drop += rest[: max(0, len(rest) - self.keep)]
        if drop:
            pipe = self.redis.pipeline(transaction=False)
            pipe.unlink(*(self.key(v) for v in drop))
            pipe.zrem(self._key("items", "deltas"), *(str(v) for v in drop))
            pipe.execute()
        return len(drop)

    def get(self, first: int, last: int) -> list[ItemDelta] | None:
        """Deltas ``first .. last`` in order, or None when any of them is not in Redis.

        Raises:
            SnapshotCorrupt: a delta is present but does not decode.
        """
        if last < first:
            return []
        wanted = list(range(int(first), int(last) + 1))
        raw = self.redis.mget([self.key(v) for v in wanted])
        if any(r is None for r in raw):
            return None
        return [decode_delta(r, v) for r, v in zip(raw, wanted, strict=True)]


__all__ = [
    "DELTA_MAGIC",
    "DeltaLog",
    "ItemDelta",
    "decode_delta",
    "delta_rows",
    "encode_delta",
    "plan_delta",
    "plan_positional",
]
