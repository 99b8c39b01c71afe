"""A Redis lease that keeps one trainer active per model; a second instance waits as a standby.

The holder renews the lease on every loop turn. If it stalls past the TTL, a standby takes over
and the old holder, on its next renewal, learns it lost the lease and stops without writing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

import redis

from train.errors import TrainError

log = logging.getLogger(__name__)

# Extend only if we still hold it; a plain SET would steal a lease someone else took over.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class LeaseLost(TrainError, RuntimeError):
    """Another instance holds the lease now: stop without writing checkpoints."""


class Lease:
    """An exclusive, expiring lease on ``key``; :attr:`ttl_s` is its time to live."""

    def __init__(self, client: redis.Redis, key: str, ttl_s: float = 15.0) -> None:
        self._client = client
        self._key = key
        self.ttl_s = ttl_s
        self._ttl_ms = int(ttl_s * 1000)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def holder(self) -> str | None:
        """Who holds the lease now (``host:pid:nonce``), or None."""
        value = self._client.get(self._key)
        return value.decode() if value else None

    def try_acquire(self) -> bool:
        """Take the lease if it is free."""
        return bool(self._client.set(self._key, self.token, nx=True, px=self._ttl_ms))

    def acquire(self, stop: threading.Event | None = None, poll_s: float = 1.0) -> bool:
        """Wait as a standby until the lease is ours (True) or ``stop`` is set (False)."""
        announced = False
        while not (stop and stop.is_set()):
            if self.try_acquire():
                return True
            if not announced:
                log.warning("another trainer holds %s (%s); waiting as standby", self._key,
                            self.holder())
                announced = True
            time.sleep(poll_s)
        return False

    def renew(self) -> None:
        """Extend the lease; raises :class:`LeaseLost` if someone else holds it."""
        if not self._renew(keys=[self._key], args=[self.token, self._ttl_ms]):
            raise LeaseLost(f"lease {self._key} is held by {self.holder()!r}, not by us")

    def release(self) -> None:
        """Give the lease up (only if we still hold it)."""
        self._release(keys=[self._key], args=[self.token])
