"""The training loop: Kafka events and profiles in, one FM updated exactly once per valid event.

Guarantees (see README "Trainer guarantees"):
- Each poll is decoded as a batch; unusable messages go to the dead-letter topic (acknowledged
  before any checkpoint covers their offsets) and the valid ones around them are applied.
- Kafka positions live inside the model checkpoint. On start the newest valid checkpoint is
  restored and every partition is sought to its stored position, so an event is applied once
  even across kill -9. Group commits follow checkpoints (for lag monitoring) and never lead them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from kafka import ConsumerRebalanceListener
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata, TopicPartition

from fmstream.settings import Settings
from model.checkpoint import latest_checkpoint, save_checkpoint
from model.errors import ModelError
from model.online import OnlineFM
from stream.consume import DeadLetters, Decoded, decode_records, flatten, make_consumer
from stream.schemas import Event, ItemProfile, UserProfile

log = logging.getLogger(__name__)


class EventSink(Protocol):
    """What the trainer tells the serving side after each applied batch."""

    def applied(self, events: Sequence[Event]) -> None: ...

    def profiles_changed(self, user_ids: Sequence[str]) -> None: ...

    def checkpointed(self, progress: Progress) -> None: ...

    def tick(self, now: float) -> None: ...


@dataclass
class Progress:
    """What the trainer has applied; lives in checkpoint metadata so it survives restarts."""

    positions: dict[str, int] = field(default_factory=dict)  # "topic|partition" -> next offset
    applied: dict[str, int] = field(default_factory=dict)  # "topic|partition" -> events applied
    events_applied: int = 0
    dead_letters: int = 0
    newest_event_ts: float | None = None

    def to_metadata(self) -> dict[str, Any]:
        return {
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
            newest_event_ts=meta.get("newest_event_ts"),
        )


def tp_key(topic: str, partition: int) -> str:
    return f"{topic}|{partition}"


def merge_profile(stored: dict | None, inline: dict | None) -> dict | None:
    """Profile fields riding on an event update the stored profile; the event's fields win."""
    if not inline:
        return None
    return {**(stored or {}), **inline}


class Trainer:
    """Consumes events and profiles, updates the FM, checkpoints with the Kafka positions."""

    def __init__(
        self,
        settings: Settings,
        *,
        dead_letter_producer,
        sink: EventSink | None = None,
        renew_lease: Callable[[], None] | None = None,
        new_model: Callable[[], OnlineFM],
    ) -> None:
        self.settings = settings
        self.sink = sink
        self._renew_lease = renew_lease or (lambda: None)
        restored = latest_checkpoint(settings.checkpoint_dir)
        if restored is None:
            self.model = new_model()
            self.progress = Progress()
            log.info("no checkpoint in %s: starting a new model", settings.checkpoint_dir)
        else:
            self.model, meta = restored
            self.progress = Progress.from_metadata(meta)
            log.info("restored checkpoint: %d events applied", self.progress.events_applied)
        self.dead_letters = DeadLetters(dead_letter_producer, settings.topic_dlq)
        self._dead_letters_restored = self.progress.dead_letters
        self.consumer = make_consumer(settings, settings.trainer_group)
        self.topics = (settings.topic_users, settings.topic_items, settings.topic_events)
        self.consumer.subscribe(list(self.topics), listener=_SeekToCheckpoint(self))
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()

    # --- the loop -------------------------------------------------------------------------

    def run(self, stop: threading.Event, idle_exit_s: float | None = None) -> Progress:
        """Train until ``stop`` is set (or nothing arrives for ``idle_exit_s``), then checkpoint."""
        idle_since = time.monotonic()
        try:
            while not stop.is_set():
                n = self.step()
                now = time.monotonic()
                if n:
                    idle_since = now
                elif idle_exit_s is not None and now - idle_since > idle_exit_s:
                    break
            self.checkpoint()
        finally:
            self.consumer.close(autocommit=False)
        return self.progress

    def step(self, timeout_ms: int = 200) -> int:
        """One poll: decode, apply, maybe checkpoint and publish. Returns records consumed."""
        self._renew_lease()
        records = flatten(self.consumer.poll(timeout_ms=timeout_ms))
        if records:
            self.apply_records(records)
        due = self._since_checkpoint >= self.settings.checkpoint_every_events or (
            self._since_checkpoint and time.monotonic() - self._last_checkpoint
            >= self.settings.checkpoint_every_s
        )
        if due:
            self.checkpoint()
        if self.sink is not None:
            self.sink.tick(time.time())
        return len(records)

    def apply_records(self, records: list[ConsumerRecord]) -> None:
        """Apply one polled batch: profiles first, then events as one model update."""
        by_topic: dict[str, list[ConsumerRecord]] = defaultdict(list)
        for r in records:
            by_topic[r.topic].append(r)
        limit = self.settings.max_message_bytes
        users = decode_records(by_topic[self.settings.topic_users], UserProfile,
                               self.dead_letters, max_bytes=limit)
        items = decode_records(by_topic[self.settings.topic_items], ItemProfile,
                               self.dead_letters, max_bytes=limit)
        events = decode_records(by_topic[self.settings.topic_events], Event,
                                self.dead_letters, max_bytes=limit)
        if users:
            ids = [d.message.user_id for d in users]
            self.model.upsert_users(ids, [d.message.features for d in users])
            if self.sink is not None:
                self.sink.profiles_changed(ids)
        if items:
            self.model.upsert_items([d.message.item_id for d in items],
                                    [d.message.features for d in items])
        applied = self._apply_events(events)
        for r in records:
            self.progress.positions[tp_key(r.topic, r.partition)] = r.offset + 1
        for d in applied:
            key = tp_key(d.record.topic, d.record.partition)
            self.progress.applied[key] = self.progress.applied.get(key, 0) + 1
        self.progress.dead_letters = self._dead_letters_restored + self.dead_letters.count
        self._since_checkpoint += len(records)
        if applied and self.sink is not None:
            self.sink.applied([d.message for d in applied])

    def _apply_events(self, events: list[Decoded[Event]]) -> list[Decoded[Event]]:
        """Update the model with ``events``; isolate and dead-letter any the model rejects."""
        if not events:
            return []
        self._upsert_inline_profiles([d.message for d in events])
        try:
            self._learn([d.message for d in events])
            return events
        except ModelError:
            log.exception("batch of %d rejected by the model; applying one by one", len(events))
        good = []
        for d in events:
            try:
                self._learn([d.message])
                good.append(d)
            except ModelError as exc:
                self.dead_letters.send(d.record, "apply", exc, str(exc))
        return good

    def _upsert_inline_profiles(self, events: Sequence[Event]) -> None:
        for side, attr, upsert, profile_of in (
            ("user", "user_id", self.model.upsert_users, self.model.user_profile),
            ("item", "item_id", self.model.upsert_items, self.model.item_profile),
        ):
            merged: dict[str, dict] = {}
            for e in events:
                inline = getattr(e, side)
                if inline:
                    key = getattr(e, attr)
                    merged[key] = merge_profile(merged.get(key) or profile_of(key), inline)
            if merged:
                upsert(list(merged), list(merged.values()))

    def _learn(self, events: Sequence[Event]) -> None:
        ts = np.array([e.ts if e.ts is not None else time.time() for e in events], dtype=np.float64)
        self.model.learn_many(
            [e.user_id for e in events],
            [e.item_id for e in events],
            labels=np.array([e.label for e in events], dtype=np.float32),
            contexts=[e.context for e in events],
            ts=ts,
        )
        self.progress.events_applied += len(events)
        newest = float(ts.max())
        if self.progress.newest_event_ts is None or newest > self.progress.newest_event_ts:
            self.progress.newest_event_ts = newest

    # --- checkpoints ----------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Write model + positions atomically, then commit the same positions to the group."""
        self.dead_letters.flush()  # a dead letter is acked before a checkpoint covers it
        self._renew_lease()  # never write after losing the lease to another trainer
        save_checkpoint(self.settings.checkpoint_dir, self.model, self.progress.to_metadata())
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        offsets = {}
        assigned = self.consumer.assignment()
        for key, pos in self.progress.positions.items():
            topic, part = key.rsplit("|", 1)
            tp = TopicPartition(topic, int(part))
            if tp in assigned:
                offsets[tp] = OffsetAndMetadata(pos, "", -1)
        if offsets:
            try:
                self.consumer.commit(offsets)
            except Exception as exc:  # the checkpoint is authoritative; a failed commit only delays lag
                log.warning("group commit failed (checkpoint is safe): %s", exc)
        if self.sink is not None:
            self.sink.checkpointed(self.progress)

    def seek_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        """Position newly assigned partitions at the checkpoint (or the beginning)."""
        for tp in assigned:
            pos = self.progress.positions.get(tp_key(tp.topic, tp.partition))
            if pos is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, pos)


class _SeekToCheckpoint(ConsumerRebalanceListener):
    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_partitions_revoked(self, revoked) -> None:
        if revoked:
            self.trainer.checkpoint()

    def on_partitions_assigned(self, assigned) -> None:
        self.trainer.seek_assigned(list(assigned))
