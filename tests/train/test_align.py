"""EventAligner (train/align.py): records of several partitions go out in timestamp order, each
partition in offset order, never ahead of a partition that still has records on the broker,
and never held past its bounds. Pure logic: plain records, a fake clock, no broker."""

from __future__ import annotations

from typing import NamedTuple

import pytest
from kafka.errors import KafkaTimeoutError
from kafka.structs import TopicPartition

from train.align import EventAligner, StableLags, consumer_lags

A, B, C = (TopicPartition("ev", p) for p in range(3))
PROFILES = TopicPartition("users", 0)


class Rec(NamedTuple):
    topic: str
    partition: int
    offset: int
    timestamp: int


def recs(tp: TopicPartition, stamps: list[int], first: int = 0) -> list[Rec]:
    return [Rec(tp.topic, tp.partition, first + j, t) for j, t in enumerate(stamps)]


def ids(records: list[Rec]) -> list[tuple[int, int]]:
    return [(r.partition, r.offset) for r in records]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_partitions_are_merged_by_timestamp_each_in_offset_order() -> None:
    al = EventAligner("ev", max_records=100)
    assert al.push({A: recs(A, [1, 4, 6]), B: recs(B, [2, 3, 5, 7])}) == []
    out = al.take({A: 0, B: 0})  # nothing more on the broker
    assert [r.timestamp for r in out] == [1, 2, 3, 4, 5, 6, 7]
    assert al.buffered == 0 and al.take({A: 0, B: 0}) == []


def test_ties_and_backward_timestamps_keep_each_partition_in_offset_order() -> None:
    al = EventAligner("ev", max_records=100)
    al.push({A: recs(A, [5, 3, 9]), B: recs(B, [5, 4])})  # A's 3 comes after its 5
    out = al.take({A: 0, B: 0})
    # keys (running maxima): A 5 5 9, B 5 5; ties go partition by partition
    assert ids(out) == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2)]
    for p in (0, 1):  # never out of offset order within a partition
        offsets = [r.offset for r in out if r.partition == p]
        assert offsets == sorted(offsets)


def test_at_most_max_records_per_take_the_rest_stays_in_order() -> None:
    al = EventAligner("ev", max_records=3)
    al.push({A: recs(A, [1, 3, 5]), B: recs(B, [2, 4, 6])})
    assert [r.timestamp for r in al.take({A: 0, B: 0})] == [1, 2, 3]
    assert al.more  # the fetcher polls without waiting: these can go out at once
    assert [r.timestamp for r in al.take({A: 0, B: 0})] == [4, 5, 6]
    assert not al.more


def test_nothing_goes_out_ahead_of_a_partition_with_lag() -> None:
    al = EventAligner("ev", max_records=100, clock=Clock())
    al.push({A: recs(A, [1, 2, 10, 11])})
    # B has records on the broker and none buffered: anything of A could be later than them
    assert al.take({A: 0, B: 5}) == []
    al.push({B: recs(B, [3, 4])})
    # B still has lag: only what is not later than B's newest buffered record (4)
    assert [r.timestamp for r in al.take({A: 0, B: 3})] == [1, 2, 3, 4]
    assert al.take({A: 0, B: 3}) == []
    al.push({B: recs(B, [12, 13, 14], first=2)})
    assert [r.timestamp for r in al.take({A: 0, B: 0})] == [10, 11, 12, 13, 14]


def test_unknown_lag_constrains_caught_up_partitions_do_not() -> None:
    al = EventAligner("ev", max_records=100, clock=Clock())
    al.push({A: recs(A, [1, 2])})
    assert al.take({A: 0, B: None}) == []  # no fetch response from B yet
    assert ids(al.take({A: 0, B: 0, C: 0})) == [(0, 0), (0, 1)]  # B and C are at their end


def test_held_back_at_most_max_wait_s_without_a_new_record_then_in_timestamp_order() -> None:
    clock = Clock()
    al = EventAligner("ev", max_records=100, max_wait_s=1.0, clock=clock)
    al.push({A: recs(A, [5, 6]), B: recs(B, [1])})
    assert [r.timestamp for r in al.take({A: 0, B: 0, C: 7})] == []
    clock.now = 0.5
    assert al.take({A: 0, B: 0, C: 7}) == []
    clock.now = 1.0
    assert [r.timestamp for r in al.take({A: 0, B: 0, C: 7})] == [1, 5, 6]
    assert al.released_early == 1


def test_held_back_while_records_keep_arriving_at_most_max_hold_s() -> None:
    clock = Clock()
    al = EventAligner("ev", max_records=100, max_wait_s=1.0, max_hold_s=3.0, clock=clock)
    al.push({A: recs(A, [5])})
    assert al.take({A: 0, C: 7}) == []  # held from 0 s
    for t in (0.9, 1.8, 2.7):  # the consumer keeps handing over A's chunk; C has lag
        clock.now = t
        al.push({A: recs(A, [6], first=int(t))})
        assert al.take({A: 0, C: 7}) == []
    clock.now = 3.0  # held 3 s in all
    assert len(al.take({A: 0, C: 7})) == 4
    assert al.released_early == 1


def test_released_when_max_buffered_records_wait() -> None:
    al = EventAligner("ev", max_records=2, max_buffered=3, clock=Clock())
    al.push({A: recs(A, [1, 2, 3])})
    assert [r.timestamp for r in al.take({A: 0, B: None})] == [1, 2]  # 3 buffered: released
    assert al.take({A: 0, B: None}) == []  # 1 left: below the bound again, waits
    assert al.released_early == 1


def test_other_topics_are_returned_at_once_not_held() -> None:
    al = EventAligner("ev", max_records=100, clock=Clock())
    profiles = recs(PROFILES, [9, 8])
    assert al.push({A: recs(A, [1]), PROFILES: profiles}) == profiles
    assert al.buffered == 1


def test_clear_forgets_what_was_buffered() -> None:
    al = EventAligner("ev", max_records=100)
    al.push({A: recs(A, [1]), B: recs(B, [2])})
    al.clear([A])
    assert ids(al.take({A: 0, B: 0})) == [(1, 0)]
    al.push({A: recs(A, [1])})
    al.clear()
    assert al.buffered == 0


@pytest.mark.parametrize("kwargs", [{"max_records": 0}, {"max_records": 1, "max_buffered": 0},
                                    {"max_records": 1, "max_wait_s": -1.0},
                                    {"max_records": 1, "max_hold_s": -1.0}])
def test_bad_bounds_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="max_records and max_buffered >= 1"):
        EventAligner("ev", **kwargs)


def test_consumer_lags_from_highwater_and_position() -> None:
    class Consumer:
        def highwater(self, tp: TopicPartition) -> int | None:
            return {A: 10, B: None, C: 4}[tp]

        def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int:
            return {A: 7, B: 0, C: 4}[tp]

    assert consumer_lags(Consumer(), [A, B, C]) == {A: 3, B: None, C: 0}


class LsoConsumer:
    """A consumer's view for :class:`StableLags`: high watermarks, positions and the broker's
    last stable offsets (``end_offsets`` of a read_committed consumer); counts the asks."""

    def __init__(self, high: dict, pos: dict, lso: dict) -> None:
        self.high, self.pos, self.lso = high, pos, lso
        self.asked: list[list[TopicPartition]] = []
        self.fail = False

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.high[tp]

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int | None:
        return self.pos[tp]

    def end_offsets(self, tps: list[TopicPartition], timeout_ms: int | None = None) -> dict:
        self.asked.append(sorted(tps))
        if self.fail:
            raise KafkaTimeoutError("no answer")
        return {tp: self.lso[tp] for tp in tps}


def test_an_open_transaction_is_no_lag_once_its_lso_is_known() -> None:
    # A: a transaction open from offset 7 (high watermark 10); B: 3 committed records to fetch
    c = LsoConsumer({A: 10, B: 5, C: 4}, {A: 7, B: 2, C: 4}, {A: 7, B: 5, C: 4})
    clock = Clock()
    stable = StableLags(c, min_interval_s=0.1, clock=clock)
    lags = consumer_lags(c, [A, B, C])
    assert lags == {A: 3, B: 3, C: 0}
    assert stable.refine(lags) == {A: 0, B: 3, C: 0}
    assert c.asked == [[A, B]]  # only partitions with a lag
    clock.now = 1.0
    assert stable.refine(lags) == {A: 0, B: 3, C: 0}
    assert len(c.asked) == 1  # same position and high watermark: the LSO cannot have moved
    # the transaction commits: its marker moves the high watermark, the LSO is asked again
    c.high[A], c.lso[A] = 11, 11
    assert stable.refine(consumer_lags(c, [A, B, C])) == {A: 4, B: 3, C: 0}
    assert c.asked[-1] == [A]


def test_stable_lags_ask_at_most_every_interval_and_keep_the_lag_meanwhile() -> None:
    c = LsoConsumer({A: 10}, {A: 7}, {A: 7})
    clock = Clock()
    stable = StableLags(c, min_interval_s=0.1, clock=clock)
    assert stable.refine({A: 3}) == {A: 0}
    c.high[A] = 12  # another record in the open transaction
    clock.now = 0.05
    assert stable.refine({A: 5}) == {A: 5}  # too soon to ask: held back as without the LSO
    clock.now = 0.1
    assert stable.refine({A: 5}) == {A: 0}
    assert len(c.asked) == 2 and stable.asks == 2


def test_stable_lags_keep_the_high_watermark_lag_when_the_broker_does_not_answer() -> None:
    c = LsoConsumer({A: 10, B: None}, {A: 7, B: 0}, {A: 7})
    c.fail = True
    stable = StableLags(c, min_interval_s=0.0, clock=Clock())
    assert stable.refine({A: 3, B: None}) == {A: 3, B: None}
    assert stable.failed == 1
    c.fail = False
    assert stable.refine({A: 3, B: None}) == {A: 0, B: None}  # B's lag is unknown: not asked
    assert c.asked == [[A], [A]]


def test_holds_back_says_whether_a_take_would_keep_records_back() -> None:
    al = EventAligner("ev", max_records=100, clock=Clock())
    al.push({A: recs(A, [1, 5]), B: recs(B, [3])})
    assert al.holds(A) and al.holds(B) and not al.holds(C)
    assert not al.holds_back({A: 0, B: 0, C: 0})
    assert al.holds_back({A: 0, B: 2, C: 0})  # A's 5 waits for B's next records
    assert al.holds_back({A: 0, B: 0, C: None})  # C may have anything: all wait
    assert not al.holds_back({A: 4, B: 0, C: 0})  # A's own lag holds nothing back
