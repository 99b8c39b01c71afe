"""A Python request/reply client for fmstream's serving workers, over Kafka.

Requests go to ``config.topic_requests`` keyed by request id; responses come back on a reply
topic (default ``config.topic_responses``, or any topic named in ``reply_topic``, which is then
sent as each request's ``reply_to``). The client reads the reply topic WITHOUT a consumer group:
it assigns itself every partition and starts at the end, so any number of clients can listen on
the same topic without stealing each other's responses or disturbing any group. A background
thread matches responses to in-flight requests by ``request_id``; others are ignored.

Example::

    with FmClient(settings) as client:  # fmstream's Settings, or a ClientConfig
        response = client.request({"type": "u2i", "user_id": "196", "k": 10})
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kafka import TopicPartition
from pydantic import ValidationError

from serving.config import ClientConfig
from serving.errors import ClientClosed, ClientError, ClientTimeout
from stream.connect import kafka_consumer, kafka_producer
from stream.record_parse import use_fast_records
from stream.schemas import DecodeError, Request, Response, dumps, loads_object

logger = logging.getLogger(__name__)

RequestLike = Request | Mapping[str, Any]


class HasClientConfig(Protocol):
    """Anything that builds a :class:`ClientConfig` (``fmstream.settings.Settings`` does)."""

    def client_config(self) -> ClientConfig: ...


class ResponseFuture(concurrent.futures.Future[Response]):
    """The future of one request's :class:`Response`; knows its ``request_id``."""

    def __init__(self, request_id: str) -> None:
        super().__init__()
        self.request_id = request_id


@dataclass
class _Pending:
    future: ResponseFuture
    request: Request
    timeout: float | None
    deadline: float | None  # monotonic; None = until a response or close()


class FmClient:
    """Send :class:`Request` s and wait for their :class:`Response` s, many in flight.

    Args:
        config: Kafka address and topic names: a :class:`ClientConfig`, or anything with a
            ``client_config()`` method (fmstream's Settings).
        reply_topic: topic to receive responses on (default ``config.topic_responses``);
            when given, it is set as ``reply_to`` on every request.
        connect_timeout: seconds to wait for the reply topic's metadata and end offsets.
        poll_ms: how long the background thread blocks in one poll (bounds close latency).
        fetch_max_wait_ms: broker-side wait for an incomplete fetch; it dominates response
            latency, so it is small.
    """

    def __init__(
        self,
        config: ClientConfig | HasClientConfig,
        *,
        reply_topic: str | None = None,
        connect_timeout: float = 10.0,
        poll_ms: int = 50,
        fetch_max_wait_ms: int = 10,
    ) -> None:
        if not isinstance(config, ClientConfig):
            config = config.client_config()
        self.config = config
        self.request_topic = config.topic_requests
        self.reply_topic = reply_topic or config.topic_responses
        self._set_reply_to = reply_topic is not None
        self._poll_ms = poll_ms
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self._consumer = kafka_consumer(
            config.kafka,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            fetch_max_wait_ms=fetch_max_wait_ms,
            fetch_min_bytes=1,
            client_id="fmstream-client",
        )
        # a record kafka-python cannot read on the reply topic (a binary header key, a codec
        # it lacks) is skipped, not a reply thread stuck in poll() for good
        use_fast_records(self._consumer)
        try:
            self._assign_at_end(connect_timeout)
            self._producer = kafka_producer(
                config.kafka,
                acks="all",
                linger_ms=0,
                # send() blocks at most this long on metadata, not kafka-python's default 60 s
                max_block_ms=int(connect_timeout * 1000),
                client_id="fmstream-client",
            )
        except BaseException:
            self._consumer.close()
            raise
        self._thread = threading.Thread(
            target=self._receive_loop, name="fmstream-client-replies", daemon=True
        )
        self._thread.start()

    # --- setup -------------------------------------------------------------------------------

    def _assign_at_end(self, timeout: float) -> None:
        """Assign every reply partition and resolve each position to the current end.

        Resolving the positions here (not lazily in the first poll) means a response produced
        after this returns is always read, however fast the worker answers.
        """
        deadline = time.monotonic() + timeout
        partitions: set[int] = set()
        while True:
            partitions = self._consumer.partitions_for_topic(self.reply_topic) or set()
            if partitions or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if not partitions:
            raise ClientError(
                f"reply topic {self.reply_topic!r} not found on {self.config.kafka.bootstrap} "
                f"within {timeout:.1f}s; expected it to exist (create the topics with "
                "`fmstream up` / `fmstream topics`, a reply topic with `fmstream topics --reply "
                f"{self.reply_topic}`, or pass an existing reply_topic)"
            )
        tps = [TopicPartition(self.reply_topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        self._consumer.seek_to_end(*tps)
        for tp in tps:
            left_ms = max(1, int((deadline - time.monotonic()) * 1000))
            if self._consumer.position(tp, timeout_ms=left_ms) is None:
                raise ClientError(
                    f"could not resolve the end offset of {tp.topic}[{tp.partition}] within "
                    f"{timeout:.1f}s; is the broker at {self.config.kafka.bootstrap} healthy?"
                )
        logger.debug("client listening on %s (%d partitions)", self.reply_topic, len(tps))

    # --- requests ----------------------------------------------------------------------------

    def _prepare(self, req: RequestLike) -> Request:
        """Validate, fill in a request id and the reply topic."""
        if isinstance(req, Request):
            update: dict[str, Any] = {}
        else:
            data = dict(req)
            data.setdefault("request_id", uuid.uuid4().hex)
            try:
                req = Request.model_validate(data)
            except ValidationError as exc:
                raise ClientError(f"invalid request {data!r}: {exc}") from None
            update = {}
        if self._set_reply_to and req.reply_to is None:
            update["reply_to"] = self.reply_topic
        elif req.reply_to is not None and req.reply_to != self.reply_topic:
            raise ClientError(
                f"request {req.request_id}: reply_to={req.reply_to!r} but this client listens "
                f"on {self.reply_topic!r}; its response would never arrive here (build the "
                "client with reply_topic=... instead)"
            )
        return req.model_copy(update=update) if update else req

    def submit(self, req: RequestLike, timeout: float | None = None) -> ResponseFuture:
        """Send a request without waiting; the future resolves to its :class:`Response`.

        Args:
            req: a :class:`Request` or a dict of its fields (``request_id`` generated if absent).
            timeout: if given, the future fails with :class:`ClientTimeout` after this many
                seconds without a response (otherwise it waits until :meth:`close`).

        Raises:
            ClientClosed: the client is closed.
            ClientError: the request is invalid, or its id is already in flight.
        """
        request = self._prepare(req)
        rid = request.request_id
        future = ResponseFuture(rid)
        future.set_running_or_notify_cancel()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._closed:
                raise ClientClosed("the client is closed; create a new FmClient")
            if rid in self._pending:
                raise ClientError(
                    f"request id {rid!r} is already in flight; request ids must be unique"
                )
            self._pending[rid] = _Pending(future, request, timeout, deadline)
        try:
            sent = self._producer.send(self.request_topic, key=rid.encode(), value=dumps(request))
        except Exception as exc:  # the producer raises synchronously on e.g. too-large messages
            self._fail(rid, ClientError(f"request {rid}: could not send to "
                                        f"{self.request_topic!r}: {exc}"))
            return future
        sent.add_errback(
            lambda exc: self._fail(
                rid, ClientError(f"request {rid}: send to {self.request_topic!r} failed: {exc}")
            )
        )
        return future

    def request(self, req: RequestLike, timeout: float = 5.0) -> Response:
        """Send a request and wait for its response.

        Raises:
            ClientTimeout: no response within ``timeout`` seconds.
            ClientError: the request is invalid or could not be sent.
        """
        future = self.submit(req, timeout=None)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            pending = self._pop(future.request_id)
            request = pending.request if pending else None
            raise self._timeout_error(request, future.request_id, timeout) from None

    def request_many(
        self, reqs: Sequence[RequestLike], timeout: float = 5.0
    ) -> list[Response | None]:
        """Send all requests at once and wait up to ``timeout`` in total; None for unanswered."""
        futures = [self.submit(r, timeout=None) for r in reqs]
        done, _ = concurrent.futures.wait(futures, timeout=timeout)
        out: list[Response | None] = []
        for future in futures:
            if future in done and future.exception() is None:
                out.append(future.result())
            else:
                if future not in done:
                    self._pop(future.request_id)
                out.append(None)
        return out

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered, timed out or failed."""
        with self._lock:
            return len(self._pending)

    # --- lifecycle ---------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stop the reply thread, fail what is still in flight, close producer and consumer."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending.items())
            self._pending.clear()
        self._stop.set()
        self._thread.join(timeout)
        for rid, p in pending:
            if not p.future.done():
                p.future.set_exception(ClientClosed(f"client closed before request {rid} was "
                                                    "answered"))
        self._producer.close(timeout=timeout)
        self._consumer.close()

    def __enter__(self) -> FmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------------

    def _pop(self, rid: str) -> _Pending | None:
        with self._lock:
            return self._pending.pop(rid, None)

    def _fail(self, rid: str, exc: BaseException) -> None:
        pending = self._pop(rid)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(exc)

    def _timeout_error(self, request: Request | None, rid: str, timeout: float) -> ClientTimeout:
        kind = request.type if request is not None else "?"
        return ClientTimeout(
            f"no response to request {rid} ({kind}) on {self.reply_topic!r} within "
            f"{timeout:.3g}s; expected serving workers (group {self.config.group!r}) "
            f"to consume {self.request_topic!r}: check they run and `fmstream lag`"
        )

    def _receive_loop(self) -> None:
        """Resolve futures from incoming responses; expire those past their deadline."""
        while not self._stop.is_set():
            try:
                batches = self._consumer.poll(timeout_ms=self._poll_ms)
            except Exception:  # noqa: BLE001 - a broker hiccup must not kill the reply thread
                logger.exception("polling %s failed; retrying", self.reply_topic)
                self._stop.wait(0.5)
                continue
            for records in batches.values():
                for record in records:
                    self._deliver(record.value)
            self._expire()

    def _deliver(self, raw: bytes | None) -> None:
        try:
            response = Response.model_validate(loads_object(raw))
        except (DecodeError, ValidationError) as exc:
            logger.debug("ignoring an unreadable message on %s: %s", self.reply_topic, exc)
            return
        pending = self._pop(response.request_id)
        if pending is not None and not pending.future.done():
            pending.future.set_result(response)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [
                (rid, p) for rid, p in self._pending.items()
                if p.deadline is not None and p.deadline <= now
            ]
            for rid, _ in expired:
                del self._pending[rid]
        for rid, p in expired:
            if not p.future.done():
                p.future.set_exception(self._timeout_error(p.request, rid, p.timeout or 0.0))


__all__ = ["FmClient", "RequestLike", "ResponseFuture"]
