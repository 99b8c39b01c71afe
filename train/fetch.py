"""Polling and decoding overlapped with the model update: a fetch thread owns the consumer.

kafka-python's consumer is not thread-safe, so every call on it (poll, assign, seek, commit,
close) is made by one thread, the fetch thread, while it runs. It polls, hands the records to
``decode`` (which also dead-letters what is unusable) and puts the decoded batch on a bounded
queue (``depth`` batches); the trainer thread takes batches from the queue and applies them.
Other consumer calls (the trainer's group commits) are queued with :meth:`Fetcher.call` and run by
the fetch thread between polls.

Exactly once is untouched: the trainer records a partition's position only when it has applied
the batch holding it, and checkpoints those positions; batches still in the queue (or in flight)
at a crash are read again by the next trainer from the checkpoint.

While ``may_fetch()`` is False (the trainer lease is not provably ours) the thread neither polls
nor decodes, so nothing is consumed and no dead letter is written.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from operator import attrgetter
from typing import Any, Generic, NamedTuple, TypeVar

from kafka.errors import KafkaError

from stream.config import Topics
from stream.consume import Decoded, decode_event_columns, decode_records
from stream.fetcher import ConsumerRecord
from stream.schemas import (
    EventColumns,
    ItemProfile,
    ItemTombstone,
    UserProfile,
    UserTombstone,
    tombstone_id,
)
from train.align import EventAligner, StableLags, aligned_records
from train.errors import TrainError

log = logging.getLogger(__name__)

_TOPIC, _PARTITION, _OFFSET = map(attrgetter, ("topic", "partition", "offset"))


def put_while_busy(
    q: Any, item: Any, stop: threading.Event, while_full: Callable[[], None]
) -> bool:
    """Put ``item`` on the bounded queue ``q``; while it is full, run ``while_full`` (commits keep
    flowing while the trainer is busy). False if ``stop`` was set before it went in."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            while_full()
    return False


def tp_key(topic: str, partition: int) -> str:
    """A partition's key in checkpoint positions: ``topic|partition``."""
    return f"{topic}|{partition}"


def parse_tp_key(key: str) -> tuple[str, int]:
    """``(topic, partition)`` of a :func:`tp_key`."""
    topic, part = key.rsplit("|", 1)
    return topic, int(part)


def grow_assignment(
    consumer: Any, topics: Sequence[str], assigned: set
) -> tuple[set, list, list[str]]:
    """Assign every partition of ``topics`` (those already ``assigned`` kept): returns all
    partitions, the new ones (sorted; empty: nothing was reassigned) and the topics with no
    partitions (yet)."""
    from kafka.structs import TopicPartition

    found, missing = set(assigned), []
    for topic in topics:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            missing.append(topic)
        found.update(TopicPartition(topic, p) for p in parts or ())
    new = sorted(found - assigned)
    if new:
        consumer.assign(sorted(found))
    return found, new, missing


def seek_to_positions(consumer: Any, tps: Sequence[Any], positions: Mapping[str, int]) -> None:
    """Position each of ``tps`` at its entry in ``positions`` (see :func:`tp_key`), or at the
    beginning when it has none."""
    for tp in tps:
        pos = positions.get(tp_key(tp.topic, tp.partition))
        if pos is None:
            consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, pos)


class DecodedBatch(NamedTuple):
    """One poll, decoded: where it ends (the positions) and the usable messages by topic."""

    ends: dict[tuple[str, int], int]  # (topic, partition) -> next offset after this batch
    per_topic: dict[str, int]  # records polled, by topic
    users: list[Decoded[UserProfile | UserTombstone]]  # a tombstone: remove the profile
    items: list[Decoded[ItemProfile | ItemTombstone]]
    events: EventColumns  # rows: indices into event_records
    event_records: Sequence[ConsumerRecord]  # the poll's records of the events topic
    dead_letters: int = 0  # letters a fetch *process* sent (and had acknowledged) for it

    @property
    def n_records(self) -> int:
        return sum(self.per_topic.values())


def _user_tombstone(key: bytes | None) -> UserTombstone:
    return UserTombstone(tombstone_id(key, "user_id"))


def _item_tombstone(key: bytes | None) -> ItemTombstone:
    return ItemTombstone(tombstone_id(key, "item_id"))


def decode_poll(
    records: list[ConsumerRecord], dead_letters: Any, topics: Topics, max_bytes: int
) -> DecodedBatch:
    """Decode one poll's records; unusable messages are dead-lettered (stage ``decode`` or
    ``validate``) through ``dead_letters``."""
    names = list(map(_TOPIC, records))
    by_topic: dict[str, list[ConsumerRecord]] = defaultdict(list)
    if len(set(names)) == 1:  # the usual poll: one topic (C-level passes, no loop per record)
        by_topic[names[0]] = records
    else:
        for r in records:
            by_topic[r.topic].append(r)
    events = by_topic[topics.events]
    # the last record of each partition (records are in offset order within one)
    last = dict(zip(zip(names, map(_PARTITION, records), strict=True), map(_OFFSET, records),
                    strict=True))
    return DecodedBatch(
        {tp: offset + 1 for tp, offset in last.items()},
        {topic: len(rs) for topic, rs in by_topic.items() if rs},
        decode_records(by_topic[topics.users], UserProfile, dead_letters, max_bytes=max_bytes,
                       tombstone=_user_tombstone),
        decode_records(by_topic[topics.items], ItemProfile, dead_letters, max_bytes=max_bytes,
                       tombstone=_item_tombstone),
        decode_event_columns(events, dead_letters, max_bytes=max_bytes),
        events,
    )


class HandedEnds:
    """Where each partition's records handed over end, moved past what a ``read_committed``
    consumer skips.

    A batch ends a partition at its last record + 1 (:attr:`DecodedBatch.ends`). Transaction
    markers (control records) and the records of aborted transactions are never handed over,
    so a partition whose log ends with them stayed behind in the checkpoint (and in ``fmstream
    lag``) until its next committed record, although the consumer's position was past them.
    :meth:`moved` gives, for every assigned partition the aligner holds nothing of, its
    position when that is past the last end handed over: every record before it was handed
    over (in this batch or an earlier one, which the trainer applies first), so a checkpoint
    may carry it, and a trainer restarted from it skips only what was never handed over.
    Partitions with no end yet (no record handed over, no start position) are left alone.

    Args:
        positions: the start positions (``topic|partition`` -> next offset, see
            :func:`tp_key`), the ends handed over before this fetcher.
    """

    def __init__(self, positions: Mapping[str, int] | None = None) -> None:
        self._ends = {parse_tp_key(key): int(pos) for key, pos in (positions or {}).items()}

    def moved(self, consumer: Any, ends: Mapping[tuple[str, int], int],
              held: Callable[[Any], bool] = lambda tp: False) -> dict[tuple[str, int], int]:
        """The partitions whose end moves past skipped offsets, and their new ends.

        Args:
            consumer: the ``KafkaConsumer`` that polled.
            ends: the ends of the batch about to be handed over (none: no records).
            held: whether records of a partition are polled but not handed over yet (the
                aligner's :meth:`~train.align.EventAligner.holds`).
        """
        self._ends.update(ends)
        out: dict[tuple[str, int], int] = {}
        for tp in consumer.assignment():
            key = (tp.topic, tp.partition)
            last = self._ends.get(key)
            if last is None or held(tp):
                continue
            pos = consumer.position(tp, timeout_ms=0)
            if pos is not None and pos > last:
                out[key] = self._ends[key] = pos
        return out


def partition_counts(records: Sequence[ConsumerRecord], rows: Any) -> dict[int, int]:
    """How many of ``records[rows]`` each partition holds."""
    counts = getattr(records, "partition_counts", None)
    if counts is not None:
        return counts(rows)
    return dict(Counter(records[j].partition for j in rows.tolist()))

B = TypeVar("B")


class FetchFailed(TrainError, RuntimeError):
    """The fetch thread stopped on an unexpected error (the cause is chained): the trainer
    stops; restart it (it resumes from its checkpoint) once the cause is fixed."""


class Fetcher(Generic[B]):
    """Polls and decodes in its own thread; :meth:`get` returns decoded batches in poll order.

    Args:
        consumer: the ``KafkaConsumer`` (used only by the fetch thread while it runs).
        decode: turns one poll's records (a non-empty list) into a batch; runs in the fetch
            thread.
        may_fetch: polled before each poll; while False the thread waits.
        before_poll: run before each poll in the fetch thread (e.g. refresh the assignment).
        depth: decoded batches waiting at most (bounded: memory and work ahead of the model).
        poll_timeout_ms: one poll's wait when nothing has arrived.
        timings: a dict where ``poll`` and ``decode`` seconds are accumulated.
        aligner: hands one topic's records over in timestamp order across partitions
            (:mod:`train.align`); None: each poll as kafka-python returns it.
        positions: the start positions (``topic|partition`` -> next offset): a batch's ends
            move past skipped offsets from there (:class:`HandedEnds`; ``decode`` returns a
            batch with an ``ends`` dict, and is called with no records for such a move).
            None: batches are handed over as ``decode`` makes them.
    """

    def __init__(
        self,
        consumer: Any,
        decode: Callable[[list], B],
        *,
        may_fetch: Callable[[], bool] = lambda: True,
        before_poll: Callable[[], None] = lambda: None,
        depth: int = 2,
        poll_timeout_ms: int = 200,
        timings: dict[str, float] | None = None,
        aligner: EventAligner | None = None,
        positions: Mapping[str, int] | None = None,
    ) -> None:
        self.consumer = consumer
        self._aligner = aligner
        self._stable = StableLags(consumer) if aligner is not None else None
        self._ends = HandedEnds(positions) if positions is not None else None
        self._decode = decode
        self._may_fetch = may_fetch
        self._before_poll = before_poll
        self._queue: queue.Queue[B] = queue.Queue(maxsize=depth)
        self._calls: queue.SimpleQueue[tuple[Callable[[Any], Any], Future]] = queue.SimpleQueue()
        self._poll_timeout_ms = poll_timeout_ms
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._failed: BaseException | None = None
        self.cpu_s = 0.0  # CPU seconds the fetch thread used so far
        self.timings = timings if timings is not None else {}
        self.timings.setdefault("poll", 0.0)
        self.timings.setdefault("decode", 0.0)
        self._thread = threading.Thread(target=self._run, daemon=True, name="fmstream-fetch")

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def ready(self) -> bool:
        """Started (a thread fetches at once)."""
        return self.running

    @property
    def caught_up(self) -> bool:
        """The last poll found nothing and every batch before it is handed over (nothing is
        being decoded or waiting for the queue): the trainer is idle, not the fetcher busy."""
        return self._caught_up.is_set()

    def start(self) -> Fetcher[B]:
        self._thread.start()
        return self

    def dead_letter_block(self) -> None:
        """None: this fetcher sends its dead letters through the trainer's outbox (whose
        checkpoints wait for them), it keeps none of its own."""
        return None

    def get(self, timeout: float) -> B | None:
        """The next decoded batch, or None if none arrives within ``timeout`` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            if self._failed is not None:
                raise FetchFailed(f"the fetch thread failed: {self._failed!r}") from self._failed
            return None

    def call(self, fn: Callable[[Any], Any]) -> Future:
        """Run ``fn(consumer)`` on the thread that owns the consumer; its result as a future.

        When the fetch thread is not running, ``fn`` runs here and now.
        """
        future: Future = Future()
        if not self.running:
            _run_call(fn, self.consumer, future)
            return future
        self._calls.put((fn, future))
        return future

    def commit(
        self, offsets: dict[tuple[str, int], int], *, wait_s: float | None = None
    ) -> Future:
        """Commit ``offsets`` ((topic, partition) -> next offset) for the consumer's group, on
        the thread that owns the consumer; with ``wait_s`` synchronously (the future holds the
        outcome), else ``commit_async`` (failures are logged)."""
        from kafka.structs import OffsetAndMetadata, TopicPartition

        commit = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                  for (t, p), o in offsets.items()}
        if wait_s is not None:
            return self.call(lambda c: c.commit(commit, timeout_ms=int(wait_s * 1000)))
        return self.call(lambda c: c.commit_async(commit, callback=log_commit_failure))

    def pause(self) -> None:
        """Poll no more (here: stop the thread; the consumer stays usable from the caller)."""
        self.stop()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread (batches still queued are dropped: they were never applied)."""
        self._stop.set()
        if self.running:
            # Unblock a put() waiting on a full queue.
            while self.running:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(0.05)
                timeout -= 0.05
                if timeout <= 0:
                    log.warning("the fetch thread did not stop in time")
                    break
        self._run_calls()

    # --- the fetch thread ---------------------------------------------------------------------

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            _run_call(fn, self.consumer, future)

    def _run(self) -> None:
        cpu0 = time.thread_time()
        try:
            while not self._stop.is_set():
                self.cpu_s = time.thread_time() - cpu0
                self._run_calls()
                if not self._may_fetch():
                    self._stop.wait(0.05)
                    continue
                t0 = time.perf_counter()
                try:
                    self._before_poll()
                    ready = self._aligner is not None and self._aligner.more
                    polled = self.consumer.poll(timeout_ms=0 if ready else self._poll_timeout_ms)
                except KafkaError as exc:
                    # Broker away: positions stay in the consumer; retry shortly, never die.
                    log.warning("poll failed (%s); retrying", exc)
                    self._caught_up.set()  # nothing in hand: the trainer may count idle time
                    self._stop.wait(min(1.0, self._poll_timeout_ms / 1000))
                    continue
                finally:
                    self.timings["poll"] += time.perf_counter() - t0
                if self._aligner is not None:
                    records = aligned_records(self._aligner, self.consumer, polled,
                                              self._stable)
                    held = self._aligner.holds
                else:
                    records = [r for batch in polled.values() for r in batch]
                    held = _holds_nothing
                if records:
                    self._caught_up.clear()
                t0 = time.perf_counter()
                batch = self._decode(records) if records else None
                moved = {} if self._ends is None else self._ends.moved(
                    self.consumer, batch.ends if batch else {}, held)
                if batch is None and moved:  # only past markers / aborted records
                    batch = self._decode([])
                self.timings["decode"] += time.perf_counter() - t0
                if batch is None:
                    # caught up unless the aligner still holds records back for a while
                    if self._aligner is not None and self._aligner.buffered:
                        self._caught_up.clear()
                    else:
                        self._caught_up.set()
                    continue
                if moved:
                    batch.ends.update(moved)
                self._caught_up.clear()
                put_while_busy(self._queue, batch, self._stop, self._run_calls)
        except BaseException as exc:  # noqa: BLE001 - surfaced in the trainer's thread by get()
            log.exception("fetch thread failed")
            self._failed = exc
        finally:
            self.cpu_s = time.thread_time() - cpu0


def _holds_nothing(tp: Any) -> bool:
    return False


def _run_call(fn: Callable[[Any], Any], consumer: Any, future: Future) -> None:
    try:
        future.set_result(fn(consumer))
    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
        future.set_exception(exc)


def log_commit_failure(offsets, response) -> None:
    if isinstance(response, Exception):
        log.warning("group commit failed (the checkpoint is safe): %r", response)
