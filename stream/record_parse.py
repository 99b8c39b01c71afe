"""Faster record parsing for kafka-python's fetcher: the same records, less Python per record.

kafka-python (the design's client) turns each record of a fetched batch into a ``DefaultRecord``
(7 ``decode_varint`` calls, ~10 property reads) and then into a ``ConsumerRecord`` (CRC no-op
call, two deserializer calls, header sizes, ~15 more property reads): ~3 us of CPU per record,
the biggest piece of the trainer's fetch process (bench/ingest.py 'fetch process CPU: poll').

:func:`use_fast_records` gives one consumer a ``PartitionRecords`` (kafka-python's, through the
one door to its private fetcher, :mod:`stream.fetcher`) that reads message-format v2 batches
(uncompressed or after kafka-python's own decompression) with the varints inlined and builds the
``ConsumerRecord`` directly. Everything else is kafka-python's,
unchanged: fetching, batch CRC checks, aborted-transaction and control-batch handling, offsets,
metrics counts, CRC errors.
Consumers with key/value deserializers and legacy (v0/v1) batches take kafka-python's own path.
The records are equal field by field to kafka-python's (tests/stream/test_record_parse.py).

Where kafka-python gives up, this parser does not stop the partition: a batch it cannot read (a
codec whose library is missing, a payload that does not decompress, a record whose structure
lies) becomes one *unreadable-batch record* (:func:`unreadable_reason` says why; key and value
None) at the batch's last offset, after the batch's records that could be read, and the position
moves past the batch, so the consumer's decoder dead-letters it and goes on. A header key that is
not UTF-8 is read with ``surrogateescape`` instead of failing the record. (kafka-python raises
from inside its record iterator, and its fetcher then spins forever on the exhausted iterator: one
snappy-compressed batch without python-snappy, or one binary header key, hung a consumer's
``poll()`` at 100% CPU. A batch whose CRC fails still raises ``CorruptRecordError``: the broker
checked it when it was written, so it is refetched, not skipped; the exhausted iterator is
dropped so the next poll refetches instead of spinning.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from kafka import errors as Errors
from kafka.record.default_records import DefaultRecordBatch
from kafka.record.util import decode_varint

from stream.fetcher import ConsumerRecord, PartitionRecords, payload, uncompress, use_records

log = logging.getLogger(__name__)

UNREADABLE_HEADER = "fmstream.unreadable-batch"
"""Header key of an unreadable-batch record; its value is the reason (UTF-8)."""

_CODECS = {0: "uncompressed", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}


def unreadable_reason(record: Any) -> str | None:
    """Why ``record`` stands for a batch that could not be read, or None for a real record.

    Only records with a null value can be one (check that first: this is for the slow path)."""
    headers = record.headers
    if record.value is None and headers and headers[0][0] == UNREADABLE_HEADER:
        return headers[0][1].decode("utf-8", "replace")
    return None


class FastPartitionRecords(PartitionRecords):
    """kafka-python's ``PartitionRecords`` (through :mod:`stream.fetcher`) with a faster parse of
    v2 data batches, which turns a batch it cannot read into one unreadable-batch record instead
    of raising."""

    def unpack(self, tp, records) -> Iterator:
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
            if self.skip_aborted(batch) or batch.is_control_batch:
                self.next_fetch_offset = batch.next_offset
                batch = records.next_batch()
                continue
            try:
                uncompress(batch)
            except Exception as err:  # noqa: BLE001 - any codec's error: the batch can't be read
                yield self._unreadable(tp, batch, batch.base_offset, _codec_why(err))
            else:
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

    def _unreadable(self, tp, batch: DefaultRecordBatch, first_offset: int, why: str) -> Any:
        """The unreadable-batch record for ``batch`` from ``first_offset`` on; the position moves
        past the batch."""
        codec = _CODECS.get(batch.compression_type, f"codec {batch.compression_type}")
        reason = (f"record batch at offsets {first_offset}-{batch.last_offset} of "
                  f"{tp.topic}/{tp.partition} ({codec}) could not be read: {why}")
        self.records_read += 1
        self.next_fetch_offset = batch.next_offset
        return ConsumerRecord(
            tp.topic, tp.partition, self.leader_epoch, batch.last_offset, batch.max_timestamp,
            batch.timestamp_type, None, None, [(UNREADABLE_HEADER, reason.encode("utf-8"))],
            None, -1, -1, -1,
        )

    def _v2_records(self, tp, batch: DefaultRecordBatch) -> Iterator:
        """The records of one uncompressed v2 data batch, as kafka-python's ``_read_msg`` reads
        them; what cannot be read ends as one unreadable-batch record."""
        buf, pos, count = payload(batch)
        end = len(buf)
        topic, partition, epoch = tp.topic, tp.partition, self.leader_epoch
        ts_type = batch.timestamp_type
        base_offset = batch.base_offset
        first_ts = batch.first_timestamp
        log_append_ts = batch.max_timestamp if ts_type == batch.LOG_APPEND_TIME else None
        new_record = tuple.__new__
        try:
            for _ in range(count):
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
                    raise _Unreadable(f"Invalid record size: expected to read {length} bytes "
                                      f"in record payload, but instead read {pos - start}")
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
        except (ValueError, IndexError, _Unreadable) as err:
            why = str(err) if isinstance(err, _Unreadable) else (
                f"Found invalid record structure: {err!r}")
            first = self.next_fetch_offset if self.next_fetch_offset > base_offset else (
                base_offset)
            if first <= batch.last_offset:
                yield self._unreadable(tp, batch, first, why)
            else:
                log.warning("%s/%s: %s after the batch's last record; ignored", topic,
                            partition, why)
            return
        if pos != end:  # every record read: what follows is not one
            log.warning("%s/%s: %d unconsumed bytes after the records of the batch at offset "
                        "%d; ignored", topic, partition, end - pos, base_offset)


def _why(err: BaseException) -> str:
    text = str(err)  # a KafkaError's text starts with its class name
    return text if text.startswith(type(err).__name__) else f"{type(err).__name__}: {text}"


class _Unreadable(Exception):
    """A record of a batch whose structure does not add up (read as an unreadable batch)."""


def _headers(buf: bytearray, pos: int) -> tuple[list, int, int]:
    """A record's headers at ``pos``: (headers, their size as kafka-python counts it, next)."""
    count, pos = decode_varint(buf, pos)
    if count < 0:
        raise _Unreadable(f"Found invalid number of record headers {count}")
    headers = []
    for _ in range(count):
        key_len, pos = decode_varint(buf, pos)
        if key_len < 0:
            raise _Unreadable(f"Invalid negative header key size {key_len}")
        h_key = buf[pos:pos + key_len].decode("utf-8", "surrogateescape")  # never fails
        pos += key_len
        value_len, pos = decode_varint(buf, pos)
        if value_len >= 0:
            h_value = bytes(buf[pos:pos + value_len])
            pos += value_len
        else:
            h_value = None
        headers.append((h_key, h_value))
    size = sum(len(k.encode("utf-8", "surrogateescape")) + (len(v) if v is not None else 0)
               for k, v in headers)
    return headers, (size if headers else -1), pos


class PlainPartitionRecords(FastPartitionRecords):
    """:class:`FastPartitionRecords` reading each record with kafka-python's own ``DefaultRecord``
    (``FMSTREAM_KAFKA_FAST_RECORDS=false``): kafka-python's record parser, this module's batch
    handling (an unreadable batch, or the rest of it from a record kafka-python cannot read, e.g.
    a header key that is not UTF-8, becomes one unreadable-batch record)."""

    def _v2_records(self, tp, batch: DefaultRecordBatch) -> Iterator:
        first = batch.base_offset
        try:
            for record in batch:
                headers = record.headers
                key, value = record.key, record.value
                self.records_read += 1
                self.bytes_read += record.size_in_bytes
                self.next_fetch_offset = first = record.offset + 1
                yield ConsumerRecord(
                    tp.topic, tp.partition, self.leader_epoch, record.offset, record.timestamp,
                    record.timestamp_type, key, value, headers, record.checksum,
                    -1 if key is None else len(key), -1 if value is None else len(value),
                    sum(len(k.encode("utf-8")) + (len(v) if v is not None else 0)
                        for k, v in headers) if headers else -1,
                )
        except (ValueError, IndexError, Errors.CorruptRecordError) as err:
            if first <= batch.last_offset:
                yield self._unreadable(tp, batch, first, _why(err))


def _codec_why(err: BaseException) -> str:
    why = _why(err)
    if isinstance(err, Errors.UnsupportedCodecError | NotImplementedError):
        why += ("; install the codec's Python library (fmstream depends on python-snappy, lz4 "
                "and zstandard through kafka-python's extras)")
    return why


def use_fast_records(consumer: Any, *, inline: bool = True) -> Any:
    """Make ``consumer`` (a ``KafkaConsumer``) parse fetched records with
    :class:`FastPartitionRecords` (``inline=False``: :class:`PlainPartitionRecords`); returns
    it. Only this consumer changes; where kafka-python's fetcher no longer has what
    :mod:`stream.fetcher` needs, it keeps kafka-python's parser (logged once)."""
    use_records(consumer, FastPartitionRecords if inline else PlainPartitionRecords)
    return consumer
