"""Recovery by itself, on the real Kafka and Redis: Redis FLUSHALL with an idle trainer, and
FLUSHALL plus a trainer restart; `fmstream lag` warns about versions the store no longer has."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from fmstream import services as fm_services
from fmstream.app import run_trainer, run_worker
from fmstream.monitor import read_lag, version_warnings
from fmstream.settings import Settings
from serving.client import FmClient
from serving.index import ItemSnapshot
from serving.store import VectorStore
from stream.connect import redis_client as connect_redis
from stream.consume import make_producer
from stream.replay import produce_events, produce_profiles
from stream.synthetic import SyntheticStream
from tests.kafka_helpers import wait_for
from train.store_writer import StoreWriter

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
STREAM = SyntheticStream(users=200, items=150, clusters=5, seed=4)
USERS = [f"u{n}" for n in range(0, 200, 20)]


class Loop:
    """A worker thread and a trainer thread that can be stopped and started again."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop_all = threading.Event()
        self.ready = threading.Event()
        self.worker = threading.Thread(
            target=run_worker, args=(settings, self.stop_all, self.ready), daemon=True
        )
        self.trainer_stop = threading.Event()
        self.trainer: threading.Thread | None = None

    def start_trainer(self) -> None:
        self.trainer_stop = threading.Event()
        self.trainer = threading.Thread(
            target=run_trainer, args=(self.settings, self.trainer_stop), daemon=True
        )
        self.trainer.start()

    def stop_trainer(self) -> None:
        assert self.trainer is not None
        self.trainer_stop.set()
        self.trainer.join(90)
        assert not self.trainer.is_alive(), "the trainer did not stop"


@pytest.fixture
def loop(settings: Settings) -> Iterator[Loop]:
    settings = settings.model_copy(update={
        "dim": 8, "schema_path": ROOT / "config" / "synthetic.toml",
        "publish_items_s": 0.3, "publish_active_s": 0.2, "checkpoint_every_s": 0.5,
        "swap_poll_s": 0.1, "lost_check_s": 0.2,
    })
    lp = Loop(settings)
    lp.worker.start()
    lp.start_trainer()
    assert lp.ready.wait(60), "the worker got no partitions of the request topic"
    yield lp
    lp.stop_all.set()
    lp.trainer_stop.set()
    for t in (lp.worker, lp.trainer):
        if t is not None:
            t.join(60)


def feed(settings: Settings, events: int) -> None:
    producer = make_producer(settings.kafka_config())
    produce_profiles(producer, settings.topics(), STREAM.user_profiles(), STREAM.item_profiles())
    produce_events(producer, settings.topics(), STREAM.events(events))
    producer.close()


def answers_normally(client: FmClient) -> bool:
    """Every probed user gets k items from its vector (no fallback, no error)."""
    responses = client.request_many(
        [{"type": "u2i", "user_id": u, "k": 5} for u in USERS], timeout=10
    )
    return all(
        r is not None and r.error is None and r.fallback is None and len(r.items) == 5
        for r in responses
    )


def newest(store: VectorStore) -> int:
    return int(store.get_status().get("model_version", 0) or 0)


def fed_store(settings: Settings) -> tuple[redis.Redis, VectorStore]:
    """Feed 3,000 events and wait until the trainer applied them; the Redis client and store."""
    feed(settings, 3000)
    client_redis = connect_redis(settings.redis_config())
    store = VectorStore(client_redis, settings.redis_keys())
    wait_for(lambda: int(store.get_status().get("events_applied", 0)) >= 3000, 120,
             "the trainer to apply the stream")
    return client_redis, store


def test_flushall_with_an_idle_trainer_republishes_by_itself(loop: Loop) -> None:
    settings = loop.settings
    client_redis, store = fed_store(settings)
    with FmClient(settings) as client:
        wait_for(lambda: answers_normally(client), 60, "u2i answers before the flush")
        before = max(store.worker_versions().values())
        histories = store.get_histories(USERS)
        assert all(histories), "every probed user has a history before the flush"
        client_redis.flushall()  # the trainer is idle: no event will ever trigger a publish
        wait_for(lambda: store.current_item_version() is not None, 30,
                 "the publisher to notice and republish")
        wait_for(lambda: answers_normally(client), 30, "u2i answers after the flush")
        # the histories (exclude_seen, i2i_history) come back from the model, not from events
        wait_for(lambda: store.get_histories(USERS) == histories, 30, "the histories back")
        seen = client.request_many([{"type": "u2i", "user_id": u, "k": 5, "exclude_seen": True}
                                    for u in USERS], timeout=10)
        for r, h in zip(seen, histories, strict=True):
            assert r is not None and r.error is None and r.fallback is None
            assert not {i.item_id for i in r.items} & set(h)
    after = store.current_item_version()
    assert after is not None and after > before
    wait_for(lambda: min(store.worker_versions().values(), default=-1) >= after, 30,
             "the worker to follow the republished version")


def test_flushall_and_trainer_restart_keep_versions_increasing(loop: Loop) -> None:
    settings = loop.settings
    client_redis, store = fed_store(settings)
    with FmClient(settings) as client:
        wait_for(lambda: answers_normally(client), 60, "u2i answers before the restart")
        loop.stop_trainer()  # final checkpoint (with its version) and a last publish
        served = max(store.worker_versions().values())
        client_redis.flushall()
        loop.start_trainer()
        wait_for(lambda: (store.current_item_version() or 0) > served, 90,
                 "the restarted trainer to publish above every version served before")
        head = store.current_item_version()
        wait_for(lambda: min(store.worker_versions().values(), default=-1) >= head, 30,
                 "the worker to follow the restarted trainer")
        wait_for(lambda: answers_normally(client), 30, "u2i answers after the restart")
        versions = {r.model_version for r in client.request_many(
            [{"type": "u2i", "user_id": u, "k": 5} for u in USERS], timeout=10) if r}
        assert versions and min(versions) >= head


def test_version_warnings() -> None:
    assert version_warnings({}, 5, {5}) == []
    assert version_warnings({"w": 5, "x": 4}, 5, {3, 4, 5}) == []
    (gone,) = version_warnings({"w": 2}, 5, {3, 4, 5})
    assert "no longer has" in gone and "v2" in gone
    (flushed,) = version_warnings({"w": 9}, None, set())
    assert "holds no item version" in flushed
    (back,) = version_warnings({"w": 9}, 5, {5})
    assert "went back" in back


def test_lag_warns_when_a_worker_serves_a_version_the_store_no_longer_has(
    settings: Settings, redis_client: redis.Redis
) -> None:
    keys = settings.redis_keys()
    writer = StoreWriter(redis_client, keys, 1)
    reader = VectorStore(redis_client, keys)
    vectors = np.ones((3, 4), np.float32)
    for v in (1, 2, 3):
        writer.put_item_snapshot(ItemSnapshot(v, ["a", "b", "c"], vectors))
    reader.set_worker_version("fresh", 3)
    reader.set_worker_version("stale", 1)  # v1 was dropped (keep_versions=1)
    report = read_lag(settings)
    warned = [p for p in report.problems if "no longer has" in p]
    assert len(warned) == 1 and "stale" in warned[0]
    redis_client.flushall()
    reader.set_worker_version("fresh", 3)
    report = read_lag(settings)
    assert any("holds no item version" in p for p in report.problems)


def test_redis_killed_and_restarted_empty_recovers_by_itself(
    loop: Loop, services: Settings
) -> None:
    """kill -9 of redis-server while the trainer and a worker run, then a new one on the same
    port with the default persistence (none: it starts empty). Without any other action: requests
    meanwhile get an answer (an error with its code while Redis is away, never a hang), u2i
    answers normally again, versions keep increasing, the trainer holds its lease again, the
    worker registers again, and events sent after the restart are all applied (positions live in
    Kafka and the checkpoint, not in Redis)."""
    settings = loop.settings
    assert services.redis_persistence == "none"
    client_redis, store = fed_store(settings)
    lease_key = settings.redis_keys().trainer_lease()
    with FmClient(settings) as client:
        wait_for(lambda: answers_normally(client), 60, "u2i answers before the kill")
        before = store.current_item_version()
        assert before is not None
        holder = client_redis.get(lease_key)
        assert holder is not None
        assert fm_services.stop_redis(services, kill=True)
        try:
            # Redis is away: every request still gets a response, an error naming its code
            down = client.request_many(
                [{"type": "u2i", "user_id": u, "k": 5} for u in USERS], timeout=30
            )
            assert all(r is not None for r in down), "a request hung while Redis was away"
            for r in down:  # the store read failed: the worker's backend-fault code
                assert r.error is not None and r.error.code == "internal", r
                assert "ConnectionError" in r.error.message
        finally:
            fm_services.start_redis(services)
        wait_for(lambda: (store.current_item_version() or 0) > before, 60,
                 "the publisher to republish above the version before the kill")
        wait_for(lambda: answers_normally(client), 60, "u2i answers after the restart")
        after = store.current_item_version()
        assert after is not None and after > before
        wait_for(lambda: client_redis.get(lease_key) == holder, 30,
                 "the trainer to hold its lease again")
        wait_for(lambda: min(store.worker_versions().values(), default=-1) >= after, 60,
                 "the worker to register again at the republished version")
        versions = {r.model_version for r in client.request_many(
            [{"type": "u2i", "user_id": u, "k": 5} for u in USERS], timeout=10) if r}
        assert versions and min(versions) >= after
        # nothing lost: events sent after the restart are applied on top of the 3,000 before
        producer = make_producer(settings.kafka_config())
        produce_events(producer, settings.topics(), STREAM.events(1000))
        producer.close()
        wait_for(lambda: int(store.get_status().get("events_applied", 0)) == 4000, 120,
                 "the trainer to apply the events sent after the restart")
        assert (store.current_item_version() or 0) >= after


def test_the_services_redis_client_gives_up_after_one_quick_retry() -> None:
    """A Redis that is away (killed, restarting) fails a command after one retry, so a worker
    answers its requests with an error instead of holding them through redis-py's default
    backoff (10 retries; ~4.7 s per command on a refused connection)."""
    from fmstream.app import REDIS_RETRIES, redis_client

    accepted = []
    with socket.socket() as srv:  # accepts and closes at once: a Redis dying under us
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        srv.settimeout(0.2)
        client = redis_client(Settings(redis_url=f"redis://127.0.0.1:{srv.getsockname()[1]}/0"))
        assert client.get_retry().get_retries() == REDIS_RETRIES == 1
        done = threading.Event()

        def accept() -> None:
            while not done.is_set():
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                accepted.append(1)
                conn.close()

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        try:
            with pytest.raises(redis.ConnectionError):
                client.get("k")
        finally:
            done.set()
            t.join(5)
    # each attempt opens at most a connection and its re-connect: 2 attempts, not 11
    assert 1 <= len(accepted) <= 2 * (REDIS_RETRIES + 1)
