"""A backlog spread over partitions reaches the model in timestamp order through the real broker
(train/align.py wired into the fetch process, the default, and the fetch thread): kafka-python
alone hands it over partition by partition."""

from __future__ import annotations

import time
from types import SimpleNamespace

import orjson
import pytest

from fmstream.settings import Settings
from stream.consume import make_consumer
from tests.kafka_helpers import KafkaIO
from tests.train.test_fetch_process import _drain
from train.align import EventAligner
from train.fetch import Fetcher, grow_assignment, seek_to_positions
from train.fetch_process import FetchProcess, FetchSpec

pytestmark = pytest.mark.integration

PARTITIONS, PER_PARTITION = 3, 300
HOLD_S = 600.0  # a bound far above any fetch round here: the order never depends on timing


def _backlog(s: Settings, kafka_io: KafkaIO) -> dict[tuple[str, int], int]:
    """Events with interleaved timestamps (event k on partition k % 3 at base + k ms), produced
    partition by partition; returns the end offsets."""
    producer = kafka_io.producer
    base = int(time.time() * 1000) - 3_600_000
    for p in range(PARTITIONS):
        for k in range(p, PARTITIONS * PER_PARTITION, PARTITIONS):
            event = {"user_id": f"u{k % 50}", "item_id": f"i{k % 20}", "label": 1, "ts": k}
            producer.send(s.topic_events, value=orjson.dumps(event), partition=p,
                          timestamp_ms=base + k)
    producer.flush(timeout=30)
    return {(tp.topic, tp.partition): o for tp, o in kafka_io.end_offsets(s.topic_events).items()}


def _poll_of(records: list) -> SimpleNamespace:
    """What the fetch thread hands over, undecoded: the records and where they end."""
    return SimpleNamespace(ends={(r.topic, r.partition): r.offset + 1 for r in records},
                           event_records=records)


def _stamps(batches: list) -> list[int]:
    """Event record timestamps in the order the batches handed them over."""
    return [int(r.timestamp) for b in batches for r in b.event_records]


def test_the_fetch_process_hands_a_backlog_over_in_timestamp_order(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    s = settings
    ends = _backlog(s, kafka_io)
    c = s.trainer_config()
    fetcher = FetchProcess(FetchSpec(c.kafka, c.topics, c.group, {}, max_poll_records=100,
                                     poll_timeout_ms=100, align_wait_s=HOLD_S)).start()
    try:
        assert fetcher.wait_ready(60)
        stamps = _stamps(_drain(fetcher, ends))
    finally:
        fetcher.stop()
    assert len(stamps) == PARTITIONS * PER_PARTITION
    assert stamps == sorted(stamps)  # kafka-python alone: 300 of one partition, then the next


def test_the_fetch_thread_hands_a_backlog_over_in_timestamp_order(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    s = settings
    ends = _backlog(s, kafka_io)
    c = s.trainer_config()
    consumer = make_consumer(c.kafka, c.group, max_poll_records=100)
    found, new, _ = grow_assignment(consumer, c.topics.training, set())
    seek_to_positions(consumer, new, {})
    fetcher = Fetcher(consumer, _poll_of, poll_timeout_ms=100,
                      aligner=EventAligner(s.topic_events, max_records=100, max_wait_s=HOLD_S,
                                           max_hold_s=HOLD_S))
    fetcher.start()
    try:
        stamps = _stamps(_drain(fetcher, ends))
    finally:
        fetcher.stop()
        consumer.close()
    assert found and len(stamps) == PARTITIONS * PER_PARTITION
    assert stamps == sorted(stamps)
