"""Prometheus metrics of the trainer, the consumer-group lag collector, and the /metrics server.

Every process builds its own ``CollectorRegistry`` (a trainer and workers may share a process in
tests, and each must report only itself). Consumer lag carries the names that Kafka-exporter
dashboards already query (``kafka_consumergroup_lag{consumergroup,topic,partition}`` and
``kafka_consumergroup_lag_sum{consumergroup,topic}``); every other metric starts ``fmstream_``.

Trainer metrics (``/metrics`` on ``FMSTREAM_TRAINER_METRICS_PORT``):

==================================== ========= ==============================================
name                                 type      meaning
==================================== ========= ==============================================
fmstream_trainer_batch_seconds       histogram decode + model update + publish hooks of a poll
fmstream_trainer_records_total       counter   records consumed, by ``topic``
fmstream_trainer_events_applied_total counter  events the model learned from
fmstream_dead_letters_total          counter   messages sent to the dead-letter topic
fmstream_event_time_lag_seconds      gauge     now - event time of the newest applied event
fmstream_checkpoint_age_seconds      gauge     since the last checkpoint (or the start)
fmstream_publish_age_seconds         gauge     since the last publish, by ``what`` (users,
                                               items, i2i); NaN before the first
fmstream_model_version               gauge     the item snapshot version last published
==================================== ========= ==============================================
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fmstream.settings import Settings
from stream.lag import LagReader, PartitionLag

if TYPE_CHECKING:
    from kafka.consumer.fetcher import ConsumerRecord

    from serving.publisher import Publisher
    from stream.trainer import Trainer

log = logging.getLogger(__name__)

LAG_REFRESH_S = 5.0
"""How often a process re-reads its group's committed offsets and log ends (kafka_exporter-like)."""
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds; a trainer batch is up to ``max_poll_records`` events plus negatives."""


def new_registry() -> CollectorRegistry:
    """A registry with the process (CPU, memory, fds) and platform collectors."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class GroupLagCollector(Collector):
    """``kafka_consumergroup_*`` for one group, refreshed by a background thread.

    A scrape never waits for Kafka: it reports the last refresh (its age is
    ``fmstream_lag_refresh_age_seconds``). A partition the group never committed on reports lag
    ``-1`` and stays out of the sum, as kafka_exporter does (Kafka's own tool prints ``-``).

    Args:
        bootstrap: Kafka bootstrap servers.
        group: the consumer group.
        topics: the topics the group consumes.
        interval_s: seconds between refreshes (default :data:`LAG_REFRESH_S`).
    """

    def __init__(
        self, bootstrap: str, group: str, topics: Sequence[str], *,
        interval_s: float | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.group = group
        self.topics = list(topics)
        self.interval_s = LAG_REFRESH_S if interval_s is None else interval_s
        self.partitions: list[PartitionLag] = []
        self.refreshed_at: float | None = None
        self.errors = 0
        self._reader: LagReader | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> list[PartitionLag]:
        """Read the group's lag now (reconnecting after an error) and keep it for scrapes."""
        try:
            if self._reader is None:
                self._reader = LagReader(self.bootstrap)
            parts = self._reader.read({self.group: self.topics})
        except Exception:
            self.errors += 1
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            raise
        self.partitions = parts
        self.refreshed_at = time.time()
        return parts

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - Kafka down: keep the old values, retry
                log.warning("lag refresh of group %s failed: %s", self.group, exc)
            self._stop.wait(self.interval_s)

    def start(self) -> GroupLagCollector:
        """Refresh every ``interval_s`` in a daemon thread until :meth:`stop`."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"fmstream-lag-{self.group}")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        cg = ["consumergroup", "topic", "partition"]
        lag = GaugeMetricFamily("kafka_consumergroup_lag",
                                "Lag of a consumer group at topic/partition (-1: never committed)",
                                labels=cg)
        lag_sum = GaugeMetricFamily("kafka_consumergroup_lag_sum",
                                    "Lag of a consumer group at a topic, all partitions",
                                    labels=["consumergroup", "topic"])
        current = GaugeMetricFamily("kafka_consumergroup_current_offset",
                                    "Committed offset of a consumer group at topic/partition",
                                    labels=cg)
        log_end = GaugeMetricFamily("kafka_topic_partition_current_offset",
                                    "Log-end offset of a topic/partition",
                                    labels=["topic", "partition"])
        sums: dict[str, int] = {}
        for p in self.partitions:
            labels = [self.group, p.topic, str(p.partition)]
            log_end.add_metric([p.topic, str(p.partition)], p.log_end)
            sums.setdefault(p.topic, 0)
            if p.committed is None:
                lag.add_metric(labels, -1)
                continue
            lag.add_metric(labels, p.lag)
            current.add_metric(labels, p.committed)
            sums[p.topic] += p.lag
        for topic, total in sums.items():
            lag_sum.add_metric([self.group, topic], total)
        age = GaugeMetricFamily("fmstream_lag_refresh_age_seconds",
                                "Seconds since the consumer-lag values were read from Kafka")
        at = self.refreshed_at
        age.add_metric([], math.nan if at is None else time.time() - at)
        yield from (lag, lag_sum, current, log_end, age)


@contextmanager
def serve_http(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> Iterator[int]:
    """Serve ``registry`` on ``http://addr:port/metrics`` until the block exits; yields the port."""
    server, thread = start_http_server(port, addr=addr, registry=registry)
    log.info("Prometheus metrics on http://%s:%d/metrics", addr, server.server_port)
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def running(collector: GroupLagCollector) -> Iterator[GroupLagCollector]:
    """Run a lag collector's refresh thread for the duration of the block."""
    collector.start()
    try:
        yield collector
    finally:
        collector.stop()


class TrainerMetrics:
    """The trainer's metrics in ``registry`` (see the module docstring for the list)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.batch_seconds = Histogram(
            "fmstream_trainer_batch_seconds",
            "Seconds to decode and apply one polled batch (model update, publish hooks)",
            buckets=BATCH_BUCKETS, registry=registry)
        self.records = Counter("fmstream_trainer_records",
                               "Records consumed by the trainer, by topic", ["topic"],
                               registry=registry)
        self.events = Counter("fmstream_trainer_events_applied",
                              "Events the model learned from", registry=registry)
        self.dead_letters = Counter("fmstream_dead_letters",
                                    "Messages sent to the dead-letter topic", registry=registry)
        self.event_time_lag = Gauge(
            "fmstream_event_time_lag_seconds",
            "Now minus the event time of the newest applied event (NaN before the first)",
            registry=registry)
        self.checkpoint_age = Gauge("fmstream_checkpoint_age_seconds",
                                    "Seconds since the trainer's last checkpoint (or its start)",
                                    registry=registry)
        self.publish_age = Gauge("fmstream_publish_age_seconds",
                                 "Seconds since the last publish of users, items or i2i "
                                 "(NaN before the first)", ["what"], registry=registry)
        self.model_version = Gauge("fmstream_model_version",
                                   "Item snapshot version last published (trainer) or served "
                                   "(worker)", registry=registry)
        self._dead_seen = 0
        self._applied_seen = 0

    def bind(self, trainer: Trainer, publisher: Publisher) -> TrainerMetrics:
        """Read the gauges from the live trainer and publisher at scrape time."""
        def event_lag() -> float:
            newest = trainer.progress.newest_event_ts
            return math.nan if newest is None else time.time() - newest

        def publish_age(attr: str):
            return lambda: (math.nan if not getattr(publisher.times, attr)
                            else time.time() - getattr(publisher.times, attr))

        self.event_time_lag.set_function(event_lag)
        # _last_checkpoint is the trainer's own monotonic clock of its last checkpoint.
        self.checkpoint_age.set_function(
            lambda: time.monotonic() - trainer._last_checkpoint)  # noqa: SLF001
        for what, attr in (("users", "users"), ("items", "items"), ("i2i", "i2i")):
            self.publish_age.labels(what).set_function(publish_age(attr))
        self.model_version.set_function(lambda: float(publisher.version))
        self._dead_seen = trainer.dead_letters.count
        self._applied_seen = trainer.progress.events_applied
        return self

    def batch_applied(self, trainer: Trainer, records: Sequence[ConsumerRecord],
                      seconds: float) -> None:
        """Record one applied poll (called by the trainer after ``apply_records``)."""
        self.batch_seconds.observe(seconds)
        per_topic: dict[str, int] = {}
        for r in records:
            per_topic[r.topic] = per_topic.get(r.topic, 0) + 1
        for topic, n in per_topic.items():
            self.records.labels(topic).inc(n)
        applied = trainer.progress.events_applied
        self.events.inc(max(0, applied - self._applied_seen))
        self._applied_seen = applied
        dead = trainer.dead_letters.count
        self.dead_letters.inc(max(0, dead - self._dead_seen))
        self._dead_seen = dead


@contextmanager
def serve_trainer_metrics(
    settings: Settings, trainer: Trainer, publisher: Publisher
) -> Iterator[TrainerMetrics | None]:
    """Export the trainer's metrics and its group's lag while the block runs.

    Does nothing (yields None) when ``settings.trainer_metrics_port`` is 0.
    """
    if not settings.trainer_metrics_port:
        yield None
        return
    registry = new_registry()
    metrics = TrainerMetrics(registry).bind(trainer, publisher)
    lag = GroupLagCollector(settings.kafka_bootstrap, settings.trainer_group,
                            [settings.topic_events, settings.topic_users, settings.topic_items])
    registry.register(lag)
    with running(lag), serve_http(registry, settings.trainer_metrics_port):
        trainer.metrics = metrics
        try:
            yield metrics
        finally:
            trainer.metrics = None


__all__ = [
    "GroupLagCollector", "LAG_REFRESH_S", "TrainerMetrics", "new_registry", "running",
    "serve_http", "serve_trainer_metrics",
]
