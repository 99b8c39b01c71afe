"""stream/record_parse.py: the same records as kafka-python's own parser, batch by batch (pure),
then through a real consumer against the session's broker."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from kafka import TopicPartition
from kafka import codec as kafka_codec
from kafka import errors as Errors
from kafka.consumer.fetcher import Fetcher
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from kafka.record.legacy_records import LegacyRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords
from kafka.record.util import calc_crc32c

from fmstream.settings import Settings
from stream.connect import kafka_consumer
from stream.record_parse import (
    FastPartitionRecords,
    PlainPartitionRecords,
    unreadable_reason,
    use_fast_records,
)
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


def test_a_crc_failure_raises_as_kafka_pythons_does_and_is_refetched_not_spun() -> None:
    data = bytearray(_v2_batch([(j, 1_700_000_000_000, b"k", b"value", []) for j in range(5)]))
    data[-3] ^= 0xFF  # inside the last record's value: only the batch CRC can tell
    for cls in (FastPartitionRecords, PlainPartitionRecords, Fetcher.PartitionRecords):
        with pytest.raises(Errors.CorruptRecordError, match="failed crc check"):
            _parse(cls, bytes(data))
    # kafka-python keeps its exhausted iterator after the error: the fetcher asks it again and
    # again for ever (poll() hung at 100% CPU); ours is drained, so the fetcher refetches
    theirs = Fetcher.PartitionRecords(0, TP, MemoryRecords(bytes(data)), check_crcs=True)
    with pytest.raises(Errors.CorruptRecordError):
        theirs.take(10)
    assert theirs and theirs.take(10) == []  # still "has records", yields none: the spin
    ours = FastPartitionRecords(0, TP, MemoryRecords(bytes(data)), check_crcs=True)
    with pytest.raises(Errors.CorruptRecordError):
        ours.take(10)
    assert not ours


def _unreadable(records: list) -> list[str]:
    return [unreadable_reason(r) for r in records if unreadable_reason(r) is not None]


@pytest.mark.parametrize("cls", [FastPartitionRecords, PlainPartitionRecords])
def test_a_batch_whose_structure_lies_is_one_unreadable_record_after_the_good_ones(cls) -> None:
    header = DefaultRecordBatch.HEADER_STRUCT.size
    bad_length = bytearray(_v2_batch([(0, 1_700_000_000_000, b"k", b"value", [])],
                                     base_offset=40))
    bad_length[header] += 2  # length varint (single byte, zigzag): one more than written
    good = _v2_batch([(j, 1_700_000_000_000, b"k", b"v%d" % j, []) for j in range(3)],
                     base_offset=41)
    for fetch_cls in (Fetcher.PartitionRecords,):  # kafka-python gives up on the partition
        with pytest.raises(Errors.CorruptRecordError, match="Invalid record size|invalid record"):
            _parse(fetch_cls, bytes(bad_length) + good, check_crcs=False, fetch_offset=40)
    got, nexts = _parse(cls, bytes(bad_length) + good, check_crcs=False, fetch_offset=40)
    assert [r.offset for r in got] == [40, 41, 42, 43] and nexts[-1] == 44
    assert got[0].key is None and got[0].value is None
    (why,) = _unreadable(got)
    assert "offsets 40-40 of t/3" in why and ("record size" in why or "invalid" in why)
    assert [r.value for r in got[1:]] == [b"v0", b"v1", b"v2"]
    # a batch that claims bytes after its last record: the records are read, the rest ignored
    extra = _v2_batch([(0, 1_700_000_000_000, b"k", b"value", [])])
    truncated = bytearray(extra)
    struct.pack_into(">i", truncated, 8, len(extra) - 12 + 5)  # batch claims 5 more bytes...
    truncated += b"\x00" * 5  # ...that are not records
    got, _ = _parse(FastPartitionRecords, bytes(truncated), check_crcs=False)
    assert [(r.offset, r.value) for r in got] == [(0, b"value")]


def _with_codec(data: bytes, codec: int) -> bytes:
    """``data`` (one batch) relabelled as compressed with ``codec``, CRC made right again."""
    out = bytearray(data)
    attrs_at = DefaultRecordBatch.ATTRIBUTES_OFFSET
    attrs = (struct.unpack_from(">h", out, attrs_at)[0] & ~0x07) | codec
    struct.pack_into(">h", out, attrs_at, attrs)
    struct.pack_into(">I", out, DefaultRecordBatch.CRC_OFFSET,
                     calc_crc32c(memoryview(out)[attrs_at:]))
    return bytes(out)


@pytest.mark.parametrize("cls", [FastPartitionRecords, PlainPartitionRecords])
def test_a_batch_that_cannot_be_decompressed_is_one_unreadable_record(cls, monkeypatch) -> None:
    values = [b"value %d " % j + b"x" * 300 for j in range(4)]  # compressible
    records = [(j, 1_700_000_000_000 + j, b"k", v, []) for j, v in enumerate(values)]
    after = _v2_batch([(0, 1_700_000_000_100, b"k", b"after", [])], base_offset=14)
    # snappy without python-snappy (a deployment that lacks it), and an unknown codec id
    snappy = _v2_batch(records, base_offset=10, compression=DefaultRecordBatch.CODEC_SNAPPY)
    assert DefaultRecordBatch(snappy).compression_type == DefaultRecordBatch.CODEC_SNAPPY
    monkeypatch.setattr(kafka_codec, "snappy", None)
    with pytest.raises(Errors.UnsupportedCodecError):
        _parse(Fetcher.PartitionRecords, snappy + after, fetch_offset=10)
    for batch, want in ((snappy, "(snappy) could not be read: UnsupportedCodecError"),
                        (_with_codec(_v2_batch(records, base_offset=10), 6),
                         "(codec 6) could not be read: UnsupportedCodecError"),
                        (_with_codec(_v2_batch(records, base_offset=10), 1),  # not gzip data
                         "(gzip) could not be read:")):
        got, nexts = _parse(cls, batch + after, fetch_offset=10)
        assert [r.offset for r in got] == [13, 14] and nexts[-1] == 15
        (why,) = _unreadable(got)
        assert "offsets 10-13 of t/3" in why and want in why, why
        assert got[1].value == b"after"
    monkeypatch.undo()
    got = _same_as_kafka_python(snappy + after, fetch_offset=10)
    assert [r.value for r in got] == [*values, b"after"]


def test_a_header_key_that_is_not_utf8_does_not_stop_the_partition() -> None:
    records = [(0, 1_700_000_000_000, b"k", b"v0", [("\udcff\udcfe", b"binary key")]),
               (1, 1_700_000_000_000, b"k", b"v1", [])]
    builder_records = []
    for offset_delta, ts, key, value, headers in records:
        builder_records.append((offset_delta, ts, key, value, headers))
    data = _v2_batch_raw_header_keys(builder_records)
    with pytest.raises(Errors.CorruptRecordError):  # kafka-python's own parser
        _parse(Fetcher.PartitionRecords, data)
    got, _ = _parse(FastPartitionRecords, data)
    assert [r.value for r in got] == [b"v0", b"v1"]
    assert got[0].headers == [("\udcff\udcfe", b"binary key")]
    assert got[0].headers[0][0].encode("utf-8", "surrogateescape") == b"\xff\xfe"
    assert got[0].serialized_header_size == 2 + len(b"binary key")
    got, _ = _parse(PlainPartitionRecords, data)  # kafka-python's reader: dead-lettered
    assert [r.offset for r in got] == [1] and "UnicodeDecodeError" in _unreadable(got)[0]


def _v2_batch_raw_header_keys(records: list[Record]) -> bytes:
    """:func:`_v2_batch` whose header keys are written as the raw bytes ``surrogateescape``
    names (kafka-python's builder would encode them as UTF-8 and refuse the surrogates)."""
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=0, is_transactional=0, producer_id=-1,
        producer_epoch=-1, base_sequence=-1, batch_size=1 << 30,
    )
    marker = []
    for offset_delta, ts, key, value, headers in records:
        named = []
        for n, (h_key, h_value) in enumerate(headers):
            raw = h_key.encode("utf-8", "surrogateescape")
            placeholder = ("\x01" * len(raw))  # same length in UTF-8, swapped below
            marker.append((placeholder.encode(), raw))
            named.append((placeholder if n == 0 else h_key, h_value))
        builder.append(offset_delta, ts, key, value, named)
    data = bytearray(builder.build())
    for placeholder, raw in marker:
        at = bytes(data).index(placeholder)
        data[at:at + len(raw)] = raw
    struct.pack_into(">I", data, DefaultRecordBatch.CRC_OFFSET,
                     calc_crc32c(memoryview(data)[DefaultRecordBatch.ATTRIBUTES_OFFSET:]))
    return bytes(data)


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
