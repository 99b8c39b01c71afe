"""Faster record parsing for kafka-python's fetcher: the same records, less Python per record.

kafka-python (the design's client) turns each record of a fetched batch into a ``DefaultRecord``
(7 ``decode_varint`` calls, ~10 property reads) and then into a ``ConsumerRecord`` (CRC no-op
call, two deserializer calls, header sizes, ~15 more property reads): ~3 us of CPU per record,
the biggest piece of the trainer's fetch process (bench/ingest.py 'fetch process CPU: poll').

:func:`use_fast_records` gives one consumer a ``PartitionRecords`` whose ``_unpack_records``
reads message-format v2 batches (uncompressed or after kafka-python's own decompression) with the
varints inlined and builds the ``ConsumerRecord`` directly. Everything else is kafka-python's,
unchanged: fetching, batch CRC checks, aborted-transaction and control-batch handling, offsets,
metrics counts, errors (a malformed record raises ``CorruptRecordError`` as kafka-python does).
Consumers with key/value deserializers and legacy (v0/v1) batches take kafka-python's own path.
The records are equal field by field to kafka-python's (tests/stream/test_record_parse.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kafka import errors as Errors
from kafka.consumer.fetcher import ConsumerRecord, Fetcher, IsolationLevel
from kafka.record.default_records import DefaultRecordBatch
from kafka.record.util import decode_varint

_Base: Any = Fetcher.PartitionRecords


class FastPartitionRecords(_Base):
    """kafka-python's ``PartitionRecords`` with a faster parse of v2 data batches."""

    def _unpack_records(self, tp, records, key_deserializer, value_deserializer) -> Iterator:
        if key_deserializer is not None or value_deserializer is not None:
            yield from super()._unpack_records(tp, records, key_deserializer, value_deserializer)
            return
        try:
            yield from self._unpack_fast(tp, records)
        except StopIteration:  # as kafka-python: never let it end the generator silently
            raise RuntimeError("StopIteration raised unpacking messageset") from None

    def _unpack_fast(self, tp, records) -> Iterator:
        batch = records.next_batch()
        last_batch = None
        while batch is not None:
            last_batch = batch
            if self.check_crcs and not batch.validate_crc():
                raise Errors.CorruptRecordError(
                    f"Record batch for partition {self.topic_partition} at offset "
                    f"{batch.base_offset} failed crc check"
                )
            if batch.magic != 2:  # legacy formats: kafka-python's own records
                yield from self._legacy(tp, batch)
                batch = records.next_batch()
                continue
            self.leader_epoch = batch.leader_epoch
            if (self.isolation_level == IsolationLevel.READ_COMMITTED
                    and batch.has_producer_id()):
                self._consume_aborted_transactions_up_to(batch.last_offset)
                producer_id = batch.producer_id
                if self._contains_abort_marker(batch):
                    self.aborted_producer_ids.discard(producer_id)
                elif self._is_batch_aborted(batch):
                    self.next_fetch_offset = batch.next_offset
                    batch = records.next_batch()
                    continue
            if batch.is_control_batch:
                self.next_fetch_offset = batch.next_offset
                batch = records.next_batch()
                continue
            yield from self._v2_records(tp, batch)
            batch = records.next_batch()
        if last_batch is not None and last_batch.magic == 2:
            self.next_fetch_offset = last_batch.next_offset
        self.drain()

    def _legacy(self, tp, batch) -> Iterator:
        for record in batch:
            if self.check_crcs and not record.validate_crc():
                raise Errors.CorruptRecordError(
                    f"Record for partition {self.topic_partition} at offset {record.offset} "
                    "failed crc check"
                )
            key, value = record.key, record.value
            self.records_read += 1
            self.bytes_read += record.size_in_bytes
            self.next_fetch_offset = record.offset + 1
            yield ConsumerRecord(
                tp.topic, tp.partition, self.leader_epoch, record.offset, record.timestamp,
                record.timestamp_type, key, value, record.headers, record.checksum,
                -1 if key is None else len(key), -1 if value is None else len(value), -1,
            )

    def _v2_records(self, tp, batch: DefaultRecordBatch) -> Iterator:
        """The records of one v2 data batch, as kafka-python's ``_read_msg`` reads them."""
        batch._maybe_uncompress()
        buf = batch._buffer
        pos = batch._pos
        end = len(buf)
        topic, partition, epoch = tp.topic, tp.partition, self.leader_epoch
        ts_type = batch.timestamp_type
        base_offset = batch.base_offset
        first_ts = batch.first_timestamp
        log_append_ts = batch.max_timestamp if ts_type == batch.LOG_APPEND_TIME else None
        new_record = tuple.__new__
        try:
            for _ in range(batch._num_records):
                # zigzag varints: 1- and 2-byte values inline, longer via decode_varint
                b = buf[pos]
                if b < 0x80:
                    length = (b >> 1) ^ -(b & 1)
                    pos += 1
                elif buf[pos + 1] < 0x80:
                    b = (b & 0x7f) | (buf[pos + 1] << 7)
                    length = (b >> 1) ^ -(b & 1)
                    pos += 2
                else:
                    length, pos = decode_varint(buf, pos)
                start = pos
                if buf[pos] < 0x80:  # attributes (unused, as in kafka-python)
                    pos += 1
                else:
                    _, pos = decode_varint(buf, pos)
                b = buf[pos]
                if b < 0x80:
                    ts_delta = (b >> 1) ^ -(b & 1)
                    pos += 1
                elif buf[pos + 1] < 0x80:
                    b = (b & 0x7f) | (buf[pos + 1] << 7)
                    ts_delta = (b >> 1) ^ -(b & 1)
                    pos += 2
                else:
                    ts_delta, pos = decode_varint(buf, pos)
                b = buf[pos]
                if b < 0x80:
                    offset_delta = (b >> 1) ^ -(b & 1)
                    pos += 1
                elif buf[pos + 1] < 0x80:
                    b = (b & 0x7f) | (buf[pos + 1] << 7)
                    offset_delta = (b >> 1) ^ -(b & 1)
                    pos += 2
                else:
                    offset_delta, pos = decode_varint(buf, pos)
                b = buf[pos]
                if b < 0x80:
                    key_len = (b >> 1) ^ -(b & 1)
                    pos += 1
                elif buf[pos + 1] < 0x80:
                    b = (b & 0x7f) | (buf[pos + 1] << 7)
                    key_len = (b >> 1) ^ -(b & 1)
                    pos += 2
                else:
                    key_len, pos = decode_varint(buf, pos)
                if key_len >= 0:
                    key = bytes(buf[pos:pos + key_len])
                    pos += key_len
                else:
                    key = None
                b = buf[pos]
                if b < 0x80:
                    value_len = (b >> 1) ^ -(b & 1)
                    pos += 1
                elif buf[pos + 1] < 0x80:
                    b = (b & 0x7f) | (buf[pos + 1] << 7)
                    value_len = (b >> 1) ^ -(b & 1)
                    pos += 2
                else:
                    value_len, pos = decode_varint(buf, pos)
                if value_len >= 0:
                    value = bytes(buf[pos:pos + value_len])
                    pos += value_len
                else:
                    value = None
                b = buf[pos]
                if b == 0:  # no headers (the common case)
                    pos += 1
                    headers: list = []
                    header_size = -1
                else:
                    headers, header_size, pos = _headers(buf, pos)
                if pos - start != length:
                    raise Errors.CorruptRecordError(
                        f"Invalid record size: expected to read {length} bytes in record "
                        f"payload, but instead read {pos - start}"
                    )
                offset = base_offset + offset_delta
                self.records_read += 1
                self.bytes_read += length
                self.next_fetch_offset = offset + 1
                yield new_record(ConsumerRecord, (  # ConsumerRecord(...) minus a Python call
                    topic, partition, epoch, offset,
                    first_ts + ts_delta if log_append_ts is None else log_append_ts,
                    ts_type, key, value, headers, None, key_len if key is not None else -1,
                    value_len if value is not None else -1, header_size,
                ))
        except (ValueError, IndexError) as err:
            raise Errors.CorruptRecordError(
                f"Found invalid record structure: {err!r}") from None
        if pos != end:
            raise Errors.CorruptRecordError(
                f"{end - pos} unconsumed bytes after all records consumed")


def _headers(buf: bytearray, pos: int) -> tuple[list, int, int]:
    """A record's headers at ``pos``: (headers, their size as kafka-python counts it, next)."""
    count, pos = decode_varint(buf, pos)
    if count < 0:
        raise Errors.CorruptRecordError(f"Found invalid number of record headers {count}")
    headers = []
    for _ in range(count):
        key_len, pos = decode_varint(buf, pos)
        if key_len < 0:
            raise Errors.CorruptRecordError(f"Invalid negative header key size {key_len}")
        h_key = buf[pos:pos + key_len].decode("utf-8")
        pos += key_len
        value_len, pos = decode_varint(buf, pos)
        if value_len >= 0:
            h_value = bytes(buf[pos:pos + value_len])
            pos += value_len
        else:
            h_value = None
        headers.append((h_key, h_value))
    size = sum(len(k.encode("utf-8")) + (len(v) if v is not None else 0) for k, v in headers)
    return headers, (size if headers else -1), pos


def use_fast_records(consumer: Any) -> Any:
    """Make ``consumer`` (a ``KafkaConsumer``) parse fetched records with
    :class:`FastPartitionRecords`; returns it. Only this consumer changes."""
    consumer._fetcher.PartitionRecords = FastPartitionRecords
    return consumer
