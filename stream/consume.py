"""Kafka in and out: client factories, batch decoding, and the dead-letter sink.

A consumer never blocks on one message: a polled batch is decoded and validated as a batch,
what fails goes to the dead-letter topic with the reason and its source position, and the rest
is returned for the caller to apply.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np
import orjson
from kafka import KafkaConsumer, KafkaProducer
from pydantic import ValidationError

from stream.config import KafkaConfig
from stream.connect import kafka_consumer, kafka_producer
from stream.fetcher import ConsumerRecord
from stream.record_parse import unreadable_reason
from stream.schemas import (
    MAX_EVENT_AHEAD_S,
    DeadLetter,
    DecodeError,
    Event,
    EventColumns,
    MessageInvalid,
    UnreadableBatch,
    check_event_time,
    describe_validation_error,
    dumps,
    loads_object,
    parse_event,
    parse_event_values,
    parse_events,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Any)


def make_producer(kafka: KafkaConfig, **overrides) -> KafkaProducer:
    """An idempotent producer (acks=all) with a short linger so batches form under load."""
    config = dict(
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        retries=2**31 - 1,
        max_in_flight_requests_per_connection=5,
    )
    config.update(overrides)
    return kafka_producer(kafka, **config)


DEAD_LETTER_MAX_BLOCK_MS = 2000
"""How long a dead-letter producer's ``send`` waits for the topic's metadata (kafka-python's
default is 60 s): a dead-letter topic that is missing (auto-create off) then costs its caller
2 s, not a minute per letter, and is reported as blocked within seconds."""


def make_dead_letter_producer(kafka: KafkaConfig) -> KafkaProducer:
    """The trainer's dead-letter producer: not idempotent (a letter the topic refuses must not
    make it fatal: train.resilience.DeadLetterOutbox), and a short metadata wait
    (:data:`DEAD_LETTER_MAX_BLOCK_MS`)."""
    return make_producer(kafka, enable_idempotence=False, max_block_ms=DEAD_LETTER_MAX_BLOCK_MS)


def make_consumer(kafka: KafkaConfig, group_id: str | None, **overrides) -> KafkaConsumer:
    """A consumer with auto-commit off; the caller commits after its own bookkeeping.

    ``overrides`` are kafka-python options (e.g. ``max_poll_records``, default 500).
    """
    config = dict(
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
        # A transactional producer's aborted records are not messages: never learn or answer
        # them (kafka-python's default, read_uncommitted, hands them over like any other).
        isolation_level="read_committed",
    )
    config.update(overrides)
    return kafka_consumer(kafka, **config)


class Decoded(NamedTuple, Generic[M]):
    """A validated message with the record it came from (a tuple: one is built per message)."""

    message: M
    record: ConsumerRecord


DEAD_LETTER_VALUE_BYTES = 64 << 10
"""Original bytes kept in a dead letter (base64 in the letter: 4/3 of this)."""
DEAD_LETTER_KEY_BYTES = 1024
"""Original key bytes kept (in the letter and as the letter's own Kafka key)."""
DEAD_LETTER_REASON_CHARS = 2000


def null_value_error(record: ConsumerRecord) -> DecodeError:
    """Why a record with a null value cannot be used: a tombstone, or a batch the client could
    not read (:mod:`stream.record_parse`)."""
    reason = unreadable_reason(record)
    if reason is not None:
        return UnreadableBatch(reason)
    return DecodeError("empty message (null value)")


def dead_letter_id(record: ConsumerRecord) -> str:
    """The stable id of ``record``'s dead letter: ``topic/partition/offset``."""
    return f"{record.topic}/{record.partition}/{record.offset}"


def dead_letter_key(record: ConsumerRecord) -> bytes | None:
    """The Kafka key of ``record``'s dead letter: the source key, cut to a bound."""
    return None if record.key is None else bytes(record.key[:DEAD_LETTER_KEY_BYTES])


def dead_letter_for(
    record: ConsumerRecord, stage: str, error: BaseException, reason: str
) -> DeadLetter:
    """The dead-letter record of ``record``: a bounded prefix of its bytes with their length and
    sha256, where it came from, and why. Its JSON stays under ~100 KB whatever the source."""
    value = record.value or b""
    kept = value[:DEAD_LETTER_VALUE_BYTES]
    key = dead_letter_key(record)
    return DeadLetter(
        id=dead_letter_id(record),
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        source_timestamp_ms=record.timestamp,
        stage=stage,  # type: ignore[arg-type]
        error_class=type(error).__name__,
        reason=reason[:DEAD_LETTER_REASON_CHARS],
        key=key.decode("utf-8", "replace") if key else None,
        value_b64=base64.b64encode(kept).decode("ascii"),
        value_length=len(value),
        value_sha256=hashlib.sha256(value).hexdigest(),
        value_truncated=len(kept) < len(value),
    )


def dead_letter_fix(topic: str, error: str) -> str:
    """What an operator does about a dead-letter topic that refuses letters with ``error``."""
    if error == "TopicAuthorizationFailedError":
        return (f"grant the trainer's Kafka user (FMSTREAM_KAFKA_USERNAME) Write on topic "
                f"{topic} (README, Security)")
    if error == "UnknownTopicOrPartitionError":
        return (f"create topic {topic} (`fmstream topics`), or let the broker create topics "
                "(auto.create.topics.enable)")
    if error == "KafkaTimeoutError":  # no metadata in time: a missing topic or a broker away
        return (f"create topic {topic} (`fmstream topics`), or let the broker create topics "
                "(auto.create.topics.enable); if it exists, the broker did not answer in time: "
                "check that it is reachable (FMSTREAM_KAFKA_BOOTSTRAP)")
    return f"check the broker and topic {topic} (FMSTREAM_TOPIC_DLQ)"


class DeadLetters:
    """Sends unusable messages to the dead-letter topic; :meth:`flush` waits for the acks."""

    def __init__(self, producer: KafkaProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic
        self._pending: list = []
        self.count = 0

    def send(self, record: ConsumerRecord, stage: str, error: BaseException, reason: str) -> None:
        """Queue one dead letter for ``record`` that failed at ``stage`` (decode/validate/apply)."""
        letter = dead_letter_for(record, stage, error, reason)
        self._pending.append(
            self._producer.send(self._topic, key=dead_letter_key(record), value=dumps(letter))
        )
        self.count += 1
        log.warning("dead letter %s (%s): %s", letter.id, stage, reason[:200])

    def flush(self, timeout: float = 30.0) -> None:
        """Block until every queued dead letter is acknowledged (raises if one failed)."""
        if not self._pending:
            return
        self._producer.flush(timeout=timeout)
        for future in self._pending:
            future.get(timeout=timeout)
        self._pending.clear()


def decode_records(
    records: Iterable[ConsumerRecord],
    model: type[M],
    dead_letters: DeadLetters,
    *,
    max_bytes: int,
    tombstone: Callable[[bytes | None], Any] | None = None,
) -> list[Decoded[M]]:
    """Decode and validate ``records`` as ``model``; dead-letter the ones that fail.

    ``tombstone``: what a null value (a compacted topic's "delete this key") becomes, from the
    record's key (it raises :class:`DecodeError` / :class:`MessageInvalid` for a key it cannot
    use: the record is dead-lettered); None: a null value is dead-lettered.
    """
    out: list[Decoded[M]] = []
    for record in records:
        size = len(record.value or b"")
        if size > max_bytes:
            dead_letters.send(
                record, "decode", DecodeError("oversized"),
                f"message of {size} bytes exceeds the limit of {max_bytes} bytes",
            )
            continue
        if record.value is None and tombstone is not None and unreadable_reason(record) is None:
            try:
                out.append(Decoded(tombstone(record.key), record))
            except DecodeError as exc:
                dead_letters.send(record, "decode", exc, str(exc))
            except MessageInvalid as exc:
                dead_letters.send(record, "validate", exc, str(exc))
            continue
        try:
            if record.value is None:
                raise null_value_error(record)
            obj = loads_object(record.value)
        except DecodeError as exc:
            dead_letters.send(record, "decode", exc, str(exc))
            continue
        try:
            message = model.model_validate(obj)
        except ValidationError as exc:
            dead_letters.send(record, "validate", exc, describe_validation_error(exc))
            continue
        out.append(Decoded(message, record))
    return out


def decode_events(
    records: Iterable[ConsumerRecord], dead_letters: DeadLetters, *, max_bytes: int
) -> list[Decoded[Event]]:
    """Decode ``fm.events`` records with :func:`~stream.schemas.parse_event`, in order; the ones
    that fail are dead-lettered (stage ``decode`` or ``validate``) and the rest returned.

    Each message is judged on its own: one bad message never fails the others. An event whose
    ``ts`` lies too far ahead of this consumer's clock is invalid
    (:func:`~stream.schemas.check_event_time`).
    """
    out: list[Decoded[Event]] = []
    append = out.append
    loads, json_error = orjson.loads, orjson.JSONDecodeError
    now = time.time()
    for record in records:
        value = record.value
        if value is not None and len(value) > max_bytes:
            dead_letters.send(
                record, "decode", DecodeError("oversized"),
                f"message of {len(value)} bytes exceeds the limit of {max_bytes} bytes",
            )
            continue
        try:
            if value is None:
                raise null_value_error(record)
            try:
                obj = loads(value)
            except json_error as exc:
                raise DecodeError(f"not valid UTF-8 JSON: {exc}") from None
        except DecodeError as exc:
            dead_letters.send(record, "decode", exc, str(exc))
            continue
        try:
            event = parse_event(obj)
            check_event_time(event.ts, now)
            append(Decoded(event, record))
        except DecodeError as exc:
            dead_letters.send(record, "decode", exc, str(exc))
        except MessageInvalid as exc:
            dead_letters.send(record, "validate", exc, str(exc))
    return out


def decode_event_columns(
    records: Sequence[ConsumerRecord], dead_letters: DeadLetters, *, max_bytes: int
) -> EventColumns:
    """:func:`decode_events` for a whole poll at once: the valid events as columns (``rows``:
    each one's index in ``records``), the others dead-lettered (stage ``decode`` or
    ``validate``, same reasons, in record order).

    A poll whose every record is present, within ``max_bytes`` and in the common shape is
    decoded by :func:`~stream.schemas.parse_event_values` (typed, in C); otherwise the JSON of
    every record is parsed in one C-level pass when all of them are valid, else record by record,
    and judged by :func:`~stream.schemas.parse_events`. Events whose ``ts`` lies too far ahead of
    this consumer's clock are invalid (:func:`~stream.schemas.check_event_time`).
    """
    values = [r.value for r in records]
    now = time.time()
    objs: list[Any] | None = None
    if values and None not in values and max(map(len, values)) <= max_bytes:
        columns = parse_event_values(values)
        if columns is not None:
            columns, ahead = _ahead_of(columns, now)
            for j, stage, exc, reason in ahead:
                dead_letters.send(records[j], stage, exc, reason)
            return columns
        try:
            objs = list(map(orjson.loads, values))
        except orjson.JSONDecodeError:
            objs = None
    letters: list[tuple[int, str, BaseException, str]] = []
    if objs is None:  # record by record: the reason of each unusable one
        objs, index = [], []
        for j, value in enumerate(values):
            if value is not None and len(value) > max_bytes:
                letters.append((j, "decode", DecodeError("oversized"),
                                f"message of {len(value)} bytes exceeds the limit of "
                                f"{max_bytes} bytes"))
                continue
            try:
                if value is None:
                    raise null_value_error(records[j])
                objs.append(orjson.loads(value))
            except DecodeError as exc:
                letters.append((j, "decode", exc, str(exc)))
                continue
            except orjson.JSONDecodeError as exc:
                error = DecodeError(f"not valid UTF-8 JSON: {exc}")
                letters.append((j, "decode", error, str(error)))
                continue
            index.append(j)
        columns, errors = parse_events(objs)
        where = np.asarray(index, dtype=np.int64)
        columns = dataclasses.replace(columns, rows=where[columns.rows])
        errors = [(index[j], exc) for j, exc in errors]
    else:
        columns, errors = parse_events(objs)
    for j, exc in errors:
        stage = "validate" if isinstance(exc, MessageInvalid) else "decode"
        letters.append((j, stage, exc, str(exc)))
    columns, ahead = _ahead_of(columns, now)
    letters += ahead
    for j, stage, exc, reason in sorted(letters, key=lambda x: x[0]):
        dead_letters.send(records[j], stage, exc, reason)
    return columns


def _ahead_of(
    columns: EventColumns, now: float
) -> tuple[EventColumns, list[tuple[int, str, BaseException, str]]]:
    """``columns`` without the events whose ``ts`` lies too far ahead of ``now``, and a letter
    (record index, stage, error, reason) for each of those. One vectorised comparison when none
    is (an event without ``ts`` holds NaN, which never compares greater)."""
    limit = now + MAX_EVENT_AHEAD_S
    ahead = columns.ts > limit
    if not ahead.any():
        return columns, []
    letters: list[tuple[int, str, BaseException, str]] = []
    for j in np.flatnonzero(ahead).tolist():
        try:
            check_event_time(float(columns.ts[j]), now)
        except MessageInvalid as exc:
            letters.append((int(columns.rows[j]), "validate", exc, str(exc)))
    return columns.select(~ahead), letters


def flatten(polled: dict) -> list[ConsumerRecord]:
    """The records of one ``poll()`` result in partition order."""
    return [r for batch in polled.values() for r in batch]
