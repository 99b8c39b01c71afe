"""Prometheus plumbing shared by every process: the consumer-group lag collector, the registry,
and the /metrics server. (The trainer's own metrics are :mod:`train.metrics`, a worker's
:mod:`serving.metrics`.)

Every process builds its own ``CollectorRegistry`` (a trainer and workers may share a process in
tests, and each must report only itself). Consumer lag carries the names that Kafka-exporter
dashboards already query (``kafka_consumergroup_lag{consumergroup,topic,partition}`` and
``kafka_consumergroup_lag_sum{consumergroup,topic}``); every other metric starts ``fmstream_``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from stream.config import KafkaConfig, MetricsEndpoint
from stream.lag import LagReader, PartitionLag

log = logging.getLogger(__name__)

LAG_REFRESH_S = 5.0
"""How often a process re-reads its group's committed offsets and log ends (kafka_exporter-like)."""


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
        kafka: how to reach Kafka.
        group: the consumer group.
        topics: the topics the group consumes.
        interval_s: seconds between refreshes (default :data:`LAG_REFRESH_S`).
    """

    def __init__(
        self, kafka: KafkaConfig, group: str, topics: Sequence[str], *,
        interval_s: float | None = None,
    ) -> None:
        self.kafka = kafka
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
                self._reader = LagReader(self.kafka)
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
def serve_http(registry: CollectorRegistry, endpoint: MetricsEndpoint) -> Iterator[int]:
    """Serve ``registry`` on ``http://host:port/metrics`` until the block exits; yields the port
    (the one the system picked when ``endpoint.port`` is 0)."""
    server, thread = start_http_server(endpoint.port, addr=endpoint.host, registry=registry)
    log.info("Prometheus metrics on http://%s:%d/metrics", endpoint.host, server.server_port)
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


M = TypeVar("M")


@contextmanager
def serve_process_metrics(
    endpoint: MetricsEndpoint,
    kafka: KafkaConfig,
    group: str,
    topics: Sequence[str],
    build: Callable[[CollectorRegistry], M],
    attach: Callable[[M | None], None],
) -> Iterator[M | None]:
    """Export a process's metrics and its group's lag on ``endpoint`` while the block runs.

    ``build`` makes the process's metrics on a fresh registry (:func:`new_registry`); ``attach``
    hands them to the process once the server is up, and ``None`` when the block exits. Does
    nothing (yields None, attaches nothing) when ``endpoint.port`` is 0.
    """
    if not endpoint.port:
        yield None
        return
    registry = new_registry()
    metrics = build(registry)
    lag = GroupLagCollector(kafka, group, list(topics))
    registry.register(lag)
    with running(lag), serve_http(registry, endpoint):
        attach(metrics)
        try:
            yield metrics
        finally:
            attach(None)


__all__ = [
    "GroupLagCollector", "LAG_REFRESH_S", "new_registry", "running", "serve_http",
    "serve_process_metrics",
]
