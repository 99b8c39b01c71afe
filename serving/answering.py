"""Answering requests: pure logic over a small store and index interface (no Kafka, no Redis).

:func:`decode_request` turns a request record's bytes into a :class:`Pending` (a request on its
way to a response, possibly already holding its error) or a :class:`Rejected` (a dead letter:
nothing in it says whom to answer). :class:`Answerer` answers a batch of pendings from one
:class:`ServingState` with one store round trip per kind of data and one batched index search
per request type. Errors are :class:`~serving.errors.RequestError` types carrying their
response code. The transport (``serving/worker.py``) only moves bytes.

The store is anything with the four read methods of :class:`AnswerStore` (``VectorStore`` in
production, an in-memory fake in unit tests); the index is a :class:`ServingState` read once per
batch from an :class:`IndexView`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import orjson
from pydantic import ValidationError

from model.errors import FeatureError, InputError
from serving.config import ServingConfig
from serving.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    NotReady,
    RequestError,
    StoreUnavailable,
    UnknownItem,
    UnknownUser,
)
from serving.follow import ServingState
from serving.index import LoadedIndex
from serving.queries import item_queries, user_queries
from serving.timing import thread_clock
from serving.users import SharedRows
from stream.schemas import MAX_ID_LEN, DecodeError, Request, describe_validation_error, loads_object

if TYPE_CHECKING:
    from serving.store import UserVectors

log = logging.getLogger(__name__)

HISTORY_QUERIES = 20
"""Most recent history items that i2i_history searches from (the whole history is excluded)."""
POPULAR_EXTRA = 1000
"""Popular items fetched beyond ``max_k``, so exclusions still leave ``k`` of them."""
OVERSIZE_PARSE_LIMIT = 8 << 20
"""An oversized request up to this many bytes is parsed whole to find its ``request_id``."""
PEEK_BYTES = 64 << 10
"""Otherwise (or when it is not valid JSON) only its first bytes are scanned for the id."""

TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
"""Kafka's legal topic names (``org.apache.kafka.common.internals.Topic``)."""


# --- the interfaces answering reads from ------------------------------------------------------


class AnswerStore(Protocol):
    """The reads answering needs (``serving.store.VectorStore`` has them)."""

    def get_user_vectors(
        self, user_ids: Sequence[str], *, shared: SharedRows | None = None
    ) -> UserVectors:
        """Vectors of ``user_ids`` in order (``found[i]`` False where there is none)."""
        ...

    def get_histories(self, user_ids: Sequence[str]) -> list[list[str]]:
        """Each user's recent items, newest first."""
        ...

    def get_offline_i2i(
        self, item_ids: Sequence[str]
    ) -> tuple[int | None, list[list[tuple[str, float]] | None]]:
        """``(table version, [neighbours or None per item])``."""
        ...

    def get_popular(self, k: int) -> list[tuple[str, float]]:
        """The ``k`` most popular items, best first."""
        ...


class IndexView(Protocol):
    """Where the serving state is read (``serving.follow.IndexFollower``).

    A batch is answered inside ``pinned()``: the state it yields (None before any index is
    loaded) stays unchanged until the block ends, so a batch never mixes versions.
    """

    def current(self) -> ServingState | None:
        """The newest state (for reporting)."""
        ...

    def pinned(self) -> AbstractContextManager[ServingState | None]:
        """The newest state, held unchanged for the block."""
        ...


# --- a request on its way to a response -------------------------------------------------------


@dataclass
class Pending:
    """A decoded request on its way to a response.

    Either ``error`` (a :class:`RequestError`, with ``version`` when one was used) or ``items``
    (with ``version`` and ``fallback``); :meth:`encode` writes the wire JSON of
    :class:`~stream.schemas.Response` without a pydantic model per item (the hot path).
    """

    request: Request
    reply_to: str
    error: RequestError | None = None
    items: list[tuple[str, float]] | None = None
    version: int | None = None
    fallback: str | None = None
    item_version: int | None = None
    """The item version whose items the answer's state served (beside ``version``; see
    :class:`serving.follow.ServingState`)."""
    i2i_version: int | None = None
    """Offline i2i only: the version of the precomputed table the items came from."""

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def done(self) -> bool:
        return self.error is not None or self.items is not None

    def answer(
        self, items: list[tuple[str, float]], version: int | None, fallback: str | None = None
    ) -> None:
        self.items, self.version, self.fallback = items, version, fallback

    def fail(self, error: RequestError, version: int | None = None) -> None:
        self.error, self.items, self.version, self.fallback = error, None, version, None

    def encode(self) -> bytes:
        """The response as it goes on the wire (the JSON of :class:`Response`)."""
        return orjson.dumps(
            {
                "request_id": self.request.request_id,
                "items": [{"item_id": i, "score": s} for i, s in self.items or ()],
                "model_version": self.version,
                "item_version": self.item_version,
                "i2i_version": self.i2i_version,
                "error": None
                if self.error is None
                else {"code": self.error.code, "message": str(self.error)},
                "fallback": self.fallback,
            }
        )


@dataclass(frozen=True)
class Rejected:
    """A request record that cannot be answered (no usable request id): a dead letter."""

    stage: str  # "decode" | "validate"
    error: Exception
    reason: str


# --- decoding and admission -------------------------------------------------------------------


def check_reply_to(topic: str, config: ServingConfig) -> str:
    """``topic`` if a reply may go there, else raise :class:`InvalidRequest` saying why.

    Allowed: a legal Kafka topic name (``[a-zA-Z0-9._-]``, 1 to 249 characters, not ``.`` or
    ``..``), not internal (``__*``), not the request, dead-letter or an input topic, and either
    the response topic or a name starting with one of ``config.reply_prefixes``.
    """
    if not isinstance(topic, str) or not TOPIC_NAME.fullmatch(topic) or topic in (".", ".."):
        raise InvalidRequest(
            f"reply_to must be a Kafka topic name (1 to 249 of [a-zA-Z0-9._-], not '.' or "
            f"'..'), got {str(topic)[:80]!r}"
        )
    if topic.startswith("__"):
        raise InvalidRequest(f"reply_to may not be an internal topic, got {topic!r}")
    if topic in (config.topic_requests, config.topic_dlq, *config.input_topics):
        # whatever the prefixes allow: an answer written into an input topic is read as input
        # (a request answered again, a garbage profile kept for good on a compacted topic)
        raise InvalidRequest(f"reply_to may not be one of fmstream's own input or dead-letter "
                             f"topics, got {topic!r}")
    if topic != config.topic_responses and not any(
        p and topic.startswith(p) for p in config.reply_prefixes
    ):
        allowed = [config.topic_responses] + [f"{p}*" for p in config.reply_prefixes if p]
        raise InvalidRequest(f"reply_to {topic!r} is not allowed; allowed: {allowed}")
    return topic


def _usable_id(value: object) -> str | None:
    """A request id as the contract allows it (string or integer, 1 to 256 characters once
    stripped), or None."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value if 0 < len(value) <= MAX_ID_LEN else None


_PEEK = {
    name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*("(?:[^"\\]|\\.){0,1024}"|-?\d{1,40})')
    for name in ("request_id", "reply_to")
}


def _peek_fields(value: bytes) -> dict[str, object]:
    """``request_id`` and ``reply_to`` of a request too large to validate: parsed whole when
    that is bounded, else found by a bounded scan of its first :data:`PEEK_BYTES`."""
    if len(value) <= OVERSIZE_PARSE_LIMIT:
        try:
            obj = orjson.loads(value)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            return {k: obj.get(k) for k in _PEEK}
    head = value[:PEEK_BYTES]
    found: dict[str, object] = {}
    for name, pattern in _PEEK.items():
        m = pattern.search(head)
        if m is not None:
            try:
                found[name] = orjson.loads(m.group(1))
            except orjson.JSONDecodeError:
                pass
    return found


def _error_pending(obj: dict, error: RequestError, config: ServingConfig) -> Pending | None:
    """A pending that answers ``error`` to the request named in ``obj``; None without an id."""
    rid = _usable_id(obj.get("request_id"))
    if rid is None:
        return None
    reply = obj.get("reply_to")
    try:
        reply = check_reply_to(reply, config) if reply is not None else config.topic_responses
    except InvalidRequest:
        reply = config.topic_responses
    pending = Pending(Request(request_id=rid, type="u2i"), reply)
    pending.fail(error)
    return pending


def decode_request(value: bytes | None, config: ServingConfig) -> Pending | Rejected:
    """Decode one request record's value.

    Returns a :class:`Pending` whenever a request id can be read (holding an
    :class:`InvalidRequest` if the request is not valid: too large, malformed, a ``reply_to``
    that is not allowed, ...), else a :class:`Rejected` for the dead-letter topic.
    An illegal ``reply_to`` is answered on the response topic.
    """
    if value is None:
        return Rejected("decode", DecodeError("null value"), "empty message (null value)")
    size = len(value)
    if size > config.max_message_bytes:
        reason = f"request of {size} bytes exceeds the limit of {config.max_message_bytes} bytes"
        pending = _error_pending(_peek_fields(value), InvalidRequest(reason), config)
        return pending if pending is not None else Rejected("decode", DecodeError(reason), reason)
    try:  # the common case in one step: bytes to a valid request
        request = Request.model_validate_json(value)
    except ValidationError:
        request = None
    if request is None:  # find out why
        try:
            obj = loads_object(value)
        except DecodeError as exc:
            return Rejected("decode", exc, str(exc))
        try:
            request = Request.model_validate(obj)
        except ValidationError as exc:
            reason = describe_validation_error(exc)
            pending = _error_pending(obj, InvalidRequest(reason), config)
            return pending if pending is not None else Rejected("validate", exc, reason)
    if request.reply_to is None:
        return Pending(request, config.topic_responses)
    try:
        return Pending(request, check_reply_to(request.reply_to, config))
    except InvalidRequest as exc:
        pending = Pending(request, config.topic_responses)
        pending.fail(exc)
        return pending


def admit(p: Pending, state: ServingState | None, config: ServingConfig, now_ms: float) -> bool:
    """Check what a valid request needs before it is answered; fail ``p`` and return False if
    something is missing (a field of its type, ``k`` in bounds, its deadline, an index)."""
    r = p.request
    if (missing := r.missing_field()) is not None:
        p.fail(InvalidRequest(f"type {r.type!r} needs {missing!r}"))
    elif r.k > config.max_k:
        p.fail(InvalidRequest(f"k must be between 1 and {config.max_k}, got {r.k}"))
    elif r.deadline_ms is not None and now_ms > r.deadline_ms:
        p.fail(DeadlineExceeded(f"deadline {r.deadline_ms:.0f} ms passed before serving"))
    elif state is None:
        p.fail(
            NotReady(
                "no item index published yet; retry after the trainer has learned from some events"
            )
        )
    else:
        return True
    return False


# --- answering --------------------------------------------------------------------------------


class Answerer:
    """Answers pendings from one :class:`ServingState` and an :class:`AnswerStore`."""

    def __init__(self, store: AnswerStore, config: ServingConfig) -> None:
        self.store = store
        self.config = config
        self.store_s = 0.0
        """Seconds the last :meth:`answer` spent reading the store (user records, histories)."""
        self.store_idle_s = 0.0
        """Of :attr:`store_s`, seconds the thread neither ran nor waited for a core (Redis
        round trips, and the GIL when another thread held it on the way back)."""

    def answer(
        self, pendings: Sequence[Pending], state: ServingState | None, now_ms: float | None = None
    ) -> None:
        """Give every pending not yet done its answer or its error (never raises)."""
        now_ms = time.time() * 1000 if now_ms is None else now_ms
        self.store_s = self.store_idle_s = 0.0
        todo = [p for p in pendings if not p.done and admit(p, state, self.config, now_ms)]
        if todo and state is not None:  # admit() fails every pending without a state
            self._answer_isolated(todo, state)
            for p in todo:  # the answers name the state's version: its item version beside
                if p.version is not None:
                    p.item_version = state.item_version

    def _answer_isolated(self, todo: list[Pending], state: ServingState) -> None:
        """Answer the batch together; if that fails, answer the unanswered ones one by one so a
        bad request (e.g. a context value of the wrong type) fails alone. Once the store is
        found away (:class:`StoreUnavailable`), every request that reads it fails at once with
        that error instead of waiting on it again; the others are still answered."""
        down: StoreUnavailable | None = None
        try:
            _Batch(self, todo, state).answer()
            return
        except StoreUnavailable as exc:
            down = exc
            log.warning("%s: answering the batch's %d requests without it", exc, len(todo))
        except Exception as exc:  # noqa: BLE001 - answer, never crash the consumer
            if len(todo) == 1:
                todo[0].fail(_as_request_error(todo[0], exc), state.version)
                return
            log.info("batch of %d requests failed (%r); answering them one by one", len(todo), exc)
        for p in todo:
            if p.done:
                continue
            if down is not None and _reads_store(p.request):
                p.fail(down, state.version)
                continue
            try:
                _Batch(self, [p], state).answer()
            except StoreUnavailable as exc:
                down = exc
                p.fail(exc, state.version)
            except Exception as exc:  # noqa: BLE001
                p.fail(_as_request_error(p, exc), state.version)


def _reads_store(r: Request) -> bool:
    """Whether answering ``r`` reads the store: a user's vector or history, offline i2i tables."""
    return r.user_id is not None or (r.type == "i2i" and r.source == "offline")


def _as_request_error(p: Pending, exc: Exception) -> RequestError:
    """The error a request whose answer raised ``exc`` gets."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, FeatureError | InputError):
        return InvalidRequest(str(exc))
    log.error("request %s failed", p.request_id, exc_info=exc)
    return InternalError(f"{type(exc).__name__}: {exc}")


def _rows(loaded: LoadedIndex, item_ids: set[str]) -> set[int]:
    """Index rows of the ids that the snapshot holds (others cannot be returned anyway)."""
    row_of = loaded.snapshot.row_of
    return {row_of[i] for i in item_ids if i in row_of}


class _Batch:
    """Answers a batch of valid requests from one state: one store round trip per kind of data,
    one batched search per request type."""

    def __init__(self, answerer: Answerer, todo: list[Pending], state: ServingState) -> None:
        started, (cpu0, runq0) = time.perf_counter(), thread_clock()
        self.store = answerer.store
        self.config = answerer.config
        self.todo = todo
        self.state = state
        self.loaded = state.loaded
        self.version = state.version
        self._popular: list[tuple[str, float]] | None = None
        users = sorted({p.request.user_id for p in todo if p.request.user_id is not None})
        self.user_row = {u: i for i, u in enumerate(users)}
        # user records are composed with the shared rows of this very version (serving/users.py)
        self.vecs: UserVectors | None = (
            self.store.get_user_vectors(users, shared=state.users) if users else None
        )
        need_hist = sorted(
            {
                p.request.user_id
                for p in todo
                if p.request.user_id is not None
                and (p.request.type == "i2i_history" or p.request.exclude_seen)
            }
        )
        self.hist: dict[str, list[str]] = (
            dict(zip(need_hist, self.store.get_histories(need_hist), strict=True))
            if need_hist
            else {}
        )
        wall, (cpu1, runq1) = time.perf_counter() - started, thread_clock()
        answerer.store_s += wall
        answerer.store_idle_s += max(0.0, wall - (cpu1 - cpu0) - (runq1 - runq0))

    def answer(self) -> None:
        by_type: dict[str, list[Pending]] = {}
        for p in self.todo:
            key = (
                "i2i_offline"
                if p.request.type == "i2i" and p.request.source == "offline"
                else p.request.type
            )
            by_type.setdefault(key, []).append(p)
        for kind, handler in (
            ("u2i", self.u2i),
            ("i2i", self.i2i_online),
            ("i2i_offline", self.i2i_offline),
            ("i2i_history", self.i2i_history),
            ("rank", self.rank),
        ):
            if kind in by_type:
                handler(by_type[kind])

    # --- shared pieces ---------------------------------------------------------------------

    def has_vector(self, p: Pending) -> bool:
        return self.vecs is not None and bool(self.vecs.found[self.user_row[p.request.user_id]])

    def exclusions(self, p: Pending) -> set[str]:
        out = set(p.request.exclude_item_ids)
        if p.request.exclude_seen and p.request.user_id is not None:
            out.update(self.hist.get(p.request.user_id, ()))
        return out

    def popular(self, p: Pending) -> None:
        """The fallback: the most popular items (minus exclusions), marked as such."""
        if self._popular is None:
            self._popular = self.store.get_popular(self.config.max_k + POPULAR_EXTRA)
        excl = self.exclusions(p)
        items = [(i, s) for i, s in self._popular if i not in excl][: p.request.k]
        p.answer(items, self.version, "popular")

    def reply(self, p: Pending, found: list[tuple[int, float]], bias: float = 0.0) -> None:
        ids = self.loaded.snapshot.item_ids
        p.answer([(ids[row], score + bias) for row, score in found[: p.request.k]], self.version)

    # --- request types ---------------------------------------------------------------------

    def u2i(self, todo: list[Pending]) -> None:
        """User vector (context folded in) against the index; popular items without a vector."""
        served = []
        for p in todo:
            if self.has_vector(p):
                served.append(p)
            else:
                self.popular(p)
        if not served:
            return
        rows = [self.user_row[p.request.user_id] for p in served]
        q = user_queries(
            self.vecs.vectors[rows], [p.request.context for p in served], self.state.context
        )
        excl = [_rows(self.loaded, self.exclusions(p)) for p in served]
        hits = self.loaded.search_excluding(q, max(p.request.k for p in served), excl)
        bias = float(self.loaded.snapshot.bias)
        for p, found in zip(served, hits, strict=True):
            self.reply(p, found, bias)

    def i2i_online(self, todo: list[Pending]) -> None:
        """``[1, 0, V_i]`` against the index; never the item itself."""
        row_of = self.loaded.snapshot.row_of
        known = []
        for p in todo:
            row = row_of.get(p.request.item_id, -1)
            if row < 0:
                p.fail(
                    UnknownItem(f"item {p.request.item_id!r} is not in index v{self.version}"),
                    self.version,
                )
            else:
                known.append((p, row))
        if not known:
            return
        q = item_queries(self.loaded.snapshot.vectors[[r for _, r in known]])
        excl = [_rows(self.loaded, self.exclusions(p)) | {r} for p, r in known]
        hits = self.loaded.search_excluding(q, max(p.request.k for p, _ in known), excl)
        for (p, _), found in zip(known, hits, strict=True):
            self.reply(p, found)

    def i2i_offline(self, todo: list[Pending]) -> None:
        """The precomputed table. The answer names the batch's state like every answer
        (``model_version`` and its ``item_version``: the version contract) and the table's own
        version as ``i2i_version`` (a table keeps the number it was started at)."""
        version, tables = self.store.get_offline_i2i([p.request.item_id for p in todo])
        for p, table in zip(todo, tables, strict=True):
            p.i2i_version = version
            if table is None:
                p.fail(
                    UnknownItem(
                        f"item {p.request.item_id!r} has no offline neighbours "
                        "(unknown, or the table is not built yet)"
                    ),
                    self.version,
                )
                continue
            excl = self.exclusions(p)
            p.answer([(i, s) for i, s in table if i not in excl][: p.request.k], self.version)

    def i2i_history(self, todo: list[Pending]) -> None:
        """Neighbours of the user's recent items merged by best score, history excluded."""
        row_of = self.loaded.snapshot.row_of
        queries: list[int] = []
        excl: list[set[int]] = []
        spans: list[tuple[Pending, int, int]] = []
        for p in todo:
            history = self.hist.get(p.request.user_id, [])
            recent = [row_of[i] for i in history if i in row_of][:HISTORY_QUERIES]
            if not recent:
                self.popular(p)
                continue
            # The whole history is excluded (not only the items queried): the merged
            # neighbours are new to the user.
            banned = _rows(self.loaded, self.exclusions(p) | set(history))
            spans.append((p, len(queries), len(queries) + len(recent)))
            queries += recent
            excl += [banned] * len(recent)
        if not spans:
            return
        q = item_queries(self.loaded.snapshot.vectors[queries])
        hits = self.loaded.search_excluding(q, max(p.request.k for p, _, _ in spans), excl)
        for p, lo, hi in spans:
            best: dict[int, float] = {}
            for found in hits[lo:hi]:
                for row, score in found:
                    if score > best.get(row, -np.inf):
                        best[row] = score
            self.reply(p, sorted(best.items(), key=lambda t: -t[1]))

    def rank(self, todo: list[Pending]) -> None:
        """Full FM score (context included) of the given items, best first."""
        snapshot = self.loaded.snapshot
        for p in todo:
            if not self.has_vector(p):
                p.fail(
                    UnknownUser(f"user {p.request.user_id!r} has no published vector"),
                    self.version,
                )
                continue
            asked = dict.fromkeys(p.request.item_ids)  # a repeated id is scored once
            scored = [(i, r) for i in asked if (r := snapshot.row_of.get(i, -1)) >= 0]
            if not scored:
                p.fail(UnknownItem(
                    f"none of the {len(asked)} item_ids (e.g. {next(iter(asked))!r}) is in "
                    f"index v{self.version}; rank scores only items the trainer has published"
                ), self.version)
                continue
            row = self.user_row[p.request.user_id]
            q = user_queries(self.vecs.vectors[[row]], [p.request.context], self.state.context)[0]
            scores = snapshot.vectors[[r for _, r in scored]] @ q + snapshot.bias
            order = np.argsort(-scores, kind="stable")
            p.answer([(scored[j][0], float(scores[j])) for j in order], self.version)


__all__ = [
    "AnswerStore",
    "Answerer",
    "IndexView",
    "Pending",
    "Rejected",
    "ServingState",
    "admit",
    "check_reply_to",
    "decode_request",
]
