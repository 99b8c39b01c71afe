"""Prometheus metrics of a serving worker (``/metrics`` on ``FMSTREAM_WORKER_METRICS_PORT``,
bound to ``FMSTREAM_METRICS_HOST``).

==================================== ========= ==============================================
name                                 type      meaning
==================================== ========= ==============================================
fmstream_request_seconds             histogram from a request's Kafka timestamp to its reply
                                               acknowledged (queueing included)
fmstream_worker_batch_seconds        histogram answer + reply + commit of one polled batch
fmstream_requests_total              counter   request records consumed
fmstream_request_errors_total        counter   error responses, by ``code``
fmstream_dead_letters_total          counter   request records dead-lettered (no request id)
fmstream_model_version               gauge     item snapshot version this worker serves
fmstream_index_age_seconds           gauge     now - creation time of the served snapshot
fmstream_index_swaps_total           counter   snapshots swapped in
fmstream_worker_group_member         gauge     1 while a stable member of the serving group with
                                               its partitions positioned, else 0
fmstream_worker_out_of_group_seconds gauge     seconds since it last was one (0 while it is)
fmstream_worker_consumer_renewals_total counter Kafka consumers the watchdog replaced (not a
                                               member for ``FMSTREAM_WORKER_WATCHDOG_S``)
==================================== ========= ==============================================

plus ``kafka_consumergroup_lag`` / ``kafka_consumergroup_lag_sum`` of the serving group (every
worker reports the whole group: aggregate with ``max by (consumergroup, topic, partition)``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from stream.config import KafkaConfig, MetricsEndpoint
from stream.metrics import serve_process_metrics

if TYPE_CHECKING:
    from serving.worker import Pending, Worker
    from stream.fetcher import ConsumerRecord

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds; the target is a few milliseconds per request."""


class _WorkerState(Collector):
    """What the worker serves, read at scrape time."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = self.worker.state
        version = GaugeMetricFamily("fmstream_model_version",
                                    "Item snapshot version this worker serves (NaN: none yet)")
        version.add_metric([], math.nan if state is None else state.version)
        age = GaugeMetricFamily("fmstream_index_age_seconds",
                                "Seconds since the served item snapshot was created")
        age.add_metric([], math.nan if state is None
                       else time.time() - state.loaded.snapshot.created_at)
        swaps = CounterMetricFamily("fmstream_index_swaps", "Item snapshots swapped in")
        swaps.add_metric([], self.worker.swaps)
        group = self.worker.group_report()
        member = GaugeMetricFamily("fmstream_worker_group_member",
                                   "1 while a stable member of the serving group with its "
                                   "partitions positioned, else 0")
        member.add_metric([], 1.0 if group["member"] else 0.0)
        out = GaugeMetricFamily("fmstream_worker_out_of_group_seconds",
                                "Seconds since this worker was last a stable group member")
        out.add_metric([], float(group["out_s"]))
        renewals = CounterMetricFamily("fmstream_worker_consumer_renewals",
                                       "Kafka consumers the watchdog replaced")
        renewals.add_metric([], float(group["renewals"]))
        yield from (version, age, swaps, member, out, renewals)


class WorkerMetrics:
    """A worker's metrics in ``registry`` (see the module docstring for the list)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.request_seconds = Histogram(
            "fmstream_request_seconds",
            "Seconds from a request's Kafka timestamp to its reply acknowledged",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_seconds = Histogram(
            "fmstream_worker_batch_seconds",
            "Seconds to answer, reply to and commit one polled batch of requests",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.requests = Counter("fmstream_requests", "Request records consumed",
                                registry=registry)
        self.errors = Counter("fmstream_request_errors", "Error responses, by code", ["code"],
                              registry=registry)
        self.dead_letters = Counter("fmstream_dead_letters",
                                    "Request records sent to the dead-letter topic",
                                    registry=registry)
        self._dead_seen = 0

    def bind(self, worker: Worker) -> WorkerMetrics:
        """Export the served version, index age and swaps of ``worker`` at scrape time."""
        self.registry.register(_WorkerState(worker))
        return self

    def batch_answered(
        self,
        records: Sequence[ConsumerRecord],
        pendings: Sequence[Pending],
        dead_letters: int,
        seconds: float,
    ) -> None:
        """Record one answered poll (called by the worker after the commit).

        Args:
            records: the polled request records.
            pendings: their responses (dead-lettered records have none).
            dead_letters: the worker's dead-letter count so far.
            seconds: time spent answering, replying and committing.
        """
        done = time.time()
        self.batch_seconds.observe(seconds)
        self.requests.inc(len(records))
        for r in records:
            if r.timestamp is not None and r.timestamp > 0:
                self.request_seconds.observe(max(0.0, done - r.timestamp / 1000.0))
        for p in pendings:
            if p.error is not None:
                self.errors.labels(p.error.code).inc()
        self.dead_letters.inc(max(0, dead_letters - self._dead_seen))
        self._dead_seen = dead_letters


@contextmanager
def serve_worker_metrics(
    endpoint: MetricsEndpoint, kafka: KafkaConfig, group: str, requests_topic: str,
    worker: Worker,
) -> Iterator[WorkerMetrics | None]:
    """Export the worker's metrics and its group's lag on ``endpoint`` while the block runs.

    Does nothing (yields None) when ``endpoint.port`` is 0.
    """
    def attach(metrics: WorkerMetrics | None) -> None:
        worker.metrics = metrics

    with serve_process_metrics(endpoint, kafka, group, [requests_topic],
                               lambda registry: WorkerMetrics(registry).bind(worker),
                               attach) as metrics:
        yield metrics


__all__ = ["LATENCY_BUCKETS", "WorkerMetrics", "serve_worker_metrics"]
