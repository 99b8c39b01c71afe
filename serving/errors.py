"""One error tree for the serving package.

Every message says what was expected, what arrived, and what to do about it.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base of every error raised by ``serving``."""


class SnapshotError(ServingError):
    """An item-index snapshot in Redis cannot be used."""


class SnapshotMissing(SnapshotError):
    """No snapshot (or no such version, or a part of it) is in Redis."""


class SnapshotCorrupt(SnapshotError):
    """A snapshot is in Redis but its manifest or payload does not check out."""


class IndexInputError(ServingError, ValueError):
    """Arrays handed to an index have the wrong shape, dtype or size."""


class ClientError(ServingError):
    """The request/reply client could not complete a request."""


class ClientTimeout(ClientError, TimeoutError):
    """No response arrived for a request within its timeout."""


class ClientClosed(ClientError):
    """The client was closed while (or before) a request was in flight."""


__all__ = [
    "ClientClosed",
    "ClientError",
    "ClientTimeout",
    "IndexInputError",
    "ServingError",
    "SnapshotCorrupt",
    "SnapshotError",
    "SnapshotMissing",
]
