"""Everything fmstream keeps in Redis, behind one class: :class:`VectorStore`.

Key layout (every key under ``settings.redis_prefix``, built with ``settings.redis_key``):

========================== ======= =====================================================
key                        type    value
========================== ======= =====================================================
``user:{user_id}``         string  header ``<q d`` (int64 version, float64 publish time)
                                   + raw little-endian float32 vector (augmented E_user)
``hist:{user_id}``         list    recent item ids, newest first, bounded (LPUSH + LTRIM)
``items:current``          string  current item snapshot version (only ever moves forward)
``items:versions``         zset    snapshot versions written (score = version)
``items:{v}:manifest``     string  JSON manifest (n, dim, dtype, bias, chunks, sha256, ...)
``items:{v}:chunk:{i}``    string  i-th slice of the float32 ``(n, dim)`` vector bytes
``items:{v}:ids:{i}``      string  i-th slice of the orjson list of item ids
``items:{v}:extra:{name}`` string  opaque blob shipped with the snapshot (e.g. ``context``)
``i2i:current``            string  current offline i2i version (only moves forward)
``i2i:versions``           zset    offline i2i versions written
``i2i:{v}``                hash    item id -> orjson ``[[item_id, score], ...]``
``popular``                string  orjson ``[[item_id, score], ...]``, best first
``status``                 hash    publisher/trainer progress (model_version, *_published_at)
``workers``                set     worker ids that reported a version
``worker:{id}``            string  the item version a worker serves (expires: dead workers vanish)
========================== ======= =====================================================

A snapshot is written chunks first, manifest second, and the pointer last (compare-and-set, forward
only), so a reader that follows the pointer always finds a complete, checksummed version.
"""

from __future__ import annotations

import hashlib
import logging
import math
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import redis

from fmstream.settings import Settings
from serving.errors import ServingError, SnapshotCorrupt, SnapshotMissing
from serving.index import ItemSnapshot, as_matrix

logger = logging.getLogger(__name__)

USER_HEADER = struct.Struct("<qd")
"""Header of a user-vector value: int64 model version, float64 publish time (epoch seconds)."""

SNAPSHOT_FORMAT = 1
_BATCH = 5_000  # keys per MGET / MSET / HSET command: bounded replies, few round trips
_FETCH_BYTES = 64 << 20  # snapshot bytes fetched per pipeline round trip

# Move a version pointer only forward: returns 1 if it moved, 0 if the stored one is >= ours.
# KEYS: history lists; ARGV: max_len, then per key: n, item_1 .. item_n (oldest first).
# LPUSH leaves the newest at the head; LTRIM bounds the list.
_PUSH_HISTORY = """
local max_len = tonumber(ARGV[1])
local pos = 2
for i, key in ipairs(KEYS) do
  local n = tonumber(ARGV[pos])
  redis.call('LPUSH', key, unpack(ARGV, pos + 1, pos + n))
  redis.call('LTRIM', key, 0, max_len - 1)
  pos = pos + n + 1
end
return #KEYS
"""
_CAS_FORWARD = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or (tonumber(cur) < tonumber(ARGV[1])) then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


@dataclass(frozen=True, eq=False)
class UserVectors:
    """User vectors read back from Redis, aligned with the requested ids.

    Attributes:
        vectors: float32 ``(n, d)``; zeros where not found.
        found: bool ``(n,)``.
        versions: int64 ``(n,)`` model version of each vector; -1 where not found.
        published_at: float64 ``(n,)`` publish time (epoch seconds); NaN where not found.
    """

    vectors: np.ndarray
    found: np.ndarray
    versions: np.ndarray
    published_at: np.ndarray


def _chunks(seq: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def _slices(payload: bytes, size: int) -> list[memoryview]:
    """``payload`` cut into views of at most ``size`` bytes (at least one), without copying."""
    view = memoryview(payload)
    return [view[i : i + size] for i in range(0, len(view), size)] or [view]


def _to_number(raw: bytes | str) -> str | int | float:
    text = raw.decode() if isinstance(raw, bytes) else raw
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class VectorStore:
    """fmstream's Redis state: user vectors and histories, item snapshots, i2i, status.

    Args:
        client: a ``redis.Redis`` built with ``decode_responses=False`` (values are binary).
        settings: provides ``redis_key`` (the prefix) and ``keep_versions``.
    """

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
        if kwargs.get("decode_responses"):
            raise ServingError(
                "VectorStore needs a Redis client with decode_responses=False (vectors are "
                "binary), got one with decode_responses=True; build it with "
                "redis.Redis.from_url(url)"
            )
        self.redis = client
        self.settings = settings
        self._cas_forward = client.register_script(_CAS_FORWARD)
        self._push_history = client.register_script(_PUSH_HISTORY)

    @classmethod
    def from_settings(cls, settings: Settings) -> VectorStore:
        """A store on ``settings.redis_url``."""
        return cls(redis.Redis.from_url(settings.redis_url), settings)

    def key(self, *parts: str | int) -> str:
        """A key under this deployment's prefix."""
        return self.settings.redis_key(*parts)

    # --- user vectors ----------------------------------------------------------------------

    def put_user_vectors(
        self, user_ids: Sequence[str], vectors: np.ndarray, version: int
    ) -> None:
        """Write one vector per user (header + float32 bytes), batched with MSET.

        Args:
            user_ids: n user ids.
            vectors: float32 ``(n, d)`` (augmented E_user).
            version: model version the vectors come from.
        """
        mat = as_matrix(vectors, name="user vectors")
        if mat.shape[0] != len(user_ids):
            raise ServingError(
                f"put_user_vectors: {len(user_ids)} user ids for {mat.shape[0]} vectors; "
                "expected one vector per id"
            )
        if not len(user_ids):
            return
        header = USER_HEADER.pack(int(version), time.time())
        body = mat.astype("<f4", copy=False)
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(user_ids), _BATCH):
            stop = min(start + _BATCH, len(user_ids))
            pipe.mset(
                {
                    self.key("user", uid): header + body[i].tobytes()
                    for i, uid in zip(range(start, stop), user_ids[start:stop], strict=True)
                }
            )
        pipe.execute()

    def get_user_vectors(self, user_ids: Sequence[str], *, dim: int | None = None) -> UserVectors:
        """Read the users' vectors (MGET in batches); missing users are zero rows, not found.

        Args:
            user_ids: ids to read.
            dim: expected width; by default the width of the first vector found. Values of
                another width (from a model of another size) count as not found.
        """
        n = len(user_ids)
        keys = [self.key("user", uid) for uid in user_ids]
        pipe = self.redis.pipeline(transaction=False)
        for batch in _chunks(keys, _BATCH):
            pipe.mget(batch)
        raw: list[bytes | None] = [v for part in pipe.execute() for v in part] if n else []
        if dim is None:
            first = next((v for v in raw if v is not None and len(v) >= USER_HEADER.size), None)
            dim = (len(first) - USER_HEADER.size) // 4 if first is not None else 0
        expected = USER_HEADER.size + 4 * dim
        found = np.fromiter((v is not None and len(v) == expected for v in raw), bool, count=n)
        bad = sum(1 for v in raw if v is not None) - int(found.sum())
        if bad:
            logger.warning("%d user vector(s) have another width than %d: ignored", bad, dim)
        vectors = np.zeros((n, dim), dtype=np.float32)
        versions = np.full(n, -1, dtype=np.int64)
        published = np.full(n, np.nan, dtype=np.float64)
        idx = np.flatnonzero(found)
        if len(idx):
            blob = b"".join(raw[i] for i in idx)  # type: ignore[misc]
            rec = np.frombuffer(
                blob,
                dtype=np.dtype([("version", "<i8"), ("at", "<f8"), ("vec", "<f4", (dim,))]),
            )
            vectors[idx] = rec["vec"]
            versions[idx] = rec["version"]
            published[idx] = rec["at"]
        return UserVectors(vectors, found, versions, published)

    # --- user history ----------------------------------------------------------------------

    def push_history(
        self, user_ids: Sequence[str], item_ids: Sequence[str], max_len: int
    ) -> None:
        """Append interactions (in event order) to each user's recent items, newest first.

        Args:
            user_ids, item_ids: aligned pairs, oldest first.
            max_len: items kept per user (LTRIM).
        """
        if len(user_ids) != len(item_ids):
            raise ServingError(
                f"push_history: {len(user_ids)} users for {len(item_ids)} items; expected pairs"
            )
        if max_len < 1:
            raise ServingError(f"push_history: max_len must be >= 1, got {max_len}")
        per_user: dict[str, list[str]] = {}
        for uid, iid in zip(user_ids, item_ids, strict=True):
            per_user.setdefault(uid, []).append(iid)
        if not per_user:
            return
        # One scripted call per batch: packing 2 commands per user in redis-py cost far more
        # than the work itself (profiled: ~3/4 of publish time under ingest load).
        keys, args = [], [max_len]
        for uid, items in per_user.items():
            keys.append(self.key("hist", uid))
            tail = items[-max_len:]
            args.append(len(tail))
            args.extend(tail)
        self._push_history(keys=keys, args=args)

    def get_histories(
        self, user_ids: Sequence[str], *, limit: int | None = None
    ) -> list[list[str]]:
        """Each user's recent items, newest first, deduplicated keeping the first occurrence."""
        pipe = self.redis.pipeline(transaction=False)
        for uid in user_ids:
            pipe.lrange(self.key("hist", uid), 0, -1 if limit is None else limit - 1)
        out: list[list[str]] = []
        for items in pipe.execute() if user_ids else []:
            out.append(list(dict.fromkeys(i.decode() for i in items)))
        return out

    # --- item snapshots --------------------------------------------------------------------

    def current_item_version(self) -> int | None:
        """The version ``items:current`` points at, or None before the first publish."""
        raw = self.redis.get(self.key("items", "current"))
        return int(raw) if raw is not None else None

    def item_versions(self) -> list[int]:
        """Snapshot versions present in Redis, ascending."""
        return [int(v) for v in self.redis.zrange(self.key("items", "versions"), 0, -1)]

    def put_item_snapshot(self, snapshot: ItemSnapshot, chunk_bytes: int = 4 << 20) -> bool:
        """Publish an item snapshot: chunks, then manifest, then (last) the forward-only pointer.

        A version not above the current one is not written (a warning is logged). After the
        pointer moves, versions older than the current and the ``settings.keep_versions`` before
        it are deleted.

        Returns:
            True when the pointer now names this snapshot's version.
        """
        if chunk_bytes < 1:
            raise ServingError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        v = int(snapshot.version)
        current = self.current_item_version()
        if current is not None and v <= current:
            logger.log(
                logging.INFO if v == current else logging.WARNING,
                "item snapshot v%d not written: Redis already has v%d (versions only move "
                "forward; publish a higher version)", v, current,
            )
            return False
        started = time.perf_counter()
        vec_bytes = np.ascontiguousarray(snapshot.vectors, dtype="<f4").tobytes()
        ids_bytes = orjson.dumps(list(snapshot.item_ids))
        vec_parts = _slices(vec_bytes, chunk_bytes)
        id_parts = _slices(ids_bytes, chunk_bytes)
        extra_names = sorted(snapshot.extra)
        digest = hashlib.sha256()
        for part in (*vec_parts, *id_parts, *(snapshot.extra[k] for k in extra_names)):
            digest.update(part)
        manifest = {
            "format": SNAPSHOT_FORMAT,
            "version": v,
            "n": snapshot.n,
            "dim": snapshot.dim,
            "dtype": "<f4",
            "bias": float(snapshot.bias),
            "chunk_bytes": chunk_bytes,
            "chunks": len(vec_parts),
            "vector_bytes": len(vec_bytes),
            "ids_chunks": len(id_parts),
            "ids_bytes": len(ids_bytes),
            "extra": {k: len(snapshot.extra[k]) for k in extra_names},
            "sha256": digest.hexdigest(),
            "created_at": float(snapshot.created_at),
            "written_at": time.time(),
        }
        self.redis.zadd(self.key("items", "versions"), {str(v): v})
        # Several round trips of bounded size: one huge pipeline would stall other clients.
        pipe = self.redis.pipeline(transaction=False)
        pending = 0
        parts = [(self.key("items", v, "chunk", i), p) for i, p in enumerate(vec_parts)]
        parts += [(self.key("items", v, "ids", i), p) for i, p in enumerate(id_parts)]
        parts += [(self.key("items", v, "extra", k), snapshot.extra[k]) for k in extra_names]
        for key, payload in parts:
            pipe.set(key, payload)
            pending += len(payload)
            if pending >= _FETCH_BYTES:
                pipe.execute()
                pending = 0
        pipe.set(self.key("items", v, "manifest"), orjson.dumps(manifest))
        pipe.execute()
        moved = bool(self._cas_forward(keys=[self.key("items", "current")], args=[v]))
        if moved:
            logger.info(
                "published item snapshot v%d: %d x %d, %d bytes in %.3fs",
                v, snapshot.n, snapshot.dim, len(vec_bytes) + len(ids_bytes),
                time.perf_counter() - started,
            )
            self._drop_old_item_versions(v)
        else:
            logger.warning("item snapshot v%d written but a newer version won the pointer", v)
        return moved

    def item_manifest(self, version: int | None = None) -> dict[str, Any]:
        """The parsed manifest of ``version`` (default: the current one).

        Raises:
            SnapshotMissing: nothing published, or no such version.
            SnapshotCorrupt: the manifest is not valid JSON with the expected fields.
        """
        if version is None:
            version = self.current_item_version()
            if version is None:
                raise SnapshotMissing(
                    f"no item snapshot published under prefix {self.settings.redis_prefix!r}: "
                    f"expected key {self.key('items', 'current')!r}; start the publisher "
                    "(or check FMSTREAM_REDIS_PREFIX)"
                )
        raw = self.redis.get(self.key("items", version, "manifest"))
        if raw is None:
            raise SnapshotMissing(
                f"item snapshot v{version} has no manifest in Redis (never written, or deleted "
                f"as older than the newest {self.settings.keep_versions + 1}); load the current "
                "version instead"
            )
        return _parse_manifest(raw, version)

    def load_item_snapshot(self, version: int | None = None) -> ItemSnapshot:
        """Read and verify a snapshot (default: the current one).

        Raises:
            SnapshotMissing: no snapshot, no such version, or a part vanished while reading
                (deleted by newer publishes): retry with the current version.
            SnapshotCorrupt: sizes or the sha256 do not match the manifest.
        """
        manifest = self.item_manifest(version)
        v = manifest["version"]
        n, dim = manifest["n"], manifest["dim"]
        keys = [self.key("items", v, "chunk", i) for i in range(manifest["chunks"])]
        keys += [self.key("items", v, "ids", i) for i in range(manifest["ids_chunks"])]
        keys += [self.key("items", v, "extra", k) for k in manifest["extra"]]
        vec_buf = bytearray(manifest["vector_bytes"])  # writable: faiss and numpy may use it
        ids_buf = bytearray()
        extra: dict[str, bytes] = {}
        extra_names = list(manifest["extra"])
        digest = hashlib.sha256()
        offset = 0
        n_vec, n_ids = manifest["chunks"], manifest["ids_chunks"]
        per_trip = max(1, _FETCH_BYTES // max(1, manifest["chunk_bytes"]))
        for start in range(0, len(keys), per_trip):
            batch = keys[start : start + per_trip]
            values = self.redis.mget(batch)
            for j, (key, value) in enumerate(zip(batch, values, strict=True)):
                if value is None:
                    raise SnapshotMissing(
                        f"item snapshot v{v}: {key!r} vanished while loading (the version was "
                        "probably deleted by newer publishes); load the current version"
                    )
                digest.update(value)
                pos = start + j
                if pos < n_vec:
                    end = offset + len(value)
                    if end > len(vec_buf):
                        raise SnapshotCorrupt(
                            f"item snapshot v{v}: vector chunks hold more than the "
                            f"{len(vec_buf)} bytes the manifest declares; republish it"
                        )
                    vec_buf[offset:end] = value
                    offset = end
                elif pos < n_vec + n_ids:
                    ids_buf += value
                else:
                    extra[extra_names[pos - n_vec - n_ids]] = value
        problems = []
        if offset != n * dim * 4 or len(vec_buf) != n * dim * 4:
            problems.append(f"vector bytes {offset}, expected {n * dim * 4} (n={n}, dim={dim})")
        if len(ids_buf) != manifest["ids_bytes"]:
            problems.append(f"id bytes {len(ids_buf)}, expected {manifest['ids_bytes']}")
        for name, size in manifest["extra"].items():
            if len(extra.get(name, b"")) != size:
                problems.append(f"extra {name!r} has {len(extra.get(name, b''))} bytes, "
                                f"expected {size}")
        if digest.hexdigest() != manifest["sha256"]:
            problems.append(
                f"sha256 {digest.hexdigest()[:12]}…, expected {manifest['sha256'][:12]}…"
            )
        if problems:
            raise SnapshotCorrupt(
                f"item snapshot v{v} does not match its manifest: {'; '.join(problems)}; "
                "keep serving the previous version and republish"
            )
        try:
            item_ids = orjson.loads(bytes(ids_buf))
        except orjson.JSONDecodeError as exc:
            raise SnapshotCorrupt(f"item snapshot v{v}: item ids are not JSON ({exc})") from None
        if not isinstance(item_ids, list) or len(item_ids) != n:
            size = len(item_ids) if isinstance(item_ids, list) else "?"
            raise SnapshotCorrupt(
                f"item snapshot v{v}: expected a JSON list of {n} item ids, got "
                f"{type(item_ids).__name__} of {size}; republish it"
            )
        vectors = np.frombuffer(vec_buf, dtype="<f4").astype(np.float32, copy=False)
        return ItemSnapshot(
            version=v,
            item_ids=[str(i) for i in item_ids],
            vectors=vectors.reshape(n, dim),
            bias=manifest["bias"],
            extra=extra,
            created_at=manifest["created_at"],
        )

    def _snapshot_keys(self, version: int) -> list[str]:
        """Every key of one snapshot version (from its manifest, else by a SCAN)."""
        raw = self.redis.get(self.key("items", version, "manifest"))
        try:
            m = _parse_manifest(raw, version) if raw is not None else None
        except SnapshotCorrupt:
            m = None
        if m is None:
            pattern = _glob_escape(self.key("items", version, "")) + "*"
            return [k.decode() for k in self.redis.scan_iter(match=pattern, count=1000)]
        keys = [self.key("items", version, "chunk", i) for i in range(m["chunks"])]
        keys += [self.key("items", version, "ids", i) for i in range(m["ids_chunks"])]
        keys += [self.key("items", version, "extra", k) for k in m["extra"]]
        return [*keys, self.key("items", version, "manifest")]

    def _drop_old_item_versions(self, current: int) -> None:
        """Delete snapshots older than ``current`` and the ``keep_versions`` before it."""
        older = [v for v in self.item_versions() if v < current]
        drop = older[: max(0, len(older) - self.settings.keep_versions)]
        for v in drop:
            keys = self._snapshot_keys(v)
            pipe = self.redis.pipeline(transaction=False)
            for batch in _chunks(keys, _BATCH):
                pipe.unlink(*batch)  # freed in the background, no stall
            pipe.zrem(self.key("items", "versions"), str(v))
            pipe.execute()
            logger.debug("dropped item snapshot v%d (%d keys)", v, len(keys))

    # --- offline i2i -----------------------------------------------------------------------

    def put_offline_i2i(
        self, version: int, neighbours: Mapping[str, Sequence[tuple[str, float]]]
    ) -> bool:
        """Publish an offline item-to-item table as a hash, then move ``i2i:current`` forward.

        A version not above the current one is not written (a warning is logged). Versions older
        than the previous one are deleted (the previous is kept for readers that are between
        reading the pointer and the hash).

        Returns:
            True when the pointer now names this version.
        """
        v = int(version)
        raw = self.redis.get(self.key("i2i", "current"))
        if raw is not None and v <= int(raw):
            logger.log(
                logging.INFO if v == int(raw) else logging.WARNING,
                "offline i2i v%d not written: Redis already has v%s (versions only move "
                "forward; publish a higher version)", v, raw.decode(),
            )
            return False
        key = self.key("i2i", v)
        pipe = self.redis.pipeline(transaction=False)
        pipe.unlink(key)  # leftovers of an interrupted earlier write of this version
        pipe.zadd(self.key("i2i", "versions"), {str(v): v})
        items = list(neighbours.items())
        for batch in _chunks(items, _BATCH):
            pipe.hset(
                key,
                mapping={
                    iid: orjson.dumps([[str(j), float(s)] for j, s in nbrs]) for iid, nbrs in batch
                },
            )
        pipe.execute()
        moved = bool(self._cas_forward(keys=[self.key("i2i", "current")], args=[v]))
        if not moved:
            logger.warning("offline i2i v%d written but Redis already points at a newer one", v)
            return False
        versions = [int(x) for x in self.redis.zrange(self.key("i2i", "versions"), 0, -1)]
        drop = [x for x in versions if x < v][:-1]
        if drop:
            pipe = self.redis.pipeline(transaction=False)
            pipe.unlink(*(self.key("i2i", x) for x in drop))
            pipe.zrem(self.key("i2i", "versions"), *(str(x) for x in drop))
            pipe.execute()
        logger.info("published offline i2i v%d for %d items", v, len(items))
        return True

    def get_offline_i2i(
        self, item_ids: Sequence[str]
    ) -> tuple[int | None, list[list[tuple[str, float]] | None]]:
        """The current offline neighbours of each item (None for items without an entry).

        Returns:
            ``(version, neighbours)``; version is None (and all None) before the first publish.
        """
        values: list[bytes | None] = [None] * len(item_ids)
        version: int | None = None
        for _ in range(3):  # the pointer may move (and old hashes vanish) between two reads
            raw = self.redis.get(self.key("i2i", "current"))
            if raw is None:
                return None, [None] * len(item_ids)
            version = int(raw)
            if not item_ids:
                return version, []
            pipe = self.redis.pipeline(transaction=False)
            pipe.exists(self.key("i2i", version))
            pipe.hmget(self.key("i2i", version), list(item_ids))
            exists, values = pipe.execute()
            if exists:
                break
        out: list[list[tuple[str, float]] | None] = [
            None if value is None else [(str(i), float(s)) for i, s in orjson.loads(value)]
            for value in values
        ]
        return version, out

    # --- popular items ---------------------------------------------------------------------

    def put_popular(self, items: Sequence[tuple[str, float]]) -> None:
        """Replace the popular-items list (stored best first)."""
        ranked = sorted(((str(i), float(s)) for i, s in items), key=lambda p: -p[1])
        self.redis.set(self.key("popular"), orjson.dumps(ranked))

    def get_popular(self, k: int) -> list[tuple[str, float]]:
        """The ``k`` most popular items, best first (empty before the first publish)."""
        raw = self.redis.get(self.key("popular"))
        if raw is None or k <= 0:
            return []
        return [(str(i), float(s)) for i, s in orjson.loads(raw)[:k]]

    # --- status and workers ----------------------------------------------------------------

    def put_status(self, **fields: str | int | float) -> None:
        """Set fields of the status hash (e.g. ``model_version=7, items_published_at=...``)."""
        if not fields:
            return
        mapping: dict[str, str] = {}
        for name, value in fields.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ServingError(f"status field {name!r}: expected a finite number, got {value}")
            mapping[name] = repr(value) if isinstance(value, float) else str(value)
        self.redis.hset(self.key("status"), mapping=mapping)

    def get_status(self) -> dict[str, str | int | float]:
        """The status hash, numbers parsed back to int/float."""
        raw = self.redis.hgetall(self.key("status"))
        return {k.decode(): _to_number(v) for k, v in sorted(raw.items())}

    def set_worker_version(self, worker_id: str, version: int, ttl_s: float = 30.0) -> None:
        """Record the item version a worker serves; it expires unless refreshed within ttl_s."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.key("worker", worker_id), int(version), px=max(1, int(ttl_s * 1000)))
        pipe.sadd(self.key("workers"), worker_id)
        pipe.execute()

    def worker_versions(self) -> dict[str, int]:
        """Live workers and the item version each serves (expired workers are forgotten)."""
        ids = sorted(m.decode() for m in self.redis.smembers(self.key("workers")))
        if not ids:
            return {}
        values = self.redis.mget([self.key("worker", w) for w in ids])
        dead = [w for w, val in zip(ids, values, strict=True) if val is None]
        if dead:
            self.redis.srem(self.key("workers"), *dead)
        return {w: int(val) for w, val in zip(ids, values, strict=True) if val is not None}


def _parse_manifest(raw: bytes, version: int) -> dict[str, Any]:
    """Decode and check a manifest's fields, or raise :class:`SnapshotCorrupt`."""
    try:
        m = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SnapshotCorrupt(f"item snapshot v{version}: manifest is not JSON ({exc})") from None
    need: dict[str, type | tuple[type, ...]] = {
        "version": int, "n": int, "dim": int, "bias": (int, float), "chunk_bytes": int,
        "chunks": int, "vector_bytes": int, "ids_chunks": int, "ids_bytes": int, "extra": dict,
        "sha256": str, "created_at": (int, float), "dtype": str,
    }
    if not isinstance(m, dict):
        raise SnapshotCorrupt(f"item snapshot v{version}: manifest is not a JSON object")
    wrong = [f for f, t in need.items() if not isinstance(m.get(f), t)]
    if wrong:
        raise SnapshotCorrupt(
            f"item snapshot v{version}: manifest fields missing or mistyped: {', '.join(wrong)}; "
            "was it written by another fmstream version?"
        )
    if m["version"] != version or m["dtype"] != "<f4" or m["n"] < 0 or m["dim"] < 1:
        raise SnapshotCorrupt(
            f"item snapshot v{version}: manifest says version={m['version']}, dtype={m['dtype']}, "
            f"n={m['n']}, dim={m['dim']}; expected version {version}, dtype <f4, n >= 0, dim >= 1"
        )
    return m


__all__ = ["USER_HEADER", "UserVectors", "VectorStore"]
