"""A worker that falls out of its consumer group comes back by itself (issue 10).

The :class:`Watchdog` rules on a fake clock; then against the session's real Kafka and Redis:
a worker evicted through the broker's admin API rejoins by itself; one whose consumer stops
polling (a consumer that no longer tries to join) is given a new consumer by its watchdog; and
one whose poll never returns is ended by its watchdog with status ``EXIT_STUCK`` (run as
``fmstream serve`` in a subprocess).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import redis
from kafka.admin import MemberToRemove

from fmstream.settings import Settings
from serving.client import FmClient
from serving.index import ItemSnapshot
from serving.store import VectorStore
from serving.worker import EXIT_STUCK, Watchdog, Worker
from stream.connect import kafka_admin
from tests.kafka_helpers import wait_for
from tests.serving.faulty_kafka import FaultyClients
from train.store_writer import StoreWriter

REPO_ROOT = Path(__file__).resolve().parents[2]
N_ITEMS = 50


# --- the rules, on a fake clock ---------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_worker_out_of_the_group_for_the_limit_is_due_a_new_consumer() -> None:
    clock = Clock()
    dog = Watchdog(30, clock=clock, on_stuck=lambda message: None)
    assert not dog.overdue()  # joining: the first join has the whole limit
    clock.now += 31
    assert dog.overdue() and dog.unhealthy_s() == 31
    dog.renewed()
    assert not dog.overdue() and dog.renewals == 1
    dog.turn(True)
    clock.now += 100
    assert not dog.overdue() and dog.unhealthy_s() == 0  # a member: no bound
    dog.turn(False)  # dropped: the bound counts from the last healthy turn
    assert dog.overdue() and dog.unhealthy_s() == 100
    dog.waiting("no request topic yet")  # out by choice: counts from now
    clock.now += 29
    assert not dog.overdue()
    clock.now += 2
    assert dog.overdue()


def test_a_request_loop_that_does_not_come_back_is_stuck() -> None:
    clock = Clock()
    dog = Watchdog(30, clock=clock, on_stuck=lambda message: None)
    clock.now += 29
    assert dog.stuck() is None
    dog.turn(False)  # polls that return keep it alive, member or not
    clock.now += 29
    assert dog.stuck() is None
    dog.alive("positioning the assigned partitions")
    clock.now += 31
    message = dog.stuck()
    assert message is not None and "31 s" in message and "positioning" in message
    assert f"status {EXIT_STUCK}" in message


def test_a_watchdog_of_limit_zero_is_off() -> None:
    clock = Clock()
    dog = Watchdog(0, clock=clock, on_stuck=lambda message: None)
    clock.now += 10_000
    assert not dog.overdue() and dog.stuck() is None
    dog.watch(threading.Event())  # returns at once


def test_the_watchdog_thread_calls_on_stuck_once() -> None:
    called: list[str] = []
    fired = threading.Event()

    def on_stuck(message: str) -> None:
        called.append(message)
        fired.set()

    dog = Watchdog(0.2, on_stuck=on_stuck)
    done = threading.Event()
    thread = threading.Thread(target=dog.watch, args=(done,), daemon=True)
    thread.start()
    assert fired.wait(30), "the watchdog never fired"
    thread.join(30)
    assert not thread.is_alive() and len(called) == 1


# --- real Kafka -----------------------------------------------------------------------------


def publish_items(settings: Settings, redis_client: redis.Redis) -> VectorStore:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((N_ITEMS, 10)).astype(np.float32)
    vectors[:, 1] = 1.0
    StoreWriter(redis_client, settings.redis_keys()).put_item_snapshot(
        ItemSnapshot(1, [f"i{j}" for j in range(N_ITEMS)], vectors))
    return VectorStore(redis_client, settings.redis_keys())


def members(settings: Settings) -> list[str]:
    with kafka_admin(settings.kafka_config()) as admin:
        group = admin.describe_groups([settings.serving_group])[settings.serving_group]
    return [m["member_id"] if isinstance(m, dict) else m.member_id
            for m in group.get("members") or ()]


def evict(settings: Settings) -> list[str]:
    """Remove every member of the serving group through the broker (as a session expiry does)."""
    gone = members(settings)
    assert gone, "no member to evict"
    with kafka_admin(settings.kafka_config()) as admin:
        admin.remove_group_members(settings.serving_group,
                                   [MemberToRemove(member_id=m) for m in gone])
    return gone


def answered(client: FmClient, item: str) -> bool:
    """One request answered (not an error); False on a timeout (the group not back yet)."""
    try:
        return client.request({"type": "i2i", "item_id": item}, timeout=3).error is None
    except Exception:  # noqa: BLE001 - ClientTimeout: ask again
        return False


class InProcess:
    """A worker as a thread of this process, with a watchdog that records instead of exiting."""

    def __init__(self, settings: Settings, store: VectorStore, clients, limit_s: float) -> None:
        self.stuck: list[str] = []
        self.worker = Worker(settings.serving_config(), store, clients, worker_id="wd",
                             watchdog=Watchdog(limit_s, on_stuck=self.stuck.append))
        self.stop, self.ready = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self.worker.run, args=(self.stop,),
                                       kwargs={"ready": self.ready}, daemon=True, name="wd")

    def __enter__(self) -> InProcess:
        self.thread.start()
        assert self.ready.wait(180), "the worker never got its partitions"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the worker did not stop"


def test_an_evicted_worker_rejoins_by_itself(settings: Settings,
                                             redis_client: redis.Redis) -> None:
    """The broker drops the member (admin remove-members, what a session expiry does): the
    worker notices on its next heartbeat, rejoins, and answers again, without a renewal."""
    store = publish_items(settings, redis_client)
    clients = FaultyClients(settings, lambda: False, "deaf")  # never faulty
    with InProcess(settings, store, clients, limit_s=60) as running, FmClient(settings) as client:
        wait_for(lambda: answered(client, "i1"), 60, "a first answer")
        gone = evict(settings)
        wait_for(lambda: (m := members(settings)) and not set(m) & set(gone), 60,
                 "a new member id in the group")
        wait_for(lambda: answered(client, "i2"), 60, "an answer after the eviction")
        assert running.worker.watchdog.renewals == 0 and not running.stuck


def test_a_consumer_that_stops_rejoining_is_replaced_within_the_limit(
    settings: Settings, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's first consumer stops polling kafka-python (nothing rejoins the group) and
    the broker drops the member: within the watchdog's limit the worker closes that consumer,
    joins with a new one and answers again; the renewal shows in its report and metric.

    The replacement's join may stall too on a loaded box (seen: a rebalance right after its
    join that it never completed, stuck "rebalancing" for over a minute); the watchdog renews
    that one as well, as it would in production, so the test counts renewals (at least one,
    one consumer each) instead of expecting exactly two consumers."""
    store = publish_items(settings, redis_client)
    deaf = threading.Event()
    clients = FaultyClients(settings, deaf.is_set, "deaf")
    limit_s = 8.0
    with InProcess(settings, store, clients, limit_s) as running, FmClient(settings) as client:
        wait_for(lambda: answered(client, "i1"), 60, "a first answer")
        deaf.set()
        gone = evict(settings)
        dog = running.worker.watchdog
        wait_for(lambda: not dog.member, 60, "the worker to see it is out of the group")
        # back within the limit (plus a join on a loaded box): a new consumer, a new member
        wait_for(lambda: dog.renewals >= 1, limit_s + 60, "the watchdog's renewal")
        wait_for(lambda: (m := members(settings)) and not set(m) & set(gone), 60,
                 "the new consumer in the group")
        # generous: a replacement whose join stalls is renewed after limit_s, then joins
        wait_for(lambda: answered(client, "i2"), 180, "an answer from a new consumer")
        # a member again (not read at one instant: a rebalance right after a join makes it a
        # non-member for a few seconds)
        group = wait_for(lambda: (g := running.worker.group_report())["member"] and g, 60,
                         "the worker a group member again")
        renewals = group["renewals"]
        assert renewals >= 1 and renewals == dog.renewals
        assert len(clients.made) == 1 + renewals and clients.made[0].faulty_polls > 0
        assert not running.stuck
        wait_for(lambda: store.worker_groups().get("wd", {}).get("renewals") == renewals, 30,
                 "the renewals in the worker's report")
    assert "closing the Kafka consumer and joining with a new one (renewal 1)" in caplog.text


def test_a_worker_whose_poll_never_returns_exits_for_its_supervisor(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """``fmstream serve`` whose consumer's poll hangs (the request thread stuck inside Kafka):
    its watchdog thread logs why and ends the process with ``EXIT_STUCK``."""
    store = publish_items(settings, redis_client)
    trigger = tmp_path / "hang"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FMSTREAM_")}
    env.update(settings.to_env())
    env.update(FMSTREAM_WORKER_WATCHDOG_S="10", PYTHONUNBUFFERED="1", COLUMNS="300")
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "tests.serving.stuck_worker", str(trigger)], cwd=REPO_ROOT,
            env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        with FmClient(settings) as client:
            wait_for(lambda: proc.poll() is not None or answered(client, "i1"), 180,
                     "the worker's first answer")
        assert proc.poll() is None, log_path.read_text()
        assert store.worker_versions(), "the worker never reported"
        trigger.touch()
        code = proc.wait(timeout=180)  # the limit is 10 s; generous for a loaded box
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_path.read_text()
    assert code == EXIT_STUCK, output
    assert "worker watchdog: the request loop has not come back from Kafka" in output
