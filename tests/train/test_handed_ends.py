"""HandedEnds (train/fetch.py): a partition's end moves to the consumer's position past what a
read_committed consumer skips (markers, aborted records), never past a record not handed over.
Pure logic: a consumer's assignment and positions, no broker."""

from __future__ import annotations

from kafka.structs import TopicPartition

from train.fetch import HandedEnds

A, B, C = (TopicPartition("ev", p) for p in range(3))
U = TopicPartition("users", 0)


class Consumer:
    def __init__(self, pos: dict) -> None:
        self.pos = pos

    def assignment(self) -> set[TopicPartition]:
        return set(self.pos)

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int | None:
        return self.pos[tp]


def test_ends_move_to_the_position_past_skipped_offsets_only_where_nothing_is_held() -> None:
    ends = HandedEnds({"ev|0": 4, "users|0": 2})  # the checkpoint's positions
    c = Consumer({A: 9, B: 6, C: None, U: 2})
    held = {B}.__contains__
    # A: markers / aborted records 4-8 skipped; B: records polled but held by the aligner; C:
    # no position yet; U: nothing skipped
    assert ends.moved(c, {}, held) == {("ev", 0): 9}
    assert ends.moved(c, {}, held) == {}  # told once
    # this poll hands B's records over up to 5; the consumer is at 6 (a marker after them)
    assert ends.moved(c, {("ev", 1): 5}, lambda tp: False) == {("ev", 1): 6}
    c.pos[A] = 12  # records 9-11 handed over in this batch: its own end, nothing to move
    assert ends.moved(c, {("ev", 0): 12}, held) == {}


def test_a_partition_with_no_end_yet_is_left_alone() -> None:
    ends = HandedEnds()
    c = Consumer({A: 5})
    assert ends.moved(c, {}) == {}  # never handed anything, no start position: unknown
    assert ends.moved(c, {("ev", 0): 3}) == {("ev", 0): 5}
