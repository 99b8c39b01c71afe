"""Group lag and the commit log: the record format (pure), then against the session's broker."""

from __future__ import annotations

import struct
import time

import pytest
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from fmstream.settings import Settings
from stream.connect import kafka_admin, kafka_consumer
from stream.lag import (
    CommitLog,
    LagReader,
    PartitionLag,
    group_lag,
    java_string_hash,
    offsets_partition,
    parse_offset_commit,
)
from tests.kafka_helpers import KafkaIO

# --- pure -------------------------------------------------------------------------------------


def test_java_string_hash_matches_java() -> None:
    # Values of String.hashCode() from a JVM.
    assert java_string_hash("") == 0
    assert java_string_hash("a") == 97
    assert java_string_hash("hello") == 99162322
    assert java_string_hash("fmstream-serving") == 1102126918
    assert java_string_hash("fmstream-trainer") == -1949240337
    assert java_string_hash("polygenelubricants") == -(1 << 31)  # Integer.MIN_VALUE


def test_offsets_partition_is_kafkas_group_placement() -> None:
    assert offsets_partition("polygenelubricants", 50) == 0  # Utils.abs(MIN_VALUE) is 0
    assert offsets_partition("fmstream-serving", 50) == 1102126918 % 50
    assert offsets_partition("fmstream-trainer", 50) == 1949240337 % 50
    assert offsets_partition("probe-g", 5) == 0  # seen on a real 5-partition offsets topic


def _key(group: str, topic: str, partition: int, kind: int = 1) -> bytes:
    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack(">h", len(raw)) + raw

    return struct.pack(">h", kind) + s(group) + s(topic) + struct.pack(">i", partition)


def test_parse_flexible_v4_value() -> None:
    # As the 4.x group coordinator writes it: offset, leader epoch, compact metadata "",
    # commit timestamp, then a tagged field (the topic id).
    value = (struct.pack(">hqi", 4, 5, -1) + b"\x01" + struct.pack(">q", 1_795_397_311_380)
             + b"\x01\x00\x10" + bytes(16))
    assert parse_offset_commit(_key("g", "t", 3), value) == ("g", "t", 3, 5, 1_795_397_311.38)


@pytest.mark.parametrize(("version", "body"), [
    (0, struct.pack(">qh2sq", 42, 2, b"md", 1_000)),
    (1, struct.pack(">qh2sqq", 42, 2, b"md", 1_000, 9_999)),  # + expire timestamp
    (3, struct.pack(">qih2sq", 42, 7, 2, b"md", 1_000)),  # + leader epoch
])
def test_parse_legacy_values(version: int, body: bytes) -> None:
    parsed = parse_offset_commit(_key("grp", "topic", 0, kind=0), struct.pack(">h", version) + body)
    assert parsed == ("grp", "topic", 0, 42, 1.0)


def test_parse_skips_what_is_not_an_offset_commit() -> None:
    value = struct.pack(">hqi", 4, 5, -1) + b"\x01" + struct.pack(">q", 1) + b"\x00"
    assert parse_offset_commit(_key("g", "t", 0, kind=2), value) is None  # group metadata
    assert parse_offset_commit(_key("g", "t", 0), None) is None  # offset deleted
    assert parse_offset_commit(_key("g", "t", 0), b"\x00\x04\x00") is None  # truncated
    assert parse_offset_commit(None, value) is None


def test_never_committed_partition_lags_by_its_retained_log() -> None:
    assert PartitionLag("g", "t", 0, None, log_end=90, log_start=30).lag == 60
    assert PartitionLag("g", "t", 0, 80, log_end=90, log_start=30).lag == 10
    assert PartitionLag("g", "t", 0, 95, log_end=90).lag == 0


# --- on the broker ----------------------------------------------------------------------------


@pytest.mark.integration
def test_reader_sees_commits_log_ends_and_deleted_records(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    topic, group = settings.topic_events, settings.trainer_group
    kafka_io.produce(topic, [b"x"] * 30, partition=0)
    kafka_io.produce(topic, [b"y"] * 20, partition=1)
    admin = kafka_admin(settings.kafka_config())
    consumer = kafka_consumer(settings.kafka_config(), group_id=group, enable_auto_commit=False)
    try:
        admin.delete_records({TopicPartition(topic, 1): 5})  # retention moved the log start
        consumer.assign([TopicPartition(topic, 0)])
        consumer.commit({TopicPartition(topic, 0): OffsetAndMetadata(12, "", -1)})
        lags = group_lag(settings.kafka_config(), group, [topic], admin=admin)
        parts = {p.partition: p for p in lags}
    finally:
        consumer.close(autocommit=False)
        admin.close()
    assert sorted(parts) == list(range(settings.partitions_events))
    assert (parts[0].committed, parts[0].log_end, parts[0].lag) == (12, 30, 18)
    assert (parts[1].committed, parts[1].log_start, parts[1].log_end, parts[1].lag) \
        == (None, 5, 20, 15)
    assert all(parts[p].lag == 0 for p in range(2, settings.partitions_events))
    with LagReader(settings.kafka_config()) as reader:
        states = reader.group_states([group, f"{group}.nobody"])
    assert states[group].members == 0 and states[group].state == "Empty"
    assert states[f"{group}.nobody"].state == "Dead"


@pytest.mark.integration
def test_commit_log_sees_each_commit_in_order_with_its_time(settings: Settings) -> None:
    topic, group = settings.topic_events, settings.serving_group
    tp = TopicPartition(topic, 2)
    kafka = settings.kafka_config()
    consumer = kafka_consumer(kafka, group_id=group, enable_auto_commit=False)
    other = kafka_consumer(kafka, group_id=f"{group}.other", enable_auto_commit=False)
    log = CommitLog(kafka, [group])
    try:
        consumer.assign([tp])
        other.assign([tp])
        consumer.commit({tp: OffsetAndMetadata(1, "", -1)})  # before start(): not seen
        log.start()
        before = time.time()
        for offset in (4, 4, 2):
            consumer.commit({tp: OffsetAndMetadata(offset, "", -1)})
        other.commit({tp: OffsetAndMetadata(9, "", -1)})  # another group: not watched
        seen = []
        deadline = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:
            seen += log.poll(0.2)
    finally:
        log.close()
        consumer.close(autocommit=False)
        other.close(autocommit=False)
    assert log.available
    assert [(c.group, c.topic, c.partition, c.offset) for c in seen] == [
        (group, topic, 2, 4), (group, topic, 2, 4), (group, topic, 2, 2)]
    assert all(before - 1 <= c.ts <= time.time() + 1 for c in seen)
    assert [c.ts for c in seen] == sorted(c.ts for c in seen)
