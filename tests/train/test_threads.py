"""The trainer's two hand-overs, without I/O: publishing in its own thread (coalesced, bounded,
never blocking the trainer) and the fetch thread that owns the consumer."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from tests.kafka_helpers import wait_for
from train.fetch import Fetcher, FetchFailed
from train.publish_thread import PublisherFailed, PublisherThread


def ev(user: str, item: str = "i", label: int = 1) -> SimpleNamespace:
    return SimpleNamespace(user_id=user, item_id=item, label=label)


class Sink:
    """Records what reaches it; ``gate`` (when cleared) holds the publisher thread in applied()."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.inside = threading.Event()

    def applied(self, events) -> None:
        self.inside.set()
        self.gate.wait(30)
        self.calls.append(("applied", [e.user_id for e in events]))

    def profiles_changed(self, user_ids) -> None:
        self.calls.append(("profiles", list(user_ids)))

    def checkpointed(self, progress) -> None:
        self.calls.append(("checkpoint", progress.events_applied))

    def tick(self, now: float) -> None:
        self.calls.append(("tick", None))


def test_a_blocked_publisher_never_blocks_the_trainer_and_changes_coalesce() -> None:
    sink = Sink()
    sink.gate.clear()
    thread = PublisherThread(sink, interval_s=0.01).start()
    try:
        thread.applied([ev("a")])
        assert sink.inside.wait(10)  # the thread is now stuck inside the sink
        for i in range(50):  # the trainer hands over more while the publisher is stuck
            thread.applied([ev(f"u{i}")])
            thread.profiles_changed([f"p{i % 3}"])
            thread.checkpointed(SimpleNamespace(events_applied=i))
        assert thread.waiting_events == 50
        sink.gate.set()
        assert thread.flush(timeout=30)
    finally:
        thread.close()
    calls = [c for c in sink.calls if c[0] != "tick"]  # the thread ticks on every turn
    # one turn for the first batch, then everything else delivered together in one turn
    assert calls == [
        ("applied", ["a"]),
        ("profiles", ["p0", "p1", "p2"]),
        ("applied", [f"u{i}" for i in range(50)]),
        ("checkpoint", 49),  # only the newest report
    ]
    assert thread.dropped == 0


def test_the_hand_over_is_bounded_and_keeps_dropped_users_active() -> None:
    sink = Sink()
    sink.gate.clear()
    thread = PublisherThread(sink, interval_s=0.01, max_events=10).start()
    try:
        thread.applied([ev("first")])
        assert sink.inside.wait(10)
        for i in range(8):
            thread.applied([ev(f"u{i}a"), ev(f"u{i}b")])
        assert thread.waiting_events <= 10 and thread.dropped == 6
        sink.gate.set()
        assert thread.flush(timeout=30)
    finally:
        thread.close()
    delivered = [u for k, users in sink.calls if k == "applied" for u in users]
    assert delivered == ["first"] + [f"u{i}{s}" for i in range(3, 8) for s in "ab"]
    profiles = [u for k, users in sink.calls if k == "profiles" for u in users]
    assert set(profiles) == {f"u{i}{s}" for i in range(3) for s in "ab"}  # vectors still go out


def test_a_publisher_bug_surfaces_in_the_trainer() -> None:
    class Broken(Sink):
        def applied(self, events) -> None:
            raise ZeroDivisionError("bug")

    thread = PublisherThread(Broken(), interval_s=0.01).start()
    thread.applied([ev("a")])
    with pytest.raises(PublisherFailed, match="bug"):
        thread.flush(timeout=30)
    with pytest.raises(PublisherFailed, match="bug"):
        thread.applied([ev("b")])  # the trainer's next hand-over fails loudly
    thread.close()


def test_on_start_runs_in_the_publisher_thread_before_it_publishes() -> None:
    sink = Sink()
    seen: list[tuple[str, int]] = []
    thread = PublisherThread(sink, interval_s=0.01, on_start=lambda: seen.append(
        (threading.current_thread().name, len(sink.calls)))).start()
    try:
        thread.applied([ev("a")])
        assert thread.flush(timeout=30)
    finally:
        thread.close()
    assert seen == [("fmstream-publish", 0)]
    assert ("applied", ["a"]) in sink.calls


def test_an_on_start_failure_surfaces_in_the_trainer() -> None:
    def fails() -> None:
        raise OSError("no such thread setting")

    sink = Sink()
    thread = PublisherThread(sink, interval_s=0.01, on_start=fails).start()
    with pytest.raises(PublisherFailed, match="no such thread setting"):
        thread.applied([ev("a")])  # raises here once the thread has failed,
        thread.flush(timeout=30)  # else here: the hand-over is never delivered
    with pytest.raises(PublisherFailed, match="no such thread setting"):
        thread.applied([ev("b")])
    thread.close()
    assert sink.calls == []  # nothing was published


class Consumer:
    """A consumer that remembers which thread called it."""

    def __init__(self, polls: list[dict]) -> None:
        self.polls = list(polls)
        self.threads: set[str] = set()
        self.commits: list[object] = []

    def poll(self, timeout_ms: int) -> dict:
        self.threads.add(threading.current_thread().name)
        return self.polls.pop(0) if self.polls else {}

    def commit(self, offsets) -> str:
        self.threads.add(threading.current_thread().name)
        self.commits.append(offsets)
        return "ok"


def test_the_fetch_thread_owns_the_consumer_and_keeps_poll_order() -> None:
    consumer = Consumer([{"tp0": [1, 2]}, {"tp0": [3]}, {"tp1": [4, 5, 6]}])
    fetcher = Fetcher(consumer, lambda records: [r * 10 for r in records], depth=1,
                      poll_timeout_ms=10).start()
    got = []
    try:
        while len(got) < 3:
            batch = fetcher.get(timeout=10)
            if batch is not None:
                got.append(batch)
        assert fetcher.call(lambda c: c.commit({"tp0": 3})).result(timeout=10) == "ok"
    finally:
        fetcher.stop()
    assert got == [[10, 20], [30], [40, 50, 60]]
    assert consumer.threads == {"fmstream-fetch"} and consumer.commits == [{"tp0": 3}]
    # once stopped, a call runs in the caller's thread
    assert fetcher.call(lambda c: c.commit({"x": 1})).result() == "ok"


def test_no_poll_while_fetching_is_not_allowed() -> None:
    consumer = Consumer([{"tp0": [1]}])
    allowed = threading.Event()
    fetcher = Fetcher(consumer, list, may_fetch=allowed.is_set, poll_timeout_ms=10).start()
    try:
        assert fetcher.get(timeout=0.3) is None
        assert consumer.polls == [{"tp0": [1]}] and not consumer.threads
        allowed.set()
        wait_for(lambda: fetcher.get(timeout=0.1) == [1], what="a batch once allowed")
    finally:
        fetcher.stop()


def test_caught_up_only_after_an_empty_poll_with_nothing_in_hand() -> None:
    consumer = Consumer([{"tp0": [1, 2]}])
    decoding, release = threading.Event(), threading.Event()

    def slow_decode(records: list) -> list:
        decoding.set()
        release.wait(30)  # a big poll being decoded
        return list(records)

    fetcher = Fetcher(consumer, slow_decode, poll_timeout_ms=10).start()
    try:
        assert decoding.wait(10)
        assert not fetcher.caught_up  # records in hand: the trainer must not count idle time
        release.set()
        wait_for(lambda: fetcher.get(timeout=0.1) == [1, 2], what="the slow batch")
        wait_for(lambda: fetcher.caught_up, what="an empty poll after it")
    finally:
        fetcher.stop()


def test_a_decode_bug_surfaces_in_the_trainer() -> None:
    def decode(records):
        raise ValueError("decoder bug")

    fetcher = Fetcher(Consumer([{"tp0": [1]}]), decode, poll_timeout_ms=10).start()
    try:
        wait_for(lambda: not fetcher.running, what="the fetch thread to stop", poll_s=0.01)
        with pytest.raises(FetchFailed, match="decoder bug"):
            fetcher.get(timeout=0.01)
    finally:
        fetcher.stop()
