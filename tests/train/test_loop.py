"""The trainer against the real broker and Redis: applies valid events, dead-letters bad ones,
resumes from its checkpoint without losing or repeating an event."""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis

from fmstream.app import run_trainer
from fmstream.settings import Settings
from model.checkpoint import latest_checkpoint
from serving.follow import IndexFollower
from serving.store import VectorStore
from stream.consume import make_producer
from stream.replay import produce_events, produce_profiles
from stream.synthetic import SyntheticStream
from tests.kafka_helpers import consume_all, end_offsets, wait_for
from train.loop import CPU_PIECES

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
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


def test_the_trainer_reports_where_its_thread_cpu_went(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _small(settings)
    producer = make_producer(settings.kafka_config())
    produce_events(producer, settings.topics(), list(STREAM.events(1500)))
    producer.close()
    with caplog.at_level(logging.INFO, logger="train.loop"):
        assert _train(settings).events_applied == 1500

    line = next(r.getMessage() for r in caplog.records if "trainer stopped" in r.getMessage())
    pieces = dict(
        (k, float(v)) for k, v in
        (p.split() for p in line.split("trainer thread CPU seconds: ")[1].split(", "))
    )
    assert set(pieces) == set(CPU_PIECES)
    assert all(v >= 0 for v in pieces.values())
    assert pieces["learn"] > 0 and pieces["checkpoint"] > 0  # it learned and checkpointed


def test_small_polls_give_the_live_hit_rate_samples_not_a_sixteenth_of_them(
    settings: Settings,
) -> None:
    """A paced stream reaches the trainer in small polls (tens of positives each). A sampled
    poll gives up to 64 of its positives (one in 16 of them gave 3-4 samples, for the same fixed
    cost per poll: 135 samples over ml-100k at 4,000 events/s under the default share): with the
    budget admitting every poll, polls of at most 100 positives give at least 0.64 of them."""
    settings = _small(settings).model_copy(update={"max_poll_records": 100,
                                                   "live_cpu_share": 1.0})
    producer = make_producer(settings.kafka_config())
    events = list(STREAM.events(1500))
    produce_events(producer, settings.topics(), events)
    producer.close()
    progress = _train(settings)
    assert progress.events_applied == 1500
    positives = sum(e["label"] == 1 for e in events)
    assert positives == 1500
    samples = sum(progress.live_samples.values())  # within the windows (2,000 each)
    assert 0.64 * positives <= samples <= positives, progress.live_samples


def test_a_1mb_event_is_one_bounded_dead_letter_and_the_trainer_checkpoints(
    settings: Settings,
) -> None:
    """Its dead letter keeps a prefix of the bytes with their length and sha256 (the whole
    base64 would exceed what the broker accepts, and the trainer would never checkpoint)."""
    settings = _small(settings)
    huge = b'{"user_id": "u1", "item_id": "i1", "pad": "' + b"x" * 1_000_000 + b'"}'
    producer = make_producer(settings.kafka_config(), max_request_size=2_000_000)
    events = list(STREAM.events(1000))
    produce_events(producer, settings.topics(), events[:500])
    sent = producer.send(settings.topic_events, key=b"u1", value=huge).get(timeout=30)
    produce_events(producer, settings.topics(), events[500:])
    producer.close()

    progress = _train(settings)

    assert progress.events_applied == 1000 and progress.dead_letters == 1
    _, meta = latest_checkpoint(settings.checkpoint_dir)
    assert meta["events_applied"] == 1000
    [letter] = consume_all(settings, settings.topic_dlq, expect=1)
    assert len(letter.value) < 100_000
    body = orjson.loads(letter.value)
    assert body["id"] == f"{settings.topic_events}/{sent.partition}/{sent.offset}"
    assert body["value_length"] == len(huge) and body["value_truncated"] is True
    assert body["value_sha256"] == hashlib.sha256(huge).hexdigest()
    assert huge.startswith(base64.b64decode(body["value_b64"]))


def test_profile_verdicts_do_not_depend_on_what_else_the_poll_holds(settings: Settings) -> None:
    """An invalid profile (a list for the categorical ``segment``) next to a valid one for the
    same id, in either order and in one poll: the invalid one is dead-lettered, the valid one
    applied."""
    settings = _small(settings).model_copy(
        update={"schema_path": ROOT / "config" / "synthetic.toml"}
    )
    good_then_bad = [{"user_id": "p1", "features": {"segment": "s1"}},
                     {"user_id": "p1", "features": {"segment": ["s1", "s2"]}}]
    bad_then_good = [{"user_id": "p2", "features": {"segment": ["s3", "s4"]}},
                     {"user_id": "p2", "features": {"segment": "s2"}}]
    producer = make_producer(settings.kafka_config())
    for profile in good_then_bad + bad_then_good:
        producer.send(settings.topic_users, key=profile["user_id"].encode(),
                      value=orjson.dumps(profile))
    produce_events(producer, settings.topics(), list(STREAM.events(200)))
    producer.close()

    progress = _train(settings)

    assert progress.dead_letters == 2
    letters = [orjson.loads(m.value) for m in consume_all(settings, settings.topic_dlq, expect=2)]
    assert {orjson.loads(base64.b64decode(b["value_b64"]))["user_id"] for b in letters} == {
        "p1", "p2"}
    assert all(b["stage"] == "apply" and "segment" in b["reason"] for b in letters)
    model, _ = latest_checkpoint(settings.checkpoint_dir)
    assert model.user_profile("p1") == {"segment": "s1"}
    assert model.user_profile("p2") == {"segment": "s2"}


def test_a_tombstone_on_a_profile_topic_removes_the_profile(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A null value on ``fm.users`` / ``fm.items`` (a compacted topic's "delete this key", e.g.
    an erasure) removes that entity's profile: it keeps its id row and history and scores as
    having no profile; logged at INFO, no dead letter (it was one). In order with upserts of the
    same key; a tombstone for an unknown id creates nothing; one with an empty key is a dead
    letter."""
    settings = _small(settings).model_copy(
        update={"schema_path": ROOT / "config" / "synthetic.toml"}
    )
    producer = make_producer(settings.kafka_config())
    produce_profiles(producer, settings.topics(), STREAM.user_profiles(), STREAM.item_profiles())
    events = list(STREAM.events(300))
    produce_events(producer, settings.topics(), events)
    erased = events[0]["user_id"]
    again = next(e["user_id"] for e in events if e["user_id"] != erased)
    producer.send(settings.topic_users, key=erased.encode(), value=None)
    producer.send(settings.topic_users, key=again.encode(), value=None)
    producer.send(settings.topic_users, key=again.encode(),
                  value=orjson.dumps({"user_id": again, "features": {"segment": "s9"}}))
    producer.send(settings.topic_users, key=b"never-seen", value=None)
    producer.send(settings.topic_users, key=b"", value=None)  # (kafka-python sends no null+null)
    producer.send(settings.topic_items, key=b"i3", value=None)
    producer.close()

    with caplog.at_level(logging.INFO, logger="train.loop"):
        progress = _train(settings)

    assert progress.events_applied == 300 and progress.dead_letters == 1
    [letter] = consume_all(settings, settings.topic_dlq, expect=1)
    body = orjson.loads(letter.value)
    assert body["stage"] == "validate" and "tombstone" in body["reason"]
    assert "user_id: an id must not be empty" in body["reason"]
    model, _ = latest_checkpoint(settings.checkpoint_dir)
    assert model.user_profile(erased) == {}  # known, with no profile
    assert model.user_positives([erased])[0] > 0  # its history kept
    assert model.user_profile(again) == {"segment": "s9"}  # the upsert after the tombstone
    assert model.user_profile("never-seen") is None  # nothing created
    assert model.item_profile("i3") == {} and model.item_profile("i4") == {"category": "c4"}
    logged = [r.getMessage() for r in caplog.records if "tombstone" in r.getMessage()]
    assert logged and all(r.levelname == "INFO" for r in caplog.records
                          if "tombstone" in r.getMessage())


def test_an_item_profile_change_with_no_events_reaches_serving(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A running trainer, quiet after a warm-up (every event in a version, nothing owed): an
    item profile upsert with a new category and an item profile tombstone on ``fm.items``, and
    no event. A new item version comes and the served vectors of both items change; an item
    left alone keeps its vector. (Before: only events made item versions, so an idle shop's
    recategorised item kept its old vector until some event came.)"""
    settings = _small(settings).model_copy(
        update={"schema_path": ROOT / "config" / "synthetic.toml", "checkpoint_every_s": 0.5}
    )
    producer = make_producer(settings.kafka_config())
    produce_profiles(producer, settings.topics(), STREAM.user_profiles(), STREAM.item_profiles())
    n = 300
    produce_events(producer, settings.topics(), list(STREAM.events(n)))
    producer.flush()
    reader = VectorStore(redis_client, settings.redis_keys())
    follower = IndexFollower(reader)

    def served(*items: str) -> tuple[int, np.ndarray]:
        follower.refresh()
        state = follower.current()
        assert state is not None
        snap = state.loaded.snapshot
        return state.item_version, np.stack([snap.vectors[snap.row_of[i]] for i in items])

    def quiet() -> bool:
        """Every event applied and handed over (a checkpoint of them reported: its report
        reaches the publisher after them), the newest version an item version, and none for
        4 item cadences since that report (a version owed then would have come)."""
        s = reader.get_status()
        return (s.get("events_applied") == n and "items_published_at" in s
                and s.get("model_version") == s.get("item_version")
                and time.time() - max(s["items_published_at"], s["checkpoint_at"])
                > 4 * settings.publish_items_s)

    stop, result = threading.Event(), []
    thread = threading.Thread(target=lambda: result.append(run_trainer(settings, stop)),
                              daemon=True)
    thread.start()
    try:
        wait_for(quiet, 120, "the trainer quiet after its warm-up")
        v0, before = served("i3", "i4", "i0")
        assert STREAM.clusters == 5  # i3 is in c3, i4 in c4
        producer.send(settings.topic_items, key=b"i3",
                      value=orjson.dumps({"item_id": "i3", "features": {"category": "c1"}}))
        producer.send(settings.topic_items, key=b"i4", value=None)  # its profile removed
        producer.close()
        wait_for(lambda: served("i3")[0] > v0, 30, "an item version after the profile change")
        v1, after = served("i3", "i4", "i0")
    finally:
        stop.set()
        thread.join(120)
    assert not thread.is_alive() and result[0].events_applied == n
    assert v1 > v0
    assert not np.allclose(after[0], before[0])  # i3: the c1 row, not c3's
    assert not np.allclose(after[1], before[1])  # i4: no category row any more
    np.testing.assert_array_equal(after[2], before[2])  # i0: unchanged, not re-shipped


def test_an_invalid_inline_profile_is_not_hidden_by_a_valid_one_in_the_same_poll(
    settings: Settings,
) -> None:
    """Events of one user in one poll: an inline profile with an invalid value (a list for the
    categorical ``segment``) followed by one with a valid value of the same field. The event
    with the invalid profile is dead-lettered (before: merged away, neither applied nor
    dead-lettered), the other applied with its profile; two valid values apply in order, and
    repeating the same value is fine."""
    settings = _small(settings).model_copy(
        update={"schema_path": ROOT / "config" / "synthetic.toml"}
    )

    def event(user: str, item: str, segment) -> dict:
        return {"user_id": user, "item_id": item, "label": 1, "ts": 1000.0,
                "user": {"segment": segment}}

    # (good then bad is caught by the merged value failing; bad then good was the hole. One
    # rejected call would bisect the poll and split pairs, so this poll has only the one.)
    events = [event("q1", "i1", "s1"), event("q1", "i2", "s3"),  # two valid values
              event("q2", "i3", ["s3", "s4"]), event("q2", "i4", "s2"),  # bad, then good
              event("q3", "i5", "s4"), event("q3", "i6", "s4")]  # the same value twice
    producer = make_producer(settings.kafka_config())
    for e in events:  # one partition (same key order), so they come in one poll, in order
        producer.send(settings.topic_events, key=b"same", value=orjson.dumps(e), partition=0)
    producer.close()

    progress = _train(settings)

    assert progress.events_applied == 5 and progress.dead_letters == 1
    (letter,) = [orjson.loads(m.value)
                 for m in consume_all(settings, settings.topic_dlq, expect=1)]
    assert orjson.loads(base64.b64decode(letter["value_b64"]))["item_id"] == "i3"
    assert letter["stage"] == "apply" and "segment" in letter["reason"]
    model, _ = latest_checkpoint(settings.checkpoint_dir)
    assert model.user_profile("q1") == {"segment": "s3"}
    assert model.user_profile("q2") == {"segment": "s2"}
    assert model.user_profile("q3") == {"segment": "s4"}


def test_a_letter_over_the_dead_letter_topics_limit_goes_without_the_records_bytes(
    settings: Settings,
) -> None:
    """An operator lowered the dead-letter topic's ``max.message.bytes`` below a letter: the
    letter goes again without the record's bytes (length and sha256 kept) and the trainer goes
    on. Before: the letter was re-sent for ever, the fetcher never handed a batch over again,
    and kafka-python's idempotent producer turned the refusal into a fatal state that failed
    every later letter too."""
    from tests.serving.test_worker_refusals import limit_topic

    settings = _small(settings)
    limit_topic(settings, settings.topic_dlq, 4096)
    big = b"not json " + b"x" * 20_000  # its letter carries ~27 kB of base64
    small = b"[1, 2, 3]"
    producer = make_producer(settings.kafka_config())
    events = list(STREAM.events(1000))
    produce_events(producer, settings.topics(), events[:500])
    sent = producer.send(settings.topic_events, key=b"u1", value=big).get(timeout=30)
    produce_events(producer, settings.topics(), events[500:])
    producer.send(settings.topic_events, key=b"u2", value=small).get(timeout=30)
    producer.close()

    stop, result = threading.Event(), []
    thread = threading.Thread(target=lambda: result.append(
        run_trainer(settings, stop, idle_exit_s=3.0)), daemon=True)
    thread.start()
    thread.join(timeout=120)
    if thread.is_alive():  # the old code: intake held by the letter it re-sent for ever
        stop.set()
        thread.join(timeout=60)
        pytest.fail("the trainer never went idle: a refused dead letter held its intake")
    [progress] = result
    assert progress.events_applied == 1000 and progress.dead_letters == 2
    _, meta = latest_checkpoint(settings.checkpoint_dir)
    assert meta["events_applied"] == 1000
    letters = {orjson.loads(m.value)["id"]: orjson.loads(m.value)
               for m in consume_all(settings, settings.topic_dlq, expect=2)}
    slim = letters.pop(f"{settings.topic_events}/{sent.partition}/{sent.offset}")
    assert slim["value_b64"] == "" and slim["value_truncated"] is True
    assert slim["value_length"] == len(big)
    assert slim["value_sha256"] == hashlib.sha256(big).hexdigest()
    assert "refused by the dead-letter topic" in slim["reason"] and "JSON" in slim["reason"]
    [other] = letters.values()
    assert base64.b64decode(other["value_b64"]) == small  # a letter that fits keeps its bytes


def test_a_checkpoint_with_a_newest_event_time_from_the_future_is_reset_on_load() -> None:
    """Written before events from the future were refused, such a time would keep the event-time
    lag negative for good: a loaded checkpoint drops it (the next event sets it again)."""
    import time

    from train.loop import Progress

    now = time.time()
    assert Progress.from_metadata({"newest_event_ts": 99_999_999_999.0}).newest_event_ts is None
    assert Progress.from_metadata({"newest_event_ts": now}).newest_event_ts == now
    assert Progress.from_metadata({"newest_event_ts": 881250949.0}).newest_event_ts == 881250949.0
    assert Progress.from_metadata({}).newest_event_ts is None
