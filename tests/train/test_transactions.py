"""Transactions from a producer we did not write (Kafka's Java client, tests/java/TxnProducer.java)
as the trainer's fetchers see them, against the real broker:

- a transaction left open on one events partition does not hold the other partitions' events
  back (train/align.py's lag counts what a read_committed consumer can fetch: up to the last
  stable offset, not the high watermark);
- transaction markers and aborted records at the end of a partition do not leave the trainer's
  positions (its checkpoint, its group commit, ``fmstream lag``) behind the partition's end, and
  a trainer restarted from them applies nothing twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import orjson
import pytest

from fmstream.settings import Settings
from stream.consume import make_consumer
from stream.lag import group_lag
from tests.kafka_helpers import KafkaIO, wait_for
from tests.test_hostile import checkpoint_meta
from tests.test_hostile_wire import Trainer, trainer_settings
from tests.test_hostile_wire import java as send_with_java
from train.align import EventAligner
from train.fetch import Fetcher, grow_assignment, seek_to_positions
from train.fetch_process import FetchProcess, FetchSpec

pytestmark = pytest.mark.integration

HOLD_S = 600.0  # the aligner's bounds, far above any wait here: only a lag of 0 releases records
OPEN_TXN_MS = 120_000  # how long the broker keeps the dead producer's transaction open


def java(s: Settings, sections: list[tuple[str, int, list[bytes]]], timeout_ms: int = 10_000
         ) -> None:
    """Send ``(mode, partition, values)`` sections to the events topic (null keys) with Kafka's
    Java producer; transactions time out after ``timeout_ms``."""
    send_with_java(s, [(mode, s.topic_events, p, [f"-|{v.decode()}" for v in values])
                       for mode, p, values in sections], timeout_ms=timeout_ms)


def event(user: str) -> bytes:
    return orjson.dumps({"user_id": user, "item_id": "i1", "ts": 1_700_000_000})


def _poll_of(records: list) -> SimpleNamespace:
    """What the fetch thread hands over, undecoded: the records and where they end."""
    return SimpleNamespace(ends={(r.topic, r.partition): r.offset + 1 for r in records},
                           event_records=records)


class Fetched:
    """The batches a fetcher handed over so far: their event records and the ends reached."""

    def __init__(self, fetcher: FetchProcess | Fetcher) -> None:
        self.fetcher = fetcher
        self.values: list[bytes] = []
        self.ends: dict[tuple[str, int], int] = {}

    def more(self) -> None:
        batch = self.fetcher.get(timeout=0.5)
        if batch is not None:
            self.values.extend(r.value for r in batch.event_records)
            self.ends.update(batch.ends)


@contextmanager
def fetching(kind: str, s: Settings) -> Iterator[Fetched]:
    """The trainer's fetch process or fetch thread, from the beginning, aligner bounds HOLD_S."""
    c = s.trainer_config()
    if kind == "process":
        fetcher: FetchProcess | Fetcher = FetchProcess(FetchSpec(
            c.kafka, c.topics, c.group, {}, max_poll_records=100, poll_timeout_ms=100,
            align_wait_s=HOLD_S)).start()
        try:
            assert fetcher.wait_ready(60)
            yield Fetched(fetcher)
        finally:
            fetcher.stop()
        return
    consumer = make_consumer(c.kafka, c.group, max_poll_records=100)
    _, new, _ = grow_assignment(consumer, c.topics.training, set())
    seek_to_positions(consumer, new, {})
    fetcher = Fetcher(consumer, _poll_of, poll_timeout_ms=100, positions={},
                      aligner=EventAligner(s.topic_events, max_records=100, max_wait_s=HOLD_S,
                                           max_hold_s=HOLD_S)).start()
    try:
        yield Fetched(fetcher)
    finally:
        fetcher.stop()
        consumer.close()


def stable_offsets(s: Settings) -> dict:
    """Last stable offsets of the events topic (what a read_committed consumer can read)."""
    consumer = make_consumer(s.kafka_config(), None)
    try:
        return consumer.end_offsets(list(grow_assignment(consumer, [s.topic_events], set())[0]))
    finally:
        consumer.close()


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_a_transaction_left_open_on_one_partition_holds_back_no_other_partition(
    kind: str, settings: Settings, kafka_io: KafkaIO
) -> None:
    s = settings
    kafka_io.produce(s.topic_events, [event("before")], partition=2)
    # a producer dies inside a transaction on partition 2: read_committed consumers stop there
    # (Kafka's rule) until the broker aborts it, OPEN_TXN_MS later
    java(s, [("open", 2, [event("open0"), event("open1")])], timeout_ms=OPEN_TXN_MS)
    with fetching(kind, s) as fetched:
        kafka_io.produce(s.topic_events, [event("elsewhere")], partition=0)
        # before: partition 2's lag (high watermark - position = the open records) held every
        # other partition's records back for the aligner's whole wait (HOLD_S here, 1 s in the
        # trainer), or until the broker aborted the transaction
        wait_for(lambda: (fetched.more(), event("elsewhere") in fetched.values)[1], 60,
                 "the event on partition 0 handed over", poll_s=0)
        still_open = stable_offsets(s)  # the transaction is still open: partition 2 is held
    ends = kafka_io.end_offsets(s.topic_events)
    (p2,) = (tp for tp in ends if tp.partition == 2)
    assert still_open[p2] == 1 and ends[p2] == 3  # open since offset 1; 2 records
    assert sorted(fetched.values) == sorted([event("before"), event("elsewhere")])


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_the_ends_handed_over_move_past_markers_and_aborted_records(
    kind: str, settings: Settings, kafka_io: KafkaIO
) -> None:
    s = settings
    kafka_io.produce(s.topic_events, [event(f"plain{n}") for n in range(3)], partition=1)
    java(s, [("commit", 1, [event(f"committed{n}") for n in range(2)]),
             ("abort", 1, [event(f"aborted{n}") for n in range(3)])])
    ends = {(tp.topic, tp.partition): o for tp, o in kafka_io.end_offsets(s.topic_events).items()}
    assert ends[(s.topic_events, 1)] == 3 + 2 + 1 + 3 + 1  # records and two markers
    with fetching(kind, s) as fetched:
        # before: partition 1 ended at its last committed record + 1 (5), 5 offsets short
        wait_for(lambda: (fetched.more(), all(fetched.ends.get(tp, 0) >= o
                                              for tp, o in ends.items() if o))[1],
                 60, "every partition handed over to its end", poll_s=0)
    assert fetched.ends[(s.topic_events, 1)] == 10
    assert sorted(fetched.values) == sorted(
        [event(f"plain{n}") for n in range(3)] + [event(f"committed{n}") for n in range(2)])


def test_the_trainers_checkpoint_and_lag_reach_past_an_aborted_transaction_exactly_once(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    s = trainer_settings(settings)
    with Trainer(s) as trainer:
        before = trainer.settle(kafka_io)  # a probe per partition
        java(s, [("commit", 4, [event(f"committed{n}") for n in range(5)]),
                 ("abort", 4, [event(f"aborted{n}") for n in range(5)])])
        ends = {f"{tp.topic}|{tp.partition}": o
                for tp, o in kafka_io.end_offsets(s.topic_events).items()}

        def at_ends() -> bool:
            m = checkpoint_meta(s)
            return m is not None and all(m["positions"].get(k) == o for k, o in ends.items())

        # before: partition 4 stayed at its last committed record + 1 (the markers and the 5
        # aborted records after it counted as lag) until the next committed event there
        wait_for(at_ends, 60, "a checkpoint at the end of every partition", poll_s=0.5)
        wait_for(lambda: all(p.lag == 0 for p in group_lag(s.kafka_config(), s.trainer_group,
                                                           [s.topic_events])),
                 60, "no lag left on the trainer's group")
        applied = trainer.applied()
    assert applied - before == 5  # the committed ones, once
    with Trainer(s) as trainer:  # restarted from those positions: nothing again, nothing lost
        assert trainer.settle(kafka_io) == applied + 6  # only the new probes
