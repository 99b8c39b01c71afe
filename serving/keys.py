"""The Redis key layout, defined once: the read side (``serving/``) and the write side
(``train/``) both build their keys here.

Every key lives under a deployment prefix (``FMSTREAM_REDIS_PREFIX``, default ``fm:``):

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
``items:notice``           channel pub/sub: the publisher announces each version it made current
                                   (wakes the workers' followers; the poll stays the fallback)
``i2i:current``            string  current offline i2i version (only moves forward)
``i2i:versions``           zset    offline i2i versions written
``i2i:{v}``                hash    item id -> orjson ``[[item_id, score], ...]``
``popular``                string  orjson ``[[item_id, score], ...]``, best first
``status``                 hash    publisher/trainer progress (model_version, *_published_at)
``workers``                set     worker ids that reported a version
``worker:{id}``            string  the version a worker serves (expires: dead workers vanish)
``worker_items:{id}``      string  the item version behind it (same expiry; <= ``worker:{id}``)
``worker_group:{id}``      string  orjson ``{"member": bool, "out_s": float, "renewals": int}``:
                                   whether the worker is a stable member of the serving group,
                                   seconds since it last was, consumers it renewed (same expiry)
``trainer:lease``          string  the trainer lease (holder token, expiring)
========================== ======= =====================================================

A snapshot is written chunks first, manifest second, and the pointer last (compare-and-set,
forward only), so a reader that follows the pointer always finds a complete, checksummed version.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

USER_HEADER = struct.Struct("<qd")
"""Header of a user-vector value: int64 model version, float64 publish time (epoch seconds)."""

SNAPSHOT_FORMAT = 1
"""Format number written into (and required from) every snapshot manifest."""

CAS_FORWARD = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or (tonumber(cur) < tonumber(ARGV[1])) then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0
"""
"""Lua: move a version pointer only forward; returns 1 if it moved, 0 if the stored one is >= ours
(KEYS[1] the pointer, ARGV[1] the version). Every writer of a version pointer uses it."""


@dataclass(frozen=True)
class RedisKeys:
    """Builds every fmstream key under one deployment prefix."""

    prefix: str = "fm:"

    def key(self, *parts: str | int) -> str:
        """A key under the prefix, e.g. ``fm:user:196``."""
        return self.prefix + ":".join(str(p) for p in parts)

    def user(self, user_id: str) -> str:
        return self.key("user", user_id)

    def history(self, user_id: str) -> str:
        return self.key("hist", user_id)

    def items_current(self) -> str:
        return self.key("items", "current")

    def items_versions(self) -> str:
        return self.key("items", "versions")

    def items_manifest(self, version: int) -> str:
        return self.key("items", version, "manifest")

    def items_chunk(self, version: int, i: int) -> str:
        return self.key("items", version, "chunk", i)

    def items_ids(self, version: int, i: int) -> str:
        return self.key("items", version, "ids", i)

    def items_extra(self, version: int, name: str) -> str:
        return self.key("items", version, "extra", name)

    def items_deltas(self) -> str:
        return self.key("items", "deltas")

    def items_notice(self) -> str:
        return self.key("items", "notice")

    def items_version_prefix(self, version: int) -> str:
        """Prefix of every key of one snapshot version (for a SCAN when its manifest is gone)."""
        return self.key("items", version, "")

    def i2i_current(self) -> str:
        return self.key("i2i", "current")

    def i2i_versions(self) -> str:
        return self.key("i2i", "versions")

    def i2i(self, version: int) -> str:
        return self.key("i2i", version)

    def popular(self) -> str:
        return self.key("popular")

    def status(self) -> str:
        return self.key("status")

    def workers(self) -> str:
        return self.key("workers")

    def worker(self, worker_id: str) -> str:
        return self.key("worker", worker_id)

    def worker_items(self, worker_id: str) -> str:
        return self.key("worker_items", worker_id)

    def worker_group(self, worker_id: str) -> str:
        return self.key("worker_group", worker_id)

    def trainer_lease(self) -> str:
        return self.key("trainer", "lease")
