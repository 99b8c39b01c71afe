"""The trainer's Prometheus metrics (``/metrics`` on ``FMSTREAM_TRAINER_METRICS_PORT``, bound to
``FMSTREAM_METRICS_HOST``).

Consumer lag carries the names that Kafka-exporter dashboards already query
(``kafka_consumergroup_lag{consumergroup,topic,partition}``, see :mod:`stream.metrics`); every
other metric starts ``fmstream_``. The metrics observe the trainer and the publisher only
through their ``stats()`` snapshots (:class:`~train.loop.TrainerStats`,
:class:`~train.publisher.PublishStats`).

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
fmstream_live_hit_rate               gauge     test-then-train HR@10 of sampled incoming
                                               positives, by ``k`` and ``cohort`` (warm, cold;
                                               NaN before the first sample; model/live.py)
fmstream_live_hit_rate_samples       gauge     sampled positives behind that rate, by
                                               ``cohort`` (at most its window, 2,000)
fmstream_dead_letters_waiting        gauge     dead letters the dead-letter topic has not
                                               acknowledged for good (an ACL denies Write, the
                                               topic is missing): the intake waits for them
fmstream_dead_letter_topic_blocked_seconds gauge since the dead-letter topic took none of
                                               them (0 while letters go through)
==================================== ========= ==============================================
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stream.config import KafkaConfig, MetricsEndpoint
from stream.metrics import serve_process_metrics

if TYPE_CHECKING:
    from train.loop import Trainer, TrainerStats
    from train.publisher import PublishStats

BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds; a trainer batch is up to ``max_poll_records`` events plus negatives."""


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
        self.live_hit_rate = Gauge("fmstream_live_hit_rate",
                                   "Share of sampled incoming positives whose item was in the "
                                   "user's top-k before the model learned them",
                                   ["k", "cohort"], registry=registry)
        self.live_samples = Gauge("fmstream_live_hit_rate_samples",
                                  "Sampled positives behind fmstream_live_hit_rate (its window: "
                                  "a rate over few samples is noise)", ["cohort"],
                                  registry=registry)
        self.dead_letters_waiting = Gauge(
            "fmstream_dead_letters_waiting",
            "Dead letters the dead-letter topic has not acknowledged (the trainer's intake "
            "waits for them; 0 while letters go through)", registry=registry)
        self.dead_letter_blocked = Gauge(
            "fmstream_dead_letter_topic_blocked_seconds",
            "Seconds since the dead-letter topic last took the letters waiting (0 while they "
            "go through): grant Write on it, or create it", registry=registry)
        self._dead_seen = 0
        self._applied_seen = 0

    def bind(
        self,
        trainer_stats: Callable[[], TrainerStats],
        publish_stats: Callable[[], PublishStats],
    ) -> TrainerMetrics:
        """Read the gauges from ``trainer_stats()`` and ``publish_stats()`` at scrape time."""

        def event_lag() -> float:
            newest = trainer_stats().newest_event_ts
            return math.nan if newest is None else time.time() - newest

        def publish_age(attr: str) -> Callable[[], float]:
            def age() -> float:
                at = getattr(publish_stats().times, attr)
                return math.nan if not at else time.time() - at

            return age

        self.event_time_lag.set_function(event_lag)
        self.checkpoint_age.set_function(lambda: trainer_stats().checkpoint_age_s)
        for what in ("users", "items", "i2i"):
            self.publish_age.labels(what).set_function(publish_age(what))
        self.model_version.set_function(lambda: float(publish_stats().version))
        for cohort in ("warm", "cold"):
            self.live_hit_rate.labels("10", cohort).set_function(
                lambda c=cohort: trainer_stats().live_hit_rate.get(c, math.nan)
            )
            self.live_samples.labels(cohort).set_function(
                lambda c=cohort: float(trainer_stats().live_samples.get(c, 0))
            )
        self.dead_letters_waiting.set_function(
            lambda: float(trainer_stats().dead_letters_waiting))
        self.dead_letter_blocked.set_function(lambda: trainer_stats().dead_letters_blocked_s)
        stats = trainer_stats()
        self._dead_seen = stats.dead_letters
        self._applied_seen = stats.events_applied
        return self

    def batch_applied(
        self, per_topic: Mapping[str, int], seconds: float, stats: TrainerStats
    ) -> None:
        """Record one applied poll (its records by topic; the trainer calls this after applying
        it)."""
        self.batch_seconds.observe(seconds)
        for topic, n in per_topic.items():
            self.records.labels(topic).inc(n)
        self.events.inc(max(0, stats.events_applied - self._applied_seen))
        self._applied_seen = stats.events_applied
        self.dead_letters.inc(max(0, stats.dead_letters - self._dead_seen))
        self._dead_seen = stats.dead_letters


@contextmanager
def serve_trainer_metrics(
    endpoint: MetricsEndpoint,
    kafka: KafkaConfig,
    trainer: Trainer,
    publish_stats: Callable[[], PublishStats],
) -> Iterator[TrainerMetrics | None]:
    """Export the trainer's metrics and its group's lag on ``endpoint`` while the block runs.

    Does nothing (yields None) when ``endpoint.port`` is 0.
    """
    def attach(metrics: TrainerMetrics | None) -> None:
        trainer.metrics = metrics

    with serve_process_metrics(endpoint, kafka, trainer.config.group, list(trainer.topics),
                               lambda registry: TrainerMetrics(registry).bind(
                                   trainer.stats, publish_stats),
                               attach) as metrics:
        yield metrics


__all__ = ["BATCH_BUCKETS", "TrainerMetrics", "serve_trainer_metrics"]
