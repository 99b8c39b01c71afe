"""Event records of several partitions handed over in timestamp order, not partition by partition.

Why: kafka-python's ``poll`` hands out one partition's fetched chunk at a time (about 7,000
events at the default 1 MB ``max_partition_fetch_bytes``), so a trainer catching up on a backlog
learned the stream partition by partition: one group of users over a long stretch of time, then
the next group over the same stretch (ml-100k through ``fmstream train``, 6 partitions: the
event times of its learn calls went back 18.9M s in all). The Learner's contract is that quality
does not depend on how Kafka batches; the in-process model fed that order lost warm HR@10
(-0.005, -0.012, -0.002 on seeds 0-2, bench/RESULTS.md "Quality through Kafka"). This is Kafka
Streams' *timestamp synchronisation* (``max.task.idle.ms`` = 0): records are buffered per
partition and handed over by record timestamp, never ahead of a partition that still has
records on the broker. (Record timestamps are the producers' create times unless they set
them: a replay produced in event order keeps event order.)

Rules (:meth:`EventAligner.take`):

* per partition, offset order is kept (a record's key is the running maximum of the
  partition's timestamps, so keys never decrease within a partition); across partitions,
  records go out by key (ties: partition order);
* a partition *constrains* while it may hold earlier records than those buffered: it has lag
  (records on the broker not yet polled) or its lag is unknown. Only records with a key at or
  below every constraining partition's newest buffered key go out; a constraining partition
  with nothing buffered holds everything back. Lag counts what the consumer can fetch: records
  of a transaction still open are not (:class:`StableLags`), so a producer that died
  mid-transaction on one partition does not hold the others back;
* held back while records keep arriving (the consumer is working through other partitions'
  fetched chunks; a backlog of 6 partitions needs about 5 chunks buffered), but at most
  ``max_wait_s`` without a new record, ``max_hold_s`` in all, or until ``max_buffered`` records
  wait: then what is buffered goes out in key order anyway (ordering is quality, never
  availability);
* records of other topics (profiles) are not held: :meth:`push` returns them at once.

Positions stay exact: the trainer records the positions of the records it was handed, so
records still buffered when it stops are fetched again by the next trainer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from operator import attrgetter
from typing import Any

import numpy as np
from kafka.errors import KafkaError

log = logging.getLogger(__name__)

_TIMESTAMP = attrgetter("timestamp")

Partition = Any
"""A topic partition (``kafka.structs.TopicPartition``; any hashable in tests)."""


class EventAligner:
    """Buffers one topic's records per partition and hands them over in timestamp order.

    Args:
        topic: the topic whose records are aligned (the events topic).
        max_records: most records one :meth:`take` returns.
        max_buffered: records buffered past which they go out without waiting.
        max_wait_s: longest records are held back while no new record arrives.
        max_hold_s: longest records are held back at all.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        topic: str,
        *,
        max_records: int,
        max_buffered: int = 65_536,
        max_wait_s: float = 1.0,
        max_hold_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_records < 1 or max_buffered < 1 or max_wait_s < 0 or max_hold_s < 0:
            raise ValueError(
                f"EventAligner: max_records and max_buffered >= 1, max_wait_s and max_hold_s "
                f">= 0; got {max_records}, {max_buffered}, {max_wait_s}, {max_hold_s}"
            )
        self.topic = topic
        self.max_records, self.max_buffered = max_records, max_buffered
        self.max_wait_s, self.max_hold_s = max_wait_s, max_hold_s
        self._clock = clock
        self._arrived_at = clock()  # when the last record was pushed
        self._records: dict[Partition, list[Any]] = {}
        self._keys: dict[Partition, np.ndarray] = {}  # running max of timestamps, per partition
        self._held_since: float | None = None
        self.released_early = 0  # takes that did not wait for a constraining partition
        self.more = False  # the last take left records that may go out now: poll without waiting

    @property
    def buffered(self) -> int:
        return sum(len(r) for r in self._records.values())

    def push(self, polled: Mapping[Partition, list[Any]]) -> list[Any]:
        """Buffer one poll's records of the aligned topic; returns the others (not held)."""
        others: list[Any] = []
        for tp, records in polled.items():
            if not records:
                continue
            if tp.topic != self.topic:
                others.extend(records)
                continue
            ts = np.fromiter(map(_TIMESTAMP, records), np.int64, len(records))
            old = self._keys.get(tp)
            floor = old[-1] if old is not None and old.size else np.iinfo(np.int64).min
            keys = np.maximum.accumulate(np.maximum(ts, floor))
            self._arrived_at = self._clock()
            self._records.setdefault(tp, []).extend(records)
            self._keys[tp] = keys if old is None or not old.size else np.concatenate([old, keys])
        return others

    def take(self, lags: Mapping[Partition, int | None]) -> list[Any]:
        """The next records in key order (at most ``max_records``; maybe none).

        Args:
            lags: for every assigned partition of the topic, its records on the broker not yet
                polled (None: not known yet).
        """
        self.more = False
        if not self.buffered:
            self._held_since = None
            return []
        bound = self._bound(lags)
        parts = [tp for tp, keys in self._keys.items() if keys.size]
        if not any(self._keys[tp][0] <= bound for tp in parts):
            now = self._clock()
            if self._held_since is None:
                self._held_since = now
            if (self.buffered < self.max_buffered and now - self._held_since < self.max_hold_s
                    and now - max(self._arrived_at, self._held_since) < self.max_wait_s):
                return []
            bound = np.iinfo(np.int64).max  # waited long enough: in key order, as buffered
            self.released_early += 1
        else:
            self._held_since = None
        # no partition gives more than max_records: the merge never sorts more than that each
        counts = [min(self.max_records, int(np.searchsorted(self._keys[tp], bound, side="right")))
                  for tp in parts]
        keys = np.concatenate([self._keys[tp][:n] for tp, n in zip(parts, counts, strict=True)])
        source = np.repeat(np.arange(len(parts)), counts)
        order = np.argsort(keys, kind="stable")[: self.max_records]
        taken = np.bincount(source[order], minlength=len(parts))
        # within a partition, the stable sort keeps offset order, so each partition gives a
        # prefix: record j of the merged order is the next record of its partition
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        sources = source[order]
        buffers = [self._records[tp] for tp in parts]
        # Python ints, not numpy scalars, in the per-record lookup (~5x less CPU per record)
        out = list(map(list.__getitem__, map(buffers.__getitem__, sources.tolist()),
                       (order - starts[sources]).tolist()))
        for tp, n in zip(parts, taken.tolist(), strict=True):
            if n:
                del self._records[tp][:n]
                self._keys[tp] = self._keys[tp][n:]
        self.more = any(k.size and k[0] <= bound for k in self._keys.values())
        return out

    def holds_back(self, lags: Mapping[Partition, int | None]) -> bool:
        """Would :meth:`take` under ``lags`` keep some buffered record back for a partition
        that may still have earlier ones (its bounds aside)?"""
        bound = self._bound(lags)
        return any(keys.size and keys[-1] > bound for keys in self._keys.values())

    def holds(self, partition: Partition) -> bool:
        """Are records of ``partition`` buffered (polled, not handed over yet)?"""
        keys = self._keys.get(partition)
        return keys is not None and bool(keys.size)

    def _bound(self, lags: Mapping[Partition, int | None]) -> int:
        """The newest key that may go out: every constraining partition's newest buffered key
        at most (one with nothing buffered holds everything back)."""
        bound = np.iinfo(np.int64).max
        for tp, lag in lags.items():
            if lag == 0:
                continue  # everything it has is buffered: it constrains nothing
            keys = self._keys.get(tp)
            bound = min(bound, int(keys[-1]) if keys is not None and keys.size else -1 << 62)
        return bound

    def clear(self, partitions: Iterable[Partition] | None = None) -> None:
        """Forget buffered records (of ``partitions``; all by default), e.g. after a seek."""
        for tp in list(self._records) if partitions is None else list(partitions):
            self._records.pop(tp, None)
            self._keys.pop(tp, None)


def aligned_records(aligner: EventAligner, consumer: Any, polled: Mapping[Partition, list[Any]],
                    stable: StableLags | None = None) -> list[Any]:
    """One poll through ``aligner``: the poll's records of other topics, then the aligned
    topic's records that may go out now (each partition in offset order). With ``stable``, a
    partition that would hold records back is asked for its last stable offset first
    (:class:`StableLags`)."""
    others = aligner.push(polled)
    parts = [tp for tp in consumer.assignment() if tp.topic == aligner.topic]
    lags = consumer_lags(consumer, parts)
    if stable is not None and aligner.holds_back(lags):
        lags = stable.refine(lags)
    return others + aligner.take(lags)


def consumer_lags(consumer: Any, partitions: Iterable[Partition]) -> dict[Partition, int | None]:
    """Records on the broker not yet polled, per partition, from what the consumer last heard
    (kafka-python's ``highwater`` from fetch responses; None before the first one)."""
    out: dict[Partition, int | None] = {}
    for tp in partitions:
        high = consumer.highwater(tp)
        pos = None if high is None else consumer.position(tp, timeout_ms=0)
        out[tp] = None if pos is None else max(0, high - pos)
    return out


class StableLags:
    """Lags to the last stable offset (LSO): the records a ``read_committed`` consumer can
    still fetch.

    kafka-python keeps the high watermark of fetch responses but not their LSO, so
    ``highwater - position`` (:func:`consumer_lags`) also counts the records of a transaction
    still open on the partition, which a read_committed consumer cannot fetch until it ends
    (a producer that died mid-transaction: up to its ``transaction.timeout.ms``, 1 minute by
    default). The aligner took such a partition for one with records still to come and held
    every other partition's records back up to its wait (events elsewhere 1.11-1.16 s from
    produce to the model instead of 0.24-0.38 s, bench/RESULTS.md 'hostile wire').

    :meth:`refine` asks the broker for the LSO (``end_offsets`` of a read_committed consumer)
    of the partitions with a lag, only when the aligner would hold records back, and once per
    (position, high watermark) of a partition: the LSO moves only when a transaction ends,
    which appends its marker and so moves the high watermark the next fetch response reports.
    Asks are at least ``min_interval_s`` apart; meanwhile, and when the broker does not answer,
    a partition keeps its high-watermark lag (it holds back, as without this class).

    Args:
        consumer: the ``KafkaConsumer`` (read_committed; with read_uncommitted the LSO asked
            is the high watermark and nothing changes).
        min_interval_s: shortest time between two asks.
        timeout_ms: longest one ask may block.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, consumer: Any, *, min_interval_s: float = 0.1, timeout_ms: int = 500,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.consumer = consumer
        self.min_interval_s, self.timeout_ms = min_interval_s, timeout_ms
        self._clock = clock
        self._asked_at = -float("inf")
        self._stable: dict[Partition, tuple[int, int, int]] = {}  # (position, high, LSO)
        self.asks = 0  # ListOffsets requests made
        self.failed = 0  # of which the broker did not answer in time

    def refine(self, lags: Mapping[Partition, int | None]) -> dict[Partition, int | None]:
        """``lags`` (from :func:`consumer_lags`) with each positive one cut to the LSO."""
        out = dict(lags)
        seen: dict[Partition, tuple[int, int]] = {}
        for tp, lag in lags.items():
            if not lag:
                continue
            high = self.consumer.highwater(tp)
            pos = self.consumer.position(tp, timeout_ms=0)
            if high is None or pos is None:
                continue
            seen[tp] = (pos, high)
        ask = [tp for tp, state in seen.items() if self._stable.get(tp, (None, None))[:2] != state]
        now = self._clock()
        if ask and now - self._asked_at >= self.min_interval_s:
            self._asked_at = now
            self.asks += 1
            try:
                stable = self.consumer.end_offsets(ask, timeout_ms=self.timeout_ms)
            except KafkaError as exc:
                self.failed += 1
                log.debug("last stable offsets of %s not known (%r)", ask, exc)
            else:
                for tp, lso in stable.items():
                    if tp in seen and lso is not None:
                        self._stable[tp] = (*seen[tp], int(lso))
        for tp, (pos, high) in seen.items():
            known = self._stable.get(tp)
            if known is not None and known[:2] == (pos, high):
                out[tp] = max(0, min(high, known[2]) - pos)
        return out
