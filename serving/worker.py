"""The serving worker's transport: requests from Kafka in, answers on the reply topic out.

Answering itself is pure and lives in ``serving/answering.py``; index following (full
snapshots, deltas) in ``serving/follow.py``. This module polls, hands each batch to the
answerer, sends the replies (or dead letters), and commits.

Workers form one consumer group (add workers to scale). Replies are pipelined: a batch's replies
are handed to the producer and the worker polls the next batch while the broker acknowledges
them. Offsets are committed only up to batches whose replies (and dead letters) were all
acknowledged (at least once: after a crash or a rebalance the unacknowledged tail is answered
again, and the client drops the repeats by request id).

Never a crash on one message: a reply the producer refuses (too large, a topic it cannot reach)
becomes an ``internal`` error reply or, failing that, a dead letter (stage ``reply``); a reply
that fails for good after it was sent is dead-lettered; only transient failures (the broker
away) rewind the consumer to answer again.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    KafkaTimeoutError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from kafka.structs import MemberState, OffsetAndMetadata, TopicPartition

from serving.answering import (
    Answerer,
    IndexView,
    Pending,
    Rejected,
    ServingState,
    decode_request,
)
from serving.config import ServingConfig
from serving.coordinator import GroupCoordinator
from serving.errors import InternalError, InvalidRequest, ServingError
from serving.follow import IndexFollower as DeltaFollower
from serving.graph import GraphKeeper
from serving.index import configure_faiss
from serving.timing import BatchTimes, PathLog, thread_clock
from stream.consume import dead_letter_for, dead_letter_key, flatten
from stream.fetcher import ConsumerRecord
from stream.record_parse import unreadable_reason, use_fast_records
from stream.schemas import UnreadableBatch, dumps

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 0.2
"""Acknowledged offsets are committed at most this often while requests keep coming (and once
no request came for :data:`QUIET_COMMIT_S`, and at shutdown)."""
QUIET_COMMIT_S = 0.1
"""Once every reply is acknowledged and no request came for this long, what is acknowledged is
committed at once (an idle worker's group lag reads 0, not its last answers). Not on every
empty poll: at 10-100 requests/s that was one OffsetCommit (a write to the broker's offsets
log) per request (bench/RESULTS.md 'idlecpu')."""
IDLE_POLL_MS = 1000
"""The poll timeout when nothing is in flight or uncommitted. A poll returns as soon as a
request arrives, so this adds no latency; it only sets how often an idle loop turns (the
watchdog, a shutdown and a new assignment are seen within it)."""
METADATA_MAX_AGE_MS = 5_000
"""How often a worker refreshes topic metadata (a missed partition assignment heals then)."""
REBALANCE_TIMEOUT_MS = 30_000
"""kafka-python's ``max_poll_interval_ms``, which is also the JoinGroup *rebalance timeout*: the
broker holds a rebalance open this long for every member to rejoin, and a member that does not
poll for this long leaves the group. A worker polls at least every second (a batch of requests
takes well under a second), so 30 s instead of the default 300 s: one starved or hung member
delays a rebalance of the whole group by at most 30 s (seen as members stuck "rebalancing"
> 90 s)."""
JOIN_POLL_MS = 3000
"""The poll timeout while the consumer joins the group. kafka-python 3.0.12 awaits its
JoinGroup + SyncGroup only inside ``poll()`` and discards a join that completed between two
polls (``join_group_async`` starts a new one when the cached task is done), so polls shorter
than a join, spaced by the loop's own work, never join: measured with joins of 0.3 s, polls of
100 ms 0.5 s apart gave 35 joins (generation 34) in 20 s and never a stable member; polls of
1 s: stable at the first (bench/RESULTS.md 'watchdog'). A poll returns as soon as requests
arrive, so this costs only the idle time after a join."""
POLL_MAX_RECORDS = 512
"""Requests answered together at most (one Redis round trip and one search per type)."""
FETCH_MAX_WAIT_MS = 500
"""Broker-side wait of a fetch that finds no request. The broker answers a waiting fetch as soon
as a request arrives (fetch_min_bytes=1), so this costs no latency; measured 5 vs 100 ms: same
p50/p99, fewer empty fetches for the broker to serve while idle; 100 vs 500 ms: an idle worker
0.021 -> 0.011 cores, its broker 0.054 -> 0.042 (bench/RESULTS.md 'idlecpu'). Group calls go to
the coordinator's own connection, so heartbeats and commits never queue behind it."""
BLAS_THRESHOLD = 200
"""faiss uses BLAS for a flat search when ``queries x dim`` reaches this: from ~6 queries at
d=34 (measured on 2 cores, 100k items: 1 query 1.0 ms scanning vs 5.0 ms with BLAS, 16 queries
22 ms vs 12 ms; faiss' own default, 128000, never uses BLAS for request-sized batches)."""
CLOSE_TIMEOUT_MS = 5000
"""How long closing a consumer may take (leaving the group); a watchdog renewal or shutdown
never waits longer for a consumer that is stuck."""
SEND_MAX_BLOCK_MS = 5000
"""How long ``producer.send`` may block (metadata of a new reply topic, a full buffer): a
reply topic that cannot be reached costs one dead letter, not a stalled worker."""


class KafkaClients(Protocol):
    """Makes the worker's Kafka clients (``fmstream`` builds them from its settings: addresses,
    security, reconnect backoff)."""

    def producer(self, **overrides: Any) -> KafkaProducer: ...

    def consumer(self, group_id: str | None, **overrides: Any) -> KafkaConsumer: ...


class IndexFollower(IndexView, Protocol):
    """An :class:`IndexView` the worker refreshes from its background thread
    (``serving.follow.IndexFollower``)."""

    def refresh(self) -> bool:
        """Load a newer index if there is one (off the request path); True on swap."""
        ...


HEARTBEAT_MARGIN_S = 1.0
"""A member answers only while its last heartbeat (or join) is younger than the session timeout
minus this margin (at least half the session): past it, the coordinator may already have handed
its partitions to another member, and answering would answer twice."""

MEMBERSHIP_ERRORS = (
    CommitFailedError, IllegalGenerationError, UnknownMemberIdError, RebalanceInProgressError
)
"""Commit failures that mean this consumer is not (or no longer) the partitions' owner."""


class Membership:
    """Whether this consumer is a member of its group right now (not a zombie).

    Read after every poll: the group state must be stable and the last successful heartbeat (or
    the join) younger than the session timeout less :data:`HEARTBEAT_MARGIN_S`. A member whose
    heartbeats stopped for a whole session is made to rejoin. The heartbeat time comes from
    kafka-python's coordinator through :class:`serving.coordinator.GroupCoordinator`; without
    it, the state alone decides.
    """

    def __init__(self, consumer: KafkaConsumer, session_timeout_ms: int,
                 coordinator: GroupCoordinator | None = None) -> None:
        self.consumer = consumer
        self.coordinator = GroupCoordinator(consumer) if coordinator is None else coordinator
        self.session_s = session_timeout_ms / 1000
        self.generation = -1
        self.joined_at = time.monotonic()
        self.paused_since: float | None = None
        self.pauses = 0
        self.late_join_logged = False

    def _heartbeat_at(self) -> float:
        received = self.coordinator.last_heartbeat()
        return self.joined_at if received is None else max(received, self.joined_at)

    def rejoin_pending(self) -> bool:
        """True when the group is rebalancing and the next poll will rejoin it: the moment to
        commit everything answered, so the partitions' next owners start exactly after it."""
        return self.consumer.group_metadata().state is MemberState.STABLE \
            and self.coordinator.rejoin_needed()

    def joining(self) -> bool:
        """True while the consumer is not a stable member or is about to rejoin (its next
        poll sends or awaits a JoinGroup)."""
        return self.consumer.group_metadata().state is not MemberState.STABLE \
            or self.rejoin_pending()

    def check(self) -> bool:
        """True while this consumer may answer for its assignment."""
        meta = self.consumer.group_metadata()
        now = time.monotonic()
        if meta.state is MemberState.STABLE and meta.generation_id != self.generation:
            self.generation, self.joined_at = meta.generation_id, now
        silent = now - self._heartbeat_at()
        fresh_s = max(self.session_s / 2, self.session_s - HEARTBEAT_MARGIN_S)
        ok = meta.state is MemberState.STABLE and silent < fresh_s
        if ok:
            if self.paused_since is not None:
                log.warning("group membership back (generation %d) after %.1f s; answering again",
                            self.generation, now - self.paused_since)
                self.paused_since = None
            return True
        if self.paused_since is None and self.generation != -1:  # (not before the first join)
            self.paused_since = now
            self.pauses += 1
            log.warning("not a stable group member (state %s, last heartbeat %.1f s ago): "
                        "answering nothing until it rejoins", meta.state, silent)
        elif self.generation == -1 and not self.late_join_logged and silent >= self.session_s:
            # never seen stable: without this line a worker dropped before its first stable
            # poll (a loaded box at start) said nothing at all
            self.late_join_logged = True
            log.warning("not a stable group member yet, %.0f s after subscribing (state %s): "
                        "answering nothing until it joins", silent, meta.state)
        if meta.state is MemberState.STABLE and silent >= self.session_s:
            self.coordinator.request_rejoin()  # heartbeats stopped: the group dropped us
        return False


EXIT_STUCK = 75
"""Exit status of a worker whose request loop the watchdog found stuck in a Kafka call
(``EX_TEMPFAIL``: a temporary failure; its supervisor restarts it)."""


def exit_stuck(message: str) -> None:
    """Log ``message`` and end the process at once with :data:`EXIT_STUCK` (no cleanup: the
    thread that would do it is the stuck one). Replies not committed are answered again by the
    partitions' next owners (at least once)."""
    log.critical("%s", message)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001, S110 - exiting anyway
            pass
    sys.stderr.flush()
    os._exit(EXIT_STUCK)


class Watchdog:
    """Bounds how long a worker may go without being a stable group member, and how long its
    request loop may stay inside one Kafka call; needs nothing of kafka-python.

    The request loop reports each turn (:meth:`turn`: after every poll, whether this worker was
    a stable member with its partitions positioned; a stable member assigned nothing counts as
    healthy: more workers than partitions) and each bounded wait of its own (:meth:`alive`).

    - Not a healthy member for ``limit_s`` while the loop turns (the group dropped it and the
      consumer does not rejoin, a join that never completes, partitions never positioned):
      :meth:`overdue` is True and the loop closes its consumer and joins with a new one.
    - The loop has not come back for ``limit_s`` (a poll that never returns): the watchdog's own
      thread (:meth:`watch`) calls ``on_stuck`` (default :func:`exit_stuck`: exit with
      :data:`EXIT_STUCK` for the supervisor to restart the worker).

    ``limit_s`` must exceed the longest legitimate join: the rebalance timeout
    (:data:`REBALANCE_TIMEOUT_MS`) plus a session timeout. 0 turns both off.
    """

    def __init__(self, limit_s: float, *, on_stuck: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_s = float(limit_s)
        self.on_stuck = on_stuck or exit_stuck
        self.clock = clock
        now = clock()
        self.turned_at = now  # the loop last came back (a poll returned, a bounded wait)
        self.healthy_at = now  # it was last a healthy member (or chose not to be one yet)
        self.member = False
        self.renewals = 0
        self.where = "starting"

    @property
    def enabled(self) -> bool:
        return self.limit_s > 0

    def alive(self, where: str) -> None:
        """The loop is responsive (between two bounded Kafka calls of its own)."""
        self.turned_at, self.where = self.clock(), where

    def waiting(self, where: str) -> None:
        """The loop is responsive and not a member by choice (e.g. no request topic yet)."""
        self.turned_at = self.healthy_at = self.clock()
        self.where, self.member = where, False

    def turn(self, healthy: bool) -> None:
        """A poll returned; ``healthy``: a stable member with its partitions positioned."""
        now = self.clock()
        self.turned_at, self.where, self.member = now, "poll", healthy
        if healthy:
            self.healthy_at = now

    def unhealthy_s(self) -> float:
        """Seconds since this worker was last a healthy member (0 while it is one)."""
        return 0.0 if self.member else max(0.0, self.clock() - self.healthy_at)

    def overdue(self) -> bool:
        """True when the consumer should be replaced (not a healthy member for the limit)."""
        return self.enabled and not self.member and self.clock() - self.healthy_at > self.limit_s

    def renewed(self) -> None:
        """A new consumer was made: its join gets the whole limit again."""
        self.renewals += 1
        self.turned_at = self.healthy_at = self.clock()

    def stuck(self) -> str | None:
        """Why the process must end (the loop has not come back for the limit), else None."""
        silent = self.clock() - self.turned_at
        if not self.enabled or silent <= self.limit_s:
            return None
        return (f"worker watchdog: the request loop has not come back from Kafka for "
                f"{silent:.0f} s (in: {self.where}; limit {self.limit_s:.0f} s); exiting with "
                f"status {EXIT_STUCK} so that its supervisor restarts the worker")

    def watch(self, done: threading.Event) -> None:
        """Thread body: until ``done``, check the loop every tenth of the limit (at most 1 s)
        and call ``on_stuck`` once it has not come back for the limit."""
        if not self.enabled:
            return
        tick = min(1.0, self.limit_s / 10)
        while not done.wait(tick):
            message = self.stuck()
            if message is not None:
                self.on_stuck(message)
                return


def _transient(error: BaseException | None) -> bool:
    """A send failure that answering again later can cure (the broker away, a timeout)."""
    return isinstance(error, KafkaTimeoutError) or bool(getattr(error, "retriable", False))


def _wait_for_partitions(consumer: KafkaConsumer, topic: str, stop: threading.Event,
                         watchdog: Watchdog | None = None) -> None:
    """Block until ``topic`` has partitions in the consumer's metadata (or ``stop``)."""
    announced = False
    while not stop.is_set():
        if watchdog is not None:
            watchdog.waiting(f"waiting for the request topic {topic}")
        if consumer.partitions_for_topic(topic):
            return
        if not announced:
            log.warning("request topic %s has no partitions yet; waiting for it", topic)
            announced = True
        stop.wait(0.2)


# --- replies in flight and the offsets they allow to commit --------------------------------


@dataclass
class _Out:
    """One message sent for one request record: its reply or its dead letter."""

    future: Any
    record: ConsumerRecord
    pending: Pending | None  # None: a dead letter


@dataclass
class _SentBatch:
    """One polled batch whose replies and dead letters are with the producer."""

    outs: list[_Out]
    first: dict[TopicPartition, int]  # first offset of the batch in each partition
    upto: dict[TopicPartition, int]  # next offset of each partition once all are acknowledged
    records: Sequence[ConsumerRecord]
    pendings: list[Pending]
    started: float
    retried: bool = field(default=False)


def _size(p: Pending) -> str:
    """The size of ``p``'s reply, for a dead letter's reason (a refusal may be for its size)."""
    try:
        return f"{len(p.encode())} bytes"
    except Exception as exc:  # noqa: BLE001 - an answer that cannot be encoded
        return f"not encodable: {exc!r}"


class _RetryLater(Exception):
    """Nothing could be sent for a record now (the broker away): answer its batch again."""


REPLY_TOPICS_REFRESH_S = 1.0
"""At most this often the worker lists the broker's topics to look up a ``reply_to`` it has not
seen (one metadata request, ~ms)."""


class ReplyTopics:
    """Which ``reply_to`` topics exist, so that a reply never waits on a missing one.

    kafka-python's ``send`` to a topic the broker does not have (auto-creation off, a name that
    collides with another, no Describe right) blocks for ``max_block_ms`` (5 s) and fails: every
    such request stalled the whole worker for 5 s (a flood of them, minutes). Here a topic
    not seen before costs one listing of the broker's topics, at most one per
    :data:`REPLY_TOPICS_REFRESH_S`; a topic still missing after it is reported at once. A
    listing that fails says nothing (the send decides, as before).
    """

    def __init__(self, consumer: KafkaConsumer, refresh_s: float = REPLY_TOPICS_REFRESH_S,
                 clock=time.monotonic) -> None:
        self.consumer = consumer
        self.refresh_s = refresh_s
        self.clock = clock
        self.known: set[str] = set()
        self.listed_at = -float("inf")

    def missing(self, topics: set[str]) -> set[str]:
        """The topics of ``topics`` the broker does not list (empty if it cannot be asked)."""
        unknown = topics - self.known
        if not unknown:
            return set()
        now = self.clock()
        if now - self.listed_at >= self.refresh_s:
            self.listed_at = now
            try:
                self.known = set(self.consumer.topics())
            except KafkaError as exc:
                log.warning("could not list the broker's topics (%r); sending as is", exc)
                return set()
            unknown = topics - self.known
        return unknown


class _Replies:
    """Sends replies and dead letters, tracks them until acknowledged, commits what they cover."""

    def __init__(self, worker: Worker, consumer: KafkaConsumer, producer: KafkaProducer,
                 *, alive: Callable[[str], None] | None = None) -> None:
        self.worker = worker
        self.alive = alive or (lambda where: None)  # the watchdog: each bounded call returned
        self.consumer = consumer
        # one producer for every reply (response topic and reply_to topics) and dead letter;
        # not idempotent, so a write the broker refuses for good fails that batch only (Worker.run)
        self.producer = producer
        self.sent: deque[_SentBatch] = deque()
        self.acked: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}
        self.last_commit = time.monotonic()
        self.owned: set[TopicPartition] = set()  # the assignment as last seen
        self.fresh: set[TopicPartition] = set()  # assigned, not yet anchored
        self.lost = False  # a commit said this consumer is not the owner any more
        self.reply_topics = ReplyTopics(consumer)

    # --- sending ----------------------------------------------------------------------------

    def dead_letter(self, record: ConsumerRecord, stage: str, error: BaseException,
                    reason: str) -> _Out:
        """Send the dead letter of ``record`` (bounded in size; raises :class:`_RetryLater`)."""
        letter = dead_letter_for(record, stage, error, reason)
        try:
            future = self.producer.send(
                self.worker.config.topic_dlq, key=dead_letter_key(record), value=dumps(letter)
            )
        except KafkaError as exc:
            raise _RetryLater(repr(exc)) from exc
        self.worker.dead_letters += 1
        log.warning("dead letter %s (%s): %s", letter.id, stage, reason[:200])
        return _Out(future, record, None)

    def reply(self, record: ConsumerRecord, p: Pending) -> _Out:
        """Send the reply of ``p``; a reply the producer refuses becomes an ``internal`` error
        reply, then a dead letter (raises :class:`_RetryLater` if the broker is away)."""
        key = p.request_id.encode()
        producer = self.producer
        try:
            return _Out(producer.send(p.reply_to, key=key, value=p.encode()), record, p)
        except KafkaError as exc:
            first = exc
        if not _transient(first) and p.error is None:  # e.g. the answer is too large
            p.fail(InternalError(f"the answer could not be sent: {first!r}"), p.version)
            try:
                return _Out(producer.send(p.reply_to, key=key, value=p.encode()), record, p)
            except KafkaError as exc:
                first = exc
        return self.dead_letter(record, "reply", first, f"reply to {p.reply_to!r} "
                                                        f"({_size(p)}) failed: {first!r}")

    def _refuse_missing_reply_topics(self, outcomes: list[Pending | Rejected]) -> None:
        """Answer ``invalid_request`` on the response topic to requests whose ``reply_to``
        the broker does not have (instead of a 5-s wait per request and a dead letter)."""
        default = self.worker.config.topic_responses
        wanted = {o.reply_to for o in outcomes if isinstance(o, Pending) and o.reply_to != default}
        missing = self.reply_topics.missing(wanted) if wanted else set()
        for o in outcomes:
            if isinstance(o, Pending) and o.reply_to in missing:
                o.reply_to = default
                o.fail(InvalidRequest(
                    f"reply_to {o.request.reply_to!r} is not a topic of the broker; create it "
                    f"first (workers never create reply topics), or leave reply_to out"))
                o.item_version = None

    def send(self, records: Sequence[ConsumerRecord], outcomes: list[Pending | Rejected],
             started: float) -> None:
        """Send one batch's replies and dead letters (``outcomes`` aligned with ``records``)."""
        outs: list[_Out] = []
        first: dict[TopicPartition, int] = {}
        upto: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            first.setdefault(tp, r.offset)
            upto[tp] = r.offset + 1
        self._refuse_missing_reply_topics(outcomes)
        try:
            for record, outcome in zip(records, outcomes, strict=True):
                if isinstance(outcome, Rejected):
                    outs.append(self.dead_letter(record, outcome.stage, outcome.error,
                                                 outcome.reason))
                    continue
                try:
                    outs.append(self.reply(record, outcome))
                except _RetryLater:
                    raise
                except Exception as exc:  # noqa: BLE001 - e.g. an answer that cannot be encoded
                    log.exception("reply to %s failed", outcome.request_id)
                    outs.append(self.dead_letter(record, "reply", exc, f"reply failed: {exc!r}"))
        except _RetryLater as exc:
            log.warning("cannot send now (%s); answering this batch again", exc)
            self._rewind(first)
            return
        pendings = [o for o in outcomes if isinstance(o, Pending)]
        self.sent.append(_SentBatch(outs, first, upto, records, pendings, started))

    # --- acknowledgements -------------------------------------------------------------------

    def settle(self) -> None:
        """Move the commit mark over every batch whose messages are all acknowledged."""
        while self.sent and all(o.future.is_done for o in self.sent[0].outs):
            batch = self.sent.popleft()
            failed = [o for o in batch.outs if o.future.failed()]
            if any(_transient(o.future.exception) for o in failed):
                self._rewind(batch.first, failed[0].future.exception)
                return
            if failed:
                self._dead_letter_failed(batch, failed)
                return
            self.acked.update(batch.upto)
            if self.worker.metrics is not None:
                self.worker.metrics.batch_answered(
                    batch.records,
                    batch.pendings,
                    self.worker.dead_letters,
                    time.perf_counter() - batch.started,
                )

    def _dead_letter_failed(self, batch: _SentBatch, failed: list[_Out]) -> None:
        """Replies that failed for good: dead-letter them and wait for those before the commit
        mark moves (a dead letter that fails for good too is logged and let go)."""
        if batch.retried:
            for o in failed:
                log.error("dead letter of %s[%d]@%d failed for good: %r", o.record.topic,
                          o.record.partition, o.record.offset, o.future.exception)
            batch.outs = [o for o in batch.outs if o not in failed]
            self.sent.appendleft(batch)
            return
        try:
            letters = [
                self.dead_letter(o.record, "reply", o.future.exception,
                                 f"reply to {o.pending.reply_to!r} ({_size(o.pending)}) "
                                 f"failed: {o.future.exception!r}")
                if o.pending is not None else o
                for o in failed
            ]
        except _RetryLater as exc:
            self._rewind(batch.first, exc)
            return
        batch.outs = [o for o in batch.outs if o not in failed] + letters
        batch.retried = True
        self.sent.appendleft(batch)

    def drop(self, records: Sequence[ConsumerRecord]) -> None:
        """Leave ``records`` unanswered: put the consumer back before them, so they are answered
        after the rejoin (by whoever owns their partitions then, from the committed offsets).

        After a refused commit (:attr:`lost`: not the owner any more) the batches in flight are
        forgotten too: their offsets can never be committed by this member. Otherwise (the group
        only rebalancing) they stay: their acknowledgements still move the commit mark, so a
        clean handover repeats nothing.
        """
        first: dict[TopicPartition, int] = {}
        for r in records:
            first.setdefault(TopicPartition(r.topic, r.partition), r.offset)
        if self.lost:
            self.lost = False
            self.sent.clear()
            self.acked.clear()
        try:
            assigned = self.consumer.assignment()
            for tp, offset in first.items():
                if tp in assigned:
                    self.consumer.seek(tp, offset)
        except Exception as exc:  # noqa: BLE001 - mid-rebalance: positions come from commits
            log.info("could not seek back (%r); the rejoin positions the partitions", exc)

    def _rewind(self, first: dict[TopicPartition, int], error: BaseException | None = None
                ) -> None:
        """Answer again from ``first`` (and every later batch in flight)."""
        start = dict(first)
        for batch in self.sent:  # later batches are answered again too
            for tp, offset in batch.first.items():
                start.setdefault(tp, offset)
        self.sent.clear()
        if error is not None:
            log.error("replies not acknowledged (%r); answering again from %s", error, start)
        assigned = self.consumer.assignment()
        for tp, offset in start.items():
            if tp in assigned:
                self.consumer.seek(tp, offset)

    # --- commits ----------------------------------------------------------------------------

    def commit(self, *, sync: bool = False, idle: bool = False) -> None:
        """Commit the acknowledged offsets: async and at most every COMMIT_INTERVAL_S, or at
        once when ``idle`` (no request came for QUIET_COMMIT_S: no batch is coming to share the
        commit, and an idle worker's group lag should read 0, not the last answers), or
        ``sync`` (waits for the broker)."""
        if not (sync or idle) and time.monotonic() - self.last_commit < COMMIT_INTERVAL_S:
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
                self.consumer.commit_async(offsets, callback=self._commit_done)
            except MEMBERSHIP_ERRORS as exc:
                self._commit_failed(exc)
                return
            except Exception as exc:  # noqa: BLE001 - e.g. mid-rebalance: the next one covers it
                log.warning("offset commit not sent: %r", exc)
                return
        self.committed.update(todo)

    def _commit_done(self, offsets, response) -> None:
        """Callback of an async commit (may run on the consumer's IO thread: only flags)."""
        if isinstance(response, Exception):
            for tp in offsets:  # so the next commit sends them again
                self.committed.pop(tp, None)
            if isinstance(response, MEMBERSHIP_ERRORS):
                self._commit_failed(response)
            else:
                log.warning("offset commit failed (the requests may be answered twice): %r",
                            response)

    def _commit_failed(self, error: BaseException) -> None:
        log.warning("offset commit refused, this worker is not the owner (%r): dropping the "
                    "replies in flight and rejoining", error)
        self.lost = True

    def acknowledged(self) -> dict[TopicPartition, int]:
        """The commit mark including batches in flight that are acknowledged by now (in order,
        stopping at the first one not done or failed); changes nothing."""
        marks = dict(self.acked)
        for batch in list(self.sent):
            if not all(o.future.is_done and not o.future.failed() for o in batch.outs):
                break
            marks.update(batch.upto)
        return marks

    def uncommitted(self) -> bool:
        """Whether some acknowledged offset is not committed yet."""
        return any(self.committed.get(tp) != o for tp, o in self.acked.items())

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for every message in flight, then commit what is acknowledged (synchronously)."""
        try:
            self.producer.flush(timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - the unacknowledged are answered again later
            log.warning("replies not acknowledged within %.0f s: %r", timeout_s, exc)
        self.settle()
        try:
            self.commit(sync=True)
        except MEMBERSHIP_ERRORS as exc:
            self._commit_failed(exc)
        except Exception as exc:  # noqa: BLE001 - the next owner answers them again
            log.warning("could not commit the acknowledged offsets: %r", exc)

    # --- assignment -------------------------------------------------------------------------

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
                self.alive("positioning the assigned partitions")
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


class _Handover(AsyncConsumerRebalanceListener):
    """Before a rebalance takes this member's partitions: wait for the replies in flight and
    commit everything answered, so the next owners start right after it (no request answered
    twice on a clean handover).

    kafka-python awaits this on its IO loop before JoinGroup, while the request loop is inside
    ``poll()``; the commit is :meth:`GroupCoordinator.commit_in_listener`, skipped if a
    kafka-python release drops it (then only the early drain of the request loop remains).
    """

    def __init__(self, replies: _Replies, coordinator: GroupCoordinator) -> None:
        self.replies = replies
        self.coordinator = coordinator

    async def on_partitions_revoked(self, revoked) -> None:
        replies = self.replies
        commit = self.coordinator.commit_in_listener()
        if commit is None or not revoked:
            return
        try:
            if replies.sent:
                replies.producer.flush(timeout=5.0)
            offsets = {tp: OffsetAndMetadata(o, "", -1)
                       for tp, o in replies.acknowledged().items() if tp in revoked}
            if offsets:
                await commit(offsets, timeout_ms=5000)
                replies.committed.update({tp: o.offset for tp, o in offsets.items()})
                log.info("handover: committed %d partition(s) before the rebalance", len(offsets))
        except Exception as exc:  # noqa: BLE001 - the next owner answers the tail again
            log.warning("handover commit failed (some requests may be answered twice): %r", exc)

    async def on_partitions_assigned(self, assigned) -> None:
        return None  # anchored by the request loop (Replies.follow)

    async def on_partitions_lost(self, lost) -> None:
        return None  # not the owner any more: nothing may be committed


def _decode(record: ConsumerRecord, config: ServingConfig) -> Pending | Rejected:
    """:func:`decode_request`, and a dead letter if it fails unexpectedly (never raises)."""
    if record.value is None and (why := unreadable_reason(record)) is not None:
        return Rejected("decode", UnreadableBatch(why), why)  # a batch Kafka's client can't read
    try:
        return decode_request(record.value, config)
    except Exception as exc:  # noqa: BLE001 - one odd message never stops the loop
        log.exception("decoding a request failed")
        return Rejected("decode", exc, f"request could not be decoded: {exc!r}")


def _poll_ms(replies: _Replies, request_at: float, watchdog: Watchdog) -> int:
    """The next poll's timeout for a member: 10 ms while replies are in flight (their
    acknowledgements are settled between polls), until the quiet commit while acknowledged
    offsets are uncommitted (``request_at``: when requests last came), else
    :data:`IDLE_POLL_MS` (at most a quarter of the watchdog's limit)."""
    if replies.sent:
        return 10
    if replies.uncommitted():
        left_ms = int((QUIET_COMMIT_S - (time.monotonic() - request_at)) * 1000) + 1
        return min(100, max(10, left_ms)) if left_ms > 0 else 100  # past it: a commit failed
    if watchdog.enabled:
        return max(10, min(IDLE_POLL_MS, int(watchdog.limit_s * 250)))
    return IDLE_POLL_MS


# --- the worker ----------------------------------------------------------------------------


class Worker:
    """Answers u2i, i2i, i2i_history and rank requests from the newest loaded index.

    Args:
        config: the worker's own config (``Settings.serving_config()`` builds it).
        store: the Redis store (user vectors, histories, offline i2i, popular, snapshots).
        clients: makes the Kafka producer and consumer.
        index: where the serving state comes from (default: a ``serving.follow.IndexFollower``
            of ``store``: full snapshot, then deltas); refreshed every ``config.swap_poll_s`` by
            a background thread.
        worker_id: the name this worker is listed under in Redis.
        watchdog: bounds the time out of the group and inside one Kafka call (default: a
            :class:`Watchdog` of ``config.watchdog_s`` that exits the process when stuck).
    """

    def __init__(
        self,
        config: ServingConfig,
        store,
        clients: KafkaClients,
        *,
        index: IndexFollower | None = None,
        worker_id: str | None = None,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.clients = clients
        self.index: IndexFollower = index or DeltaFollower(
            store,
            kind=config.index_kind,
            graphs=GraphKeeper(m=config.hnsw_m, ef_search=config.hnsw_ef_search,
                               rebuild_after_s=config.hnsw_rebuild_s)
            if config.index_kind == "hnsw" else None,
            poll_s=config.swap_poll_s,
        )
        self.answerer = Answerer(store, config)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        # Set once this member joined the group with its partitions positioned: from then on a
        # request is answered (by it or another member). Only then is it listed in Redis.
        self.serving = threading.Event()
        self.answered = 0
        self.dead_letters = 0
        self.metrics = None  # a serving.metrics.WorkerMetrics while /metrics is served
        self.membership: Membership | None = None  # while running
        self.watchdog = watchdog or Watchdog(config.watchdog_s)
        # where the request path's time goes, logged every 10 s (read by bench/scale.py e2e)
        self.path_log = PathLog()
        self._decode_s = 0.0
        self._request_at = -float("inf")  # monotonic time of the last poll that found requests
        if hasattr(self.index, "timings"):
            self.index.timings = self.path_log

    # --- the index -------------------------------------------------------------------------

    @property
    def state(self) -> ServingState | None:
        """The state the next batch is answered from."""
        return self.index.current()

    @property
    def swaps(self) -> int:
        """Index versions moved to (full loads and delta applications)."""
        return int(getattr(self.index, "full_loads", 0)) + int(
            getattr(self.index, "deltas_applied", 0))

    def refresh(self) -> bool:
        """Load and swap in a newer index if there is one. Returns True on swap."""
        swapped = self.index.refresh()
        if swapped:
            self._report()
        return swapped

    def follow_loop(self, stop: threading.Event) -> None:
        """Refresh the index on every version notice and at least every ``swap_poll_s``
        (:class:`serving.follow.VersionNotices`) until ``stop``; errors never kill it."""
        wait = getattr(self.index, "wait", None)
        try:
            while not stop.is_set():
                try:
                    if not self.refresh():  # a swap reports itself: one write per version
                        self._report()
                except Exception:  # noqa: BLE001 - keep serving the old index, retry next tick
                    log.exception("index refresh failed; still serving the previous version")
                if wait is not None:
                    wait(stop, self.config.swap_poll_s)
                else:
                    stop.wait(self.config.swap_poll_s)
        finally:
            close = getattr(self.index, "close", None)
            if close is not None:
                close()

    def _report(self) -> None:
        """List this worker, its version and its group membership in Redis (expires unless
        renewed), once serving."""
        state = self.state
        if state is not None and self.serving.is_set():
            self.store.set_worker_version(self.worker_id, state.version,
                                          item_version=state.item_version,
                                          group=self.group_report())

    def group_report(self) -> dict[str, bool | float | int]:
        """This worker's group membership as the watchdog last saw it: ``member``, ``out_s``
        (seconds out of the group, 0 while a member), ``renewals`` (consumers replaced)."""
        watchdog = self.watchdog
        return {"member": watchdog.member, "out_s": round(watchdog.unhealthy_s(), 1),
                "renewals": watchdog.renewals}

    # --- the request loop ------------------------------------------------------------------

    def run(self, stop: threading.Event, *, ready: threading.Event | None = None) -> None:
        """Serve until ``stop`` is set. Starts the follow thread; commits after replies are acked.

        ``ready`` (and :attr:`serving`) is set once the worker holds partitions of the group, each
        positioned: a request produced after that is answered by this worker or another member.
        """
        # Threads and the BLAS threshold of batched flat search. Process-wide, so done here, by
        # the process that serves, whatever started it.
        configure_faiss(self.config.threads, blas_threshold=BLAS_THRESHOLD)
        follower = threading.Thread(
            target=self.follow_loop, args=(stop,), daemon=True, name="fmstream-follow"
        )
        follower.start()
        # linger 0: a reply leaves at once (the batch is already formed by the poll). Not
        # idempotent: kafka-python 3.0.12's idempotent producer takes any produce error it
        # cannot retry (an answer over the response topic's max.message.bytes, a dead letter
        # over the dead-letter topic's, a reply_to topic this worker may Describe but not Write
        # under an ACL) for a fatal one and fails every later send of the worker for good.
        # Without it such an error fails that record's batch only (the sender has no transaction
        # manager to make it fatal), so replies to client-named reply_to topics share this one
        # producer (tests/test_security.py: a reply_to the worker may not write costs that
        # request a dead letter, nothing more). Order and exactly-once on the wire are not
        # needed: the worker commits a batch once all its sends are acknowledged, and a retry's
        # repeat is dropped by request id (by the client) or letter id (dead letters), as after
        # any rewind.
        producer = self.clients.producer(linger_ms=0, max_block_ms=SEND_MAX_BLOCK_MS,
                                         enable_idempotence=False, metrics_enabled=False)
        watchdog = self.watchdog
        watching = threading.Event()  # set: the watchdog stops (shutdown, or run() is over)
        threading.Thread(target=watchdog.watch, args=(watching,), daemon=True,
                         name="fmstream-watchdog").start()
        consumer = self._consumer()
        try:
            replies, membership = self._join(consumer, producer, stop)
            while not stop.is_set():
                if watchdog.overdue():
                    consumer = self._renew(consumer)
                    replies, membership = self._join(consumer, producer, stop)
                    continue
                try:
                    self._step(consumer, replies, membership, ready)
                except KafkaError as exc:  # the broker away: positions stay, retry shortly
                    watchdog.turn(False)
                    log.warning("Kafka call failed (%r); retrying", exc)
                    stop.wait(0.2)
                except Exception:  # noqa: BLE001 - never die on one batch
                    watchdog.turn(False)
                    log.exception("request loop failed; carrying on")
                    stop.wait(0.2)
            watching.set()  # a shutdown that hangs is for the supervisor's kill, not status 75
            replies.drain()
        finally:
            watching.set()
            consumer.close(autocommit=False, timeout_ms=CLOSE_TIMEOUT_MS)
            producer.close()

    def _consumer(self) -> KafkaConsumer:
        """A new consumer of the serving group (not subscribed yet)."""
        consumer = self.clients.consumer(
            self.config.group,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            fetch_min_bytes=1,
            auto_offset_reset="latest",
            max_poll_records=POLL_MAX_RECORDS,
            session_timeout_ms=self.config.session_timeout_ms,
            heartbeat_interval_ms=max(300, self.config.session_timeout_ms // 4),
            # A join made while the request topic was missing from the member's metadata (just
            # created, or a metadata answer without it while the broker is busy) is assigned
            # nothing until the next metadata refresh: every 5 s instead of kafka-python's 5 min.
            metadata_max_age_ms=METADATA_MAX_AGE_MS,
            max_poll_interval_ms=REBALANCE_TIMEOUT_MS,
            # kafka-python's own sensors (read by nothing here: serving/metrics.py keeps the
            # worker's) cost ~6% of the request loop's Python time at 100 requests/s
            metrics_enabled=False,
        )
        # a batch kafka-python cannot read (a codec it lacks, a binary header key) becomes one
        # dead letter; with kafka-python's own parser it hung poll() for good
        use_fast_records(consumer)
        return consumer

    def _join(self, consumer: KafkaConsumer, producer: KafkaProducer, stop: threading.Event
              ) -> tuple[_Replies, Membership]:
        """Subscribe ``consumer`` to the request topic (joined by its next poll)."""
        replies = _Replies(self, consumer, producer, alive=self.watchdog.alive)
        coordinator = GroupCoordinator(consumer)
        self.membership = membership = Membership(consumer, self.config.session_timeout_ms,
                                                  coordinator)
        # Join the group only once the topic's partitions are in metadata: a member that joins
        # before (a topic created a moment ago) is assigned nothing until the next metadata
        # refresh, minutes later.
        _wait_for_partitions(consumer, self.config.topic_requests, stop, self.watchdog)
        consumer.subscribe([self.config.topic_requests], listener=_Handover(replies, coordinator))
        return replies, membership

    def _renew(self, consumer: KafkaConsumer) -> KafkaConsumer:
        """Close ``consumer`` (it has not been a healthy member for the watchdog's limit) and
        make a new one. What the old one answered and did not commit is answered again by the
        partitions' next owners, as after any rebalance that drops a member."""
        watchdog = self.watchdog
        try:
            state = consumer.group_metadata().state
        except Exception as exc:  # noqa: BLE001 - only for the log line
            state = repr(exc)
        log.warning("worker watchdog: not a stable group member with its partitions for %.0f s "
                    "(group state %s, limit %.0f s); closing the Kafka consumer and joining "
                    "with a new one (renewal %d)", watchdog.unhealthy_s(), state,
                    watchdog.limit_s, watchdog.renewals + 1)
        watchdog.alive("closing the consumer")
        try:
            consumer.close(autocommit=False, timeout_ms=CLOSE_TIMEOUT_MS)
        except Exception as exc:  # noqa: BLE001 - the new consumer joins anyway
            log.warning("closing the old consumer failed: %r", exc)
        watchdog.renewed()
        return self._consumer()

    def _step(self, consumer: KafkaConsumer, replies: _Replies, membership: Membership,
              ready: threading.Event | None) -> None:
        """One turn of the request loop: poll, answer, send, settle, commit."""
        if membership.rejoin_pending() and (replies.sent or replies.uncommitted()):
            # a clean handover: what this member answered is committed before the
            # partitions move (else their next owner answers it again)
            replies.drain(timeout_s=5.0)
        if membership.joining():
            timeout_ms = JOIN_POLL_MS  # the join is awaited inside poll() only
        else:
            timeout_ms = _poll_ms(replies, self._request_at, self.watchdog)
        records = flatten(consumer.poll(timeout_ms=timeout_ms))
        now = time.monotonic()
        if records:
            self._request_at = now
        if replies.lost or not membership.check():
            # A zombie answers nothing: what it polled and what it has in flight belong to
            # the group's current owners (answered from the committed offsets).
            self.watchdog.turn(False)
            replies.drop(records)
            return
        positioned = replies.follow()
        self.watchdog.turn(positioned or not replies.owned)  # assigned nothing: a spare member
        if positioned and not self.serving.is_set():
            self.serving.set()
            self._report()
            if ready is not None:
                ready.set()
        if records:
            started, (cpu0, runq0), now = time.perf_counter(), thread_clock(), time.time()
            oldest = min((r.timestamp for r in records if r.timestamp and r.timestamp > 0),
                         default=None)
            with self._busy():  # the follower's apply slices wait for this batch
                outcomes = self.handle(records)
                answered = time.perf_counter()
                replies.send(records, outcomes, started)
            sent, (cpu1, runq1) = time.perf_counter(), thread_clock()
            self.path_log.batch(BatchTimes(
                len(records), 0.0 if oldest is None else max(0.0, now - oldest / 1000),
                self._decode_s, self.answerer.store_s,
                answered - started - self._decode_s - self.answerer.store_s, sent - answered,
                cpu1 - cpu0, runq1 - runq0, self.answerer.store_idle_s))
        replies.settle()
        replies.commit(idle=not replies.sent and now - self._request_at >= QUIET_COMMIT_S)
        self.path_log.maybe_log()

    def _busy(self) -> AbstractContextManager[None]:
        busy = getattr(self.index, "busy", None)  # serving.follow.IndexFollower has it
        return busy() if busy is not None else nullcontext()

    def handle(self, records: Sequence[ConsumerRecord]) -> list[Pending | Rejected]:
        """Decode and answer a batch of request records: one outcome per record, in order."""
        started = time.perf_counter()
        outcomes = [_decode(r, self.config) for r in records]
        self._decode_s = time.perf_counter() - started
        pendings = [o for o in outcomes if isinstance(o, Pending)]
        with self.index.pinned() as state:  # the whole batch uses one version
            self.answerer.answer(pendings, state)
        self.answered += len(pendings)
        return outcomes


__all__ = [
    "BLAS_THRESHOLD", "EXIT_STUCK", "KafkaClients", "Pending", "ServingError", "ServingState",
    "Watchdog", "Worker",
]
