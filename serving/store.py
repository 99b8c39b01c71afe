"""The read side of fmstream's Redis state: :class:`VectorStore` (workers, monitoring).

The key layout is :mod:`serving.keys` (shared with the write side, ``train/store_writer.py``).
A reader that follows a version pointer always finds a complete, checksummed version.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import numpy as np
import orjson
import redis

from serving.errors import ServingError, SnapshotCorrupt, SnapshotMissing, StoreUnavailable
from serving.index import ItemSnapshot
from serving.keys import USER_HEADER, RedisKeys
from serving.users import USER_MAGIC, SharedRows, decode_user_record

logger = logging.getLogger(__name__)

_BATCH = 5_000  # keys per MGET / MSET / HSET command: bounded replies, few round trips
_FETCH_BYTES = 64 << 20  # snapshot bytes fetched per pipeline round trip

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _request_read(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """A read that answers requests: Redis unreachable (connection refused or lost, a timeout,
    still loading its data) becomes :class:`StoreUnavailable`, which the worker answers at once."""

    @functools.wraps(fn)
    def read(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(
                f"the store (Redis) did not answer: {type(exc).__name__}: {exc}; retry shortly"
            ) from exc

    return read


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


def check_binary_client(client: redis.Redis, who: str) -> None:
    """Raise :class:`ServingError` unless ``client`` returns bytes (vectors are binary)."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    if kwargs.get("decode_responses"):
        raise ServingError(
            f"{who} needs a Redis client with decode_responses=False (vectors are "
            "binary), got one with decode_responses=True; build it with "
            "stream.connect.redis_client(config)"
        )


class VectorStore:
    """Reads fmstream's Redis state: user vectors and histories, item snapshots, i2i, status.

    Also records which version each worker serves (the one thing a worker writes).

    Args:
        client: a ``redis.Redis`` built with ``decode_responses=False`` (values are binary).
        keys: the key layout (the deployment's prefix).
    """

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        check_binary_client(client, "VectorStore")
        self.redis = client
        self.keys = keys

    def key(self, *parts: str | int) -> str:
        """A key under this deployment's prefix (prefer the named ones of :attr:`keys`)."""
        return self.keys.key(*parts)

    # --- user vectors ----------------------------------------------------------------------

    @_request_read
    def get_user_vectors(
        self, user_ids: Sequence[str], *, dim: int | None = None, shared: SharedRows | None = None
    ) -> UserVectors:
        """Read the users' vectors (MGET in batches); missing users are zero rows, not found.

        A record in the composed layout (:mod:`serving.users`) is turned into ``E_user`` with
        ``shared``, the shared rows of the version being served; a plain vector is used as is.

        Args:
            user_ids: ids to read.
            dim: expected width; by default the width of the first vector found. Values of
                another width (from a model of another size) count as not found.
            shared: the shared user rows to compose with (None: no shared row is known).
        """
        n = len(user_ids)
        keys = [self.keys.user(uid) for uid in user_ids]
        pipe = self.redis.pipeline(transaction=False)
        for batch in _chunks(keys, _BATCH):
            pipe.mget(batch)
        raw: list[bytes | None] = [v for part in pipe.execute() for v in part] if n else []
        composed: dict[int, np.ndarray] = {}
        stamps: dict[int, tuple[int, float]] = {}
        records, at = [], []
        for i, value in enumerate(raw):
            if value is not None and value[:4] == USER_MAGIC:
                try:
                    rec = decode_user_record(value)
                except SnapshotCorrupt as exc:
                    logger.warning("user %r: %s; ignored", user_ids[i], exc)
                    raw[i] = None
                    continue
                assert rec is not None
                records.append(rec)
                at.append(i)
                raw[i] = None
        if records:
            widths = {r.own.shape[0] for r in records}
            for width in widths:
                part = [(i, r) for i, r in zip(at, records, strict=True) if r.own.shape[0] == width]
                vecs, missing = (shared or SharedRows()).compose([r for _, r in part])
                if missing:
                    logger.debug("%d shared user key(s) not in the served version", missing)
                for (i, r), vec in zip(part, vecs, strict=True):
                    composed[i] = vec
                    stamps[i] = (r.version, r.published_at)
        if dim is None:
            first = next((v for v in raw if v is not None and len(v) >= USER_HEADER.size), None)
            if first is not None:
                dim = (len(first) - USER_HEADER.size) // 4
            elif composed:
                dim = next(iter(composed.values())).shape[0]
            else:
                dim = 0
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
        for i, vec in composed.items():
            if vec.shape[0] != dim:
                continue
            vectors[i] = vec
            found[i] = True
            versions[i], published[i] = stamps[i]
        return UserVectors(vectors, found, versions, published)

    # --- user history ----------------------------------------------------------------------

    @_request_read
    def get_histories(
        self, user_ids: Sequence[str], *, limit: int | None = None
    ) -> list[list[str]]:
        """Each user's recent items, newest first, deduplicated keeping the first occurrence."""
        pipe = self.redis.pipeline(transaction=False)
        for uid in user_ids:
            pipe.lrange(self.keys.history(uid), 0, -1 if limit is None else limit - 1)
        out: list[list[str]] = []
        for items in pipe.execute() if user_ids else []:
            out.append(list(dict.fromkeys(i.decode() for i in items)))
        return out

    # --- item snapshots --------------------------------------------------------------------

    def current_item_version(self) -> int | None:
        """The version ``items:current`` points at, or None before the first publish."""
        raw = self.redis.get(self.keys.items_current())
        return int(raw) if raw is not None else None

    def item_versions(self) -> list[int]:
        """Snapshot versions present in Redis, ascending."""
        return [int(v) for v in self.redis.zrange(self.keys.items_versions(), 0, -1)]

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
                    f"no item snapshot published under prefix {self.keys.prefix!r}: "
                    f"expected key {self.keys.items_current()!r}; start the publisher "
                    "(or check FMSTREAM_REDIS_PREFIX)"
                )
        raw = self.redis.get(self.keys.items_manifest(version))
        if raw is None:
            raise SnapshotMissing(
                f"item snapshot v{version} has no manifest in Redis (never written, or deleted "
                "as older than the versions the publisher keeps); load the current "
                "version instead"
            )
        return parse_manifest(raw, version)

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
        keys = [self.keys.items_chunk(v, i) for i in range(manifest["chunks"])]
        keys += [self.keys.items_ids(v, i) for i in range(manifest["ids_chunks"])]
        keys += [self.keys.items_extra(v, k) for k in manifest["extra"]]
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

    # --- offline i2i -----------------------------------------------------------------------

    @_request_read
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
            raw = self.redis.get(self.keys.i2i_current())
            if raw is None:
                return None, [None] * len(item_ids)
            version = int(raw)
            if not item_ids:
                return version, []
            pipe = self.redis.pipeline(transaction=False)
            pipe.exists(self.keys.i2i(version))
            pipe.hmget(self.keys.i2i(version), list(item_ids))
            exists, values = pipe.execute()
            if exists:
                break
        out: list[list[tuple[str, float]] | None] = [
            None if value is None else [(str(i), float(s)) for i, s in orjson.loads(value)]
            for value in values
        ]
        return version, out

    # --- popular items ---------------------------------------------------------------------

    @_request_read
    def get_popular(self, k: int) -> list[tuple[str, float]]:
        """The ``k`` most popular items, best first (empty before the first publish)."""
        raw = self.redis.get(self.keys.popular())
        if raw is None or k <= 0:
            return []
        return [(str(i), float(s)) for i, s in orjson.loads(raw)[:k]]

    # --- status and workers ----------------------------------------------------------------

    def get_status(self) -> dict[str, str | int | float]:
        """The status hash, numbers parsed back to int/float."""
        raw = self.redis.hgetall(self.keys.status())
        return {k.decode(): _to_number(v) for k, v in sorted(raw.items())}

    def set_worker_version(
        self, worker_id: str, version: int, ttl_s: float = 30.0, item_version: int | None = None,
        group: Mapping[str, bool | float | int] | None = None,
    ) -> None:
        """Record the version a worker serves and the item version behind it (None: the
        version itself), and its group membership (``group``: ``member``, ``out_s``,
        ``renewals``; see :meth:`worker_groups`); all expire unless refreshed within ttl_s."""
        px = max(1, int(ttl_s * 1000))
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.worker(worker_id), int(version), px=px)
        pipe.set(self.keys.worker_items(worker_id),
                 int(version if item_version is None else item_version), px=px)
        if group is not None:
            pipe.set(self.keys.worker_group(worker_id), orjson.dumps(dict(group)), px=px)
        pipe.sadd(self.keys.workers(), worker_id)
        pipe.execute()

    def _worker_values(self, key_of: Callable[[str], str]) -> tuple[list[str], list]:
        """The listed workers and the value of ``key_of(worker)`` for each (None: expired)."""
        ids = sorted(m.decode() for m in self.redis.smembers(self.keys.workers()))
        return ids, (self.redis.mget([key_of(w) for w in ids]) if ids else [])

    def worker_versions(self) -> dict[str, int]:
        """Live workers and the version each serves (expired workers are forgotten)."""
        ids, values = self._worker_values(self.keys.worker)
        dead = [w for w, val in zip(ids, values, strict=True) if val is None]
        if dead:
            self.redis.srem(self.keys.workers(), *dead)
        return {w: int(val) for w, val in zip(ids, values, strict=True) if val is not None}

    def worker_groups(self) -> dict[str, dict]:
        """Live workers' group membership as each last reported it: ``member`` (a stable member
        of the serving group with its partitions positioned), ``out_s`` (seconds since it last
        was one), ``renewals`` (Kafka consumers its watchdog replaced). A worker that reported
        none (older code) is left out."""
        ids, values = self._worker_values(self.keys.worker_group)
        out = {}
        for w, val in zip(ids, values, strict=True):
            try:
                parsed = orjson.loads(val) if val is not None else None
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                out[w] = parsed
        return out

    def worker_item_versions(self) -> dict[str, int]:
        """Live workers and the item version behind the version each serves (the version
        contract: a worker whose item version is >= the stamp of an event's user record
        answers from a model that learned everything before that event). A worker that
        reported no item version (older code) is left out."""
        ids, values = self._worker_values(self.keys.worker_items)
        return {w: int(val) for w, val in zip(ids, values, strict=True) if val is not None}


def parse_manifest(raw: bytes, version: int) -> dict[str, Any]:
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


__all__ = [
    "USER_HEADER", "UserVectors", "VectorStore", "check_binary_client", "parse_manifest",
]
