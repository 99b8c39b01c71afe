"""The serving worker: requests from Kafka in, answers on the reply topic out.

Workers form the consumer group ``fmstream-serving`` (add workers to scale). Each poll's requests
are answered together: one Redis round trip for user vectors and histories, one batched index
search per request type. A background thread loads new item snapshots and swaps ONE reference,
so a request never waits for a build and a batch never mixes versions.

Replies are pipelined: a batch's replies are handed to the producer and the worker polls the next
batch while the broker acknowledges them. Offsets are committed only up to batches whose replies
were all acknowledged (at least once: after a crash or a rebalance the unacknowledged tail is
answered again, and the client drops the repeats by request id). A reply the producer gives up on
rewinds the consumer to the first unacknowledged request, which is then answered again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson
from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata, TopicPartition
from pydantic import ValidationError

from fmstream.settings import Settings
from model.compose import ContextTable
from model.errors import FeatureError, InputError
from serving.errors import ServingError
from serving.graph import GraphKeeper
from serving.index import LoadedIndex, configure_faiss
from serving.queries import item_queries, user_queries
from serving.store import UserVectors, VectorStore
from stream.consume import DeadLetters, flatten, make_consumer, make_producer
from stream.schemas import (
    DecodeError,
    ErrorInfo,
    Request,
    Response,
    describe_validation_error,
    dumps,
    loads_object,
)

log = logging.getLogger(__name__)

HISTORY_QUERIES = 20
"""Most recent history items that i2i_history searches from (the whole history is excluded)."""
COMMIT_INTERVAL_S = 0.2
"""Acknowledged offsets are committed at most this often (and at shutdown)."""
POLL_MAX_RECORDS = 512
"""Requests answered together at most (one Redis round trip and one search per type)."""
FETCH_MAX_WAIT_MS = 100
"""Broker-side wait of a fetch that finds no request. The broker answers a waiting fetch as soon
as a request arrives (fetch_min_bytes=1), so this costs no latency; measured 5 vs 100 ms: same
p50/p99, fewer empty fetches for the broker to serve while idle."""
BLAS_THRESHOLD = 200
"""faiss uses BLAS for a flat search when ``queries x dim`` reaches this: from ~6 queries at
d=34 (measured on 2 cores, 100k items: 1 query 1.0 ms scanning vs 5.0 ms with BLAS, 16 queries
22 ms vs 12 ms; faiss' own default, 128000, never uses BLAS for request-sized batches)."""


@dataclass(frozen=True)
class ServingState:
    """What one batch of requests is answered from: swapped as a single reference."""

    loaded: LoadedIndex
    context: ContextTable | None

    @property
    def version(self) -> int:
        return self.loaded.snapshot.version


@dataclass
class Pending:
    """A decoded request on its way to a response.

    An error is a full :class:`Response` in ``response``; an answer is ``items`` (with
    ``version`` and ``fallback``), encoded straight to the wire format by :meth:`encode` without
    a pydantic model per item (the hot path).
    """

    request: Request
    reply_to: str
    response: Response | None = None
    items: list[tuple[str, float]] | None = None
    version: int | None = None
    fallback: str | None = None

    @property
    def done(self) -> bool:
        return self.response is not None or self.items is not None

    def answer(
        self, items: list[tuple[str, float]], version: int | None, fallback: str | None = None
    ) -> None:
        self.items, self.version, self.fallback = items, version, fallback

    def encode(self) -> bytes:
        """The response as it goes on the wire (the JSON of :class:`Response`)."""
        if self.response is not None:
            return dumps(self.response)
        return orjson.dumps(
            {
                "request_id": self.request.request_id,
                "items": [{"item_id": i, "score": s} for i, s in self.items or ()],
                "model_version": self.version,
                "error": None,
                "fallback": self.fallback,
            }
        )


def _rows(loaded: LoadedIndex, item_ids: set[str]) -> set[int]:
    """Index rows of the ids that the snapshot holds (others cannot be returned anyway)."""
    row_of = loaded.snapshot.row_of
    return {row_of[i] for i in item_ids if i in row_of}


def _wait_for_partitions(consumer: KafkaConsumer, topic: str, stop: threading.Event) -> None:
    """Block until ``topic`` has partitions in the consumer's metadata (or ``stop``)."""
    announced = False
    while not stop.is_set():
        if consumer.partitions_for_topic(topic):
            return
        if not announced:
            log.warning("request topic %s has no partitions yet; waiting for it", topic)
            announced = True
        stop.wait(0.2)


def _failure(p: Pending, exc: Exception, state: ServingState) -> Response:
    """The error response of a request whose answer raised ``exc``."""
    if isinstance(exc, FeatureError | InputError):
        return _error(p.request.request_id, "invalid_request", str(exc), state.version)
    log.error("request %s failed", p.request.request_id, exc_info=exc)
    return _error(p.request.request_id, "internal", f"{type(exc).__name__}: {exc}", state.version)


def _error(request_id: str, code: str, message: str, version: int | None = None) -> Response:
    return Response(
        request_id=request_id, error=ErrorInfo(code=code, message=message), model_version=version
    )


# --- replies in flight and the offsets they allow to commit --------------------------------


@dataclass
class _SentBatch:
    """One polled batch whose replies are with the producer."""

    futures: list
    first: dict[TopicPartition, int]  # first offset of the batch in each partition
    upto: dict[TopicPartition, int]  # next offset of each partition once all are acknowledged
    records: Sequence[ConsumerRecord]
    pendings: list[Pending]
    started: float


class _Replies:
    """Tracks replies until the broker acknowledged them; commits what they cover."""

    def __init__(
        self, worker: Worker, consumer: KafkaConsumer, producer: KafkaProducer, dead: DeadLetters
    ) -> None:
        self.worker = worker
        self.consumer = consumer
        self.producer = producer
        self.dead = dead
        self.sent: deque[_SentBatch] = deque()
        self.acked: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}
        self.last_commit = time.monotonic()
        self.owned: set[TopicPartition] = set()  # the assignment as last seen
        self.fresh: set[TopicPartition] = set()  # assigned, not yet anchored

    def send(
        self, records: Sequence[ConsumerRecord], pendings: list[Pending], started: float
    ) -> None:
        futures = [
            self.producer.send(p.reply_to, key=p.request.request_id.encode(), value=p.encode())
            for p in pendings
        ]
        first: dict[TopicPartition, int] = {}
        upto: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            first.setdefault(tp, r.offset)
            upto[tp] = r.offset + 1
        self.sent.append(_SentBatch(futures, first, upto, records, pendings, started))

    def settle(self) -> None:
        """Move the commit mark over every batch whose replies are all acknowledged."""
        while self.sent and all(f.is_done for f in self.sent[0].futures):
            batch = self.sent.popleft()
            failed = [f.exception for f in batch.futures if f.failed()]
            if failed:
                self._rewind(batch, failed[0])
                return
            self.acked.update(batch.upto)
            if self.worker.metrics is not None:
                self.worker.metrics.batch_answered(
                    batch.records,
                    batch.pendings,
                    self.dead.count,
                    time.perf_counter() - batch.started,
                )

    def _rewind(self, failed: _SentBatch, error: BaseException) -> None:
        """Answer again from the first request whose reply was not acknowledged."""
        start = dict(failed.first)
        for batch in self.sent:  # later batches are answered again too
            for tp, offset in batch.first.items():
                start.setdefault(tp, offset)
        self.sent.clear()
        log.error(
            "replies of %d requests were not acknowledged (%r); answering again from %s",
            len(failed.pendings),
            error,
            start,
        )
        assigned = self.consumer.assignment()
        for tp, offset in start.items():
            if tp in assigned:
                self.consumer.seek(tp, offset)

    def commit(self, *, sync: bool = False) -> None:
        """Commit the acknowledged offsets: async and at most every COMMIT_INTERVAL_S, or
        ``sync`` (waits for the broker)."""
        if not sync and time.monotonic() - self.last_commit < COMMIT_INTERVAL_S:
            return
        owned = self.consumer.assignment()  # never commit for a partition handed over
        todo = {
            tp: o for tp, o in self.acked.items() if tp in owned and self.committed.get(tp) != o
        }
        self.last_commit = time.monotonic()
        if not todo:
            return
        offsets = {tp: OffsetAndMetadata(o, "", -1) for tp, o in todo.items()}
        if sync:
            self.consumer.commit(offsets, timeout_ms=10_000)
        else:
            try:
                self.consumer.commit_async(offsets, callback=_commit_done)
            except Exception as exc:  # noqa: BLE001 - e.g. mid-rebalance: the next one covers it
                log.warning("offset commit not sent: %r", exc)
                return
        self.committed.update(todo)

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for every reply in flight, then commit what is acknowledged (synchronously)."""
        try:
            self.producer.flush(timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - the unacknowledged are answered again later
            log.warning("replies not acknowledged within %.0f s: %r", timeout_s, exc)
        self.settle()
        try:
            self.commit(sync=True)
        except Exception as exc:  # noqa: BLE001 - the next owner answers them again
            log.warning("could not commit the acknowledged offsets: %r", exc)

    def follow(self) -> bool:
        """Notice a new assignment (after a poll) and anchor its partitions; True once every
        assigned partition is positioned.

        Done here rather than in rebalance callbacks: those may run on the consumer's IO thread
        (kafka-python 3), where a blocking consumer call fails and a wait stalls heartbeats.
        Replies of a partition handed over that are not committed yet (at most
        COMMIT_INTERVAL_S of them) are answered again by its next owner (at least once).
        """
        assigned = self.consumer.assignment()
        if assigned != self.owned:
            for tp in self.owned - assigned:
                self.acked.pop(tp, None)
                self.committed.pop(tp, None)
            self.fresh = (self.fresh | (assigned - self.owned)) & assigned
            self.owned = set(assigned)
        if self.fresh:
            return self.anchor()
        return bool(self.owned)

    def anchor(self) -> bool:
        """Position every newly assigned partition and commit the position of those the group
        never committed; True when all are positioned.

        A partition with no committed offset starts at its end ("latest": requests older than
        the group are not answered). Committing that start at once makes it the group's: a
        member that takes the partition over in a later rebalance starts there too, instead of
        at the end of that moment, which would skip the requests produced in between.
        """
        assigned = self.consumer.assignment()
        offsets = {}
        try:
            for tp in sorted(self.fresh & assigned):
                position = self.consumer.position(tp, timeout_ms=5000)
                if position is None:
                    return False
                if self.consumer.committed(tp, timeout_ms=5000) is None:
                    offsets[tp] = OffsetAndMetadata(position, "", -1)
            if offsets:
                self.consumer.commit(offsets, timeout_ms=5000)
                self.committed.update({tp: o.offset for tp, o in offsets.items()})
        except Exception as exc:  # noqa: BLE001 - a rebalance in between: again after a poll
            log.info("could not anchor the new partitions yet: %r", exc)
            return False
        self.fresh = set()
        return True


def _commit_done(offsets, response) -> None:
    if isinstance(response, Exception):
        log.warning("offset commit failed (the requests may be answered twice): %r", response)


# --- the worker ----------------------------------------------------------------------------


class Worker:
    """Answers u2i, i2i, i2i_history and rank requests from the newest loaded index."""

    def __init__(self, settings: Settings, store: VectorStore, *, worker_id: str | None = None):
        self.settings = settings
        self.store = store
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.state: ServingState | None = None
        # Set once this member joined the group with its partitions positioned: from then on a
        # request is answered (by it or another member). Only then is it listed in Redis.
        self.serving = threading.Event()
        self._swap_lock = threading.Lock()
        self.swaps = 0
        self.answered = 0
        self.metrics = None  # a serving.metrics.WorkerMetrics while /metrics is served
        self._graphs = GraphKeeper(m=settings.hnsw_m, ef_search=settings.hnsw_ef_search,
                                   rebuild_after_s=settings.hnsw_rebuild_s)

    # --- hot swap --------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Load and swap in a newer item snapshot if there is one. Returns True on swap."""
        with self._swap_lock:
            version = self.store.current_item_version()
            if version is None or (self.state and self.state.version >= version):
                return False
            snapshot = self.store.load_item_snapshot(version)
            # Everything is built here, off the request path (the id -> row map included):
            # the request loop only ever sees a complete state.
            if self.settings.index_kind == "hnsw":
                # The graph is reused across snapshots (exact re-scoring on these vectors) and
                # rebuilt in the background when stale: see serving/graph.py.
                loaded = LoadedIndex(snapshot,
                                     self._graphs.index_for(snapshot.item_ids, snapshot.vectors))
                _ = snapshot.row_of  # the id -> row map now, not on the first request
            else:
                loaded = LoadedIndex.build(snapshot, "flat")
            blob = snapshot.extra.get("context")
            context = ContextTable.from_bytes(blob) if blob else None
            self.state = ServingState(loaded, context)  # the swap: one reference assignment
            self.swaps += 1
            self._report()
            log.info(
                "worker %s now serves v%d (%d items)",
                self.worker_id,
                version,
                len(snapshot.item_ids),
            )
            return True

    def swap_loop(self, stop: threading.Event) -> None:
        """Look for new snapshots every ``swap_poll_s`` until ``stop``; errors never kill it."""
        while not stop.is_set():
            try:
                self.refresh()
                self._report()
            except Exception:  # noqa: BLE001 - keep serving the old index, retry next tick
                log.exception("snapshot load failed; still serving the previous version")
            stop.wait(self.settings.swap_poll_s)

    def _report(self) -> None:
        """List this worker and its version in Redis (expires unless renewed), once serving."""
        if self.state is not None and self.serving.is_set():
            self.store.set_worker_version(self.worker_id, self.state.version)

    # --- the request loop ------------------------------------------------------------------

    def run(self, stop: threading.Event, *, ready: threading.Event | None = None) -> None:
        """Serve until ``stop`` is set. Starts the swap thread; commits after replies are acked.

        ``ready`` (and :attr:`serving`) is set once the worker holds partitions of the group, each
        positioned: a request produced after that is answered by this worker or another member.
        """
        # Threads and the BLAS threshold of batched flat search. Process-wide, so done here, by
        # the process that serves, whatever started it.
        configure_faiss(self.settings.threads, blas_threshold=BLAS_THRESHOLD)
        swapper = threading.Thread(
            target=self.swap_loop, args=(stop,), daemon=True, name="fmstream-swap"
        )
        swapper.start()
        # linger 0: a reply leaves at once (the batch is already formed by the poll).
        producer = make_producer(self.settings.kafka_config(), linger_ms=0)
        consumer = make_consumer(
            self.settings.kafka_config(),
            self.settings.serving_group,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            fetch_min_bytes=1,
            auto_offset_reset="latest",
            max_poll_records=POLL_MAX_RECORDS,
            session_timeout_ms=self.settings.worker_session_timeout_ms,
            heartbeat_interval_ms=max(300, self.settings.worker_session_timeout_ms // 4),
        )
        dead = DeadLetters(producer, self.settings.topic_dlq)
        replies = _Replies(self, consumer, producer, dead)
        try:
            # Join the group only once the topic's partitions are in metadata: a member that
            # joins before (a topic created a moment ago) is assigned nothing until the next
            # metadata refresh, minutes later.
            _wait_for_partitions(consumer, self.settings.topic_requests, stop)
            consumer.subscribe([self.settings.topic_requests])
            while not stop.is_set():
                # short polls while replies are in flight, so their offsets are committed soon
                records = flatten(consumer.poll(timeout_ms=10 if replies.sent else 100))
                if replies.follow() and not self.serving.is_set():
                    self.serving.set()
                    self._report()
                    if ready is not None:
                        ready.set()
                if records:
                    started = time.perf_counter()
                    pendings = self.handle(records, dead)
                    replies.send(records, pendings, started)
                    dead.flush()  # rare; the dead letters must be acked before the commit
                replies.settle()
                replies.commit()
            replies.drain()
        finally:
            consumer.close(autocommit=False)
            producer.close()

    def handle(self, records: Sequence[ConsumerRecord], dead: DeadLetters) -> list[Pending]:
        """Decode a batch of request records and answer every one that names a request id."""
        pendings = [p for r in records if (p := self._decode(r, dead)) is not None]
        state = self.state  # one read: the whole batch uses one version
        now_ms = time.time() * 1000
        max_k = self.settings.max_k
        todo = []
        for p in pendings:
            if p.done:
                continue
            r = p.request
            if (missing := r.missing_field()) is not None:
                p.response = _error(
                    r.request_id, "invalid_request", f"type {r.type!r} needs {missing!r}"
                )
            elif r.k > max_k:
                p.response = _error(
                    r.request_id, "invalid_request", f"k must be between 1 and {max_k}, got {r.k}"
                )
            elif r.deadline_ms is not None and now_ms > r.deadline_ms:
                p.response = _error(
                    r.request_id,
                    "deadline_exceeded",
                    f"deadline {r.deadline_ms:.0f} ms passed before serving",
                )
            elif state is None:
                p.response = _error(
                    r.request_id,
                    "not_ready",
                    "no item index published yet; retry after the trainer "
                    "has learned from some events",
                )
            else:
                todo.append(p)
        if todo:
            self._answer_isolated(todo, state)
        self.answered += len(pendings)
        return pendings

    def _answer_isolated(self, todo: list[Pending], state: ServingState) -> None:
        """Answer the batch together; if that fails, answer the unanswered ones one by one so a
        bad request (e.g. a context value of the wrong type) fails alone."""
        try:
            _Batch(self, todo, state).answer()
            return
        except Exception as exc:  # noqa: BLE001 - answer, never crash the consumer
            if len(todo) == 1:
                todo[0].response = _failure(todo[0], exc, state)
                return
            log.info("batch of %d requests failed (%r); answering them one by one", len(todo), exc)
        for p in todo:
            if not p.done:
                try:
                    _Batch(self, [p], state).answer()
                except Exception as exc:  # noqa: BLE001
                    p.response = _failure(p, exc, state)

    def _decode(self, record: ConsumerRecord, dead: DeadLetters) -> Pending | None:
        """A Pending (maybe already holding an error response), or None when dead-lettered."""
        default_reply = self.settings.topic_responses
        size = len(record.value or b"")
        if size > self.settings.max_message_bytes:
            dead.send(
                record,
                "decode",
                DecodeError("oversized"),
                f"request of {size} bytes exceeds {self.settings.max_message_bytes}",
            )
            return None
        if record.value is not None:
            try:  # the common case in one step: bytes to a valid request
                req = Request.model_validate_json(record.value)
                return Pending(req, req.reply_to or default_reply)
            except ValidationError:
                pass  # find out why below
        try:
            obj = loads_object(record.value)
        except DecodeError as exc:
            dead.send(record, "decode", exc, str(exc))
            return None
        try:
            req = Request.model_validate(obj)
        except ValidationError as exc:
            rid = obj.get("request_id")
            if isinstance(rid, int) and not isinstance(rid, bool):
                rid = str(rid)
            if not isinstance(rid, str) or not rid.strip() or len(rid) > 256:
                dead.send(record, "validate", exc, describe_validation_error(exc))
                return None
            reply = obj.get("reply_to")
            reply = reply if isinstance(reply, str) and 0 < len(reply) < 250 else default_reply
            stub = Request(request_id=rid, type="u2i")
            return Pending(
                stub, reply, _error(rid, "invalid_request", describe_validation_error(exc))
            )
        return Pending(req, req.reply_to or default_reply)


# --- answering -----------------------------------------------------------------------------


class _Batch:
    """Answers a batch of valid requests from one state: one Redis round trip per kind of data,
    one batched search per request type."""

    def __init__(self, worker: Worker, todo: list[Pending], state: ServingState) -> None:
        self.worker = worker
        self.store = worker.store
        self.todo = todo
        self.state = state
        self.loaded = state.loaded
        self.version = state.version
        self._popular: list[tuple[str, float]] | None = None
        users = sorted({p.request.user_id for p in todo if p.request.user_id is not None})
        self.user_row = {u: i for i, u in enumerate(users)}
        self.vecs: UserVectors | None = self.store.get_user_vectors(users) if users else None
        need_hist = sorted(
            {
                p.request.user_id
                for p in todo
                if p.request.type == "i2i_history" or p.request.exclude_seen
            }
        )
        self.hist: dict[str, list[str]] = (
            dict(zip(need_hist, self.store.get_histories(need_hist), strict=True))
            if need_hist
            else {}
        )

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
            self._popular = self.store.get_popular(self.worker.settings.max_k + 1000)
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
                p.response = _error(
                    p.request.request_id,
                    "unknown_item",
                    f"item {p.request.item_id!r} is not in index v{self.version}",
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
        """The precomputed table (named by its own version)."""
        version, tables = self.store.get_offline_i2i([p.request.item_id for p in todo])
        for p, table in zip(todo, tables, strict=True):
            if table is None:
                p.response = _error(
                    p.request.request_id,
                    "unknown_item",
                    f"item {p.request.item_id!r} has no offline neighbours "
                    "(unknown, or the table is not built yet)",
                    version,
                )
                continue
            excl = self.exclusions(p)
            p.answer([(i, s) for i, s in table if i not in excl][: p.request.k], version)

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
                p.response = _error(
                    p.request.request_id,
                    "unknown_user",
                    f"user {p.request.user_id!r} has no published vector",
                    self.version,
                )
                continue
            scored = [(i, r) for i in p.request.item_ids if (r := snapshot.row_of.get(i, -1)) >= 0]
            if not scored:
                p.response = _error(
                    p.request.request_id,
                    "unknown_item",
                    "none of item_ids is in the index",
                    self.version,
                )
                continue
            row = self.user_row[p.request.user_id]
            q = user_queries(self.vecs.vectors[[row]], [p.request.context], self.state.context)[0]
            scores = snapshot.vectors[[r for _, r in scored]] @ q + snapshot.bias
            order = np.argsort(-scores, kind="stable")
            p.answer([(scored[j][0], float(scores[j])) for j in order], self.version)


__all__ = ["Pending", "ServingError", "ServingState", "Worker"]
