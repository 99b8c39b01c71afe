"""stream/record_parse.py: the same records as kafka-python's own parser, batch by batch (pure),
then through a real consumer against the session's broker."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from kafka import TopicPartition
from kafka import errors as Errors
from kafka.consumer.fetcher import Fetcher
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from kafka.record.legacy_records import LegacyRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords
from kafka.record.util import calc_crc32c

from fmstream.settings import Settings
from stream.connect import kafka_consumer
from stream.record_parse import FastPartitionRecords, use_fast_records
from tests.kafka_helpers import KafkaIO, wait_for

TP = TopicPartition("t", 3)
Record = tuple  # (offset_delta, timestamp, key, value, headers)


def _v2_batch(records: list[Record], *, base_offset: int = 0, compression: int = 0,
              log_append_time: bool = False) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=compression, is_transactional=0, producer_id=-1,
        producer_epoch=-1, base_sequence=-1, batch_size=1 << 30,
    )
    for offset_delta, ts, key, value, headers in records:
        builder.append(offset_delta, ts, key, value, headers)
    data = builder.build()
    struct.pack_into(">q", data, 0, base_offset)
    if log_append_time:  # attribute bit 3, then the batch CRC again (it covers attributes on)
        attrs_at = DefaultRecordBatch.ATTRIBUTES_OFFSET
        attrs = struct.unpack_from(">h", data, attrs_at)[0] | 0x08
        struct.pack_into(">h", data, attrs_at, attrs)
        struct.pack_into(">I", data, DefaultRecordBatch.CRC_OFFSET,
                         calc_crc32c(memoryview(data)[attrs_at:]))
    return bytes(data)


def _parse(cls: type, data: bytes, *, take: int | None = None, check_crcs: bool = True,
           fetch_offset: int = 0) -> tuple[list, list[int]]:
    """All records ``cls`` yields (in takes of ``take``) and ``next_fetch_offset`` after each."""
    parsed = cls(fetch_offset, TP, MemoryRecords(data), check_crcs=check_crcs)
    out, nexts = [], []
    while parsed:
        got = parsed.take(take)
        out.extend(got)
        nexts.append(parsed.next_fetch_offset)
        if not got:
            break
    return out, nexts


def _same_as_kafka_python(data: bytes, **kwargs) -> list:
    ours = _parse(FastPartitionRecords, data, **kwargs)
    theirs = _parse(Fetcher.PartitionRecords, data, **kwargs)
    assert ours == theirs
    return ours[0]


def test_plain_records_equal_field_by_field() -> None:
    records = [(j, 1_700_000_000_000 + 3 * j, f"u{j}".encode(), b'{"x":%d}' % j, [])
               for j in range(500)]
    got = _same_as_kafka_python(_v2_batch(records, base_offset=1000))
    assert [r.offset for r in got] == list(range(1000, 1500))
    assert got[7].key == b"u7" and got[7].value == b'{"x":7}' and got[7].timestamp == (
        1_700_000_000_021)
    assert got[7].serialized_key_size == 2 and got[7].serialized_header_size == -1


def test_edge_values_and_multibyte_varints() -> None:
    records = [
        (0, 1_700_000_000_000, None, b"v", []),  # null key
        (1, 1_700_000_000_000, b"k", None, []),  # null value (tombstone)
        (2, 1_700_000_000_000, b"", b"", []),  # empty key and value
        (3, 1_699_999_999_000, b"k", b"x" * 70, []),  # negative ts delta; 2-byte lengths
        (70, 1_700_000_100_000, b"k", b"y" * 9000, []),  # 3-byte varints (ts, length)
        (200_000, 1_800_000_000_000, b"k" * 200, b"z" * 300_000, []),  # long ones
        (200_001, 1_700_000_000_001, b"k", b"h",
         [("a", b"1"), ("\u00e9t\u00e9", None), ("", b""), ("k" * 100, b"v" * 100)]),
    ]
    got = _same_as_kafka_python(_v2_batch(records, base_offset=5))
    assert got[-1].headers[1] == ("\u00e9t\u00e9", None)
    assert got[0].serialized_key_size == -1 and got[1].serialized_value_size == -1


def test_several_batches_taken_in_pieces_keep_kafka_pythons_positions() -> None:
    data = b"".join(
        _v2_batch([(j, 1_700_000_000_000 + j, b"k", b"v%d" % j, []) for j in range(n)],
                  base_offset=base)
        for base, n in ((0, 10), (10, 7), (17, 33))
    )
    for take in (1, 3, 8, 1000):
        got = _same_as_kafka_python(data, take=take)
        assert [r.offset for r in got] == list(range(50))
    # a fetch that starts inside a batch skips its earlier records, as kafka-python does
    got = _same_as_kafka_python(data, take=4, fetch_offset=12)
    assert [r.offset for r in got] == list(range(12, 50))


def test_compressed_and_log_append_time_batches() -> None:
    records = [(j, 1_700_000_000_000 + j, b"k%d" % j, b"value %d" % j, []) for j in range(300)]
    got = _same_as_kafka_python(_v2_batch(records, compression=DefaultRecordBatch.CODEC_GZIP))
    assert len(got) == 300
    got = _same_as_kafka_python(_v2_batch(records, log_append_time=True))
    assert {r.timestamp for r in got} == {1_700_000_000_299}  # the batch's max timestamp
    assert {r.timestamp_type for r in got} == {1}


def test_legacy_batches_take_kafka_pythons_records() -> None:
    builder = LegacyRecordBatchBuilder(magic=1, compression_type=0, batch_size=1 << 20)
    for j in range(20):
        builder.append(j, timestamp=1_700_000_000_000 + j, key=b"k", value=b"v%d" % j)
    got = _same_as_kafka_python(bytes(builder.build()))
    assert [r.value for r in got] == [b"v%d" % j for j in range(20)]


def test_a_corrupt_batch_fails_as_kafka_pythons_does() -> None:
    data = bytearray(_v2_batch([(j, 1_700_000_000_000, b"k", b"value", []) for j in range(5)]))
    data[-3] ^= 0xFF  # inside the last record's value: only the batch CRC can tell
    for cls in (FastPartitionRecords, Fetcher.PartitionRecords):
        with pytest.raises(Errors.CorruptRecordError, match="failed crc check"):
            _parse(cls, bytes(data))
    # without the CRC check: a record whose length field lies, then trailing garbage
    header = DefaultRecordBatch.HEADER_STRUCT.size
    bad_length = bytearray(_v2_batch([(0, 1_700_000_000_000, b"k", b"value", [])]))
    bad_length[header] += 2  # length varint (single byte, zigzag): one more than written
    extra = _v2_batch([(0, 1_700_000_000_000, b"k", b"value", [])])
    for cls in (FastPartitionRecords, Fetcher.PartitionRecords):
        with pytest.raises(Errors.CorruptRecordError, match="Invalid record size|invalid record"):
            _parse(cls, bytes(bad_length), check_crcs=False)
    truncated = bytearray(extra)
    struct.pack_into(">i", truncated, 8, len(extra) - 12 + 5)  # batch claims 5 more bytes...
    truncated += b"\x00" * 5  # ...that are not records
    for cls in (FastPartitionRecords, Fetcher.PartitionRecords):
        with pytest.raises(Errors.CorruptRecordError, match="unconsumed bytes"):
            _parse(cls, bytes(truncated), check_crcs=False)


_bytes_or_none = st.one_of(st.none(), st.binary(max_size=300))


@hsettings(max_examples=60, deadline=None)
@given(st.lists(
    st.tuples(st.integers(-(1 << 40), 1 << 40), _bytes_or_none, _bytes_or_none,
              st.lists(st.tuples(st.text(max_size=8), _bytes_or_none), max_size=3)),
    min_size=1, max_size=40,
), st.integers(0, 1 << 50), st.integers(1, 50))
def test_any_records_parse_as_kafka_pythons(rows, base_offset, take) -> None:
    records = [(j, 1_700_000_000_000 + ts, key, value, headers)
               for j, (ts, key, value, headers) in enumerate(rows)]
    _same_as_kafka_python(_v2_batch(records, base_offset=base_offset), take=take,
                          fetch_offset=base_offset)


def test_a_real_consumer_reads_the_same_records(settings: Settings, kafka_io: KafkaIO) -> None:
    topic = settings.topic_events
    sent = [(f"u{j}".encode(), b'{"n":%d}' % j) for j in range(3000)]
    kafka_io.produce(topic, sent[:1000], partition=0, headers=[("h", b"1")])
    kafka_io.produce(topic, sent[1000:], partition=1)

    def read_all(fast: bool) -> list:
        consumer = kafka_consumer(settings.kafka_config(), group_id=None,
                                  enable_auto_commit=False, max_poll_records=700)
        if fast:
            assert use_fast_records(consumer) is consumer
        tps = [TopicPartition(topic, p) for p in (0, 1)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        got: list = []

        def more() -> bool:
            for batch in consumer.poll(timeout_ms=200).values():
                got.extend(batch)
            return len(got) >= len(sent)

        try:
            wait_for(more, timeout=60, what="every record read", poll_s=0.0)
            assert consumer.position(tps[0]) == 1000 and consumer.position(tps[1]) == 2000
        finally:
            consumer.close(autocommit=False)
        return sorted(got, key=lambda r: (r.partition, r.offset))

    ours, theirs = read_all(True), read_all(False)
    assert ours == theirs
    assert [(r.key, r.value) for r in ours] == sent
    assert ours[0].headers == [("h", b"1")] and ours[1000].headers == []
