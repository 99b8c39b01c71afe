"""Background checkpoints in the trainer against the real broker and Redis: a writer that fails
(disk error) or dies commits nothing and is retried; once one succeeds, exactly its positions are
committed; the final checkpoint covers every event."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

import train.checkpointer
from fmstream.app import run_trainer
from fmstream.settings import Settings
from model.checkpoint import checkpoint_files, latest_checkpoint, write_pending
from model.errors import CheckpointError
from stream.consume import make_producer
from stream.lag import group_lag
from stream.replay import produce_events
from stream.synthetic import SyntheticStream
from tests.kafka_helpers import end_offsets, wait_for

pytestmark = pytest.mark.integration

STREAM = SyntheticStream(users=300, items=100, clusters=5, seed=3)


def _committed(settings: Settings) -> dict[str, int | None]:
    lags = group_lag(settings.kafka_config(), settings.trainer_group, [settings.topic_events])
    return {f"{p.topic}|{p.partition}": p.committed for p in lags}


def _newest_meta(settings: Settings) -> dict:
    newest = latest_checkpoint(settings.checkpoint_dir)
    return {"events_applied": -1} if newest is None else newest[1]


def _attempts(folder: Path) -> int:
    return len(list(folder.glob("attempt-*")))


@pytest.mark.parametrize("how", ["disk error", "killed"])
def test_a_failing_writer_commits_nothing_and_the_next_one_is_retried(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    s = settings.model_copy(update={"dim": 8, "checkpoint_every_events": 10**9,
                                    "checkpoint_every_s": 0.3})
    n = 3000
    producer = make_producer(s.kafka_config())
    produce_events(producer, s.topics(), list(STREAM.events(n)))
    producer.close()
    marks = tmp_path / "marks"
    marks.mkdir()

    def failing(pending: Path, model, metadata: dict) -> None:  # runs in the forked writer
        (marks / f"attempt-{os.getpid()}").touch()
        if how == "killed":
            write_pending(pending, model, metadata)  # complete, then the writer dies
            os.kill(os.getpid(), signal.SIGKILL)
        pending.write_bytes(b"torn")
        raise CheckpointError("cannot write: [Errno 28] No space left on device (test)")

    monkeypatch.setattr(train.checkpointer, "write_pending", failing)
    stop = threading.Event()
    result: list = []
    thread = threading.Thread(target=lambda: result.append(run_trainer(s, stop)), daemon=True)
    thread.start()
    try:
        wait_for(lambda: _attempts(marks) >= 3, 120, "three failed background checkpoints")
        assert checkpoint_files(s.checkpoint_dir) == []  # no file under a checkpoint name
        assert set(_committed(s).values()) == {None}  # nothing committed ahead of a checkpoint
        monkeypatch.undo()  # the disk is back: the next background checkpoint succeeds
        wait_for(lambda: _newest_meta(s)["events_applied"] == n, 120,
                 "a background checkpoint of every event")
        meta = _newest_meta(s)
        wait_for(lambda: _committed(s) == meta["positions"], 60, "its positions committed")
    finally:
        stop.set()
        thread.join(120)
    assert not thread.is_alive()
    assert result[0].events_applied == n
    ends = end_offsets(s, s.topic_events)
    assert {f"{t}|{p}": e for (t, p), e in ends.items()} == _committed(s)
    assert not [p for p in s.checkpoint_dir.iterdir() if p.name.endswith(".tmp")]
