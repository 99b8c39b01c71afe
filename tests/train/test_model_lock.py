"""The trainer's model lock goes to a waiting reader (the publisher) between two optimiser steps
of a poll: a version waits for one step, not the whole poll, and the model learns exactly what
it learned before (same steps, same order, same bits)."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import numpy as np
import pytest

from fmstream.app import new_model
from fmstream.settings import Settings
from model import FeatureSchema, OnlineFM, TrainConfig
from model.learner import Learner, LearnPolicy
from stream.consume import make_producer
from stream.replay import produce_events
from stream.synthetic import SyntheticStream
from train.loop import Trainer
from train.model_lock import ModelLock
from train.publish_thread import LockedModel

SCHEMA = FeatureSchema.from_dict(
    {"user": {"segment": {}}, "item": {"category": {}}, "context": {"hour": {}}}
)


def _until(done, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def _digest(fm: OnlineFM) -> str:
    header, arrays = fm.state()
    h = hashlib.sha1(json.dumps(header, sort_keys=True, default=str).encode())
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


def _model() -> OnlineFM:
    fm = OnlineFM(SCHEMA, TrainConfig(dim=8, negatives=3, seed=3))
    fm.upsert_users([f"u{x}" for x in range(50)], [{"segment": f"s{x % 4}"} for x in range(50)])
    fm.upsert_items([f"i{x}" for x in range(80)], [{"category": f"c{x % 5}"} for x in range(80)])
    return fm


def _events(n: int):
    rng = np.random.default_rng(7)
    u = [f"u{x}" for x in rng.integers(0, 60, n)]  # some users and items are new
    i = [f"i{x}" for x in rng.integers(0, 90, n)]
    y = (rng.random(n) < 0.7).astype(np.float32)
    ctx = [{"hour": str(h)} for h in rng.integers(0, 24, n)]
    return u, i, y, ctx, np.arange(n, dtype=np.float64)


def test_without_a_waiter_the_holder_keeps_the_lock() -> None:
    lock = ModelLock()
    with lock:
        assert not lock.let_waiters_in()
        assert lock.locked()
    assert lock.handoffs == 0 and not lock.locked()


def test_a_reader_at_every_step_boundary_leaves_the_model_bit_for_bit() -> None:
    """A reader making the publisher's reads (drain the change marks, shared rows, item parts,
    user vectors) between every two steps of a batch: the model is the same, bit for bit, as
    one that learned the batch alone; the reader saw every step boundary, never a half step."""
    u, i, y, ctx, ts = _events(2000)
    policy = LearnPolicy(step_events=64, replay=0.5, seed=5)
    alone = _model()
    Learner(alone, policy).learn(u, i, y, contexts=ctx, ts=ts)

    fm, lock = _model(), ModelLock()
    seen: list[int] = []
    stop = threading.Event()

    def reader() -> None:  # one critical section per version, as VersionedPublisher reads
        while True:
            with lock:
                if stop.is_set():
                    return
                seen.append(fm.n_updates)
                fm.drain_changed_rows()
                keys, _ = fm.user_shared_keys_from(0)
                fm.shared_params(keys)
                fm.item_parts_at(np.arange(int(fm.n_items)))
                fm.user_vectors(["u1", "u2"])

    thread = threading.Thread(target=reader)
    lock.on_boundary = lambda: _until(lambda: lock.waiting >= 1, "the reader to wait")
    with lock:
        thread.start()
        Learner(fm, policy).learn(
            u, i, y, contexts=ctx, ts=ts,
            before_step=lambda where: where.start and lock.let_waiters_in(),
        )
        stop.set()
    thread.join(10)
    assert not thread.is_alive()
    assert _digest(fm) == _digest(alone)
    steps = -(-2000 // 64)
    assert lock.handoffs == steps - 1
    # the reader came in once per boundary, each time after a whole number of steps
    assert seen[: steps - 1] == [64 * k for k in range(1, steps)]


@pytest.mark.integration
def test_a_reader_waiting_during_a_poll_gets_the_model_after_one_step(settings: Settings) -> None:
    """The trainer learning a poll of many steps; a reader (the publisher's locked view of the
    model) that starts waiting at a step boundary gets the model there: not one more event is
    learned before it, and the poll goes on after it."""
    settings = settings.model_copy(update={"dim": 8, "trainer_fetch_process": False})
    stream = SyntheticStream(users=200, items=100, clusters=5, seed=1)
    producer = make_producer(settings.kafka_config())
    produce_events(producer, settings.topics(), list(stream.events(3000)))
    producer.flush()
    trainer = Trainer(
        settings.trainer_config(), dead_letter_producer=producer,
        new_model=lambda: new_model(settings),
    )
    lock = trainer.model_lock
    publisher_view = LockedModel(trainer.model, lock)
    seen: dict = {}

    def reader() -> None:
        seen["got"] = publisher_view.n_updates

    def at_boundary() -> None:
        if "thread" in seen:
            return
        seen["at"] = trainer.model.n_updates
        seen["thread"] = threading.Thread(target=reader)
        seen["thread"].start()
        _until(lambda: lock.waiting >= 1, "the reader to wait for the model")

    lock.on_boundary = at_boundary
    deadline = time.monotonic() + 60
    try:
        while trainer.progress.events_applied < 3000:
            assert time.monotonic() < deadline, "the trainer did not apply every event"
            trainer.step()
    finally:
        trainer.close()
        producer.close()
    seen["thread"].join(10)
    assert seen["got"] == seen["at"]  # in at the boundary: no step learned while it waited
    assert seen["at"] < trainer.model.n_updates  # ...and the poll went on after it
    assert lock.handoffs >= 1
