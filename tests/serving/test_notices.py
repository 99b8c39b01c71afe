"""Version notices (``items:notice``) against the real Redis: the publisher announces every
version it makes current, a follower waiting between polls wakes on it at once, and a lost
notice or a broken subscription falls back to the poll and subscribes again."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
import redis
from pydantic import SecretStr

from fmstream.settings import Settings
from serving.deltas import DeltaLog
from serving.follow import IndexFollower, VersionNotices
from serving.store import VectorStore
from stream.connect import redis_client as connect_redis
from tests.kafka_helpers import wait_for
from tests.serving.test_deltas import evolve
from tests.train.test_deltas_publish import learn, new_model
from train.deltas import VersionedPublisher
from train.store_writer import StoreWriter

pytestmark = pytest.mark.integration

FOREVER_S = 3600.0  # a poll that never comes within a test: only a notice can wake the follower


def subscribers(store: VectorStore) -> int:
    ((_, n),) = store.redis.pubsub_numsub(store.key("items", "notice"))
    return int(n)


@pytest.fixture
def following(store: VectorStore, writer: StoreWriter
              ) -> Iterator[tuple[IndexFollower, DeltaLog, list]]:
    """A follower at v1 running its loop with a poll that never comes (``FOREVER_S``)."""
    base, deltas, _ = evolve(50, 4)
    writer.put_item_snapshot(base)
    follower = IndexFollower(store, poll_s=FOREVER_S)
    assert follower.refresh() and follower.version == 1
    stop = threading.Event()
    thread = threading.Thread(target=follower.run, args=(stop,), daemon=True)
    thread.start()
    wait_for(lambda: subscribers(store) >= 1, 30, "the follower to subscribe")
    yield follower, DeltaLog(store.redis, store.key), deltas
    stop.set()
    thread.join(10)
    assert not thread.is_alive()  # stop ends a wait on notices (no poll needed)
    wait_for(lambda: subscribers(store) == 0, 10, "the subscription to be closed")


def test_a_notice_wakes_a_waiting_follower_at_once(following, store: VectorStore) -> None:
    follower, log, deltas = following
    for d in deltas[:2]:
        log.put(d)
        store.redis.publish(store.key("items", "notice"), str(d.version))
        wait_for(lambda v=d.version: follower.version == v, 30, f"v{d.version} by its notice")
    assert follower.notices is not None and follower.notices.received >= 2


def test_a_broken_subscription_is_made_again(following, store: VectorStore) -> None:
    """The subscriber's connection killed (as by a Redis restart): the follower subscribes
    again by itself and the next notice wakes it."""
    follower, log, deltas = following
    store.redis.client_kill_filter(_type="pubsub")
    wait_for(lambda: subscribers(store) >= 1, 30, "the follower to subscribe again")
    log.put(deltas[0])
    store.redis.publish(store.key("items", "notice"), str(deltas[0].version))
    wait_for(lambda: follower.version == deltas[0].version, 30, "the version by its notice")


def test_without_a_notice_the_poll_moves_the_follower(
    store: VectorStore, writer: StoreWriter
) -> None:
    """A lost notice (or a publisher that announces nothing) costs one poll, never a freeze."""
    base, deltas, _ = evolve(50, 2)
    writer.put_item_snapshot(base)
    follower = IndexFollower(store, poll_s=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=follower.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: follower.version == 1, 30, "the full snapshot")
        DeltaLog(store.redis, store.key).put(deltas[0])  # no notice
        wait_for(lambda: follower.version == 2, 30, "v2 by the poll")
        assert follower.notices is not None and follower.notices.received == 0
    finally:
        stop.set()
        thread.join(10)


def test_notices_down_fall_back_to_sleeping_the_poll(settings: Settings) -> None:
    """Redis away: each wait fails, sleeps (never spins) and says no notice came."""
    away = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})  # nothing there
    client = connect_redis(away.redis_config(), socket_connect_timeout=0.2)
    notices = VersionNotices(client, "fm:items:notice")
    stop = threading.Event()
    assert notices.wait(stop, 0.05) is False and notices.wait(stop, 0.05) is False
    assert notices.failures == 2
    stop.set()
    assert notices.wait(stop, FOREVER_S) is False  # stopped: returns at once, not after 1 s
    notices.close()


def test_the_publisher_announces_every_version_it_makes_current(
    store: VectorStore, writer: StoreWriter
) -> None:
    model = new_model()
    rng = np.random.default_rng(21)
    learn(model, rng, 200, 300)
    sub = store.redis.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(store.key("items", "notice"))
    try:
        wait_for(lambda: subscribers(store) >= 1, 30, "the test to subscribe")
        pub = VersionedPublisher(writer, model)
        made = [pub.publish_items(now=1.0)]  # a full snapshot
        learn(model, rng, 10, 300)
        made.append(pub.publish_shared(now=1.1))  # a shared-rows version
        made.append(pub.publish_items(now=1.5))  # a delta
        got: list[int] = []

        def read() -> bool:
            msg = sub.get_message(timeout=0.5)
            if msg is not None:
                got.append(int(msg["data"]))
            return len(got) == 3

        wait_for(read, 30, "three notices")
        assert got == [p.version for p in made if p is not None]
        assert store.current_item_version() == got[-1]
    finally:
        sub.close()


@pytest.fixture
def denied(redis_client: redis.Redis, settings: Settings) -> Iterator[redis.Redis]:
    """A client of the session's Redis as a user whose ACL allows every key and command but no
    pub/sub channel (an ACL written before the notices)."""
    name = f"fresh-nochannels-{threading.get_ident()}"
    redis_client.execute_command("ACL", "SETUSER", name, "reset", "on", ">pw", "~*",
                                 "resetchannels", "+@all")
    user = settings.model_copy(update={"redis_username": name, "redis_password": SecretStr("pw")})
    client = connect_redis(user.redis_config(), socket_timeout=10)
    yield client
    client.close()
    redis_client.execute_command("ACL", "DELUSER", name)


def test_a_redis_user_denied_the_channel_publishes_and_follows_by_the_poll(
    denied: redis.Redis, settings: Settings
) -> None:
    """Notices are a hint: a publisher whose PUBLISH is refused (NOPERM) stops announcing
    with one warning and keeps publishing; a follower whose SUBSCRIBE is refused stops trying
    and follows by its poll."""
    keys = settings.redis_keys()
    writer, reader = StoreWriter(denied, keys, 3), VectorStore(denied, keys)
    follower = IndexFollower(reader, poll_s=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=follower.run, args=(stop,), daemon=True)
    thread.start()
    try:
        model = new_model()
        rng = np.random.default_rng(22)
        learn(model, rng, 200, 300)
        pub = VersionedPublisher(writer, model)
        first = pub.publish_items(now=1.0)
        assert first is not None and not pub._notices  # refused once: off, the version is out
        learn(model, rng, 10, 300)
        second = pub.publish_items(now=1.5)
        assert second is not None and reader.current_item_version() == second.version
        wait_for(lambda: follower.version == second.version, 30, "the follower by its poll")
        assert follower.notices is not None and follower.notices.denied
    finally:
        stop.set()
        thread.join(10)
