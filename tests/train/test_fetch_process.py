"""The fetch process against the real broker: it starts at the trainer's positions, hands over
decoded columns with their positions, has its dead letters acknowledged before handing a poll
over, commits for the trainer, polls only when allowed, and dies with its trainer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import orjson
import pytest
from kafka.structs import TopicPartition

from fmstream.settings import Settings
from stream.connect import kafka_consumer
from stream.synthetic import SyntheticStream
from tests.kafka_helpers import KafkaIO, wait_for
from train.fetch import DecodedBatch
from train.fetch_process import FetchProcess, FetchSpec, RecordBlock

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STREAM = SyntheticStream(users=50, items=20, clusters=5, seed=3)


def _spec(s: Settings, positions: dict[str, int] | None = None) -> FetchSpec:
    c = s.trainer_config()
    return FetchSpec(c.kafka, c.topics, c.group, positions or {}, max_poll_records=100,
                     max_message_bytes=c.max_message_bytes, poll_timeout_ms=100)


def _drain(fetcher: FetchProcess, ends: dict[tuple[str, int], int]) -> list[DecodedBatch]:
    """Batches until every partition of ``ends`` is read to its end."""
    got: list[DecodedBatch] = []
    reached: dict[tuple[str, int], int] = {}

    def done() -> bool:
        batch = fetcher.get(timeout=0.5)
        if batch is not None:
            got.append(batch)
            reached.update(batch.ends)
        return all(reached.get(tp, 0) >= end for tp, end in ends.items())

    wait_for(done, 90, "the fetch process to read every partition to its end", poll_s=0)
    return got


def test_columns_from_the_given_positions_and_letters_acknowledged_first(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    s = settings
    events = list(STREAM.events(90))
    for p in range(3):
        kafka_io.produce(s.topic_events, [(e["user_id"].encode(), orjson.dumps(e))
                                          for e in events[30 * p: 30 * (p + 1)]], partition=p)
    poison = kafka_io.produce(s.topic_events, [b"not json", b'{"user_id": "u1"}'], partition=1)
    ends = {(tp.topic, tp.partition): o for tp, o in kafka_io.end_offsets(s.topic_events).items()}
    fetcher = FetchProcess(_spec(s, {f"{s.topic_events}|0": 10})).start()  # p0 from offset 10
    try:
        assert fetcher.wait_ready(60)
        batches = _drain(fetcher, ends)
        # the letters were acknowledged before their poll was handed over
        letters = kafka_io.consume_all(s.topic_dlq, expect=2, timeout_s=5)
        offsets = {f"{s.topic_events}/1/{m.offset}" for m in poison}
        assert {orjson.loads(r.value)["id"] for r in letters} == offsets
        assert sum(b.dead_letters for b in batches) == 2
        applied = [e for b in batches for e in b.events]
        assert len(applied) == 80  # the first 10 of partition 0 lie before its position
        assert sorted(e.item_id + e.user_id for e in applied) == sorted(
            e["item_id"] + e["user_id"] for e in events[10:])
        block = batches[0].event_records
        assert isinstance(block, RecordBlock)
        first = block[int(batches[0].events.rows[0])]
        assert first.topic == s.topic_events and first.value is not None
        # the trainer's group commit, made by the child
        fetcher.commit({(s.topic_events, 0): 25}, wait_s=15).result(timeout=20)
        consumer = kafka_consumer(s.kafka_config(), group_id=s.trainer_group,
                                  enable_auto_commit=False)
        try:
            assert consumer.committed(TopicPartition(s.topic_events, 0)) == 25
        finally:
            consumer.close()
    finally:
        fetcher.stop()
    assert not fetcher.running


def test_nothing_is_polled_while_not_allowed(settings: Settings, kafka_io: KafkaIO) -> None:
    s = settings
    kafka_io.produce(s.topic_events, [orjson.dumps(e) for e in STREAM.events(20)])
    allowed = threading.Event()
    fetcher = FetchProcess(_spec(s), may_fetch=allowed.is_set).start()
    try:
        assert fetcher.wait_ready(60)
        assert fetcher.get(timeout=1.0) is None
        assert not fetcher.caught_up  # it has not looked: the trainer is not idle yet
        allowed.set()
        ends = {(tp.topic, tp.partition): o
                for tp, o in kafka_io.end_offsets(s.topic_events).items()}
        assert sum(len(b.events) for b in _drain(fetcher, ends)) == 20
        # everything handed over and an empty poll since: caught up (the trainer's idle clock)
        wait_for(lambda: fetcher.caught_up, 30, "an empty poll after the last batch")
    finally:
        fetcher.stop()


def test_the_fetch_process_dies_with_its_trainer(settings: Settings, tmp_path: Path) -> None:
    """kill -9 of the trainer leaves no orphan consuming or dead-lettering."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from fmstream.settings import Settings
        from train.fetch_process import FetchProcess, FetchSpec
        if __name__ == "__main__":
            c = Settings.model_validate_json(sys.argv[1]).trainer_config()
            f = FetchProcess(FetchSpec(c.kafka, c.topics, c.group)).start()
            f.wait_ready(60)
            print(f.pid, flush=True)
            time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script), settings.model_dump_json()],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        wait_for(lambda: not _alive(child), 30, "the fetch process to die with its parent")
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] not in "ZX"
    except FileNotFoundError:
        return False
    except OSError:
        return os.path.exists(f"/proc/{pid}")


def test_record_block_rebuilds_each_record_after_pickling() -> None:
    """Keys and values travel as two blobs; each record comes back as it was (None kept)."""
    import pickle

    from stream.fetcher import ConsumerRecord

    kv = [(b"k0", b'{"a": 1}'), (None, b"v1"), (b"", None), (b"k3", b""), (None, None),
          (b"k\x005", b"\xff\x00")]
    records = [ConsumerRecord("t", j % 3, -1, 100 + j, 1_000 + j, 0, k, v, [], None,
                              -1, -1, -1) for j, (k, v) in enumerate(kv)]
    block = pickle.loads(pickle.dumps(RecordBlock(records)))
    assert len(block) == len(kv)
    for j, (k, v) in enumerate(kv):
        r = block[j]
        assert (r.topic, r.partition, r.offset, r.timestamp, r.key, r.value) == (
            "t", j % 3, 100 + j, 1_000 + j, k, v)
        assert r.serialized_value_size == (-1 if v is None else len(v))
    assert block.partition_counts(block.offsets >= 0) == {0: 2, 1: 2, 2: 2}
    assert len(RecordBlock([])) == 0
