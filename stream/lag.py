"""Consumer-group lag: committed offset, log-end offset and lag per topic/partition."""

from __future__ import annotations

from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer
from kafka.structs import TopicPartition

from fmstream.settings import Settings


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None  # None: the group never committed on this partition
    log_end: int

    @property
    def lag(self) -> int:
        """Messages not yet covered by the group's commit (the whole log if never committed)."""
        return self.log_end - (self.committed or 0)


def group_lag(
    settings: Settings, group: str, topics: list[str], *, admin: KafkaAdminClient | None = None
) -> list[PartitionLag]:
    """Per-partition lag of ``group`` over ``topics`` (every partition, committed or not)."""
    own_admin = admin is None
    admin = admin or KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    try:
        committed = {
            tp: meta.offset for tp, meta in admin.list_consumer_group_offsets(group).items()
        }
        tps = [
            TopicPartition(t, p)
            for t in topics
            for p in sorted(consumer.partitions_for_topic(t) or ())
        ]
        ends = consumer.end_offsets(tps) if tps else {}
        return [
            PartitionLag(group, tp.topic, tp.partition,
                         committed.get(tp) if committed.get(tp, -1) >= 0 else None, ends[tp])
            for tp in tps
        ]
    finally:
        consumer.close()
        if own_admin:
            admin.close()
