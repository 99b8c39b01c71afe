"""Narrow configs of the trainer process, built from ``Settings`` by ``fmstream/``.

Nothing in ``train/`` reads the settings or the environment itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from model.learner import LearnPolicy
from stream.config import KafkaConfig, Topics
from train.errors import TrainConfigError


@dataclass(frozen=True)
class TrainerConfig:
    """What the training loop needs.

    Attributes:
        kafka: how to reach the brokers.
        topics: the contract's topic names (the trainer reads users, items, events; writes dlq).
        group: the consumer group its positions are committed under (for lag monitoring).
        checkpoint_dir: where checkpoints (model + Kafka positions) are written.
        checkpoint_every_events: checkpoint after this many records...
        checkpoint_every_s: ...or this many seconds, whichever comes first.
        max_poll_records: records per poll.
        max_message_bytes: larger messages are dead-lettered.
        check_crcs: verify the CRC32C of fetched record batches.
        fast_records: parse fetched records with :mod:`stream.record_parse` (the same records
            as kafka-python's own parser, less CPU).
        policy: how polls become optimiser steps (model/learner.py); checkpointed with its
            replay state.
        live_sample_every: at most every n-th positive is scored before it is learned (live
            HR@10); a sampled poll gives up to 64 of its positives, spread evenly.
        live_cpu_share: most of the trainer thread's CPU the live HR@10 may take: a poll is
            sampled only while the metric's CPU so far is within this share of the training
            CPU so far (1 = every poll; a budget left unspent carries over to later polls).
        fetch_process: poll and decode in a child process (its own core, not the trainer's
            GIL; :mod:`train.fetch_process`) instead of a thread.
        fetch_depth: decoded polls kept ready ahead of the model update.
        checkpoint_background: periodic checkpoints are written by a forked child
            (:mod:`train.checkpointer`) so the trainer thread is not stopped by them; the final
            one is always written in the trainer thread.
    """

    kafka: KafkaConfig
    checkpoint_dir: Path
    topics: Topics = field(default_factory=Topics)
    group: str = "fmstream-trainer"
    checkpoint_every_events: int = 1_000_000
    checkpoint_every_s: float = 10.0
    max_poll_records: int = 8192
    max_message_bytes: int = 65536
    check_crcs: bool = True
    fast_records: bool = True
    policy: LearnPolicy = field(default_factory=LearnPolicy)
    live_sample_every: int = 1
    live_cpu_share: float = 0.03
    fetch_process: bool = False
    fetch_depth: int = 2
    checkpoint_background: bool = True

    def __post_init__(self) -> None:
        if self.fetch_depth < 1:
            raise TrainConfigError(
                f"fetch_depth: decoded polls kept ready must be >= 1, got {self.fetch_depth}: "
                "set FMSTREAM_TRAINER_FETCH_DEPTH to 1 or more"
            )


@dataclass(frozen=True)
class PublishConfig:
    """Cadences and sizes of what the publisher writes to Redis (seconds unless named)."""

    publish_active_s: float = 0.1
    publish_all_s: float = 60.0
    publish_items_s: float = 0.5
    publish_shared_s: float = 0.1  # shared-rows versions between item versions (0: none)
    offline_i2i_s: float = 60.0
    offline_i2i_k: int = 20
    history_len: int = 50
    # deltas: see train/deltas.py and the settings of the same names
    full_snapshot_s: float = 600.0
    full_after_rows: float = 10.0
    full_after_bytes: float = 2.0
    keep_deltas: int = 600
    offline_i2i_per_tick: int = 128
    lost_check_s: float = 0.5
    item_tolerance: float = 0.0
    item_max_age_s: float = 5.0
    item_delta_form: str = "parts"
