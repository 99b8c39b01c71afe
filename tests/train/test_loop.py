"""The trainer against the real broker and Redis: applies valid events, dead-letters bad ones,
resumes from its checkpoint without losing or repeating an event."""

from __future__ import annotations

import base64
import threading

import orjson
import pytest

from fmstream.app import run_trainer
from fmstream.settings import Settings
from model.checkpoint import latest_checkpoint
from stream.consume import make_producer
from stream.replay import produce_events, produce_profiles
from stream.synthetic import SyntheticStream
from tests.kafka_helpers import consume_all, end_offsets

pytestmark = pytest.mark.integration

STREAM = SyntheticStream(users=200, items=100, clusters=5, seed=1)

POISON = [
    b"not json at all",
    b'{"user_id": "u1"}',  # no item_id
    b'{"user_id": "u1", "item_id": "i1", "label": 7}',
    b'{"user_id": "u1", "item_id": "i1", "context": {"hour": NaN}}',
    b"[1, 2, 3]",
]


def _small(settings: Settings) -> Settings:
    return settings.model_copy(update={"dim": 8, "checkpoint_every_events": 500,
                                       "publish_items_s": 0.5})


def _train(settings: Settings, idle_exit_s: float = 3.0):
    return run_trainer(settings, threading.Event(), idle_exit_s=idle_exit_s)


def test_valid_events_applied_and_poison_dead_lettered(settings: Settings) -> None:
    settings = _small(settings)
    producer = make_producer(settings.kafka_config())
    produce_profiles(producer, settings.topics(), STREAM.user_profiles(), STREAM.item_profiles())
    events = list(STREAM.events(3000))
    produce_events(producer, settings.topics(), events[:1500])
    for raw in POISON:
        producer.send(settings.topic_events, key=b"u1", value=raw)
    producer.send(settings.topic_events, key=b"u1", value=b"{" + b" " * 70_000 + b"}")
    produce_events(producer, settings.topics(), events[1500:])
    producer.close()

    progress = _train(settings)

    assert progress.events_applied == 3000
    assert progress.dead_letters == len(POISON) + 1
    letters = consume_all(settings, settings.topic_dlq, expect=len(POISON) + 1)
    bodies = [orjson.loads(m.value) for m in letters]
    originals = {base64.b64decode(b["value_b64"]) for b in bodies}
    assert set(POISON) <= originals
    for b in bodies:
        assert b["source_topic"] == settings.topic_events
        assert b["stage"] in ("decode", "validate") and b["reason"]
        assert b["source_offset"] >= 0
    assert any("exceeds the limit" in b["reason"] for b in bodies)
    assert any(b["stage"] == "validate" and "item_id" in b["reason"] for b in bodies)


def test_restart_resumes_exactly_where_the_checkpoint_left(settings: Settings) -> None:
    settings = _small(settings)
    producer = make_producer(settings.kafka_config())
    events = list(STREAM.events(4000))
    produce_events(producer, settings.topics(), events[:2500])
    assert _train(settings).events_applied == 2500
    produce_events(producer, settings.topics(), events[2500:])
    producer.close()
    progress = _train(settings)

    assert progress.events_applied == 4000
    ends = end_offsets(settings, settings.topic_events)
    for (topic, part), end in ends.items():
        assert progress.applied.get(f"{topic}|{part}", 0) == end
        assert progress.positions.get(f"{topic}|{part}", 0) == end
    model, meta = latest_checkpoint(settings.checkpoint_dir)
    assert meta["events_applied"] == 4000
    assert model.n_updates == 4000
