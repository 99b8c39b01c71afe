"""The worker through faults: a zombie member answers nothing, a refused commit drops what is in
flight, answers resume after a broker restart, and two workers starting under load answer every
request exactly once.

The membership rules are unit-tested on a stand-in consumer; the rest runs against the session's
real Kafka and Redis, with workers as threads of this process (``Worker.run``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from types import SimpleNamespace

import numpy as np
import orjson
import pytest
import redis
from kafka.errors import (
    CommitFailedError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RequestTimedOutError,
)
from kafka.structs import MemberState, TopicPartition

from fmstream import services as fm_services
from fmstream.settings import Settings
from serving.answering import decode_request
from serving.client import FmClient
from serving.config import ServingConfig
from serving.errors import ClientTimeout
from serving.index import ItemSnapshot
from serving.store import VectorStore
from serving.timing import PathLog
from serving.worker import (
    IDLE_POLL_MS,
    JOIN_POLL_MS,
    QUIET_COMMIT_S,
    Membership,
    ReplyTopics,
    Watchdog,
    Worker,
    _Replies,
)
from tests.kafka_helpers import KafkaIO, consume_all, wait_for
from tests.worker_helpers import start_worker
from train.store_writer import StoreWriter

log = logging.getLogger(__name__)

N_ITEMS = 300


# --- membership on a stand-in consumer -------------------------------------------------------


class FakeCoordinator:
    """Stands in for :class:`serving.coordinator.GroupCoordinator` (the one reader of
    kafka-python's private coordinator, tested on a real consumer in test_coordinator.py)."""

    def __init__(self) -> None:
        self.last_receive = time.monotonic()
        self.rejoin_requested = 0
        self.rejoin = False

    def last_heartbeat(self) -> float:
        return self.last_receive

    def rejoin_needed(self) -> bool:
        return self.rejoin

    def request_rejoin(self) -> bool:
        self.rejoin_requested += 1
        return True


class FakeConsumer:
    def __init__(self) -> None:
        self.coordinator = FakeCoordinator()
        self.state = MemberState.STABLE
        self.generation = 1
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.assigned = {TopicPartition("t", 0)}

    def group_metadata(self):
        return SimpleNamespace(state=self.state, generation_id=self.generation)

    def assignment(self):
        return set(self.assigned)

    def seek(self, tp, offset) -> None:
        self.seeks.append((tp, offset))


def member_of(consumer: FakeConsumer) -> Membership:
    return Membership(consumer, session_timeout_ms=3000, coordinator=consumer.coordinator)


def test_a_member_answers_only_while_stable_with_fresh_heartbeats() -> None:
    consumer = FakeConsumer()
    member = member_of(consumer)
    assert member.check()
    consumer.state = MemberState.REBALANCING
    assert not member.check()
    consumer.state = MemberState.STABLE
    consumer.generation = 2
    assert member.check()  # a new generation counts as a fresh join
    # heartbeats stop (the process was stalled, the broker dropped it): a zombie
    consumer.coordinator.last_receive = time.monotonic() - 2.5
    member.joined_at = time.monotonic() - 2.5
    assert not member.check() and consumer.coordinator.rejoin_requested == 0
    consumer.coordinator.last_receive = time.monotonic() - 4
    member.joined_at = time.monotonic() - 4
    assert not member.check() and consumer.coordinator.rejoin_requested == 1  # made to rejoin
    consumer.coordinator.last_receive = time.monotonic()
    assert member.check() and member.pauses == 2  # the rebalance, then the silence


def test_a_member_never_seen_stable_says_so_once_after_a_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer = FakeConsumer()
    consumer.state = MemberState.UNJOINED
    consumer.coordinator.last_receive = float("-inf")
    member = member_of(consumer)
    with caplog.at_level(logging.WARNING, logger="serving.worker"):
        assert not member.check()
        assert "not a stable group member yet" not in caplog.text  # within its first session
        member.joined_at = time.monotonic() - 3.2
        assert not member.check() and not member.check()
    assert caplog.text.count("not a stable group member yet, 3 s after subscribing") == 1


def test_a_joining_member_polls_long_enough_to_see_its_join_complete() -> None:
    """kafka-python awaits a join only inside poll() and drops one that completed between two
    polls: while not a stable member (or about to rejoin) the loop polls JOIN_POLL_MS."""
    consumer = FakeConsumer()
    timeouts: list[int] = []
    consumer.poll = lambda timeout_ms: timeouts.append(timeout_ms) or {}
    member = member_of(consumer)
    worker = SimpleNamespace(metrics=None, dead_letters=0, config=ServingConfig(),
                             watchdog=Watchdog(0), serving=threading.Event(),
                             path_log=PathLog(), _request_at=-float("inf"))
    replies = _Replies(worker, consumer, RefusingProducer(0, RuntimeError()))
    for state, rejoin in ((MemberState.REBALANCING, False), (MemberState.UNJOINED, False),
                          (MemberState.STABLE, True), (MemberState.STABLE, False)):
        consumer.state, consumer.coordinator.rejoin = state, rejoin
        Worker._step(worker, consumer, replies, member, None)
    assert timeouts == [JOIN_POLL_MS, JOIN_POLL_MS, JOIN_POLL_MS, IDLE_POLL_MS]


def test_an_idle_member_polls_long_and_commits_once_requests_pause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A member with nothing in flight polls IDLE_POLL_MS (1 s: a poll returns as soon as a
    request arrives), not every 100 ms, and at most a quarter of the watchdog's limit. Its
    acknowledged offsets are committed once no request came for QUIET_COMMIT_S, not on the
    first empty poll after each answer (one OffsetCommit per request at 10-100 requests/s);
    then it polls long again."""
    monkeypatch.setattr("serving.worker.COMMIT_INTERVAL_S", 3600.0)  # only the quiet commit
    consumer = FakeConsumer()
    timeouts: list[int] = []
    commits: list[dict] = []
    consumer.poll = lambda timeout_ms: timeouts.append(timeout_ms) or {}
    consumer.commit_async = lambda offsets, callback=None: commits.append(
        {tp: o.offset for tp, o in offsets.items()})
    member = member_of(consumer)
    worker = SimpleNamespace(metrics=None, dead_letters=0, config=ServingConfig(),
                             watchdog=Watchdog(0), serving=threading.Event(),
                             path_log=PathLog(), _request_at=-float("inf"),
                             _report=lambda: None)
    replies = _Replies(worker, consumer, RefusingProducer(0, RuntimeError()))
    replies.owned = consumer.assignment()  # positioned: nothing to anchor
    Worker._step(worker, consumer, replies, member, None)
    assert timeouts == [IDLE_POLL_MS] and not commits  # idle, nothing to commit
    tp = TopicPartition("t", 0)
    replies.acked[tp] = 5  # a reply acknowledged, requests came a moment ago
    worker._request_at = time.monotonic()
    Worker._step(worker, consumer, replies, member, None)
    assert 10 <= timeouts[-1] <= 100 and not commits  # waits for the quiet commit
    worker._request_at = time.monotonic() - QUIET_COMMIT_S  # no request since
    Worker._step(worker, consumer, replies, member, None)
    assert commits == [{tp: 5}]
    Worker._step(worker, consumer, replies, member, None)
    Worker._step(worker, consumer, replies, member, None)
    assert timeouts[-2:] == [IDLE_POLL_MS, IDLE_POLL_MS] and commits == [{tp: 5}]
    worker.watchdog = Watchdog(2.0)  # a short limit: polls come back well within it
    Worker._step(worker, consumer, replies, member, None)
    assert timeouts[-1] == 500


def test_rejoin_pending_only_for_a_stable_member_asked_to_rejoin() -> None:
    consumer = FakeConsumer()
    member = member_of(consumer)
    assert not member.rejoin_pending()
    consumer.coordinator.rejoin = True
    assert member.rejoin_pending()
    consumer.state = MemberState.UNJOINED
    assert not member.rejoin_pending()


def test_a_refused_commit_drops_the_batches_in_flight_and_seeks_back() -> None:
    consumer = FakeConsumer()
    worker = SimpleNamespace(metrics=None, dead_letters=0, config=None)
    replies = _Replies(worker, consumer, producer=None)
    tp = TopicPartition("t", 0)
    replies.acked[tp] = 10
    replies.committed[tp] = 10
    replies._commit_done({tp: None}, RequestTimedOutError())
    assert not replies.lost  # a timeout says nothing about the membership
    replies._commit_done({tp: None}, CommitFailedError("generation moved"))
    assert replies.lost and tp not in replies.committed
    record = SimpleNamespace(topic="t", partition=0, offset=12)
    replies.drop([record])
    assert not replies.lost and replies.acked == {} and consumer.seeks == [(tp, 12)]


# --- real Kafka -----------------------------------------------------------------------------


def publish_items(settings: Settings, redis_client: redis.Redis) -> VectorStore:
    rng = np.random.default_rng(8)
    vectors = rng.standard_normal((N_ITEMS, 10)).astype(np.float32)
    vectors[:, 1] = 1.0
    writer = StoreWriter(redis_client, settings.redis_keys())
    writer.put_item_snapshot(ItemSnapshot(1, [f"i{j}" for j in range(N_ITEMS)], vectors))
    return VectorStore(redis_client, settings.redis_keys())


def request(rid: str, n: int) -> bytes:
    return orjson.dumps({"request_id": rid, "type": "i2i", "item_id": f"i{n % N_ITEMS}", "k": 3})


def test_answers_resume_after_a_broker_restart(settings: Settings, redis_client: redis.Redis,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """The worker (and the client) reconnect by themselves; the time from the broker being back
    to the first answer is logged (bench/robust.py measures it repeatedly), not asserted."""
    store = publish_items(settings, redis_client)
    running = start_worker(settings, store, "restart-worker")
    try:
        wait_for(lambda: running.worker.state is not None, 30, "the index")
        with FmClient(settings) as client:
            assert client.request({"type": "i2i", "item_id": "i1"}, timeout=20).error is None
            fm_services.stop_kafka(settings, kill=True)
            fm_services.start_kafka(settings)
            back = time.monotonic()
            answered = None
            deadline = back + 120
            while answered is None and time.monotonic() < deadline:
                try:
                    answered = client.request({"type": "i2i", "item_id": "i2"}, timeout=2)
                except ClientTimeout:
                    continue
            assert answered is not None, "no answer within 120 s of the broker's restart"
            assert answered.error is None
            log.warning("first answer %.2f s after the broker was back (SIGKILL restart)",
                        time.monotonic() - back)
        assert running.thread.is_alive()
    finally:
        running.close()


def test_two_workers_starting_under_load_answer_every_request_once(
    settings: Settings, redis_client: redis.Redis, kafka_io: KafkaIO
) -> None:
    """Five starts of a two-worker group (each its own group) while requests keep coming:
    the second member's join moves partitions under load; every request is answered, and (the
    first member commits what it answered before the handover) all but a rare tail only once."""
    store = publish_items(settings, redis_client)
    counter = itertools.count()
    sent: list[str] = []
    for start_no in range(5):
        s = settings.model_copy(update={"serving_group": f"{settings.serving_group}.{start_no}",
                                        "worker_session_timeout_ms": 6000})
        first = start_worker(s, store, f"a{start_no}")
        second = None
        stop_load = threading.Event()
        mine: list[str] = []

        def load(mine: list[str] = mine, start_no: int = start_no,
                 stop_load: threading.Event = stop_load) -> None:
            while not stop_load.is_set():
                batch = []
                for _ in range(5):
                    n = next(counter)
                    rid = f"s{start_no}-{n}"
                    batch.append((rid, request(rid, n)))
                kafka_io.produce(settings.topic_requests, batch)
                mine.extend(rid for rid, _ in batch)
                stop_load.wait(0.1)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        try:
            wait_for(lambda mine=mine, first=first: len(mine) >= 10
                     and first.worker.answered >= 5, 120, "answers before the second joins")
            second = start_worker(s, store, f"b{start_no}")  # returns once it owns partitions
            # load goes on until the new member answered some of it (the handover happened)
            # and 100 requests were sent: observable state, not a clock
            wait_for(lambda mine=mine, second=second: len(mine) >= 100
                     and second.worker.answered >= 20, 180, "answers after the join")
        finally:
            stop_load.set()
            loader.join(10)
        try:
            want = set(mine)

            def answered(records, want=want) -> bool:
                return want <= {r.key.decode() for r in records}

            kafka_io.consume_until(s.topic_responses, answered, timeout_s=180)
        finally:
            for w in (first, second):
                if w is not None:
                    w.close()
        sent += mine
    wire = Counter(r.key.decode() for r in consume_all(settings, settings.topic_responses))
    twice = {rid: c for rid, c in wire.items() if c > 1}
    assert set(wire) == set(sent), "a request was not answered"
    # A zombie answers everything twice; a clean handover nothing. Delivery is at least once, so
    # a rare handover tail is tolerated (seen: 2 of 546 in 1 of 20 process starts, bench/robust.py)
    assert len(twice) <= len(sent) // 100, (
        f"{len(twice)} of {len(sent)} requests answered more than once: {sorted(twice)[:10]}")


class RefusingProducer:
    """Refuses the first ``refusals`` sends (as kafka-python does a record over its size limit),
    then accepts; records what was sent where."""

    def __init__(self, refusals: int, error: Exception) -> None:
        self.refusals, self.error = refusals, error
        self.sent: list[tuple[str, bytes | None, bytes]] = []

    def send(self, topic: str, key: bytes | None = None, value: bytes = b""):
        if self.refusals > 0:
            self.refusals -= 1
            raise self.error
        self.sent.append((topic, key, value))
        return SimpleNamespace(is_done=False)


def _one_reply(producer: RefusingProducer):
    config = ServingConfig()
    worker = SimpleNamespace(metrics=None, dead_letters=0, config=config)
    replies = _Replies(worker, FakeConsumer(), producer)
    record = SimpleNamespace(topic="fm.requests", partition=0, offset=7, key=b"r1",
                             value=b'{"request_id": "r1", "type": "u2i"}', timestamp=1)
    pending = decode_request(record.value, config)
    pending.answer([("i1", 1.0)], 3)
    replies.send([record], [pending], 0.0)
    return worker, replies, pending


def test_a_reply_the_producer_refuses_becomes_an_internal_error_reply() -> None:
    producer = RefusingProducer(1, MessageSizeTooLargeError("too large"))
    worker, replies, pending = _one_reply(producer)
    [(topic, key, value)] = producer.sent
    body = orjson.loads(value)
    assert topic == "fm.responses" and key == b"r1"
    assert body["error"]["code"] == "internal" and "could not be sent" in body["error"]["message"]
    assert len(replies.sent) == 1 and worker.dead_letters == 0


def test_a_reply_refused_twice_is_dead_lettered_and_the_batch_moves_on() -> None:
    producer = RefusingProducer(2, MessageSizeTooLargeError("too large"))
    worker, replies, _ = _one_reply(producer)
    [(topic, key, value)] = producer.sent
    letter = orjson.loads(value)
    assert topic == "fm.dlq" and key == b"r1" and worker.dead_letters == 1
    assert letter["stage"] == "reply" and letter["id"] == "fm.requests/0/7"
    assert len(replies.sent) == 1  # tracked like a reply: committed once acknowledged


def test_a_broker_away_at_send_time_answers_the_batch_again() -> None:
    consumer = FakeConsumer()
    consumer.assigned = {TopicPartition("fm.requests", 0)}
    producer = RefusingProducer(5, KafkaTimeoutError("no metadata"))
    worker = SimpleNamespace(metrics=None, dead_letters=0, config=ServingConfig())
    replies = _Replies(worker, consumer, producer)
    record = SimpleNamespace(topic="fm.requests", partition=0, offset=7, key=b"r1",
                             value=b"{}", timestamp=1)
    replies.send([record], [decode_request(record.value, worker.config)], 0.0)
    assert consumer.seeks == [(TopicPartition("fm.requests", 0), 7)] and not replies.sent


# --- reply topics: a missing one is found without waiting on it -----------------------------


class ListingConsumer:
    """Stand-in for the one consumer call ``ReplyTopics`` makes (``topics()``)."""

    def __init__(self, topics: set[str]) -> None:
        self.existing = set(topics)
        self.calls = 0
        self.fail = False

    def topics(self) -> set[str]:
        self.calls += 1
        if self.fail:
            raise KafkaTimeoutError("broker away")
        return set(self.existing)


def test_reply_topics_lists_the_broker_at_most_once_per_interval() -> None:
    now = [0.0]
    consumer = ListingConsumer({"fm.responses", "fm.replies.a"})
    topics = ReplyTopics(consumer, refresh_s=1.0, clock=lambda: now[0])
    assert topics.missing({"fm.replies.a"}) == set() and consumer.calls == 1
    assert topics.missing({"fm.replies.a"}) == set() and consumer.calls == 1  # known: no call
    # a flood of missing names within the interval: no listing, no wait, all missing
    assert topics.missing({f"fm.replies.x{n}" for n in range(100)}) == {
        f"fm.replies.x{n}" for n in range(100)}
    assert consumer.calls == 1
    consumer.existing.add("fm.replies.new")
    now[0] = 1.5  # the next interval: a new name is looked up again and found
    assert topics.missing({"fm.replies.new", "fm.replies.gone"}) == {"fm.replies.gone"}
    assert consumer.calls == 2
    consumer.fail = True  # a listing that fails says nothing: send as before
    now[0] = 3.0
    assert topics.missing({"fm.replies.other"}) == set() and consumer.calls == 3
