"""stream/fetcher.py, the one door to kafka-python's private fetcher, on real kafka-python objects:
fails on a kafka-python upgrade that drops or changes what stream/record_parse.py relies on (then
update ``stream/fetcher.py`` and its pin in pyproject.toml together)."""

from __future__ import annotations

import inspect
import logging
from importlib.metadata import version

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import Fetcher
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords

from stream import fetcher as fetcher_module
from stream.config import KafkaConfig
from stream.connect import kafka_consumer
from stream.fetcher import (
    BATCH_STATE,
    RECORDS_INIT,
    RECORDS_METHODS,
    RECORDS_STATE,
    WRITTEN_AGAINST,
    PartitionRecords,
    missing,
    payload,
    uncompress,
    use_records,
)
from stream.record_parse import FastPartitionRecords, PlainPartitionRecords, use_fast_records


@pytest.fixture
def consumer():
    # no broker is needed: nothing here polls; api_version skips the version probe
    consumer = kafka_consumer(KafkaConfig("127.0.0.1:1"), group_id=None, api_version=(3, 9))
    yield consumer
    consumer.close(autocommit=False, timeout_ms=0)


def _batch(values: list[bytes], compression: int = 0) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=compression, is_transactional=0, producer_id=-1,
        producer_epoch=-1, base_sequence=-1, batch_size=1 << 30,
    )
    for j, value in enumerate(values):
        builder.append(j, 1_700_000_000_000, b"k", value, [])
    return bytes(builder.build())


def test_kafka_python_is_the_release_the_door_was_written_against() -> None:
    installed = version("kafka-python")
    assert installed.split(".")[:2] == WRITTEN_AGAINST.split(".")[:2], (
        f"kafka-python {installed} installed; stream/fetcher.py reads private attributes "
        f"as of {WRITTEN_AGAINST}: check them, then update WRITTEN_AGAINST and the pin")


def test_every_private_class_and_method_the_parser_uses_is_there() -> None:
    assert missing() == [], f"kafka-python {version('kafka-python')} dropped {missing()}"
    assert PartitionRecords.__mro__[1] is Fetcher.PartitionRecords
    assert issubclass(FastPartitionRecords, Fetcher.PartitionRecords)
    for name in RECORDS_METHODS:
        assert callable(getattr(Fetcher.PartitionRecords, name)), name
    assert list(inspect.signature(Fetcher.PartitionRecords.__init__).parameters)[1:] == list(
        RECORDS_INIT)
    assert list(inspect.signature(Fetcher.PartitionRecords._unpack_records).parameters) == [
        "self", "tp", "records", "key_deserializer", "value_deserializer"]
    # the fetcher builds its records through the class attribute the door swaps
    assert "self.PartitionRecords(" in inspect.getsource(Fetcher._parse_fetched_data)


def test_every_piece_of_state_the_parser_reads_is_on_real_objects() -> None:
    records = Fetcher.PartitionRecords(5, TopicPartition("t", 0), MemoryRecords(b""))
    for name in RECORDS_STATE:
        assert hasattr(records, name), f"PartitionRecords.{name} is gone"
    assert records.next_fetch_offset == 5 and records.records_read == 0
    assert isinstance(records.aborted_producer_ids, set)
    values = [b"value %d " % j + b"x" * 200 for j in range(3)]
    for codec in (0, DefaultRecordBatch.CODEC_GZIP):
        batch = MemoryRecords(_batch(values, codec)).next_batch()
        uncompress(batch)
        for name in BATCH_STATE:
            assert hasattr(batch, name), f"DefaultRecordBatch.{name} is gone"
        buf, pos, count = payload(batch)
        assert count == 3 and isinstance(pos, int) and values[2] in bytes(buf[pos:])


def test_a_real_consumer_builds_the_records_class_it_is_given(consumer: KafkaConsumer) -> None:
    assert consumer._fetcher.PartitionRecords is Fetcher.PartitionRecords
    assert use_records(consumer, FastPartitionRecords)
    assert consumer._fetcher.PartitionRecords is FastPartitionRecords
    assert use_fast_records(consumer, inline=False) is consumer
    assert consumer._fetcher.PartitionRecords is PlainPartitionRecords
    assert Fetcher.PartitionRecords is not PlainPartitionRecords  # only this consumer changed


def test_without_the_private_fetcher_the_consumer_keeps_kafka_pythons_parser_and_says_so_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fetcher_module, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="stream.fetcher"):
        assert not use_records(object(), FastPartitionRecords)
        assert use_fast_records(object()) is not None
    assert caplog.text.count("lacks KafkaConsumer._fetcher.PartitionRecords") == 1
    assert "records are parsed by kafka-python" in caplog.text


def test_a_kafka_python_without_partition_records_is_reported(
    consumer: KafkaConsumer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fetcher_module, "_warned", False)
    monkeypatch.setattr(fetcher_module, "_KafkaRecords", None)
    assert missing() == ["Fetcher.PartitionRecords"]
    with caplog.at_level(logging.WARNING, logger="stream.fetcher"):
        assert not use_records(consumer, FastPartitionRecords)
    assert consumer._fetcher.PartitionRecords is Fetcher.PartitionRecords  # left as it was
    assert "lacks Fetcher.PartitionRecords" in caplog.text


def test_a_changed_method_or_signature_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    class Moved(Fetcher.PartitionRecords):
        _is_batch_aborted = None

        def __init__(self, fetch_offset, tp, records, **configs):
            super().__init__(fetch_offset, tp, records, **configs)

    monkeypatch.setattr(fetcher_module, "_KafkaRecords", Moved)
    gone = missing()
    assert "PartitionRecords._is_batch_aborted" in gone
    assert any(name.startswith("PartitionRecords.__init__(") for name in gone)
