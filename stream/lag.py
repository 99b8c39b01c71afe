"""Consumer-group lag as Kafka reports it, and the group's commits as they happen.

- :class:`LagReader` asks the broker (one admin client, reused) for a group's committed offsets
  (OffsetFetch), the log-start and log-end offsets (ListOffsets) and its members: the same
  numbers ``kafka-consumer-groups.sh --describe`` prints.
- :class:`CommitLog` tails ``__consumer_offsets`` (the log the group coordinator writes every
  offset commit to, with its timestamp) for a few groups, the way Burrow observes commits: it
  tells a consumer that re-commits the same offset (stalled) from one that commits nothing
  (stopped), which periodic OffsetFetch readings cannot.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer
from kafka.admin import OffsetSpec
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from stream.config import KafkaConfig
from stream.connect import kafka_admin, kafka_consumer

log = logging.getLogger(__name__)

OFFSETS_TOPIC = "__consumer_offsets"
_METADATA_TTL_S = 30.0  # partitions of a topic are re-read this often (they may be added)


@dataclass(frozen=True)
class PartitionLag:
    """One partition of one group: committed offset, log start and end, lag."""

    group: str
    topic: str
    partition: int
    committed: int | None  # None: the group never committed on this partition
    log_end: int
    log_start: int = 0

    @property
    def lag(self) -> int:
        """Messages not yet covered by the group's commit; a never-committed partition is behind
        by its whole retained log (what a consumer starting at the earliest offset must read)."""
        base = self.log_start if self.committed is None else self.committed
        return max(0, self.log_end - base)


@dataclass(frozen=True)
class GroupState:
    """The coordinator's view of a group: its state (Stable, Empty, ...) and member count."""

    group: str
    state: str
    members: int


class LagReader:
    """Reads group lag from the broker with one admin client (close it, or use ``with``).

    Args:
        kafka: how to reach Kafka.
        admin: an admin client to use (not closed by :meth:`close`); by default one is made.
    """

    def __init__(self, kafka: KafkaConfig, *, admin: KafkaAdminClient | None = None) -> None:
        self._own_admin = admin is None
        self.admin = admin or kafka_admin(
            kafka, client_id="fmstream-lag", request_timeout_ms=10_000,
            bootstrap_timeout_ms=10_000,
        )
        self._partitions: dict[str, tuple[float, list[int]]] = {}

    def __enter__(self) -> LagReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own_admin:
            self.admin.close()

    def partitions(self, topics: Iterable[str]) -> list[TopicPartition]:
        """Every partition of ``topics`` (missing topics have none), metadata cached briefly."""
        names = list(dict.fromkeys(topics))
        now = time.monotonic()
        stale = [t for t in names
                 if t not in self._partitions or now - self._partitions[t][0] > _METADATA_TTL_S]
        if stale:
            for meta in self.admin.describe_topics(stale):
                parts = sorted(p["partition_index"] for p in meta.get("partitions") or ())
                self._partitions[meta["name"]] = (now, parts)
        return [TopicPartition(t, p) for t in names for p in self._partitions.get(t, (0.0, []))[1]]

    def read(self, groups: Mapping[str, Sequence[str]]) -> list[PartitionLag]:
        """Per-partition lag of each ``group -> topics`` (every partition, committed or not)."""
        committed = self._committed(list(groups))
        tps = self.partitions(t for topics in groups.values() for t in topics)
        ends = self.admin.list_partition_offsets({tp: OffsetSpec.LATEST for tp in tps}) \
            if tps else {}
        starts = self.admin.list_partition_offsets({tp: OffsetSpec.EARLIEST for tp in tps}) \
            if tps else {}
        out = []
        for group, topics in groups.items():
            offsets = committed.get(group, {})
            for tp in self.partitions(topics):
                meta = offsets.get(tp)
                done = meta.offset if meta is not None and meta.offset >= 0 else None
                out.append(PartitionLag(group, tp.topic, tp.partition, done,
                                        ends[tp].offset, starts[tp].offset))
        return out

    def _committed(self, groups: list[str], wait_s: float = 15.0) -> dict:
        """Committed offsets; a fresh broker creates its offsets topic first, so wait for it."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self.admin.list_group_offsets({g: None for g in groups})
            except KafkaError as exc:
                if not getattr(exc, "retriable", False) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def group_states(self, groups: Sequence[str]) -> dict[str, GroupState]:
        """State and member count of each group (``Dead`` for a group the broker does not know)."""
        described = self.admin.describe_groups(list(groups))
        return {
            g: GroupState(g, str(d.get("group_state") or "Dead"), len(d.get("members") or ()))
            for g, d in described.items()
        }


def group_lag(
    kafka: KafkaConfig, group: str, topics: list[str], *, admin: KafkaAdminClient | None = None
) -> list[PartitionLag]:
    """Per-partition lag of ``group`` over ``topics`` (every partition, committed or not)."""
    with LagReader(kafka, admin=admin) as reader:
        return reader.read({group: topics})


# --- the commit log -------------------------------------------------------------------------


@dataclass(frozen=True)
class ObservedCommit:
    """One offset commit read from ``__consumer_offsets``."""

    group: str
    topic: str
    partition: int
    offset: int
    ts: float  # epoch seconds the coordinator stamped the commit with


def java_string_hash(text: str) -> int:
    """Java's ``String.hashCode`` (signed 32 bits over UTF-16 code units)."""
    units = text.encode("utf-16-be")
    h = 0
    for (unit,) in struct.iter_unpack(">H", units):
        h = (31 * h + unit) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def offsets_partition(group: str, partitions: int) -> int:
    """The ``__consumer_offsets`` partition a group's commits go to (Kafka's group placement)."""
    h = java_string_hash(group)
    return (0 if h == -(1 << 31) else abs(h)) % partitions


def _string(buf: bytes, pos: int) -> tuple[str | None, int]:
    (n,) = struct.unpack_from(">h", buf, pos)
    pos += 2
    if n < 0:
        return None, pos
    return buf[pos:pos + n].decode("utf-8", "replace"), pos + n


def _uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def parse_offset_commit(
    key: bytes | None, value: bytes | None
) -> tuple[str, str, int, int, float] | None:
    """Decode one ``__consumer_offsets`` record.

    Key: int16 record type (0 and 1 are offset commits), then group, topic (int16-length strings)
    and int32 partition. Value: int16 version; v0-v3 are fixed (``offset``, ``leaderEpoch`` from
    v3, int16-length ``metadata``, ``commitTimestamp``); v4+ is flexible (compact string).

    Returns:
        ``(group, topic, partition, offset, commit epoch seconds)``; None for a record that is
        not an offset commit (group metadata, ...), a deletion (null value), or undecodable.
    """
    if not key or value is None or len(key) < 2:
        return None
    try:
        (kind,) = struct.unpack_from(">h", key, 0)
        if kind not in (0, 1):
            return None
        group, pos = _string(key, 2)
        topic, pos = _string(key, pos)
        (partition,) = struct.unpack_from(">i", key, pos)
        (version,) = struct.unpack_from(">h", value, 0)
        (offset,) = struct.unpack_from(">q", value, 2)
        pos = 10
        if version >= 3:
            pos += 4  # leader epoch
        if version >= 4:
            n, pos = _uvarint(value, pos)
            pos += max(0, n - 1)
        else:
            (n,) = struct.unpack_from(">h", value, pos)
            pos += 2 + max(0, n)
        (commit_ms,) = struct.unpack_from(">q", value, pos)
    except (struct.error, IndexError):
        return None
    if group is None or topic is None:
        return None
    return group, topic, partition, offset, commit_ms / 1000.0


class CommitLog:
    """Tails the groups' partitions of ``__consumer_offsets`` from now on.

    :meth:`poll` returns the commits made since :meth:`start` (in log order per group). When the
    log cannot be read (no permission, a broker that hides it), ``available`` turns False and
    callers fall back to periodic readings.
    """

    def __init__(self, kafka: KafkaConfig, groups: Iterable[str]) -> None:
        self.kafka = kafka
        self.groups = set(groups)
        self.available = True
        self._consumer: KafkaConsumer | None = None
        self._assigned: list[TopicPartition] = []

    def start(self) -> CommitLog:
        """Position at the end of the log: commits made after this call are observed."""
        try:
            self._consumer = kafka_consumer(
                self.kafka, group_id=None, enable_auto_commit=False,
                exclude_internal_topics=False, client_id="fmstream-commit-log",
                fetch_max_wait_ms=100,
            )
            self._assign(from_beginning=False)
        except KafkaError as exc:
            log.warning("cannot read %s (%s): health falls back to periodic readings",
                        OFFSETS_TOPIC, exc)
            self.available = False
        return self

    def _assign(self, *, from_beginning: bool) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        parts = consumer.partitions_for_topic(OFFSETS_TOPIC)
        if not parts:
            return  # created by the first commit of any group; looked for again on poll
        n = len(parts)
        self._assigned = sorted({TopicPartition(OFFSETS_TOPIC, offsets_partition(g, n))
                                 for g in self.groups})
        consumer.assign(self._assigned)
        if from_beginning:
            consumer.seek_to_beginning(*self._assigned)
        else:
            consumer.seek_to_end(*self._assigned)
        for tp in self._assigned:
            consumer.position(tp)  # resolve "end" now, not at the first fetch

    def poll(self, timeout_s: float = 0.0) -> list[ObservedCommit]:
        """Commits of the watched groups that arrived since the last poll."""
        if not self.available or self._consumer is None:
            return []
        try:
            if not self._assigned:
                # The topic appeared after start(): everything in it is new.
                self._consumer.poll(timeout_ms=0)
                self._assign(from_beginning=True)
                if not self._assigned:
                    return []
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000))
        except KafkaError as exc:
            log.warning("reading %s failed (%s): health falls back to periodic readings",
                        OFFSETS_TOPIC, exc)
            self.available = False
            return []
        out = []
        for tp in self._assigned:
            for record in batches.get(tp, ()):
                parsed = parse_offset_commit(record.key, record.value)
                if parsed is not None and parsed[0] in self.groups:
                    out.append(ObservedCommit(*parsed))
        return out

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None


__all__ = [
    "CommitLog", "GroupState", "LagReader", "ObservedCommit", "OFFSETS_TOPIC", "PartitionLag",
    "group_lag", "java_string_hash", "offsets_partition", "parse_offset_commit",
]
