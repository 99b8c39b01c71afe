"""The training loop: Kafka events and profiles in, one FM updated exactly once per valid event.

Guarantees (see README "Trainer guarantees"):
- A fetch thread (:mod:`train.fetch`) polls and decodes while the model learns from the previous
  batch; every consumer call is made by that thread. Each poll is decoded as a batch; unusable
  messages go to the dead-letter topic (acknowledged before any checkpoint covers their offsets)
  and the valid ones around them are applied. A message the model rejects (stage ``apply``) is
  isolated by bisecting its batch.
- Publishing runs in its own thread (:mod:`train.publish_thread`): the loop only hands over what
  changed, so a slow Redis never stalls training. The publisher reads the model under
  :attr:`Trainer.model_lock`, which the loop holds while it changes the model and hands to a
  waiting publisher between two optimiser steps of a poll (:mod:`train.model_lock`).
- Kafka positions live inside the model checkpoint. On start the newest valid checkpoint is
  restored and every partition is sought to its stored position, so an event is applied once
  even across kill -9. Group commits follow checkpoints (for lag monitoring) and never lead them.
  Periodic checkpoints are written by a forked child (:mod:`train.checkpointer`); the loop
  installs its file and only then commits and reports that snapshot's positions.
- One trainer per model holds the Redis lease (:mod:`train.resilience` has the rules for Redis
  outages). Because only the lease holder consumes, the trainer assigns itself every partition of
  its topics instead of joining a group rebalance: a restart after kill -9 resumes at once instead
  of waiting out the dead member's session. The group id names the committed offsets that
  ``fmstream lag`` reads.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from model.checkpoint import (
    checkpoint_files,
    install_pending,
    load_checkpoint,
    remove_stale_pending,
    save_checkpoint,
)
from model.errors import CheckpointError, ModelError
from model.learner import Learner
from model.live import LiveHitRate
from model.online import OnlineFM
from stream.consume import Decoded, dead_letter_id, make_consumer
from stream.fetcher import ConsumerRecord
from stream.record_parse import use_fast_records
from stream.schemas import MAX_EVENT_AHEAD_S, EventColumns, ItemTombstone, UserTombstone
from train.align import EventAligner
from train.checkpointer import BackgroundCheckpoint, ChildResult
from train.config import TrainerConfig
from train.errors import TrainConfigError
from train.fetch import (
    DecodedBatch,
    Fetcher,
    decode_poll,
    grow_assignment,
    parse_tp_key,
    partition_counts,
    seek_to_positions,
    tp_key,
)
from train.fetch_process import FetchProcess, FetchSpec
from train.model_lock import ModelLock
from train.publish_thread import PublisherThread
from train.resilience import DeadLetterBlock, DeadLetterOutbox, GuardedSink, LeaseKeeper

log = logging.getLogger(__name__)

ASSIGNMENT_REFRESH_S = 30.0
"""How often the trainer looks for partitions added to its topics."""
CHECKPOINTS_KEPT = 3
"""Checkpoint files kept (a background checkpoint's writer deletes the older ones first)."""
CHECKPOINT_RETRY_S = 1.0
"""Wait before retrying a checkpoint that could not be written (broker or lease unconfirmed)."""
RECONNECT_BACKOFF_MAX_MS = 1000
"""Longest wait between reconnect attempts to the broker (kafka-python's default is 30 s)."""
PHASES = ("poll", "decode", "wait", "update", "publish", "checkpoint")
"""The phases of :attr:`Trainer.timings` (cumulative seconds). ``poll`` and ``decode`` run in the
fetch thread, overlapped with the rest; ``wait`` is the trainer thread waiting for a batch;
``publish`` is handing changes over (the publishing itself runs in the publisher thread)."""
CPU_PIECES = ("receive", "learn", "live", "bookkeeping", "checkpoint", "handover")
"""The pieces of :attr:`Trainer.cpu` (cumulative CPU seconds of the trainer thread): ``receive``
takes a batch from the fetcher (unpickling when it is a process), ``learn`` is the model update
(``live`` excluded), ``live`` the live hit-rate sampling and ranking, ``bookkeeping`` the rest of
applying a batch (profiles, positions, counts), ``checkpoint`` writing checkpoints (with
background checkpoints: forking the writer and installing its file; the writer's own CPU is
:attr:`Trainer.checkpoint_child_cpu_s`), ``handover`` telling the publisher what changed."""
DLQ_REPORT_S = 5.0
"""While the dead-letter topic takes no letters, the status hash's ``dlq_*`` fields are refreshed
this often (the letters waiting); the change itself is reported at once."""


class CpuShare:
    """Admits an optional piece of work (the live hit rate) while its CPU so far is within
    ``share`` of the CPU of the work it rides on (training), so a metric's cost stays bounded
    whatever the catalogue or poll size; the first call is always admitted.

    Raises:
        TrainConfigError: ``share`` not in (0, 1] (a ``ValueError``).
    """

    def __init__(self, share: float) -> None:
        if not 0 < share <= 1:
            raise TrainConfigError(f"the live metric's CPU share must be in (0, 1], got {share!r}: "
                                   "set FMSTREAM_LIVE_CPU_SHARE in range")
        self.share = float(share)
        self.admitted = 0
        self.skipped = 0

    def due(self, piece_s: float, other_s: float) -> bool:
        """May the piece run again, having used ``piece_s`` CPU seconds next to ``other_s``?"""
        if piece_s <= self.share * (piece_s + other_s):
            self.admitted += 1
            return True
        self.skipped += 1
        return False


class EventSink(Protocol):
    """What the trainer tells the serving side after each applied batch."""

    def applied(self, events: EventColumns) -> None: ...

    def profiles_changed(self, user_ids: Sequence[str]) -> None: ...

    def items_changed(self, item_ids: Sequence[str]) -> None:
        """Item profiles were upserted or cleared (the model marked the rows of the items
        whose vector moved): the next item version ships them, with no event needed."""
        ...

    def checkpointed(self, progress: Progress) -> None: ...

    def report(self, fields: Mapping[str, str | int | float]) -> None:
        """Status fields for ``fmstream lag`` (the newest of each wins)."""
        ...

    def tick(self, now: float) -> None: ...


@dataclass(frozen=True)
class TrainerStats:
    """A trainer's counters at one moment (what its metrics report)."""

    events_applied: int
    dead_letters: int  # sent by this process
    newest_event_ts: float | None
    checkpoint_age_s: float  # since the last checkpoint (or the start)
    live_hit_rate: dict[str, float] = field(default_factory=dict)  # cohort -> test-then-train HR@10
    live_samples: dict[str, int] = field(default_factory=dict)  # cohort -> samples behind the rate
    # dead letters the dead-letter topic has not taken, holding the intake (0: none), and for
    # how long it has taken none (0.0: it takes them)
    dead_letters_waiting: int = 0
    dead_letters_blocked_s: float = 0.0


class BatchObserver(Protocol):
    """Told about every applied poll (the trainer's metrics)."""

    def batch_applied(
        self, per_topic: Mapping[str, int], seconds: float, stats: TrainerStats
    ) -> None: ...


def _not_ahead(newest: float | None) -> float | None:
    """A checkpoint's newest event time, or None when it lies in the future: written before
    events from the future were refused (:func:`stream.schemas.check_event_time`), it would keep
    the event-time lag negative for good; the next applied event sets it again."""
    if newest is not None and newest > time.time() + MAX_EVENT_AHEAD_S:
        log.warning("checkpoint's newest event time %.0f lies in the future (an event from "
                    "before future events were refused); reset, the next event sets it", newest)
        return None
    return newest


@dataclass
class Progress:
    """What the trainer has applied; lives in checkpoint metadata so it survives restarts."""

    positions: dict[str, int] = field(default_factory=dict)  # "topic|partition" -> next offset
    applied: dict[str, int] = field(default_factory=dict)  # "topic|partition" -> events applied
    events_applied: int = 0
    dead_letters: int = 0
    newest_event_ts: float | None = None
    published_version: int = 0  # the publisher's newest version: versions resume above it
    live_hit_rate: dict[str, float] = field(default_factory=dict)  # cohort -> HR@10 (sampled)
    live_samples: dict[str, int] = field(default_factory=dict)  # cohort -> samples in its window

    def to_metadata(self) -> dict[str, Any]:
        return {
            "published_version": self.published_version,
            "positions": dict(self.positions),
            "applied": dict(self.applied),
            "events_applied": self.events_applied,
            "dead_letters": self.dead_letters,
            "newest_event_ts": self.newest_event_ts,
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> Progress:
        return cls(
            positions={k: int(v) for k, v in meta.get("positions", {}).items()},
            applied={k: int(v) for k, v in meta.get("applied", {}).items()},
            events_applied=int(meta.get("events_applied", 0)),
            dead_letters=int(meta.get("dead_letters", 0)),
            newest_event_ts=_not_ahead(meta.get("newest_event_ts")),
            published_version=int(meta.get("published_version", 0)),
        )


def merge_profile(stored: dict | None, inline: dict | None) -> dict | None:
    """The profile after an event that carries profile fields inline (``"user": {...}``).

    Inline fields update the stored profile field by field and the event's values win: the event
    is the newer statement about the user or item. Fields the event does not mention keep their
    stored values. Returns None when the event carries no profile fields (nothing to upsert).
    """
    if not inline:
        return None
    return {**(stored or {}), **inline}


class Trainer:
    """Consumes events and profiles, updates the FM, checkpoints with the Kafka positions.

    Args:
        config: topics, group, checkpoint cadence and folder, message size limit.
        dead_letter_producer: a producer (acks=all, not idempotent: see
            :class:`~train.resilience.DeadLetterOutbox`) for the dead-letter topic.
        sink: the publisher (may also be set later through :attr:`sink`); Redis errors it raises
            pause publishing, never training.
        lease: the trainer lease (``train.lease.Lease``), held by the caller; renewed here.
        renew_lease: instead of ``lease``, a bare renew callable (tests; TTL ``lease_ttl_s``).
        new_model: builds the model when there is no checkpoint.
    """

    def __init__(
        self,
        config: TrainerConfig,
        *,
        dead_letter_producer,
        sink: EventSink | None = None,
        lease=None,
        renew_lease: Callable[[], None] | None = None,
        lease_ttl_s: float = 15.0,
        new_model: Callable[[], OnlineFM],
    ) -> None:
        self.config = config
        self.timings: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.cpu: dict[str, float] = dict.fromkeys(CPU_PIECES, 0.0)  # trainer thread, seconds
        self._sink: EventSink | None = None
        self.sink = sink
        self.metrics: BatchObserver | None = None  # train.metrics.TrainerMetrics while served
        self._own_checkpoint: str | None = None
        restored = self._restore()
        if restored is None:
            self.model = new_model()
            self.progress = Progress()
            self.learner = Learner(self.model, config.policy)
            log.info("no checkpoint in %s: starting a new model", config.checkpoint_dir)
        else:
            self.model, meta = restored
            self.progress = Progress.from_metadata(meta)
            self.learner = self._restore_learner(meta.get("learner"))
            log.info(
                "restored checkpoint %s: %d events applied",
                self._own_checkpoint,
                self.progress.events_applied,
            )
        if lease is not None:
            self.lease = LeaseKeeper(
                lease.renew,
                lease.ttl_s,  # the keeper never outlives the real lease
                try_acquire=lease.try_acquire,
                may_reacquire=self._newest_checkpoint_is_ours,
            )
        else:
            self.lease = LeaseKeeper(renew_lease or (lambda: None), lease_ttl_s)
        self.dead_letters = DeadLetterOutbox(dead_letter_producer, config.topics.dlq)
        self._dead_letters_restored = self.progress.dead_letters
        # the status hash says the dead-letter topic takes none (True at start: the first step
        # clears what a trainer stopped while blocked left there)
        self._dlq_reported = True
        self._dlq_reported_at = 0.0
        self._fetched_dead_letters = 0  # sent by a fetch process (acknowledged before handed)
        self.topics = config.topics.training
        self._assigned: set[TopicPartition] = set()
        self._assigned_at = 0.0
        # held while the model changes (publisher reads); handed to a waiting reader between
        # two optimiser steps of a poll (train/model_lock.py)
        self.model_lock = ModelLock()
        self.consumer = None
        self.fetcher: Fetcher[DecodedBatch] | FetchProcess
        if config.fetch_process:
            # poll + decode in a child process with its own consumer, from our positions
            self.fetcher = FetchProcess(
                FetchSpec(
                    config.kafka, config.topics, config.group, dict(self.progress.positions),
                    max_poll_records=config.max_poll_records, check_crcs=config.check_crcs,
                    fast_records=config.fast_records,
                    max_message_bytes=config.max_message_bytes,
                    reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
                ),
                may_fetch=lambda: self.lease.valid,
                depth=config.fetch_depth,
                timings=self.timings,
            )
        else:
            # kafka-python backs reconnects off up to 30 s: after a broker outage the trainer
            # would sit idle that long once the broker is back. 1 s, as the Java client's default.
            self.consumer = make_consumer(
                config.kafka,
                config.group,
                max_poll_records=config.max_poll_records,
                check_crcs=config.check_crcs,
                reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
            )
            use_fast_records(self.consumer, inline=config.fast_records)
            self.refresh_assignment()
            self.fetcher = Fetcher(
                self.consumer,
                self.decode,
                may_fetch=lambda: self.lease.valid,
                before_poll=self._refresh_if_due,
                depth=config.fetch_depth,
                timings=self.timings,
                aligner=EventAligner(config.topics.events, max_records=config.max_poll_records),
                positions=dict(self.progress.positions),
            )
        if config.fetch_process:  # spawned now (it polls only while the lease is ours)
            self.fetcher.start()
        self.paused = False  # True while the lease is not provably ours (Redis outage)
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._checkpoint_retry_at = 0.0
        # Periodic checkpoints written by a forked child (train/checkpointer.py). Temp files of a
        # writer killed with an earlier trainer are removed: we hold the lease, nobody else writes.
        if remove_stale_pending(config.checkpoint_dir):
            log.info("removed unfinished checkpoint temp files in %s", config.checkpoint_dir)
        self.background = BackgroundCheckpoint(config.checkpoint_dir, keep=CHECKPOINTS_KEPT)
        self.checkpoints_written = 0
        self.checkpoint_child_cpu_s = 0.0  # CPU of the background writers (not this thread's)
        # trainer-thread wall per background start (dead letters, lease, fork), newest 10k
        self.checkpoint_stall_s: deque[float] = deque(maxlen=10_000)
        self.live = LiveHitRate(k=10, sample_every=config.live_sample_every)
        self.live_budget = CpuShare(config.live_cpu_share)  # polls sampled for the live HR

    @property
    def dead_letter_count(self) -> int:
        """Dead letters this process sent (the fetch process's included)."""
        return self.dead_letters.count + self._fetched_dead_letters

    def _restore_learner(self, state: dict[str, Any] | None) -> Learner:
        """The checkpointed learner (replay buffer and generator) when its policy is still the
        configured one; otherwise a fresh learner under the configured policy."""
        if state is not None:
            try:
                learner = Learner.from_state(self.model, state)
            except (KeyError, TypeError, ValueError, ModelError) as exc:
                log.warning("checkpointed learner state unusable (%r): starting it afresh", exc)
            else:
                if learner.policy == self.config.policy:
                    return learner
                log.info("learning policy changed since the checkpoint: replay buffer emptied")
        return Learner(self.model, self.config.policy)

    def stats(self) -> TrainerStats:
        """What the trainer has done so far (for metrics; cheap, safe from any thread)."""
        block = self.dead_letter_block()
        return TrainerStats(
            events_applied=self.progress.events_applied,
            dead_letters=self.dead_letter_count,
            newest_event_ts=self.progress.newest_event_ts,
            checkpoint_age_s=time.monotonic() - self._last_checkpoint,
            live_hit_rate=self.live.rates(),
            live_samples=self.live.counts(),
            dead_letters_waiting=0 if block is None else block.waiting,
            dead_letters_blocked_s=0.0 if block is None else max(0.0, time.time() - block.since),
        )

    def dead_letter_block(self) -> DeadLetterBlock | None:
        """Dead letters the topic has not taken (this process's and the fetch process's): the
        intake (fetch process) or the checkpoints (fetch thread) wait for them; None: none."""
        return DeadLetterBlock.merge(self.dead_letters.blocked(),
                                     self.fetcher.dead_letter_block())

    def _report_dead_letters(self) -> None:
        """Tell ``fmstream lag`` (the status hash, through the sink) when the dead-letter topic
        stops or starts taking letters again, and refresh it every ``DLQ_REPORT_S`` meanwhile."""
        block = self.dead_letter_block()
        now = time.monotonic()
        if block is None and not self._dlq_reported:
            return
        if block is not None and self._dlq_reported and now - self._dlq_reported_at < DLQ_REPORT_S:
            return
        if self._sink is None:
            return
        self._dlq_reported, self._dlq_reported_at = block is not None, now
        if block is None:
            self._sink.report({"dlq_blocked_since": 0.0, "dlq_waiting": 0, "dlq_error": ""})
        else:
            self._sink.report({"dlq_blocked_since": block.since, "dlq_waiting": block.waiting,
                               "dlq_error": block.error})

    @property
    def sink(self) -> EventSink | None:
        """The publisher, wrapped so that Redis outages pause publishing but not training (a
        :class:`~train.publish_thread.PublisherThread` wraps its own sink)."""
        return self._sink

    @sink.setter
    def sink(self, sink: EventSink | None) -> None:
        if sink is not None and not isinstance(sink, GuardedSink | PublisherThread):
            sink = GuardedSink(sink)
        self._sink = sink

    def _restore(self) -> tuple[OnlineFM, dict[str, Any]] | None:
        """The newest checkpoint that loads (corrupt ones are skipped and logged)."""
        for path in reversed(checkpoint_files(self.config.checkpoint_dir)):
            try:
                restored = load_checkpoint(path)
            except CheckpointError as exc:
                log.warning("skipping unusable checkpoint %s: %s", path, exc)
                continue
            self._own_checkpoint = path.name
            return restored
        return None

    def _newest_checkpoint_is_ours(self) -> bool:
        """Nobody else wrote a checkpoint since our last one (safe to re-take an expired lease)."""
        files = checkpoint_files(Path(self.config.checkpoint_dir))
        return (files[-1].name if files else None) == self._own_checkpoint

    # --- partitions -----------------------------------------------------------------------

    def _refresh_if_due(self) -> None:
        if time.monotonic() - self._assigned_at >= ASSIGNMENT_REFRESH_S:
            self.refresh_assignment()

    def refresh_assignment(self) -> None:
        """Assign every partition of the trainer's topics; new ones start at the checkpoint."""
        self._assigned_at = time.monotonic()
        found, new, missing = grow_assignment(self.consumer, self.topics, self._assigned)
        for topic in missing:
            log.warning(
                "topic %s has no partitions (yet); looking again in %.0f s",
                topic,
                ASSIGNMENT_REFRESH_S,
            )
        if not new:
            return
        self._assigned = found
        self.seek_assigned(new)
        log.info("assigned %d partitions (%d new)", len(found), len(new))

    # --- the loop -------------------------------------------------------------------------

    def run(self, stop: threading.Event, idle_exit_s: float | None = None) -> Progress:
        """Train until ``stop`` is set (or, for ``idle_exit_s``, nothing is applied while the
        fetcher finds nothing new: a slow decode of a big poll is not idleness), then checkpoint.

        Raises:
            LeaseLost: another trainer holds the lease; nothing was written after that.
        """
        idle_since = time.monotonic()
        try:
            while not stop.is_set():
                n = self.step()
                now = time.monotonic()
                # idle: nothing applied while the fetcher could fetch and found nothing (not
                # while it decodes a big poll or waits for dead letters to be acknowledged)
                if n or self.paused or not self.fetcher.ready or not self.fetcher.caught_up:
                    idle_since = now
                elif idle_exit_s is not None and now - idle_since > idle_exit_s:
                    break
            # Batches fetched but not applied are dropped: the checkpoint does not cover them.
            self.fetcher.pause()
            if not self.checkpoint(final=True):
                log.error(
                    "stopping without a final checkpoint: the events since the last one "
                    "will be applied again by the next trainer (exactly once in its model)"
                )
        finally:
            self.close()
            log.info(
                "trainer stopped at %d events applied; seconds by phase: %s; trainer thread "
                "CPU seconds: %s",
                self.progress.events_applied,
                ", ".join(f"{k} {v:.2f}" for k, v in self.timings.items()),
                ", ".join(f"{k} {v:.3f}" for k, v in self.cpu.items()),
            )
            stalls = sorted(self.checkpoint_stall_s)
            log.info(
                "checkpoints: %d written; %d started in the background (trainer thread per "
                "start: median %.1f ms, max %.1f ms wall), their writers' CPU %.2f s",
                self.checkpoints_written,
                len(stalls),
                1e3 * stalls[len(stalls) // 2] if stalls else 0.0,
                1e3 * stalls[-1] if stalls else 0.0,
                self.checkpoint_child_cpu_s,
            )
        return self.progress

    def step(self, timeout_ms: int = 200) -> int:
        """Apply the next fetched batch (waiting up to ``timeout_ms``), maybe checkpoint.

        Returns the records consumed (0 when nothing arrived or while paused).
        """
        if not self.lease.keep():
            # Not provably ours any more (Redis away past the TTL): consume nothing, write nothing.
            if not self.paused:
                log.warning(
                    "trainer lease unconfirmed for its whole TTL: pausing until Redis answers"
                )
            self.paused = True
            time.sleep(min(0.2, timeout_ms / 1000))
            return 0
        self.paused = False
        if not self.fetcher.running:
            self.fetcher.start()
        t0, c0 = time.perf_counter(), time.thread_time()
        batch = self.fetcher.get(timeout=timeout_ms / 1000)
        self.timings["wait"] += time.perf_counter() - t0
        self.cpu["receive"] += time.thread_time() - c0
        if batch is not None:
            t0 = time.perf_counter()
            self.apply(batch)
            if self.metrics is not None:
                self.metrics.batch_applied(batch.per_topic, time.perf_counter() - t0,
                                           self.stats())
        if self.background.running:
            self._reap_checkpoint()
        if self._checkpoint_due():
            self.checkpoint()
        self._report_dead_letters()
        if self._sink is not None:
            t0, c0 = time.perf_counter(), time.thread_time()
            self._sink.tick(time.time())
            self.timings["publish"] += time.perf_counter() - t0
            self.cpu["handover"] += time.thread_time() - c0
        return 0 if batch is None else batch.n_records

    def close(self) -> None:
        """Stop the fetch thread (or process) and a background checkpoint writer, and close the
        consumer (idempotent)."""
        if self.background.cancel() is not None:
            log.info("background checkpoint cancelled (trainer closing): nothing was committed")
        self.fetcher.stop()
        if self.consumer is not None:
            self.consumer.close(autocommit=False)

    def _checkpoint_due(self) -> bool:
        if not self._since_checkpoint or self.background.running:  # at most one in flight
            return False
        now = time.monotonic()
        if now < self._checkpoint_retry_at:
            return False
        return (
            self._since_checkpoint >= self.config.checkpoint_every_events
            or now - self._last_checkpoint >= self.config.checkpoint_every_s
        )

    def decode(self, records: list[ConsumerRecord]) -> DecodedBatch:
        """Decode one polled batch (runs in the fetch thread); unusable messages are
        dead-lettered here, stage ``decode`` or ``validate``."""
        return decode_poll(
            records, self.dead_letters, self.config.topics, self.config.max_message_bytes
        )

    def apply(self, batch: DecodedBatch) -> None:
        """Apply one decoded batch: profiles first, then events as one model update; record the
        positions of every record in it; hand what changed to the publisher."""
        t1, c1 = time.perf_counter(), time.thread_time()
        learned = self.cpu["learn"] + self.cpu["live"]
        with self.model_lock:
            users = self._apply_profiles(batch.users, self.model.upsert_users,
                                         self.model.clear_user_profiles, "user_id")
            items = self._apply_profiles(batch.items, self.model.upsert_items,
                                         self.model.clear_item_profiles, "item_id")
            applied = self._apply_events(batch.events, batch.event_records)
        positions, counts = self.progress.positions, self.progress.applied
        moved = 0
        for (topic, partition), end in batch.ends.items():
            key = tp_key(topic, partition)
            moved += positions.get(key) != end
            positions[key] = end
        if len(applied):
            for partition, n in partition_counts(batch.event_records, applied.rows).items():
                key = tp_key(self.config.topics.events, partition)
                counts[key] = counts.get(key, 0) + n
        self._fetched_dead_letters += batch.dead_letters
        self.progress.dead_letters = self._dead_letters_restored + self.dead_letter_count
        # a batch with no records moves positions past markers / aborted records: checkpoint it
        self._since_checkpoint += batch.n_records or min(moved, 1)
        t2, c2 = time.perf_counter(), time.thread_time()
        self.timings["update"] += t2 - t1
        self.cpu["bookkeeping"] += c2 - c1 - (self.cpu["learn"] + self.cpu["live"] - learned)
        if self._sink is not None:
            if users:
                self._sink.profiles_changed([d.message.user_id for d in users])
            if items:
                self._sink.items_changed([d.message.item_id for d in items])
            if len(applied):
                self._sink.applied(applied)
            self.timings["publish"] += time.perf_counter() - t2
            self.cpu["handover"] += time.thread_time() - c2

    def _apply_profiles(self, decoded: list[Decoded], upsert, clear, id_field: str
                        ) -> list[Decoded]:
        """Upsert profiles in order; a profile the model rejects is dead-lettered (stage
        ``apply``). A tombstone (:class:`~stream.schemas.UserTombstone`,
        :class:`~stream.schemas.ItemTombstone`) removes the profile: ``clear`` (logged at INFO).

        Each profile is judged on its own, whatever else its poll holds: the model keeps only
        the last profile of an id in one call (an invalid one followed by a valid one would
        vanish unjudged), so a run of profiles goes to the model in chunks without a repeated
        id, in order; upserts and tombstones go in separate chunks, in order.
        """
        applied: list[Decoded] = []
        chunk: list[Decoded] = []
        ids: set[str] = set()
        erasing = False

        def flush() -> None:
            if not chunk:
                return
            if erasing:
                keys = [getattr(d.message, id_field) for d in chunk]
                cleared = clear(keys)
                log.info("tombstone on the %s profile topic: profile removed for %d of %d "
                         "ids (%s; the others are not known), e.g. %s",
                         id_field[:-3], len(cleared), len(keys),
                         dead_letter_id(chunk[0].record), keys[:3])
                applied.extend(chunk)
                return
            applied.extend(self._isolating(
                chunk,
                lambda ds: upsert(
                    [getattr(d.message, id_field) for d in ds], [d.message.features for d in ds]
                ),
            ))

        for d in decoded:
            key = getattr(d.message, id_field)
            tomb = isinstance(d.message, UserTombstone | ItemTombstone)
            if key in ids or tomb != erasing:
                flush()
                chunk, ids, erasing = [], set(), tomb
            chunk.append(d)
            ids.add(key)
        flush()
        return applied

    def _apply_events(
        self, events: EventColumns, records: list[ConsumerRecord]
    ) -> EventColumns:
        """Update the model with ``events`` (inline profiles first) as one mini-batch; returns
        the events applied. A batch the model rejects is bisected as :meth:`_isolating` does,
        each bad event dead-lettered (stage ``apply``) with its record."""
        if not len(events):
            return events
        try:
            self._upsert_inline_profiles(events)
            self._learn(events)
            return events
        except ModelError as exc:
            if len(events) == 1:
                self.dead_letters.send(records[int(events.rows[0])], "apply", exc, str(exc))
                return events.take(slice(0, 0))
        mid = len(events) // 2
        return EventColumns.concat([
            self._apply_events(events.take(slice(None, mid)), records),
            self._apply_events(events.take(slice(mid, None)), records),
        ])

    def _isolating(
        self, decoded: list[Decoded], apply: Callable[[list[Decoded]], None]
    ) -> list[Decoded]:
        """``apply(decoded)``; if the model rejects the batch, bisect it to find the bad messages.

        The model validates a whole batch before changing anything, so a rejected call left no
        trace; halves are applied in order, each bad message is dead-lettered (stage ``apply``).
        (For events, inline profile upserts run before ``learn_many``: re-running them is
        idempotent, and the inline profile of an event whose *learn* step failed stays applied.)
        Cost: about ``2 * bad * log2(batch)`` extra calls, not one per message.
        """
        if not decoded:
            return []
        try:
            apply(decoded)
            return decoded
        except ModelError as exc:
            if len(decoded) == 1:
                self.dead_letters.send(decoded[0].record, "apply", exc, str(exc))
                return []
        mid = len(decoded) // 2
        return self._isolating(decoded[:mid], apply) + self._isolating(decoded[mid:], apply)

    def _upsert_inline_profiles(self, events: EventColumns) -> None:
        """Inline profiles in event order, merged per id; an event's inline value is never hidden
        by a later one: when a later event of the batch sets a field of the same id to another
        value, what is merged so far goes to the model first, so an invalid value is judged (and
        its event dead-lettered by the bisection) whatever follows it in the poll."""
        for inlines, ids, upsert, profile_of in (
            (events.users, events.user_ids, self.model.upsert_users, self.model.user_profile),
            (events.items, events.item_ids, self.model.upsert_items, self.model.item_profile),
        ):
            if inlines is None:  # no event of the batch carries this profile
                continue
            merged: dict[str, dict] = {}
            given: dict[str, dict] = {}  # id -> inline fields set in this chunk
            for key, inline in zip(ids, inlines, strict=True):
                if not inline:
                    continue
                seen = given.get(key)
                if seen and any(f in seen and seen[f] != v for f, v in inline.items()):
                    upsert(list(merged), list(merged.values()))
                    merged, given, seen = {}, {}, None
                merged[key] = merge_profile(merged.get(key) or profile_of(key), inline)
                given[key] = {**(seen or {}), **inline}
            if merged:
                upsert(list(merged), list(merged.values()))

    def _learn(self, events: EventColumns) -> None:
        ts = events.ts
        missing = np.isnan(ts)
        if missing.any():  # events without a time happen now
            ts = np.where(missing, time.time(), ts)
        users, items, labels = events.user_ids, events.item_ids, events.labels
        b, per_poll = len(events), self.live.max_per_batch

        def test_then_train(where: slice) -> None:
            """Sample the step's positives just before the step learns them (the poll's sample
            spread over its steps, as many as one per poll); ranked once after the poll."""
            limit = -(-per_poll * (where.stop - where.start) // b)
            c0 = time.thread_time()
            try:  # a metric never stops training
                self.live.sample(self.model, users[where], items[where], labels[where], limit)
            except Exception:
                log.exception("live hit rate: sampling failed (training goes on)")
            live[0] += time.thread_time() - c0

        def before_step(where: slice) -> None:
            """Between two steps (never inside one): a reader waiting for the model (the
            publisher) gets it now, so a version waits for one step, not the whole poll."""
            if where.start:
                self.model_lock.let_waiters_in()
            if sampled:
                test_then_train(where)

        live = [0.0]
        sampled = self.live_budget.due(self.cpu["live"], self.cpu["learn"])
        c0 = time.thread_time()
        try:
            self.learner.learn(users, items, labels, contexts=events.contexts, ts=ts,
                               before_step=before_step)
        finally:
            c1 = time.thread_time()
            try:
                self.live.score()
            except Exception:
                log.exception("live hit rate: scoring failed (training goes on)")
            c2 = time.thread_time()
            self.cpu["learn"] += c1 - c0 - live[0]
            self.cpu["live"] += live[0] + c2 - c1
        self.progress.live_hit_rate = self.live.rates()
        self.progress.live_samples = self.live.counts()
        self.progress.events_applied += len(events)
        newest = float(ts.max())
        if self.progress.newest_event_ts is None or newest > self.progress.newest_event_ts:
            self.progress.newest_event_ts = newest

    # --- checkpoints ----------------------------------------------------------------------

    def checkpoint(self, *, final: bool = False) -> bool:
        """Write model + positions atomically, then commit the same positions to the group.

        Periodic checkpoints (``checkpoint_background``) are written by a forked child from a
        copy-on-write snapshot: this thread only forks and returns (True: started); the file is
        installed, and its positions committed and reported, by :meth:`step` once the child has
        exited cleanly (:meth:`_reap_checkpoint`). The final checkpoint (and every one without
        ``checkpoint_background``) is written here and waited for; a background one still
        running is cancelled first (the final one covers more).

        Nothing is written (returns False, retried later) while a dead letter it would cover is
        not acknowledged (broker away) or while the lease is not provably ours (Redis away past
        the TTL), nor while a background checkpoint is still running (at most one in flight).
        ``final``: the checkpoint at shutdown; waits longer and commits synchronously.

        Raises:
            LeaseLost: another trainer holds the lease (write nothing more, stop).
        """
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            if final:
                if self.background.cancel() is not None:
                    log.info("background checkpoint cancelled: the final one supersedes it")
            elif self.background.running:
                self._reap_checkpoint()
                if self.background.running:
                    return False
            # while the topic takes no letters (an ACL, a missing topic) only a look, no wait:
            # the fetch thread's events are still applied meanwhile, only checkpoints wait (the
            # outbox retries the oldest letter on its own thread, so no metadata wait either)
            blocked = self.dead_letters.blocked() is not None
            if not self.dead_letters.flush(timeout=30.0 if final else 0.0 if blocked else 5.0):
                if not blocked:  # then the outbox's own line (every 60 s) says it
                    log.warning(
                        "checkpoint deferred: %d dead letters not acknowledged by the broker",
                        self.dead_letters.pending,
                    )
                return self._defer_checkpoint()
            if not self.lease.keep(force=True):  # never write after the lease may have passed on
                log.warning("checkpoint deferred: the trainer lease is not provably ours")
                return self._defer_checkpoint()
            publisher = self._sink  # a PublisherThread has .version; a GuardedSink wraps .sink
            if publisher is not None and not hasattr(publisher, "version"):
                publisher = getattr(publisher, "sink", publisher)
            self.progress.published_version = max(
                self.progress.published_version, int(getattr(publisher, "version", 0) or 0)
            )
            if final or not self.config.checkpoint_background:
                path = save_checkpoint(
                    self.config.checkpoint_dir, self.model, self._metadata(), keep=CHECKPOINTS_KEPT
                )
                self._checkpointed(
                    path, self.progress, self._since_checkpoint, time.monotonic(), final
                )
                return True
            # The snapshot: this thread is the only one that changes checkpointed state (the
            # publisher reads it, and drains change marks that are not checkpointed), so the
            # fork sees the model between two batches. Positions etc. are copied for the commit.
            snapshot = (_copy_progress(self.progress), self._since_checkpoint, time.monotonic())
            try:
                self.background.start(self.model, self._metadata, token=snapshot)
            except OSError as exc:
                log.warning("cannot start a background checkpoint (%r): retrying later", exc)
                return self._defer_checkpoint()
            self.checkpoint_stall_s.append(time.perf_counter() - t0)
            return True
        finally:
            self.timings["checkpoint"] += time.perf_counter() - t0
            self.cpu["checkpoint"] += time.thread_time() - c0

    def _metadata(self) -> dict[str, Any]:
        """What a checkpoint stores beside the model (in a background writer: its snapshot)."""
        return {**self.progress.to_metadata(), "learner": self.learner.state()}

    def _reap_checkpoint(self) -> None:
        """Install a background checkpoint whose writer has exited cleanly, then commit and
        report its positions; after a failed writer nothing is committed and the next one is
        due after :data:`CHECKPOINT_RETRY_S`.

        Raises:
            LeaseLost: another trainer holds the lease (the file is not installed).
        """
        done = self.background.poll()
        if done is None:
            return
        self.checkpoint_child_cpu_s += done.cpu_s
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            self._install(done)
        finally:
            self.timings["checkpoint"] += time.perf_counter() - t0
            self.cpu["checkpoint"] += time.thread_time() - c0

    def _install(self, done: ChildResult) -> None:
        if not done.ok:
            log.warning(
                "background checkpoint failed (writer exit status %d%s): nothing committed; "
                "retrying in %.0f s",
                done.status,
                f", killed after {done.wall_s:.0f} s" if done.timed_out else "",
                CHECKPOINT_RETRY_S,
            )
            self._defer_checkpoint()
            return
        progress, since, started = done.token
        try:
            # The file becomes a checkpoint only while the lease is provably ours (as at start).
            if not self.lease.keep(force=True):
                log.warning("background checkpoint dropped: the trainer lease is not provably ours")
                done.pending.unlink(missing_ok=True)
                self._defer_checkpoint()
                return
            path = install_pending(done.pending, keep=None)  # the next writer prunes
        except CheckpointError as exc:
            log.warning("background checkpoint not installed (%s): retrying later", exc)
            self._defer_checkpoint()
            return
        except BaseException:  # LeaseLost: nothing more is written
            done.pending.unlink(missing_ok=True)
            raise
        log.debug("background checkpoint %s: %.2f s, writer CPU %.2f s", path.name,
                  done.wall_s, done.cpu_s)
        self._checkpointed(path, progress, since, started, final=False)

    def _checkpointed(
        self, path: Path, progress: Progress, since: int, started: float, final: bool
    ) -> None:
        """``path`` holds ``progress`` (the ``since`` records counted at ``started``): commit
        its positions to the group and report it to the sink."""
        self._own_checkpoint = path.name
        self.checkpoints_written += 1
        self._since_checkpoint = max(0, self._since_checkpoint - since)
        self._last_checkpoint = started
        self._commit(progress.positions, final)
        if self._sink is not None:
            self._sink.checkpointed(progress)

    def _defer_checkpoint(self) -> bool:
        self._checkpoint_retry_at = time.monotonic() + CHECKPOINT_RETRY_S
        return False

    def _commit(self, positions: Mapping[str, int], final: bool) -> None:
        """Commit checkpointed ``positions`` for lag monitoring (the checkpoint rules).

        Made by whoever owns the consumer: the fetch thread (or process) while it runs (queued,
        never waited for), else here; the final commit is synchronous.
        """
        offsets = {}
        for key, pos in positions.items():
            topic, part = parse_tp_key(key)
            if self.consumer is None or TopicPartition(topic, part) in self._assigned:
                offsets[(topic, part)] = pos
        if not offsets:
            return
        if final:
            commit = self.fetcher.commit(offsets, wait_s=15.0)
            try:
                commit.result(timeout=15)
            except (KafkaError, TimeoutError, RuntimeError) as exc:
                log.warning("group commit failed (the checkpoint is safe): %r", exc)
            return
        # never stall training on a slow coordinator
        self.fetcher.commit(offsets).add_done_callback(_log_future_failure)

    def seek_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        """Position ``assigned`` partitions at the checkpoint (or the beginning)."""
        seek_to_positions(self.consumer, assigned, self.progress.positions)


def _copy_progress(progress: Progress) -> Progress:
    """A copy whose dicts are not shared with ``progress`` (which keeps changing)."""
    return dataclasses.replace(
        progress,
        positions=dict(progress.positions),
        applied=dict(progress.applied),
        live_hit_rate=dict(progress.live_hit_rate),
        live_samples=dict(progress.live_samples),
    )


def _log_future_failure(future) -> None:
    exc = future.exception()
    if exc is not None:
        log.warning("group commit failed (the checkpoint is safe): %r", exc)
