"""The publisher rebuilds what Redis lost, on the real Redis: user histories after FLUSHALL
come back from the model (no event needed), and a user whose own id row expired gets a new
record (its vector now reads the id fallback row)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import redis

from fmstream.settings import Settings
from model import FeatureSchema
from model.online import OnlineFM, TrainConfig
from serving.follow import IndexFollower
from serving.store import VectorStore
from stream.connect import redis_client as connect_redis
from train.config import PublishConfig
from train.publisher import Publisher
from train.store_writer import StoreWriter

pytestmark = pytest.mark.integration


class Ev:
    def __init__(self, user_id: str, item_id: str, label: int = 1) -> None:
        self.user_id, self.item_id, self.label = user_id, item_id, label


def composed(reader: VectorStore, users: list[str]) -> np.ndarray:
    follower = IndexFollower(reader)
    assert follower.refresh()
    state = follower.current()
    assert state is not None
    got = reader.get_user_vectors(users, shared=state.users)
    assert got.found.all()
    return got.vectors


def test_flushall_brings_back_histories_from_the_model(
    redis_client: redis.Redis, settings: Settings
) -> None:
    keys = settings.redis_keys()
    writer, reader = StoreWriter(redis_client, keys, 3), VectorStore(redis_client, keys)
    model = OnlineFM(config=TrainConfig(dim=4, recent_items=5))
    pub = Publisher(PublishConfig(history_len=5, lost_check_s=0.0), writer, model)
    rng = np.random.default_rng(1)
    users = [f"u{k}" for k in rng.integers(0, 30, 400)]
    items = [f"i{k}" for k in rng.integers(0, 40, 400)]
    labels = rng.integers(0, 2, 400)
    for lo in range(0, 400, 100):  # batches as the trainer hands them over
        model.learn_many(users[lo:lo + 100], items[lo:lo + 100], labels=labels[lo:lo + 100])
        pub.applied([Ev(u, i, int(y)) for u, i, y in zip(
            users[lo:lo + 100], items[lo:lo + 100], labels[lo:lo + 100], strict=True)])
        pub.tick(float(lo))
    known = sorted(set(users))
    before = reader.get_histories(known)
    assert sum(map(len, before)) > 0
    assert before == [list(dict.fromkeys(h)) for h in model.recent_items(known)]
    republished = pub.republished
    redis_client.flushall()
    assert reader.get_histories(known) == [[] for _ in known]
    pub.tick(1000.0)  # no event: the lost check alone republishes
    assert pub.republished == republished + 1
    assert reader.get_histories(known) == before
    assert reader.current_item_version() is not None


def test_a_user_whose_own_row_expired_gets_a_new_record(
    redis_client: redis.Redis, settings: Settings
) -> None:
    keys = settings.redis_keys()
    writer, reader = StoreWriter(redis_client, keys, 3), VectorStore(redis_client, keys)
    schema = FeatureSchema.from_dict({"user": {"user_id": {"expire_after_s": 100.0}}})
    model = OnlineFM(schema, TrainConfig(dim=4, lr=0.5))
    pub = Publisher(PublishConfig(publish_active_s=0.0, publish_items_s=0.0), writer, model)
    for t in range(5):
        model.learn_many(["old", "new"], ["i1", "i2"], ts=[float(t)] * 2)
        pub.applied([Ev("old", "i1"), Ev("new", "i2")])
    pub.tick(10.0)
    np.testing.assert_allclose(composed(reader, ["old"]), model.user_vectors(["old"]), atol=1e-5)
    before = model.user_vectors(["old"])
    # only "new" is active from now on; "old"'s own row expires and it reads the fallback row
    model.learn_many(["new"], ["i2"], ts=[150.0])
    pub.applied([Ev("new", "i2")])
    pub.tick(20.0)
    now = model.user_vectors(["old"])
    assert not np.allclose(now, before)  # the expiry changed its vector
    np.testing.assert_allclose(composed(reader, ["old"]), now, atol=1e-5)


def test_a_republish_never_repeats_positives_whose_hand_over_was_in_flight(
    redis_client: redis.Redis, settings: Settings
) -> None:
    """The trainer learns, then hands over; the publisher may republish in between (Redis lost,
    or a start into an empty Redis). Those positives are in the republished histories already
    and must not be pushed a second time (the raw lists, not only their deduplicated reading)."""
    keys = settings.redis_keys()
    writer = StoreWriter(redis_client, keys, 3)
    model = OnlineFM(config=TrainConfig(dim=4, recent_items=8))
    model.learn_many(["old"] * 3, ["o1", "o2", "o3"])  # learned before the publisher existed
    pub = Publisher(PublishConfig(history_len=8, lost_check_s=0.0), writer, model)
    a = [Ev("u1", "i1"), Ev("u2", "i2"), Ev("u1", "i3", 0)]
    b = [Ev("u1", "i4"), Ev("u2", "i5"), Ev("u1", "i6")]
    for batch in (a, b):  # both learned ...
        model.learn_many([e.user_id for e in batch], [e.item_id for e in batch],
                         labels=np.array([e.label for e in batch]))
    pub.applied(a)  # ... only the first handed over when the publisher republishes
    pub.tick(1.0)  # empty Redis at the start: republishes everything the model knows
    pub.applied(b)  # the in-flight hand-over arrives
    model.learn_many(["u2"], ["i7"])  # and a later one (learned after) is pushed as usual
    pub.applied([Ev("u2", "i7")])

    def raw(user: str) -> list[str]:
        return [v.decode() for v in redis_client.lrange(keys.history(user), 0, -1)]

    assert raw("u1") == ["i6", "i4", "i1"]
    assert raw("u2") == ["i7", "i5", "i2"]
    assert raw("old") == ["o3", "o2", "o1"]


def test_a_history_write_that_failed_is_counted_once_when_handed_over_again(
    redis_client: redis.Redis, settings: Settings
) -> None:
    """Redis went away in the middle of a hand-over: ``applied`` raised and the trainer's
    ``GuardedSink`` hands the same events over again once Redis answers (an empty Redis after a
    restart without persistence). Those positives count once, so a republish that follows still
    skips exactly the hand-overs in flight (no positive pushed twice)."""
    keys = settings.redis_keys()
    writer = StoreWriter(redis_client, keys, 3)
    with socket.socket() as sock:  # a port nobody listens on: a real refused connection
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    away_conf = Settings(redis_url=f"redis://127.0.0.1:{port}/0").redis_config()
    away = StoreWriter(connect_redis(away_conf, socket_connect_timeout=1.0), keys, 3)
    model = OnlineFM(config=TrainConfig(dim=4, recent_items=8))
    pub = Publisher(PublishConfig(history_len=8, lost_check_s=0.0), writer, model)
    a, b, d = [Ev("u1", "i1"), Ev("u2", "i2")], [Ev("u1", "i3"), Ev("u2", "i4")], [Ev("u1", "i5")]

    def learn(batch: list[Ev]) -> None:
        model.learn_many([e.user_id for e in batch], [e.item_id for e in batch])

    learn(a)
    pub.applied(a)
    pub.tick(1.0)  # the first version (into an empty Redis: everything)
    republished = pub.republished
    learn(b)
    pub.store = away
    with pytest.raises(redis.ConnectionError):
        pub.applied(b)  # Redis away: the history write raised
    pub.store = writer
    redis_client.flushall()  # it comes back empty
    pub.applied(b)  # handed over again
    learn(d)  # learned; its hand-over is in flight when the publisher notices the loss
    pub.tick(2.0)
    assert pub.republished == republished + 1
    pub.applied(d)

    def raw(user: str) -> list[str]:
        return [v.decode() for v in redis_client.lrange(keys.history(user), 0, -1)]

    assert raw("u1") == ["i5", "i3", "i1"]
    assert raw("u2") == ["i4", "i2"]
