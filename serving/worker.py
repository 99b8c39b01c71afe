"""The serving worker: requests from Kafka in, answers on the reply topic out.

Workers form the consumer group ``fmstream-serving`` (add workers to scale). Each poll's requests
are answered together: one Redis round trip for user vectors and histories, one batched index
search per request type. A background thread loads new item snapshots and swaps ONE reference,
so a request never waits for a build and a batch never mixes versions.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from kafka.consumer.fetcher import ConsumerRecord
from pydantic import ValidationError

from fmstream.settings import Settings
from model.compose import ContextTable
from serving.errors import ServingError
from serving.index import LoadedIndex, build_index
from serving.queries import item_queries, user_queries
from serving.store import VectorStore
from stream.consume import DeadLetters, flatten, make_consumer, make_producer
from stream.schemas import (
    DecodeError,
    ErrorInfo,
    Request,
    Response,
    ScoredItem,
    describe_validation_error,
    dumps,
    loads_object,
)

log = logging.getLogger(__name__)

HISTORY_QUERIES = 20  # most recent items used by i2i_history


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
    """A decoded request on its way to a response."""

    request: Request
    reply_to: str
    response: Response | None = None
    extra: dict = field(default_factory=dict)


def _rows(loaded: LoadedIndex, item_ids: set[str]) -> set[int]:
    """Index rows of the ids that the snapshot holds (others cannot be returned anyway)."""
    row_of = loaded.snapshot.row_of
    return {row_of[i] for i in item_ids if i in row_of}


def _error(request_id: str, code: str, message: str, version: int | None = None) -> Response:
    return Response(request_id=request_id, error=ErrorInfo(code=code, message=message),
                    model_version=version)


class Worker:
    """Answers u2i, i2i, i2i_history and rank requests from the newest loaded index."""

    def __init__(self, settings: Settings, store: VectorStore, *, worker_id: str | None = None):
        self.settings = settings
        self.store = store
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.state: ServingState | None = None
        self._swap_lock = threading.Lock()
        self.swaps = 0
        self.answered = 0
        self.metrics = None  # a serving.metrics.WorkerMetrics while /metrics is served

    # --- hot swap --------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Load and swap in a newer item snapshot if there is one. Returns True on swap."""
        with self._swap_lock:
            version = self.store.current_item_version()
            if version is None or (self.state and self.state.version >= version):
                return False
            snapshot = self.store.load_item_snapshot(version)
            index = build_index(self.settings.index_kind, snapshot.vectors,
                                hnsw_m=self.settings.hnsw_m, ef_search=self.settings.hnsw_ef_search)
            blob = snapshot.extra.get("context")
            context = ContextTable.from_bytes(blob) if blob else None
            self.state = ServingState(LoadedIndex(snapshot, index), context)  # the swap
            self.swaps += 1
            self.store.set_worker_version(self.worker_id, version)
            log.info("worker %s now serves v%d (%d items)", self.worker_id, version,
                     len(snapshot.item_ids))
            return True

    def swap_loop(self, stop: threading.Event) -> None:
        """Look for new snapshots every ``swap_poll_s`` until ``stop``; errors never kill it."""
        while not stop.is_set():
            try:
                self.refresh()
                if self.state is not None:
                    self.store.set_worker_version(self.worker_id, self.state.version)
            except Exception:  # noqa: BLE001 - keep serving the old index, retry next tick
                log.exception("snapshot load failed; still serving the previous version")
            stop.wait(self.settings.swap_poll_s)

    # --- the request loop ------------------------------------------------------------------

    def run(self, stop: threading.Event, *, ready: threading.Event | None = None) -> None:
        """Serve until ``stop`` is set. Starts the swap thread; commits after replies are acked."""
        swapper = threading.Thread(target=self.swap_loop, args=(stop,), daemon=True,
                                   name="fmstream-swap")
        swapper.start()
        producer = make_producer(self.settings, linger_ms=0)
        consumer = make_consumer(self.settings, self.settings.serving_group,
                                 fetch_max_wait_ms=5, auto_offset_reset="latest",
                                 max_poll_records=512,
                                 session_timeout_ms=self.settings.worker_session_timeout_ms,
                                 heartbeat_interval_ms=max(
                                     300, self.settings.worker_session_timeout_ms // 4))
        consumer.subscribe([self.settings.topic_requests])
        dead = DeadLetters(producer, self.settings.topic_dlq)
        try:
            while not stop.is_set():
                records = flatten(consumer.poll(timeout_ms=100))
                if ready is not None and consumer.assignment():
                    ready.set()
                if not records:
                    continue
                t0 = time.perf_counter()
                pendings = self.handle(records, dead)
                for pending in pendings:
                    producer.send(pending.reply_to, key=pending.request.request_id.encode(),
                                  value=dumps(pending.response))
                producer.flush()
                dead.flush()
                consumer.commit()
                if self.metrics is not None:
                    self.metrics.batch_answered(records, pendings, dead.count,
                                                time.perf_counter() - t0)
        finally:
            consumer.close(autocommit=False)
            producer.close()

    def handle(self, records: Sequence[ConsumerRecord], dead: DeadLetters) -> list[Pending]:
        """Decode a batch of request records and answer every one that names a request id."""
        pendings = [p for r in records if (p := self._decode(r, dead)) is not None]
        todo = [p for p in pendings if p.response is None]
        state = self.state  # one read: the whole batch uses one version
        now_ms = time.time() * 1000
        for p in todo:
            r = p.request
            if (missing := r.missing_field()) is not None:
                p.response = _error(r.request_id, "invalid_request",
                                    f"type {r.type!r} needs {missing!r}")
            elif r.k > self.settings.max_k:
                p.response = _error(r.request_id, "invalid_request",
                                    f"k must be between 1 and {self.settings.max_k}, got {r.k}")
            elif r.deadline_ms is not None and now_ms > r.deadline_ms:
                p.response = _error(r.request_id, "deadline_exceeded",
                                    f"deadline {r.deadline_ms:.0f} ms passed before serving")
            elif state is None:
                p.response = _error(r.request_id, "not_ready",
                                    "no item index published yet; retry after the trainer "
                                    "has learned from some events")
        todo = [p for p in todo if p.response is None]
        if todo:
            try:
                self._answer(todo, state)
            except Exception as exc:  # noqa: BLE001 - answer, never crash the consumer
                log.exception("batch of %d requests failed", len(todo))
                for p in todo:
                    if p.response is None:
                        p.response = _error(p.request.request_id, "internal",
                                            f"{type(exc).__name__}: {exc}", state.version)
        self.answered += len(pendings)
        return pendings

    def _decode(self, record: ConsumerRecord, dead: DeadLetters) -> Pending | None:
        """A Pending (maybe already holding an error response), or None when dead-lettered."""
        default_reply = self.settings.topic_responses
        size = len(record.value or b"")
        if size > self.settings.max_message_bytes:
            dead.send(record, "decode", DecodeError("oversized"),
                      f"request of {size} bytes exceeds {self.settings.max_message_bytes}")
            return None
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
            return Pending(stub, reply, _error(rid, "invalid_request",
                                               describe_validation_error(exc)))
        return Pending(req, req.reply_to or default_reply)

    # --- answering -------------------------------------------------------------------------

    def _answer(self, todo: list[Pending], state: ServingState) -> None:
        loaded = state.loaded
        users = sorted({p.request.user_id for p in todo if p.request.user_id is not None})
        vecs = self.store.get_user_vectors(users) if users else None
        user_row = {u: i for i, u in enumerate(users)}
        need_hist = sorted({p.request.user_id for p in todo
                            if p.request.type == "i2i_history" or p.request.exclude_seen})
        hist = dict(zip(need_hist, self.store.get_histories(need_hist), strict=True)) \
            if need_hist else {}
        popular: list[tuple[str, float]] | None = None

        def exclusions(p: Pending) -> set[str]:
            out = set(p.request.exclude_item_ids)
            if p.request.exclude_seen and p.request.user_id is not None:
                out.update(hist.get(p.request.user_id, ()))
            return out

        def popular_for(p: Pending) -> None:
            nonlocal popular
            if popular is None:
                popular = self.store.get_popular(self.settings.max_k + 1000)
            excl = exclusions(p)
            items = [ScoredItem(item_id=i, score=s) for i, s in popular if i not in excl]
            p.response = Response(request_id=p.request.request_id, items=items[:p.request.k],
                                  model_version=state.version, fallback="popular")

        # u2i: one batched search over every request whose user has a vector.
        u2i = []
        for p in todo:
            if p.request.type != "u2i":
                continue
            row = user_row[p.request.user_id]
            if vecs is not None and vecs.found[row]:
                u2i.append((p, row))
            else:
                popular_for(p)
        if u2i:
            q = user_queries(vecs.vectors[[row for _, row in u2i]],
                             [p.request.context for p, _ in u2i], state.context)
            excl = [_rows(loaded, exclusions(p)) for p, _ in u2i]
            hits = loaded.search_excluding(q, max(p.request.k for p, _ in u2i), excl)
            for (p, _), found in zip(u2i, hits, strict=True):
                self._reply(p, loaded, found[:p.request.k], state, bias=True)

        # i2i online / offline.
        online = [p for p in todo if p.request.type == "i2i" and p.request.source == "online"]
        rows = [loaded.snapshot.row_of.get(p.request.item_id, -1) for p in online]
        known = [(p, r) for p, r in zip(online, rows, strict=True) if r >= 0]
        for p, r in zip(online, rows, strict=True):
            if r < 0:
                p.response = _error(p.request.request_id, "unknown_item",
                                    f"item {p.request.item_id!r} is not in index "
                                    f"v{state.version}", state.version)
        if known:
            q = item_queries(loaded.snapshot.vectors[[r for _, r in known]])
            excl = [_rows(loaded, exclusions(p)) | {r} for p, r in known]
            hits = loaded.search_excluding(q, max(p.request.k for p, _ in known), excl)
            for (p, _), found in zip(known, hits, strict=True):
                self._reply(p, loaded, found[:p.request.k], state, bias=False)
        offline = [p for p in todo if p.request.type == "i2i" and p.request.source == "offline"]
        if offline:
            version, tables = self.store.get_offline_i2i([p.request.item_id for p in offline])
            for p, table in zip(offline, tables, strict=True):
                if table is None:
                    p.response = _error(p.request.request_id, "unknown_item",
                                        f"item {p.request.item_id!r} has no offline neighbours "
                                        "(unknown, or the table is not built yet)", version)
                    continue
                excl = exclusions(p)
                items = [ScoredItem(item_id=i, score=s) for i, s in table if i not in excl]
                p.response = Response(request_id=p.request.request_id,
                                      items=items[:p.request.k], model_version=version)

        # i2i_history: neighbours of the user's recent items, merged by best score.
        for p in (p for p in todo if p.request.type == "i2i_history"):
            recent = [loaded.snapshot.row_of[i] for i in hist.get(p.request.user_id, [])
                      if i in loaded.snapshot.row_of][:HISTORY_QUERIES]
            if not recent:
                popular_for(p)
                continue
            excl_rows = _rows(loaded, exclusions(p)) | set(recent)
            q = item_queries(loaded.snapshot.vectors[recent])
            hits = loaded.search_excluding(q, p.request.k, [excl_rows] * len(recent))
            best: dict[int, float] = {}
            for found in hits:
                for row, score in found:
                    if score > best.get(row, -np.inf):
                        best[row] = score
            merged = sorted(best.items(), key=lambda t: -t[1])[:p.request.k]
            self._reply(p, loaded, merged, state, bias=False)

        # rank: full FM score (context included) of the given items.
        for p in (p for p in todo if p.request.type == "rank"):
            row = user_row[p.request.user_id]
            if not vecs.found[row]:
                p.response = _error(p.request.request_id, "unknown_user",
                                    f"user {p.request.user_id!r} has no published vector",
                                    state.version)
                continue
            item_rows = [(i, loaded.snapshot.row_of.get(i, -1)) for i in p.request.item_ids]
            scored = [(i, r) for i, r in item_rows if r >= 0]
            if not scored:
                p.response = _error(p.request.request_id, "unknown_item",
                                    "none of item_ids is in the index", state.version)
                continue
            q = user_queries(vecs.vectors[[row]], [p.request.context], state.context)[0]
            scores = loaded.snapshot.vectors[[r for _, r in scored]] @ q + loaded.snapshot.bias
            order = np.argsort(-scores, kind="stable")
            p.response = Response(
                request_id=p.request.request_id, model_version=state.version,
                items=[ScoredItem(item_id=scored[j][0], score=float(scores[j])) for j in order],
            )

    @staticmethod
    def _reply(p: Pending, loaded: LoadedIndex, found: list[tuple[int, float]],
               state: ServingState, *, bias: bool) -> None:
        ids = loaded.snapshot.item_ids
        b = loaded.snapshot.bias if bias else 0.0
        p.response = Response(
            request_id=p.request.request_id, model_version=state.version,
            items=[ScoredItem(item_id=ids[row], score=float(score + b)) for row, score in found],
        )


__all__ = ["Worker", "ServingState", "ServingError"]
