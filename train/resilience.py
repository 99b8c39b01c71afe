"""What keeps the trainer going through outages: the lease keeper, the dead-letter outbox and the
guarded sink.

The trainer's rules (README "Trainer guarantees"):

- **Lease.** The Redis lease (``train/lease.py``) says which trainer may write checkpoints. The
  trainer renews it about once a second. A renewal that *succeeded*, sent at time ``t``, proves
  the lease is ours until ``t + ttl``: nobody else can take it before it expires. So during a
  Redis outage the trainer keeps training and checkpointing until ``t + ttl - margin``; past that
  it pauses (no polls, no dead letters, no checkpoints) and retries Redis. When Redis answers:
  the lease still ours, or free again with the newest checkpoint on disk still our own, means
  carry on; anyone else holding it raises :class:`~train.lease.LeaseLost` and the trainer
  stops without writing. Checkpoints hold the model and its Kafka positions together, so even a
  stale writer could not make an event count twice; the lease keeps two trainers from wasting
  work, duplicating dead letters and publishing over each other.
- **Dead letters.** A dead letter is kept by :class:`DeadLetterOutbox` until the broker
  acknowledged it, and re-sent if its delivery failed (a broker outage longer than the
  producer's delivery timeout); a checkpoint is written only after every dead letter it covers
  is acknowledged.
- **Publishing.** Redis errors from the publisher never stop training: :class:`GuardedSink`
  skips publishing while Redis is down (backing off), keeps the applied events whose history
  write failed (bounded) and replays them when Redis answers again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from kafka import KafkaProducer
from kafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError

from stream.connect import RedisConfig
from stream.consume import (
    DEAD_LETTER_REASON_CHARS,
    dead_letter_fix,
    dead_letter_for,
    dead_letter_key,
)
from stream.fetcher import ConsumerRecord
from stream.schemas import DeadLetter, dumps
from train.lease import LeaseLost

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class LeaseKeeper:
    """Renews the trainer lease and tells whether the trainer may still consume and checkpoint.

    Args:
        renew: extends the lease; raises :class:`LeaseLost` when someone else holds it and
            ``redis.RedisError`` when Redis cannot be reached.
        ttl_s: the lease's time to live.
        try_acquire: takes the lease if it is free (used after it expired during an outage).
        may_reacquire: whether re-taking a lease that expired is safe (the trainer checks that
            the newest checkpoint on disk is still its own: nobody trained in between).
        renew_every_s: renewal cadence (a Redis round trip each).
        margin_s: safety margin subtracted from the TTL (clock drift, a slow checkpoint write).
    """

    def __init__(
        self,
        renew: Callable[[], Any],
        ttl_s: float,
        *,
        try_acquire: Callable[[], bool] | None = None,
        may_reacquire: Callable[[], bool] = lambda: True,
        renew_every_s: float = 1.0,
        margin_s: float = 2.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._renew = renew
        self._try_acquire = try_acquire
        self._may_reacquire = may_reacquire
        self.ttl_s = ttl_s
        self._every = min(renew_every_s, ttl_s / 4)
        self._margin = min(margin_s, ttl_s / 4)
        self._clock = clock
        now = clock()
        self._proven_at = now  # send time of the last successful renewal (acquire counts)
        self._tried_at = now
        self.down_since: float | None = None  # when Redis stopped answering (None: it answers)

    @property
    def valid(self) -> bool:
        """Whether the lease is provably ours now (last successful renewal + TTL - margin)."""
        return self._clock() < self._proven_at + self.ttl_s - self._margin

    def keep(self, force: bool = False) -> bool:
        """Renew when due (or ``force``); returns :attr:`valid`.

        Raises:
            LeaseLost: another instance holds the lease (stop without writing anything).
        """
        now = self._clock()
        if force or now - self._tried_at >= self._every:
            self._tried_at = now
            self._attempt(now)
        return self.valid

    def _attempt(self, sent_at: float) -> None:
        try:
            try:
                self._renew()
            except LeaseLost:
                if self._try_acquire is None or not self._may_reacquire():
                    raise
                if not self._try_acquire():
                    raise
                log.warning("trainer lease had expired (Redis outage?); took it again")
        except redis.RedisError as exc:
            if self.down_since is None:
                self.down_since = sent_at
                log.warning(
                    "cannot renew the trainer lease (%r); training on while it is "
                    "provably ours (%.1f s left)",
                    exc,
                    self.remaining_s(),
                )
            return
        if self.down_since is not None:
            log.warning(
                "Redis answers again after %.1f s; lease renewed", sent_at - self.down_since
            )
            self.down_since = None
        self._proven_at = sent_at

    def remaining_s(self) -> float:
        """Seconds the lease is still provably ours (negative: expired, or maybe someone's)."""
        return self._proven_at + self.ttl_s - self._margin - self._clock()


REFUSED_FOR_SIZE = (MessageSizeTooLargeError, RecordListTooLargeError)
"""Produce errors that sending the same letter again can never cure: the letter is over the
dead-letter topic's ``max.message.bytes`` (an operator may lower it below a letter's ~100 KB)."""


def letter_without_payload(value: bytes, error: BaseException) -> bytes:
    """The dead letter ``value`` again without the source record's bytes (their length and
    sha256 stay), its reason saying why: what is left of a letter is a few hundred bytes."""
    letter = DeadLetter.model_validate_json(value)
    note = (f"[this letter ({len(value)} bytes) was refused by the dead-letter topic "
            f"({type(error).__name__}): sent again without the record's bytes] ")
    return dumps(letter.model_copy(update={
        "reason": (note + letter.reason)[:DEAD_LETTER_REASON_CHARS],
        "value_b64": "", "value_truncated": letter.value_length > 0,
    }))


BLOCKED_LOG_EVERY_S = 60.0
"""While the dead-letter topic takes no letters, the outbox repeats its error line this often."""


@dataclass(frozen=True)
class DeadLetterBlock:
    """The dead-letter topic has not acknowledged letters since ``since`` (epoch seconds):
    ``waiting`` letters wait, the last error was ``error`` (its class name)."""

    since: float
    waiting: int
    error: str

    @staticmethod
    def merge(*blocks: DeadLetterBlock | None) -> DeadLetterBlock | None:
        """One block for several outboxes (the oldest start, the letters of all), or None."""
        found = [b for b in blocks if b is not None]
        if not found:
            return None
        first = min(found, key=lambda b: b.since)
        return DeadLetterBlock(first.since, sum(b.waiting for b in found), first.error)


class DeadLetterOutbox:
    """The dead-letter sink of the trainer: a letter stays here until the broker acked it.

    Same interface as :class:`stream.consume.DeadLetters` (``send``, ``flush``, ``count``), but
    :meth:`flush` returns False instead of raising when the broker is away, and re-sends any
    letter whose delivery failed, so a checkpoint never covers an unacknowledged dead letter. A
    letter the topic refuses for its size (:data:`REFUSED_FOR_SIZE`) goes again without the
    record's bytes (:func:`letter_without_payload`), or it would be re-sent for ever and hold
    the trainer's intake (the fetcher flushes before it hands a batch over). The producer must
    not be idempotent: kafka-python's idempotent producer turns such a refusal into a fatal
    state that fails every later send.
    Thread-safe: the fetch thread sends (decode, validate) while the trainer thread sends
    (apply) and flushes; a flush covers every letter sent before it.

    A topic that takes no letter for good (an ACL denies Write, the topic is missing with
    auto-create off) holds the intake at the first unacknowledged letter, which is the no-loss
    rule; it is made visible: one error line naming the topic and the fix (again every
    :data:`BLOCKED_LOG_EVERY_S`), :meth:`blocked` for the metrics and ``fmstream lag``, and a
    line when letters go through again (the retries go on by themselves). Once a send found no
    metadata (the topic missing, the broker away), the next letter is tried on a thread of the
    outbox's own, one at a time: a ``send`` waits up to the producer's ``max_block_ms`` for
    metadata, and a :meth:`flush` on a topic known to be unavailable must not hold its caller
    (the trainer thread, at every checkpoint attempt) for that long.
    """

    def __init__(self, producer: KafkaProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic
        self._pending: list[list[Any]] = []  # [key, value, future | None]
        self._lock = threading.Lock()
        self.count = 0
        self._blocked_since: float | None = None  # epoch s of the first flush that failed
        self._blocked_logged = 0.0  # monotonic s of the last error line
        self._last_error: BaseException | None = None  # the newest send or delivery failure
        # the last send raised (no metadata: the topic is missing, the broker away): later
        # letters are only queued (flush tries the oldest first) instead of each blocking for
        # the producer's max_block_ms
        self._unsendable = False
        # one thread sends at a time (a flush, a send, the retry thread): a letter is never
        # handed to the producer twice; a flush never waits for this lock
        self._send_lock = threading.Lock()
        self._retry: threading.Thread | None = None  # tries the oldest letter while unsendable
        try:  # learn the topic's partitions now, so send() never blocks on metadata later
            producer.partitions_for(topic)
        except KafkaError as exc:
            log.warning("no metadata for the dead-letter topic %s yet: %r", topic, exc)

    def send(self, record: ConsumerRecord, stage: str, error: BaseException, reason: str) -> None:
        """Queue one dead letter for ``record`` that failed at ``stage`` (decode/validate/apply)."""
        letter = dead_letter_for(record, stage, error, reason)
        entry = [dead_letter_key(record), dumps(letter), None]
        # else flush() sends it (after the oldest went through, while the topic is unsendable)
        if not self._unsendable and self._send_lock.acquire(blocking=False):
            try:
                self._send(entry)
            finally:
                self._send_lock.release()
        with self._lock:
            self._pending.append(entry)
            self.count += 1
        log.warning(
            "dead letter %s[%d]@%d (%s): %s",
            record.topic,
            record.partition,
            record.offset,
            stage,
            reason[:200],
        )

    def _send(self, entry: list[Any]) -> bool:
        """Hand ``entry`` to the producer; False (kept, flush() re-sends) if it raised."""
        try:
            entry[2] = self._producer.send(self._topic, key=entry[0], value=entry[1])
        except KafkaError as exc:  # e.g. metadata unavailable: keep it, flush() re-sends
            self._last_error = exc
            self._unsendable = True
            if self._blocked_since is None:  # else the blocked line says it
                log.warning("dead letter not sent yet (%r); will retry", exc)
            entry[2] = None
            return False
        self._unsendable = False
        return True

    def _retry_in_background(self, entry: list[Any]) -> None:
        """Send ``entry`` on the retry thread (it may wait ``max_block_ms`` for metadata), unless
        a send is in progress already."""
        if self._retry is not None and self._retry.is_alive():
            return
        self._retry = threading.Thread(target=self._retry_send, args=(entry,),
                                       name="dead-letter-retry", daemon=True)
        self._retry.start()

    def _retry_send(self, entry: list[Any]) -> None:
        if not self._send_lock.acquire(blocking=False):
            return  # another thread is sending: the next flush tries again
        try:
            if entry[2] is None or entry[2].failed():
                self._send(entry)
        except Exception as exc:  # noqa: BLE001 - e.g. the producer closed meanwhile
            self._last_error = exc
            log.debug("dead letter retry failed: %r", exc)
        finally:
            self._send_lock.release()

    @property
    def pending(self) -> int:
        """Dead letters not yet acknowledged by the broker."""
        return len(self._pending)

    def blocked(self) -> DeadLetterBlock | None:
        """Since when the topic has taken none of the letters waiting (the last flush failed),
        how many wait, and the last error; None while letters go through."""
        since = self._blocked_since
        if since is None:
            return None
        error = self._last_error
        return DeadLetterBlock(since, self.pending,
                               "" if error is None else type(error).__name__)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every letter sent before this call is acknowledged; False if not within
        ``timeout`` (0: only look, re-sending what failed, without waiting). (Letters sent
        meanwhile by another thread are for records not applied yet: no checkpoint written now
        covers them.) While the topic is unsendable (no metadata) the oldest letter is retried
        on the outbox's retry thread, never on the caller's."""
        done = self._flush(timeout)
        if not done:
            self._note_blocked()
        elif self._blocked_since is not None:
            log.warning("dead-letter topic %s takes letters again after %.0f s: intake resumes",
                        self._topic, time.time() - self._blocked_since)
            self._blocked_since = None
        return done

    def _note_blocked(self) -> None:
        now = time.monotonic()
        first = self._blocked_since is None
        if first:
            self._blocked_since = time.time()
        elif now - self._blocked_logged < BLOCKED_LOG_EVERY_S:
            return
        self._blocked_logged = now
        error = self._last_error
        name = "no acknowledgement" if error is None else type(error).__name__
        log.error(
            "dead-letter topic %s takes no letters (%s) for %.0f s: %d dead letters wait, and "
            "the trainer holds its intake at them (nothing past an unacknowledged letter is "
            "checkpointed or committed, so no message is lost). To fix: %s; the trainer "
            "resumes by itself once the topic takes them",
            self._topic, name, time.time() - self._blocked_since, self.pending,
            dead_letter_fix(self._topic, name))

    def _flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        warned = False
        with self._lock:
            waiting = list(self._pending)
        while True:
            done = {id(e) for e in waiting if e[2] is not None and e[2].succeeded()}
            if done:
                waiting = [e for e in waiting if id(e) not in done]
                with self._lock:
                    self._pending = [e for e in self._pending if id(e) not in done]
            if not waiting:
                return True
            for entry in waiting:
                future = entry[2]
                if future is not None and not future.failed():
                    continue  # in flight
                if future is not None and isinstance(future.exception, REFUSED_FOR_SIZE):
                    log.error("dead letter of %d bytes refused by %s (%r): re-sending it "
                              "without the record's bytes; raise the topic's "
                              "max.message.bytes to keep them", len(entry[1]), self._topic,
                              future.exception)
                    entry[1] = letter_without_payload(entry[1], future.exception)
                elif future is not None:
                    self._last_error = future.exception
                    if self._blocked_since is None and not warned:  # once; then the
                        warned = True  # blocked line (flush) says it
                        log.warning(
                            "dead letter delivery failed (%r); re-sending", future.exception
                        )
                if self._unsendable:  # no metadata: a send would hold this thread
                    self._retry_in_background(entry)
                    break  # one metadata wait at a time, the oldest letter first
                if not self._send_lock.acquire(blocking=False):
                    break  # another thread is sending (the retry thread): look again later
                try:
                    if entry[2] is not future:
                        continue  # re-sent meanwhile by another thread
                    sent = self._send(entry)
                finally:
                    self._send_lock.release()
                if not sent:
                    break  # it raised: the retry thread tries it next round
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                self._producer.flush(timeout=left)
            except KafkaError:
                return False
            if time.monotonic() < deadline and not all(
                    e[2] is not None and e[2].succeeded() for e in waiting):
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


class GuardedSink:
    """Wraps the publisher so that a Redis outage pauses publishing instead of training.

    After a Redis error the sink is *down* for ``backoff_s`` (doubling up to ``max_backoff_s``):
    ticks are skipped, applied events are queued (at most ``max_queued`` events; the oldest are
    dropped beyond that, with a warning) and the newest checkpoint report is kept. The first call
    after the backoff tries again; when it works the queued events are handed to the sink first,
    in order, then the kept checkpoint report.
    """

    def __init__(
        self,
        sink: Any,
        *,
        backoff_s: float = 0.5,
        max_backoff_s: float = 5.0,
        max_queued: int = 200_000,
        clock: Clock = time.monotonic,
    ) -> None:
        self.sink = sink
        self._backoff0 = backoff_s
        self._backoff = backoff_s
        self._max_backoff = max_backoff_s
        self._clock = clock
        self._retry_at = 0.0
        self._queued: deque[Sequence[Any]] = deque()
        self._n_queued = 0
        self._checkpoint: Any = None  # the newest checkpoint report not yet delivered
        self._report: dict[str, Any] = {}  # status fields not yet delivered (newest wins)
        self._max_queued = max_queued
        self.dropped = 0
        self.down_since: float | None = None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> bool:
        now = self._clock()
        if self.down_since is not None and now < self._retry_at:
            return False
        try:
            if self._queued:
                self._drain()
            if self._checkpoint is not None and fn != self.sink.checkpointed:  # bound: ==, not is
                self.sink.checkpointed(self._checkpoint)
                self._checkpoint = None
            fn(*args)
        except redis.RedisError as exc:
            if self.down_since is None:
                self.down_since = now
                log.warning(
                    "publisher: Redis unavailable (%r) in %s; training goes on, "
                    "publishing resumes when Redis answers",
                    exc,
                    what,
                )
            else:
                self._backoff = min(self._backoff * 2, self._max_backoff)
            self._retry_at = now + self._backoff
            return False
        if self.down_since is not None:
            log.warning("publisher: Redis answers again after %.1f s", now - self.down_since)
            self.down_since = None
            self._backoff = self._backoff0
        return True

    def _drain(self) -> None:
        while self._queued:
            batch = self._queued[0]
            self.sink.applied(batch)
            self._queued.popleft()
            self._n_queued -= len(batch)

    def _queue(self, events: Sequence[Any]) -> None:
        self._queued.append(events)
        self._n_queued += len(events)
        while self._n_queued > self._max_queued and len(self._queued) > 1:
            old = self._queued.popleft()
            self._n_queued -= len(old)
            self.dropped += len(old)
            log.warning(
                "publisher: dropped the history of %d events queued during the Redis "
                "outage (over %d queued)",
                len(old),
                self._max_queued,
            )

    def applied(self, events: Sequence[Any]) -> None:
        if not self._call("applied", self.sink.applied, events):
            self._queue(events)

    def profiles_changed(self, user_ids: Sequence[str]) -> None:
        # In memory only in the publisher; never lose it to an outage.
        self.sink.profiles_changed(user_ids)

    def items_changed(self, item_ids: Sequence[str]) -> None:
        # In memory only in the publisher, like profiles_changed.
        self.sink.items_changed(item_ids)

    def checkpointed(self, progress: Any) -> None:
        # Only the newest report matters (a status hash): keep it until Redis answers.
        self._checkpoint = progress
        if self._call("checkpointed", self.sink.checkpointed, progress):
            self._checkpoint = None

    def report(self, fields: Mapping[str, Any]) -> None:
        """Status fields (the newest of each wins), kept until Redis takes them; a sink without
        ``report`` (a test's) takes none."""
        deliver = getattr(self.sink, "report", None)
        if deliver is None:
            return
        self._report.update(fields)
        if self._call("report", deliver, dict(self._report)):
            self._report.clear()

    def tick(self, now: float) -> None:
        self._call("tick", self.sink.tick, now)


def lease_client(redis_config: RedisConfig, timeout_s: float = 2.0) -> redis.Redis:
    """A Redis client for the lease: short timeouts, one retry, so that a Redis that hangs
    (rather than refuses) cannot hold a renewal for longer than a few seconds of the TTL."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from stream.connect import redis_client

    return redis_client(
        redis_config,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
    )
