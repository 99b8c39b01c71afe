"""One error tree for the serving package.

Every message says what was expected, what arrived, and what to do about it.
"""

from __future__ import annotations

from typing import ClassVar

from stream.schemas import ErrorCode


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


# --- request errors: each carries the response code the client sees --------------------------


class RequestError(ServingError):
    """A request that is answered with an error response; :attr:`code` is its wire code.

    The message is the ``error.message`` of the response: what was expected, what arrived.
    """

    code: ClassVar[ErrorCode] = "internal"


class InvalidRequest(RequestError, ValueError):
    """The request breaks the contract (a missing field, ``k`` out of bounds, a bad ``reply_to``,
    too many bytes, a context value the schema refuses)."""

    code: ClassVar[ErrorCode] = "invalid_request"


class UnknownUser(RequestError, LookupError):
    """The user has no published vector (``rank`` needs one)."""

    code: ClassVar[ErrorCode] = "unknown_user"


class UnknownItem(RequestError, LookupError):
    """The item (or every item of ``item_ids``) is not in the index or the offline table."""

    code: ClassVar[ErrorCode] = "unknown_item"


class DeadlineExceeded(RequestError, TimeoutError):
    """The request's ``deadline_ms`` passed before it was served."""

    code: ClassVar[ErrorCode] = "deadline_exceeded"


class NotReady(RequestError):
    """No item index is published yet."""

    code: ClassVar[ErrorCode] = "not_ready"


class InternalError(RequestError):
    """The worker failed answering a valid request (a bug or a backend fault)."""

    code: ClassVar[ErrorCode] = "internal"


class StoreUnavailable(InternalError):
    """The store (Redis) did not answer a read a request needs: code ``internal``; retry shortly.

    A whole batch fails with it at once: answering its requests one by one would only wait on
    the same unreachable store again, once per request.
    """


REQUEST_ERRORS: tuple[type[RequestError], ...] = (
    InvalidRequest, UnknownUser, UnknownItem, DeadlineExceeded, NotReady, InternalError,
)
"""One type per response code of the contract (``ErrorCode`` in ``stream/schemas.py``)."""


class ClientError(ServingError):
    """The request/reply client could not complete a request."""


class ClientTimeout(ClientError, TimeoutError):
    """No response arrived for a request within its timeout."""


class ClientClosed(ClientError):
    """The client was closed while (or before) a request was in flight."""


__all__ = [
    "REQUEST_ERRORS",
    "ClientClosed",
    "ClientError",
    "ClientTimeout",
    "DeadlineExceeded",
    "IndexInputError",
    "InternalError",
    "InvalidRequest",
    "NotReady",
    "RequestError",
    "ServingError",
    "SnapshotCorrupt",
    "SnapshotError",
    "SnapshotMissing",
    "UnknownItem",
    "UnknownUser",
]
