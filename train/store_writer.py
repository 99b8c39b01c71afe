"""The write side of fmstream's Redis state: what the trainer process publishes.

:class:`StoreWriter` writes user vectors and histories, item snapshots, the offline i2i table,
popular items and the status hash; workers read them through :class:`serving.store.VectorStore`.
Both build their keys from :class:`serving.keys.RedisKeys`, the one definition of the layout.
A snapshot is written chunks first, manifest second, and the pointer last (compare-and-set,
forward only), so a reader that follows the pointer always finds a complete, checksummed version.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import orjson
import redis
from hiredis import pack_command

from serving.errors import ServingError, SnapshotCorrupt
from serving.index import ItemSnapshot, as_matrix
from serving.keys import CAS_FORWARD, SNAPSHOT_FORMAT, USER_HEADER, RedisKeys
from serving.store import check_binary_client, parse_manifest
from serving.users import encode_user_records

logger = logging.getLogger(__name__)

_BATCH = 5_000  # keys per MSET / HSET command: bounded requests, few round trips
_RECORDS_PER_MSET = 1000  # user records per MSET (~0.2 MB): Redis runs one command at a time,
# so a worker's MGET waits for the MSET ahead of it (500 records: 1.1 / 5.3 ms p50 / p99 in
# Redis, loaded box); all chunks of a call go in one pipeline (one round trip). Client CPU per
# record: 0.92-0.93 us at 8192 or 1000 per MSET, 1.24 at 250 (min of 5, loaded box)
_WRITE_BYTES = 64 << 20  # snapshot bytes written per pipeline round trip

# ARGV: key prefix of user vectors (RedisKeys.user("")), JSON list of user ids, their vectors as
# one blob of fixed-size records, the record size, the header every value starts with. One call
# per chunk of users instead of an MSET of n keys and values: client CPU per user ~3 us -> 0.2 us
# (the values are cut here, in Redis); chunks stay small so Redis is never blocked for long.
_PUT_USERS = """
local prefix, size, header = ARGV[1], tonumber(ARGV[4]), ARGV[5]
local ids, blob = cjson.decode(ARGV[2]), ARGV[3]
for i, uid in ipairs(ids) do
  redis.call('SET', prefix .. uid, header .. string.sub(blob, (i - 1) * size + 1, i * size))
end
return #ids
"""
_USERS_PER_CALL = 1000
# ARGV[1]: JSON [[user ids], [item ids]]: aligned pairs, oldest first; ARGV[2]: max_len; ARGV[3]:
# the key prefix of history lists (RedisKeys.history("")). The pairs are grouped per user here,
# in first-seen order, so each user gets ONE LPUSH of its items (the newest max_len of them) per
# call: grouping them in the publisher thread cost ~1 us of client CPU per event (a Python
# dict/list append per event), shipping the two columns as one JSON blob ~0.1. LPUSH leaves the
# newest at the head; LTRIM bounds the list (only when LPUSH's new length says it is over). The
# keys are built here rather than passed as KEYS (packing two arguments per user in redis-py
# cost ~3.5 us of client CPU per event; standalone Redis; a Redis Cluster would need the keys
# declared).
_HISTORY_PAIRS_PER_CALL = 100
"""Pairs per history script call: a worker's read waits behind a running script (Redis runs one
command at a time); calls of 500 pairs took 2.6 ms p50 / 11.6 ms p99 inside Redis on the loaded
box (RESULTS worker section 4), 100 pairs bound that to ~1 ms."""
_PUSH_HISTORY = """
local data = cjson.decode(ARGV[1])
local max_len = tonumber(ARGV[2])
local prefix = ARGV[3]
local users, items = data[1], data[2]
local per, order = {}, {}
for i = 1, #users do
  local uid = users[i]
  local list = per[uid]
  if list == nil then
    list = {}
    per[uid] = list
    order[#order + 1] = uid
  end
  list[#list + 1] = items[i]
end
for _, uid in ipairs(order) do
  local list = per[uid]
  local key = prefix .. uid
  if redis.call('LPUSH', key, unpack(list, math.max(1, #list - max_len + 1))) > max_len then
    redis.call('LTRIM', key, 0, max_len - 1)
  end
end
return #order
"""


_PUT_HISTORIES = """
local data = cjson.decode(ARGV[1])
local prefix = ARGV[2]
local users, lists = data[1], data[2]
for i = 1, #users do
  local key = prefix .. users[i]
  local list = lists[i]
  redis.call('DEL', key)
  for lo = 1, #list, 1000 do
    redis.call('RPUSH', key, unpack(list, lo, math.min(#list, lo + 999)))
  end
end
return #users
"""
_HISTORY_USERS_PER_CALL = 200
"""Users whose history one scripted call replaces (a republish): at 50 items each ~1 ms inside
Redis, so a worker's read waits at most that long behind one."""
_HISTORY_CALLS_PER_PIPELINE = 25  # of those calls, sent per round trip


def _chunks(seq: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def _slices(payload: bytes, size: int) -> list[memoryview]:
    """``payload`` cut into views of at most ``size`` bytes (at least one), without copying."""
    view = memoryview(payload)
    return [view[i : i + size] for i in range(0, len(view), size)] or [view]


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class StoreWriter:
    """Writes fmstream's Redis state (the trainer process is its only writer).

    Args:
        client: a ``redis.Redis`` built with ``decode_responses=False`` (values are binary).
        keys: the key layout (the deployment's prefix).
        keep_versions: item snapshots kept besides the current one.
    """

    def __init__(self, client: redis.Redis, keys: RedisKeys, keep_versions: int = 3) -> None:
        check_binary_client(client, "StoreWriter")
        self.redis = client
        self.keys = keys
        self.keep_versions = keep_versions
        self._cas_forward = client.register_script(CAS_FORWARD)
        self._push_history = client.register_script(_PUSH_HISTORY)
        self._put_histories = client.register_script(_PUT_HISTORIES)
        self._put_users = client.register_script(_PUT_USERS)

    def key(self, *parts: str | int) -> str:
        """A key under this deployment's prefix (prefer the named ones of :attr:`keys`)."""
        return self.keys.key(*parts)

    def current_item_version(self) -> int | None:
        """The version ``items:current`` points at, or None before the first publish."""
        raw = self.redis.get(self.keys.items_current())
        return int(raw) if raw is not None else None

    def item_versions(self) -> list[int]:
        """Snapshot versions present in Redis, ascending."""
        return [int(v) for v in self.redis.zrange(self.keys.items_versions(), 0, -1)]

    def put_user_vectors(
        self, user_ids: Sequence[str], vectors: np.ndarray, version: int
    ) -> None:
        """Write one vector per user (header + float32 bytes), a scripted call per 1,000 users.

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
        body = np.ascontiguousarray(mat, dtype="<f4")
        size = body.shape[1] * 4
        prefix = self.keys.user("")
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(user_ids), _USERS_PER_CALL):
            stop = min(start + _USERS_PER_CALL, len(user_ids))
            self._put_users(
                keys=[],
                args=[prefix, orjson.dumps(list(user_ids[start:stop])),
                      body[start:stop].tobytes(), size, header],
                client=pipe,
            )
        pipe.execute()


    def put_user_records(
        self,
        user_ids: Sequence[str],
        version: int,
        published_at: float,
        own: np.ndarray,
        keys: np.ndarray,
        weights: np.ndarray,
    ) -> None:
        """Write users' records (:func:`serving.users.encode_user_records`) under
        ``keys.user(id)``: one MSET per 1,000 users, all in one pipeline (redis-py packs them
        in C with hiredis installed). Client CPU per user ~1.3 us (numpy-built records; ~5
        when they were built a row at a time).

        Args:
            user_ids: n user ids.
            version, published_at: the stamp of every record.
            own: float32 ``(n, d + 2)`` own parts; keys: int64 ``(n, L)`` shared keys (0 =
                padding, dropped); weights: float32 ``(n, L)``.

        Raises:
            ServingError: shapes that do not match ``user_ids``.
            redis.RedisError: Redis refused or is unreachable (nothing is retried here).
        """
        n = len(user_ids)
        own = np.asarray(own)
        keys, weights = np.asarray(keys), np.asarray(weights)
        if own.ndim != 2 or own.shape[0] != n or keys.shape != weights.shape or (
                keys.ndim != 2 or keys.shape[0] != n):
            raise ServingError(
                f"put_user_records: {n} user ids with own {own.shape}, keys {keys.shape}, "
                f"weights {weights.shape}; expected (n, d + 2), (n, L) and (n, L)"
            )
        if not n:
            return
        values = encode_user_records(version, published_at, own, keys, weights)
        prefix = self.keys.user("")
        commands = []
        for start in range(0, n, _RECORDS_PER_MSET):
            stop = min(n, start + _RECORDS_PER_MSET)
            args: list[Any] = [None] * (2 * (stop - start) + 1)
            args[0] = "MSET"
            args[1::2] = [prefix + u for u in user_ids[start:stop]]
            args[2::2] = values[start:stop]
            commands.append(pack_command(tuple(args)))
        self.send_packed(commands)

    def send_packed(self, commands: Sequence[bytes]) -> list[Any]:
        """Send commands packed by ``hiredis.pack_command`` in one round trip on one pooled
        connection and return their replies (raw, as Redis sent them).

        What a redis-py pipeline does, minus its packing: redis-py's packer runs a Python
        generator over every argument before handing them to the same ``pack_command``, ~40%
        of the publisher thread's CPU for the user-record MSETs (cProfile, bench/ingest.py).

        Raises:
            redis.ResponseError: Redis refused a command (the connection is dropped, so no
                reply is left unread on it; the commands before it took effect).
            redis.ConnectionError / redis.TimeoutError: Redis unreachable (nothing retried).
        """
        if not commands:
            return []
        pool = self.redis.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(list(commands))
            return [conn.read_response() for _ in commands]
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

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
        if not len(user_ids):
            return
        # Scripted calls of at most _HISTORY_PAIRS_PER_CALL pairs, one JSON argument each, in one
        # pipeline; Redis groups each call's pairs per user (see _PUSH_HISTORY). A script runs
        # atomically: small calls bound how long a worker's read waits behind one.
        users = user_ids if isinstance(user_ids, list) else list(user_ids)
        items = item_ids if isinstance(item_ids, list) else list(item_ids)
        prefix, step = self.keys.history(""), _HISTORY_PAIRS_PER_CALL
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(users), step):
            pairs = orjson.dumps([users[start:start + step], items[start:start + step]])
            self._push_history(keys=[], args=[pairs, max_len, prefix], client=pipe)
        pipe.execute()

    def put_histories(
        self, user_ids: Sequence[str], histories: Sequence[Sequence[str]], max_len: int
    ) -> int:
        """Replace users' recent items (each list newest first, cut to ``max_len``); users
        with an empty list are left alone. Returns the number of lists written."""
        if len(user_ids) != len(histories):
            raise ServingError(
                f"put_histories: {len(user_ids)} users for {len(histories)} histories"
            )
        # one scripted call per _HISTORY_USERS_PER_CALL users (DEL + RPUSH inside Redis), the
        # calls _HISTORY_CALLS_PER_PIPELINE at a time in a pipeline: two pipelined commands per
        # user cost ~10 us of client CPU each in redis-py (bench/RESULTS.md 'redis — ...')
        kept = [(uid, items[:max_len])
                for uid, items in zip(user_ids, histories, strict=True) if items]
        prefix, step = self.keys.history(""), _HISTORY_USERS_PER_CALL
        per_pipe = _HISTORY_CALLS_PER_PIPELINE * step
        for start in range(0, len(kept), per_pipe):
            pipe = self.redis.pipeline(transaction=False)
            for lo in range(start, min(start + per_pipe, len(kept)), step):
                part = kept[lo : lo + step]
                payload = orjson.dumps([[u for u, _ in part], [h for _, h in part]])
                self._put_histories(keys=[], args=[payload, prefix], client=pipe)
            pipe.execute()
        return len(kept)


    def put_item_snapshot(self, snapshot: ItemSnapshot, chunk_bytes: int = 4 << 20) -> bool:
        """Publish an item snapshot: chunks, then manifest, then (last) the forward-only pointer.

        A version not above the current one is not written (a warning is logged). After the
        pointer moves, versions older than the current and the ``keep_versions`` before
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
        self.redis.zadd(self.keys.items_versions(), {str(v): v})
        # Several round trips of bounded size: one huge pipeline would stall other clients.
        pipe = self.redis.pipeline(transaction=False)
        pending = 0
        parts = [(self.keys.items_chunk(v, i), p) for i, p in enumerate(vec_parts)]
        parts += [(self.keys.items_ids(v, i), p) for i, p in enumerate(id_parts)]
        parts += [(self.keys.items_extra(v, k), snapshot.extra[k]) for k in extra_names]
        for key, payload in parts:
            pipe.set(key, payload)
            pending += len(payload)
            if pending >= _WRITE_BYTES:
                pipe.execute()
                pending = 0
        pipe.set(self.keys.items_manifest(v), orjson.dumps(manifest))
        pipe.execute()
        moved = bool(self._cas_forward(keys=[self.keys.items_current()], args=[v]))
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


    def _snapshot_keys(self, version: int) -> list[str]:
        """Every key of one snapshot version (from its manifest, else by a SCAN)."""
        raw = self.redis.get(self.keys.items_manifest(version))
        try:
            m = parse_manifest(raw, version) if raw is not None else None
        except SnapshotCorrupt:
            m = None
        if m is None:
            pattern = _glob_escape(self.keys.items_version_prefix(version)) + "*"
            return [k.decode() for k in self.redis.scan_iter(match=pattern, count=1000)]
        keys = [self.keys.items_chunk(version, i) for i in range(m["chunks"])]
        keys += [self.keys.items_ids(version, i) for i in range(m["ids_chunks"])]
        keys += [self.keys.items_extra(version, k) for k in m["extra"]]
        return [*keys, self.keys.items_manifest(version)]

    def _drop_old_item_versions(self, current: int) -> None:
        """Delete snapshots older than ``current`` and the ``keep_versions`` before it."""
        older = [v for v in self.item_versions() if v < current]
        drop = older[: max(0, len(older) - self.keep_versions)]
        for v in drop:
            keys = self._snapshot_keys(v)
            pipe = self.redis.pipeline(transaction=False)
            for batch in _chunks(keys, _BATCH):
                pipe.unlink(*batch)  # freed in the background, no stall
            pipe.zrem(self.keys.items_versions(), str(v))
            pipe.execute()
            logger.debug("dropped item snapshot v%d (%d keys)", v, len(keys))


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
        raw = self.redis.get(self.keys.i2i_current())
        if raw is not None and v <= int(raw):
            logger.log(
                logging.INFO if v == int(raw) else logging.WARNING,
                "offline i2i v%d not written: Redis already has v%s (versions only move "
                "forward; publish a higher version)", v, raw.decode(),
            )
            return False
        key = self.keys.i2i(v)
        pipe = self.redis.pipeline(transaction=False)
        pipe.unlink(key)  # leftovers of an interrupted earlier write of this version
        pipe.zadd(self.keys.i2i_versions(), {str(v): v})
        items = list(neighbours.items())
        for batch in _chunks(items, _BATCH):
            pipe.hset(
                key,
                mapping={
                    iid: orjson.dumps([[str(j), float(s)] for j, s in nbrs]) for iid, nbrs in batch
                },
            )
        pipe.execute()
        moved = bool(self._cas_forward(keys=[self.keys.i2i_current()], args=[v]))
        if not moved:
            logger.warning("offline i2i v%d written but Redis already points at a newer one", v)
            return False
        versions = [int(x) for x in self.redis.zrange(self.keys.i2i_versions(), 0, -1)]
        drop = [x for x in versions if x < v][:-1]
        if drop:
            pipe = self.redis.pipeline(transaction=False)
            pipe.unlink(*(self.keys.i2i(x) for x in drop))
            pipe.zrem(self.keys.i2i_versions(), *(str(x) for x in drop))
            pipe.execute()
        logger.info("published offline i2i v%d for %d items", v, len(items))
        return True


    def put_popular(self, items: Sequence[tuple[str, float]]) -> None:
        """Replace the popular-items list (stored best first)."""
        ranked = sorted(((str(i), float(s)) for i, s in items), key=lambda p: -p[1])
        self.redis.set(self.keys.popular(), orjson.dumps(ranked))


    def put_status(self, **fields: str | int | float) -> None:
        """Set fields of the status hash (e.g. ``model_version=7, items_published_at=...``)."""
        if not fields:
            return
        mapping: dict[str, str] = {}
        for name, value in fields.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ServingError(f"status field {name!r}: expected a finite number, got {value}")
            mapping[name] = repr(value) if isinstance(value, float) else str(value)
        self.redis.hset(self.keys.status(), mapping=mapping)
