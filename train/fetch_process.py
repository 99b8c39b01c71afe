"""Polling and decoding in a child process: kafka-python's record parsing and the decode get a
core of their own instead of sharing the trainer's GIL.

:class:`FetchProcess` has the :class:`train.fetch.Fetcher` contract the trainer uses (``start``,
``get``, ``commit``, ``stop``, ``running``, ``cpu_s``, ``timings``). The child owns its own
consumer and dead-letter producer:

- it assigns itself every partition of the trainer's topics and starts each at the position the
  trainer gave it (its checkpoint's), else at the beginning; partitions added later are found
  every ``ASSIGNMENT_REFRESH_S``;
- it polls only while the trainer says it may (the lease is provably ours), hands events over in
  event-time order across partitions (:mod:`train.align`), decodes each batch
  with :func:`train.fetch.decode_poll`, and waits until the dead letters of a poll are
  acknowledged by the broker *before* handing the poll over; so a checkpoint, which only covers
  what the trainer applied, never covers an unacknowledged letter;
- a decoded poll travels as columns (:class:`~stream.schemas.EventColumns`, the events topic's
  records as :class:`RecordBlock`), at most ``depth`` of them waiting;
- it dies with the trainer (``PR_SET_PDEATHSIG``, and it checks its parent), so a kill -9 of the
  trainer leaves no orphan consuming or dead-lettering.

Exactly once is the trainer's, unchanged: positions advance only when the trainer applies a batch
and live in its checkpoints; batches in flight at a crash are read again from the checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import numpy as np

from stream.config import KafkaConfig, Topics
from stream.fetcher import ConsumerRecord
from train.align import EventAligner, StableLags, aligned_records
from train.fetch import (
    DecodedBatch,
    FetchFailed,
    HandedEnds,
    decode_poll,
    grow_assignment,
    log_commit_failure,
    put_while_busy,
    seek_to_positions,
)
from train.resilience import DeadLetterBlock

log = logging.getLogger(__name__)

ASSIGNMENT_REFRESH_S = 30.0
"""How often the child looks for partitions added to its topics."""
GATE_S = 0.02
"""How often the trainer's ``may_fetch`` is passed on to the child."""
FETCH_CPU_PIECES = ("poll", "align", "decode")
"""The child's main-thread CPU by piece (:attr:`FetchProcess.cpu_pieces`): ``poll`` =
kafka-python (fetch requests, record parsing), ``align`` = :mod:`train.align`, ``decode`` =
JSON + validation into columns (:func:`train.fetch.decode_poll`) and the record block. The rest of
the child's CPU (:attr:`FetchProcess.cpu_s` minus these) is mostly the queue's feeder thread
pickling batches for the trainer."""


@dataclass(frozen=True)
class FetchSpec:
    """What the child needs (picklable): how to consume, from where, and the decode limits."""

    kafka: KafkaConfig
    topics: Topics
    group: str
    positions: Mapping[str, int] = field(default_factory=dict)  # "topic|partition" -> next
    max_poll_records: int = 8192
    check_crcs: bool = True
    fast_records: bool = True  # stream/record_parse.py
    max_message_bytes: int = 65536
    reconnect_backoff_max_ms: int = 1000
    poll_timeout_ms: int = 200
    align_wait_s: float = 1.0  # longest events wait without a new record (train/align.py)


_PARTITION, _OFFSET, _TIMESTAMP, _KEY, _VALUE = map(
    attrgetter, ("partition", "offset", "timestamp", "key", "value"))


class RecordBlock:
    """The records of one topic in a poll, as columns (cheap to send between processes);
    ``block[j]`` rebuilds record ``j`` (for a dead letter).

    Keys and values travel as one bytes blob each with their lengths (a missing key or value
    has length -1): pickling and unpickling two blobs instead of a bytes object per record cut
    the hand-over's CPU on both sides (the trainer reads a record's bytes only to dead-letter it).
    """

    __slots__ = ("_starts", "key_lengths", "keys_blob", "offsets", "partitions", "timestamps",
                 "topic", "value_lengths", "values_blob")

    def __init__(self, records: list[ConsumerRecord]) -> None:
        n = len(records)
        self.topic = records[0].topic if records else ""
        self.partitions = np.fromiter(map(_PARTITION, records), np.int32, n)
        self.offsets = np.fromiter(map(_OFFSET, records), np.int64, n)
        self.timestamps = np.fromiter(map(_TIMESTAMP, records), np.int64, n)
        self.keys_blob, self.key_lengths = _blob(list(map(_KEY, records)))
        self.values_blob, self.value_lengths = _blob(list(map(_VALUE, records)))
        self._starts: tuple[np.ndarray, np.ndarray] | None = None  # by the first block[j]

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, j: int) -> ConsumerRecord:
        if self._starts is None:  # once per block, not per record: a poll may be all bad
            self._starts = (_starts(self.key_lengths), _starts(self.value_lengths))
        key = _cut(self.keys_blob, self.key_lengths, self._starts[0], j)
        value = _cut(self.values_blob, self.value_lengths, self._starts[1], j)
        return ConsumerRecord(
            self.topic, int(self.partitions[j]), -1, int(self.offsets[j]),
            int(self.timestamps[j]), 0, key, value, [], None,
            -1 if key is None else len(key), -1 if value is None else len(value), -1,
        )

    def partition_counts(self, rows: np.ndarray) -> dict[int, int]:
        counts = np.bincount(self.partitions[rows])
        parts = np.flatnonzero(counts)
        return dict(zip(parts.tolist(), counts[parts].tolist(), strict=True))

    def __getstate__(self) -> tuple:
        return (self.topic, self.partitions, self.offsets, self.timestamps, self.keys_blob,
                self.key_lengths, self.values_blob, self.value_lengths)

    def __setstate__(self, state: tuple) -> None:
        (self.topic, self.partitions, self.offsets, self.timestamps, self.keys_blob,
         self.key_lengths, self.values_blob, self.value_lengths) = state
        self._starts = None


def _blob(parts: list[bytes | None]) -> tuple[bytes, np.ndarray]:
    """``parts`` joined into one blob, and each one's length (-1 where the part is None)."""
    if None not in parts:
        return b"".join(parts), np.fromiter(map(len, parts), np.int64, len(parts))  # type: ignore[arg-type]
    lengths = np.fromiter((-1 if p is None else len(p) for p in parts), np.int64, len(parts))
    return b"".join(p for p in parts if p is not None), lengths


def _starts(lengths: np.ndarray) -> np.ndarray:
    """Where each part of a :func:`_blob` starts in it."""
    starts = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(np.maximum(lengths[:-1], 0), out=starts[1:])
    return starts


def _cut(blob: bytes, lengths: np.ndarray, starts: np.ndarray, j: int) -> bytes | None:
    """Part ``j`` of a :func:`_blob` (None where it was None); ``starts`` from :func:`_starts`."""
    size = int(lengths[j])
    if size < 0:
        return None
    start = int(starts[j])
    return blob[start:start + size]


class FetchProcess:
    """Polls and decodes in a child process; :meth:`get` returns decoded batches in poll order.

    Args:
        spec: the consumer's settings and start positions.
        may_fetch: checked every ``GATE_S`` (and on each :meth:`get`); while False the child
            neither polls nor decodes (so it writes no dead letter).
        depth: decoded batches waiting at most.
        timings: a dict where ``poll`` and ``decode`` seconds (the child's) are kept.
    """

    def __init__(
        self,
        spec: FetchSpec,
        *,
        may_fetch: Callable[[], bool] = lambda: True,
        depth: int = 2,
        timings: dict[str, float] | None = None,
    ) -> None:
        ctx = mp.get_context("spawn")  # never fork a process with threads
        self.spec = spec
        self._may_fetch = may_fetch
        self._allowed = ctx.Event()
        self._stop = ctx.Event()
        self._ready = ctx.Event()
        self._caught_up = ctx.Event()
        self._batches: Any = ctx.Queue(maxsize=depth)
        self._control: Any = ctx.Queue()
        self._replies: Any = ctx.Queue()
        # the child's dead-letter outbox while its topic takes no letters (DeadLetterBlock):
        # since (epoch s, 0 = not blocked), letters waiting; and the error's class name
        self._dlq_block: Any = ctx.Array("d", 2)
        self._dlq_error: Any = ctx.Array("c", 64)
        self._proc = ctx.Process(
            target=_child_main,
            args=(spec, self._batches, self._control, self._replies, self._allowed, self._stop,
                  self._ready, self._caught_up, os.getpid(),
                  _SharedBlock(self._dlq_block, self._dlq_error)),
            daemon=True,
            name="fmstream-fetch",
        )
        self._started = False
        self._stopped = False
        self._call_id = 0
        self.cpu_s = 0.0  # CPU seconds of the child so far (as of the last batch)
        # the child's main-thread CPU seconds by piece (as of the last batch): FETCH_CPU_PIECES
        self.cpu_pieces: dict[str, float] = dict.fromkeys(FETCH_CPU_PIECES, 0.0)
        self.timings = timings if timings is not None else {}
        self.timings.setdefault("poll", 0.0)
        self.timings.setdefault("decode", 0.0)

    @property
    def running(self) -> bool:
        return self._started and not self._stopped and self._proc.is_alive()

    def start(self) -> FetchProcess:
        if self._started:  # a dead child is not restarted: the trainer stops on FetchFailed
            return self
        self._started = True
        self._sync_allowed()
        self._proc.start()
        threading.Thread(target=self._watch, daemon=True, name="fmstream-fetch-gate").start()
        return self

    def _watch(self) -> None:
        """Pass ``may_fetch`` on to the child as it changes (the trainer may be paused)."""
        while not self._stopped and self._proc.is_alive():
            self._sync_allowed()
            self._stop.wait(GATE_S)

    @property
    def pid(self) -> int | None:
        """The child's process id (None before :meth:`start`)."""
        return self._proc.pid

    @property
    def ready(self) -> bool:
        """The child has its consumer and partitions (it can fetch)."""
        return self._ready.is_set()

    @property
    def caught_up(self) -> bool:
        """The child's last poll found nothing and every batch before it is handed over
        (nothing is being decoded or waiting for the queue)."""
        return self._caught_up.is_set()

    def dead_letter_block(self) -> DeadLetterBlock | None:
        """The child's dead letters the topic does not take (its intake is held at them), as
        the child last reported; None while they go through."""
        return _SharedBlock(self._dlq_block, self._dlq_error).read()

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Wait until the child has its consumer and partitions (True), or ``timeout``."""
        return bool(self._ready.wait(timeout))

    def _sync_allowed(self) -> None:
        if self._may_fetch():
            self._allowed.set()
        else:
            self._allowed.clear()

    def get(self, timeout: float) -> DecodedBatch | None:
        """The next decoded batch, or None if none arrives within ``timeout`` seconds."""
        self._sync_allowed()
        try:
            item = self._batches.get(timeout=timeout)
        except queue.Empty:
            if self._started and not self._stopped and not self._proc.is_alive():
                raise FetchFailed(
                    f"the fetch process exited (code {self._proc.exitcode})"
                ) from None
            return None
        if isinstance(item, BaseException):
            raise FetchFailed(f"the fetch process failed: {item!r}") from item
        batch, cpu_s, poll_s, decode_s, pieces = item
        self.cpu_s, self.timings["poll"], self.timings["decode"] = cpu_s, poll_s, decode_s
        self.cpu_pieces = pieces
        return batch

    def commit(self, offsets: Mapping[tuple[str, int], int], *, wait_s: float | None = None
               ) -> Future:
        """Commit ``offsets`` ((topic, partition) -> next offset) for the group, made by the
        child; with ``wait_s`` it is synchronous and the future holds its outcome."""
        future: Future = Future()
        if not self.running:
            future.set_exception(RuntimeError("the fetch process is not running"))
            return future
        self._call_id += 1
        call = self._call_id
        self._control.put(("commit", call, dict(offsets), wait_s is not None))
        if wait_s is None:
            future.set_result(None)
            return future
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                future.set_exception(TimeoutError("group commit: no answer from the fetch process"))
                return future
            try:
                got, error = self._replies.get(timeout=min(left, 0.5))
            except queue.Empty:
                if not self._proc.is_alive():
                    future.set_exception(RuntimeError("the fetch process exited"))
                    return future
                continue
            if got == call:
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(RuntimeError(error))
                return future

    def pause(self) -> None:
        """Poll no more; the child stays up for :meth:`commit` until :meth:`stop`."""
        self._may_fetch = lambda: False
        self._allowed.clear()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the child (batches still queued are dropped: they were never applied)."""
        if not self._started or self._stopped:
            self._stopped = True
            return
        self._stopped = True
        self._stop.set()
        self._allowed.clear()
        deadline = time.monotonic() + timeout
        while self._proc.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):  # a child blocked on a full queue
                self._batches.get_nowait()
            self._proc.join(0.05)
        if self._proc.is_alive():
            log.warning("the fetch process did not stop in time: killing it")
            self._proc.kill()
            self._proc.join(5)
        for q in (self._batches, self._control, self._replies):
            q.cancel_join_thread()
            q.close()


# --- the child ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SharedBlock:
    """A :class:`~train.resilience.DeadLetterBlock` in shared memory (the child writes it)."""

    numbers: Any  # multiprocessing Array("d", 2): since (0 = none), waiting
    error: Any  # multiprocessing Array("c", 64): the error's class name

    def write(self, block: DeadLetterBlock | None) -> None:
        with self.numbers.get_lock():
            if block is None:
                self.numbers[0], self.numbers[1] = 0.0, 0.0
                return
            self.error.value = block.error.encode()[:63]
            self.numbers[0], self.numbers[1] = block.since, float(block.waiting)

    def read(self) -> DeadLetterBlock | None:
        with self.numbers.get_lock():
            since, waiting = self.numbers[0], self.numbers[1]
            error = self.error.value.decode("ascii", "replace")
        return None if since <= 0 else DeadLetterBlock(since, int(waiting), error)



def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(Exception):  # Linux only; the getppid check covers the rest
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(0)


def _child_main(spec: FetchSpec, batches: Any, control: Any, replies: Any, allowed: Any,
                stop: Any, ready: Any, caught_up: Any, parent: int, block: _SharedBlock) -> None:
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer decides when to stop
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s fetch %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)  # as the CLI sets it for the trainer
    try:
        _Child(spec, batches, control, replies, allowed, stop, parent, caught_up,
               block).run(ready)
    except BaseException as exc:  # noqa: BLE001 - reported to the trainer, which stops
        log.exception("fetch process failed")
        with contextlib.suppress(Exception):
            batches.put(RuntimeError(repr(exc)), timeout=5)


class _Child:
    def __init__(self, spec: FetchSpec, batches: Any, control: Any, replies: Any, allowed: Any,
                 stop: Any, parent: int, caught_up: Any, block: _SharedBlock) -> None:
        from threadpoolctl import threadpool_limits

        from stream.consume import make_consumer, make_dead_letter_producer
        from stream.record_parse import use_fast_records
        from train.resilience import DeadLetterOutbox
        from train.runtime import relax_gc

        threadpool_limits(1)
        relax_gc()  # a poll decodes ~8k fresh objects; young passes over them found nothing
        self.spec, self.batches, self.control, self.replies = spec, batches, control, replies
        self.allowed, self.stop, self.parent = allowed, stop, parent
        self.caught_up = caught_up  # set: the last poll was empty and everything is handed over
        self.consumer = make_consumer(
            spec.kafka, spec.group, max_poll_records=spec.max_poll_records,
            check_crcs=spec.check_crcs, reconnect_backoff_max_ms=spec.reconnect_backoff_max_ms,
        )
        use_fast_records(self.consumer, inline=spec.fast_records)
        # not idempotent, short metadata wait (make_dead_letter_producer)
        self.producer = make_dead_letter_producer(spec.kafka)
        self.dead_letters = DeadLetterOutbox(self.producer, spec.topics.dlq)
        self.block = block  # what the trainer shows of a dead-letter topic that takes none
        self.blocked = False  # whether ``block`` holds one
        self.aligner = EventAligner(spec.topics.events, max_records=spec.max_poll_records,
                                    max_wait_s=spec.align_wait_s,
                                    max_hold_s=max(10.0, spec.align_wait_s))
        self.stable = StableLags(self.consumer)  # lags to the LSO (open transactions)
        self.ends = HandedEnds(spec.positions)  # ends past markers and aborted records
        self.assigned: set = set()
        self.assigned_at = 0.0
        self.cpu0 = time.process_time()
        self.poll_s = self.decode_s = 0.0
        self.cpu_pieces = dict.fromkeys(FETCH_CPU_PIECES, 0.0)

    def run(self, ready: Any) -> None:
        try:
            self._refresh_assignment()
            ready.set()
            while not self.stop.is_set():
                self._run_controls()
                if os.getppid() != self.parent:
                    return
                if not self.allowed.is_set():
                    self.stop.wait(0.05)
                    continue
                batch = self._poll()
                if batch is not None:
                    self._hand_over(batch)
        finally:
            with contextlib.suppress(Exception):
                self.consumer.close(autocommit=False)
            with contextlib.suppress(Exception):
                self.producer.close(timeout=5)

    def _refresh_assignment(self) -> None:
        self.assigned_at = time.monotonic()
        found, new, _ = grow_assignment(self.consumer, self.spec.topics.training, self.assigned)
        if not new:
            return
        self.assigned = found
        seek_to_positions(self.consumer, new, self.spec.positions)

    def _poll(self) -> DecodedBatch | None:
        from kafka.errors import KafkaError

        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            if time.monotonic() - self.assigned_at >= ASSIGNMENT_REFRESH_S:
                self._refresh_assignment()
            wait_ms = 0 if self.aligner.more else self.spec.poll_timeout_ms  # more is ready
            polled = self.consumer.poll(timeout_ms=wait_ms)
        except KafkaError as exc:  # broker away: positions stay in the consumer; retry
            log.warning("poll failed (%s); retrying", exc)
            self.caught_up.set()  # nothing in hand: the trainer may count idle time
            self.stop.wait(0.2)
            return None
        finally:
            self.poll_s += time.perf_counter() - t0
            c1 = time.thread_time()
            self.cpu_pieces["poll"] += c1 - c0
        # in event-time order
        records = aligned_records(self.aligner, self.consumer, polled, self.stable)
        c2 = time.thread_time()
        self.cpu_pieces["align"] += c2 - c1
        if records:
            self.caught_up.clear()
        t0 = time.perf_counter()
        sent = self.dead_letters.count
        batch = decode_poll(records, self.dead_letters, self.spec.topics,
                            self.spec.max_message_bytes) if records else None
        # past markers and aborted records (with or without records)
        moved = self.ends.moved(self.consumer, batch.ends if batch else {}, self.aligner.holds)
        if batch is None and not moved:
            if self.aligner.buffered:  # held back for a while: not idle yet
                self.caught_up.clear()
            else:
                self.caught_up.set()
            return None
        if batch is None:
            batch = decode_poll([], self.dead_letters, self.spec.topics,
                                self.spec.max_message_bytes)
        batch.ends.update(moved)
        self.caught_up.clear()
        batch = batch._replace(event_records=RecordBlock(list(batch.event_records)),
                               dead_letters=self.dead_letters.count - sent)
        self.decode_s += time.perf_counter() - t0
        self.cpu_pieces["decode"] += time.thread_time() - c2
        return batch

    def _hand_over(self, batch: DecodedBatch) -> None:
        # A letter is acknowledged before the trainer can checkpoint past its message: a topic
        # that takes none holds the intake here (the outbox logs why and what to fix).
        while batch.dead_letters and not self.dead_letters.flush(timeout=5.0):
            self.block.write(self.dead_letters.blocked())
            self.blocked = True
            if self.stop.is_set():
                return
            self._run_controls()
        if self.blocked:
            self.block.write(None)
            self.blocked = False
        item = (batch, time.process_time() - self.cpu0, self.poll_s, self.decode_s,
                dict(self.cpu_pieces))
        put_while_busy(self.batches, item, self.stop, self._run_controls)

    def _run_controls(self) -> None:
        from kafka.structs import OffsetAndMetadata, TopicPartition

        while True:
            try:
                _, call, offsets, sync = self.control.get_nowait()
            except queue.Empty:
                return
            commit = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                      for (t, p), o in offsets.items()}
            if not sync:
                self.consumer.commit_async(commit, callback=log_commit_failure)
                continue
            try:
                self.consumer.commit(commit, timeout_ms=10_000)
            except Exception as exc:  # noqa: BLE001 - the trainer logs it
                self.replies.put((call, repr(exc)))
            else:
                self.replies.put((call, None))
