"""Raw Kafka I/O for tests (kafka-python): produce bytes, read a topic back, delete topics.

Readers never join a consumer group: they assign every partition and read from the beginning,
so they see a topic exactly as a new consumer would and never disturb the groups under test.
Every function takes the test's ``Settings`` (or a ``KafkaConfig`` or bootstrap string) first::

    produce(settings, settings.topic_events, [(b"196", b'{"user_id": "196", "item_id": "242"}')])
    letters = consume_all(settings, settings.topic_dlq, expect=3)
    replies = consume_until(settings, settings.topic_responses, lambda rs: len(rs) >= 1)

The ``kafka_io`` fixture is a :class:`KafkaIO` bound to the test's broker (one producer reused).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from fmstream.services import kafka_admin
from fmstream.settings import Settings
from stream.config import KafkaConfig
from stream.connect import kafka_consumer, kafka_producer
from stream.fetcher import ConsumerRecord

Target = Settings | KafkaConfig | str
"""The test's Settings, a connection, or a (plaintext) bootstrap string."""
Bytes = bytes | str
Message = Bytes | tuple[Bytes | None, Bytes | None]
"""A value, or a ``(key, value)`` pair; ``str`` is UTF-8 encoded, ``None`` value = tombstone."""
Predicate = Callable[[list[ConsumerRecord]], bool]


def _connection(target: Target) -> KafkaConfig:
    if isinstance(target, KafkaConfig):
        return target
    return KafkaConfig(target) if isinstance(target, str) else target.kafka_config()


def _b(value: Bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


class KafkaIO:
    """Produce to and read from one cluster with one lazily made producer (see :meth:`close`)."""

    def __init__(self, target: Target) -> None:
        self.kafka = _connection(target)
        self.bootstrap = self.kafka.bootstrap
        self._producer: KafkaProducer | None = None

    @property
    def producer(self) -> KafkaProducer:
        """A plain producer (acks=all, no serializers)."""
        if self._producer is None:
            self._producer = kafka_producer(
                self.kafka, acks="all", linger_ms=5, max_block_ms=10_000
            )
        return self._producer

    def produce(
        self,
        topic: str,
        messages: Iterable[Message],
        *,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        timeout_s: float = 10.0,
    ) -> list[Any]:
        """Send raw messages and wait until the broker acknowledged all of them.

        Returns:
            One ``RecordMetadata`` (topic, partition, offset) per message, in order.
        """
        futures = []
        for message in messages:
            key, value = message if isinstance(message, tuple) else (None, message)
            futures.append(
                self.producer.send(
                    topic, value=_b(value), key=_b(key), partition=partition, headers=headers
                )
            )
        self.producer.flush(timeout=timeout_s)
        return [future.get(timeout=timeout_s) for future in futures]

    def produce_json(
        self, topic: str, records: Iterable[tuple[str | None, Any]], **kwargs: Any
    ) -> list[Any]:
        """Send ``(key, object)`` pairs as UTF-8 JSON (orjson); see :meth:`produce`."""
        return self.produce(topic, [(key, orjson.dumps(obj)) for key, obj in records], **kwargs)

    def consume_all(
        self, topic: str, *, expect: int | None = None, timeout_s: float = 10.0
    ) -> list[ConsumerRecord]:
        """See :func:`consume_all`."""
        return consume_all(self.kafka, topic, expect=expect, timeout_s=timeout_s)

    def consume_until(
        self, topic: str, predicate: Predicate, *, timeout_s: float = 10.0
    ) -> list[ConsumerRecord]:
        """See :func:`consume_until`."""
        return consume_until(self.kafka, topic, predicate, timeout_s=timeout_s)

    def end_offsets(self, topic: str) -> dict[TopicPartition, int]:
        """See :func:`end_offsets`."""
        return end_offsets(self.kafka, topic)

    def close(self) -> None:
        """Close the producer, if one was made."""
        if self._producer is not None:
            self._producer.close(timeout=5)
            self._producer = None


def _reader(target: Target, topic: str, timeout_s: float) -> tuple[KafkaConsumer, list[Any]]:
    kafka = _connection(target)
    bootstrap = kafka.bootstrap
    consumer = kafka_consumer(
        kafka,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        bootstrap_timeout_ms=int(timeout_s * 1000),
    )
    deadline = time.monotonic() + timeout_s
    partitions = consumer.partitions_for_topic(topic)
    while not partitions:
        if time.monotonic() >= deadline:
            consumer.close()
            raise TimeoutError(f"topic {topic!r} has no partitions in metadata at {bootstrap}")
        time.sleep(0.1)
        partitions = consumer.partitions_for_topic(topic)
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    return consumer, tps


def end_offsets(
    target: Target, topic: str, *, timeout_s: float = 10.0
) -> dict[TopicPartition, int]:
    """``{TopicPartition(topic, partition): end offset}`` for every partition of ``topic``."""
    consumer, tps = _reader(target, topic, timeout_s)
    try:
        return dict(consumer.end_offsets(tps))
    finally:
        consumer.close(autocommit=False)


def consume_all(
    target: Target, topic: str, *, expect: int | None = None, timeout_s: float = 10.0
) -> list[ConsumerRecord]:
    """Read ``topic`` from the beginning of every partition.

    Args:
        expect: wait until at least this many records arrived (they may still be in flight);
            ``None`` reads up to the end offsets at the time of the call.
        timeout_s: bound on the whole read.

    Returns:
        The records, in offset order within each partition.

    Raises:
        TimeoutError: fewer than ``expect`` records (or the end not reached) within the bound.
    """
    until = None if expect is None else (lambda records: len(records) >= expect)
    return _read(target, topic, until, timeout_s)


def consume_until(
    target: Target, topic: str, predicate: Predicate, *, timeout_s: float = 10.0
) -> list[ConsumerRecord]:
    """Read ``topic`` from the beginning until ``predicate(records so far)`` holds.

    Raises:
        TimeoutError: with a summary of what did arrive.
    """
    return _read(target, topic, predicate, timeout_s)


def _read(
    target: Target, topic: str, until: Predicate | None, timeout_s: float
) -> list[ConsumerRecord]:
    consumer, tps = _reader(target, topic, timeout_s)
    deadline = time.monotonic() + timeout_s
    records: list[ConsumerRecord] = []
    try:
        ends = consumer.end_offsets(tps) if until is None else {}
        while True:
            if until is not None and until(records):
                return records
            if until is None and all(consumer.position(tp) >= ends[tp] for tp in tps):
                return records
            if time.monotonic() >= deadline:
                sample = [(r.partition, r.offset, r.key, r.value) for r in records[-3:]]
                raise TimeoutError(
                    f"{topic!r}: condition not met after {timeout_s:.1f} s; read "
                    f"{len(records)} records, last ones {sample}"
                )
            batch = consumer.poll(timeout_ms=100)
            for tp in tps:
                records.extend(batch.get(tp, []))
    finally:
        consumer.close(autocommit=False)


def produce(target: Target, topic: str, messages: Iterable[Message], **kwargs: Any) -> list[Any]:
    """One-shot :meth:`KafkaIO.produce` (opens and closes a producer)."""
    io = KafkaIO(target)
    try:
        return io.produce(topic, messages, **kwargs)
    finally:
        io.close()


def delete_topics(target: Target, topics: Iterable[str], *, timeout_s: float = 5.0) -> None:
    """Delete ``topics`` (missing ones are ignored); returns when the broker accepted it."""
    names = list(topics)
    with kafka_admin(_connection(target), timeout_s=timeout_s) as admin:
        present = set(admin.list_topics())
        doomed = [name for name in names if name in present]
        if doomed:
            admin.delete_topics(doomed, timeout_ms=int(timeout_s * 1000), raise_errors=False)


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition",
             poll_s: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")
