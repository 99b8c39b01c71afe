"""Background checkpoints by a forked writer (train/checkpointer.py), with real fork/exit/kill:
the file holds the model as it was at the fork, a failed or killed writer leaves no checkpoint and
no temp file, at most one writer runs, and a writer dies with its parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from model import OnlineFM, TrainConfig
from model.checkpoint import checkpoint_files, install_pending, load_checkpoint, write_pending
from model.codec import dumps_json
from model.errors import CheckpointError
from train.checkpointer import CHILD_NICE, EXIT_FAILED, BackgroundCheckpoint
from train.errors import CheckpointBusy

ROOT = Path(__file__).resolve().parents[2]


def _model(seed: int = 0) -> OnlineFM:
    fm = OnlineFM(config=TrainConfig(dim=4, seed=seed))
    _learn(fm, 0)
    return fm


def _learn(fm: OnlineFM, seed: int) -> None:
    rng = np.random.default_rng(seed)
    fm.learn_many([f"u{j}" for j in rng.integers(0, 50, 500)],
                  [f"i{j}" for j in rng.integers(0, 30, 500)])


def _wait_done(bg: BackgroundCheckpoint):
    deadline = time.monotonic() + 60
    while (done := bg.poll()) is None:
        assert time.monotonic() < deadline, "writer still running after 60 s"
        time.sleep(0.01)
    return done


def test_the_file_holds_the_model_as_it_was_at_the_fork(tmp_path: Path) -> None:
    fm = _model()
    header, arrays = fm.state()  # views of the live model: copy them
    expected = json.loads(dumps_json(header)), {k: v.copy() for k, v in arrays.items()}
    bg = BackgroundCheckpoint(tmp_path)
    bg.start(fm, lambda: {"positions": {"t|0": 7}}, token="mine")
    assert bg.running
    _learn(fm, 1)  # the parent trains on while the child writes
    done = _wait_done(bg)
    assert done.ok and done.status == 0 and done.token == "mine" and done.cpu_s >= 0
    assert not bg.running and checkpoint_files(tmp_path) == []  # installed only by the caller
    path = install_pending(done.pending)
    back, meta = load_checkpoint(path)
    assert meta == {"positions": {"t|0": 7}}
    header, arrays = back.state()
    assert json.loads(dumps_json(header)) == expected[0]
    assert arrays.keys() == expected[1].keys()
    for name, arr in arrays.items():
        assert np.array_equal(arr, expected[1][name]), name
    assert back.n_updates == fm.n_updates - 500  # not the updates made after the fork


def _failing(pending: Path, model: OnlineFM, metadata: dict) -> None:
    raise CheckpointError("disk full (test)")


def _killed(pending: Path, model: OnlineFM, metadata: dict) -> None:
    write_pending(pending, model, metadata)  # complete, but the writer dies before exit 0
    os.kill(os.getpid(), signal.SIGKILL)


def _short_write(pending: Path, model: OnlineFM, metadata: dict) -> None:
    pending.write_bytes(b"torn")  # a writer that stops half-way (no exception)
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize(
    ("writer", "status"), [(_failing, EXIT_FAILED), (_killed, -signal.SIGKILL),
                           (_short_write, EXIT_FAILED)]
)
def test_a_failed_or_killed_writer_leaves_no_file(tmp_path: Path, writer, status: int) -> None:
    bg = BackgroundCheckpoint(tmp_path, writer=writer)
    bg.start(_model(), dict)
    done = _wait_done(bg)
    assert not done.ok and done.status == status
    assert os.listdir(tmp_path) == []  # no checkpoint, no temp file
    bg.writer = None  # the next one (the default writer) succeeds
    bg.start(_model(), dict)
    done = _wait_done(bg)
    assert done.ok
    install_pending(done.pending)
    assert [p.name for p in checkpoint_files(tmp_path)] == ["ckpt-000000000001.fmck"]


def _blocked(pending: Path, model: OnlineFM, metadata: dict) -> None:
    os.read(int(os.environ["FMSTREAM_TEST_BLOCK_FD"]), 1)  # until the test closes the pipe
    write_pending(pending, model, metadata)


def test_one_writer_at_a_time_and_cancel(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.environ["FMSTREAM_TEST_BLOCK_FD"] = str(r)
    try:
        bg = BackgroundCheckpoint(tmp_path, writer=_blocked)
        bg.start(_model(), dict)
        assert bg.poll() is None and bg.running
        with pytest.raises(CheckpointBusy, match=rf"still running \(pid {bg.pid}\): wait for "
                           r"poll\(\) .* or cancel\(\) it") as exc:
            bg.start(_model(), dict)
        assert isinstance(exc.value, RuntimeError)
        assert len(os.listdir(tmp_path)) == 1  # the running writer's temp file
        done = bg.cancel()
        assert done is not None and not done.ok and done.status == -signal.SIGKILL
        assert os.listdir(tmp_path) == [] and not bg.running
        assert bg.cancel() is None and bg.poll() is None
    finally:
        os.environ.pop("FMSTREAM_TEST_BLOCK_FD")
        os.close(r)
        os.close(w)


def test_the_writer_dies_with_its_parent(tmp_path: Path) -> None:
    """A trainer killed with -9 takes its in-flight writer with it (PR_SET_PDEATHSIG)."""
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from tests.train.test_checkpointer import _model, _blocked
        from train.checkpointer import BackgroundCheckpoint
        r, w = os.pipe()
        os.environ["FMSTREAM_TEST_BLOCK_FD"] = str(r)
        bg = BackgroundCheckpoint({str(tmp_path)!r}, writer=_blocked)
        bg.start(_model(), dict)
        print(bg.pid, flush=True)
        sys.stdin.read()  # until the test kills us
        """
    )
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        child = int(proc.stdout.readline())
        assert _state(child) not in (None, "Z")  # blocked in the middle of its checkpoint
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.monotonic() + 30
        while _state(child) not in (None, "Z"):  # gone (or a zombie nobody reaps)
            assert time.monotonic() < deadline, f"writer {child} outlived its parent"
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert checkpoint_files(tmp_path) == []
    assert [p for p in os.listdir(tmp_path) if p.startswith(".ckpt-")]  # stale temp, cleaned
    # by the next trainer (remove_stale_pending, tests/model/test_checkpoint.py)


def _state(pid: int) -> str | None:
    """The process state letter of ``pid`` (R, S, T, Z, ...), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def test_the_writer_prunes_what_the_last_install_left(tmp_path: Path) -> None:
    """The caller installs without deleting (keep=None: no 0.1 s unlink on its thread); the next
    writer deletes all but the newest ``keep`` before writing."""
    bg = BackgroundCheckpoint(tmp_path, keep=2)
    for _ in range(4):
        bg.start(_model(), dict)
        done = _wait_done(bg)
        assert done.ok
        install_pending(done.pending, keep=None)
    names = [p.name for p in checkpoint_files(tmp_path)]
    assert names == [f"ckpt-{j:012d}.fmck" for j in (2, 3, 4)]  # 2 kept + the newest install


def test_a_writer_stuck_past_the_timeout_is_killed_and_the_next_one_runs(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.environ["FMSTREAM_TEST_BLOCK_FD"] = str(r)
    try:
        bg = BackgroundCheckpoint(tmp_path, writer=_blocked, timeout_s=0.2)
        bg.start(_model(), dict)
        done = _wait_done(bg)  # poll() kills it once it has run 0.2 s
        assert not done.ok and done.timed_out and done.status == -signal.SIGKILL
        assert os.listdir(tmp_path) == []
        bg.writer, bg.timeout_s = None, 600.0
        bg.start(_model(), dict)
        done = _wait_done(bg)
        assert done.ok and not done.timed_out
    finally:
        os.environ.pop("FMSTREAM_TEST_BLOCK_FD")
        os.close(r)
        os.close(w)


def _records_nice(pending: Path, model: OnlineFM, metadata: dict) -> None:
    write_pending(pending, model, metadata)
    (pending.parent / "child-nice").write_text(str(os.getpriority(os.PRIO_PROCESS, 0)))


@pytest.mark.parametrize("nice", [CHILD_NICE, 0])
def test_the_writer_runs_at_a_lower_priority(tmp_path: Path, nice: int) -> None:
    """Background work: the child adds ``nice`` to its niceness (the trainer keeps its own)."""
    parent = os.getpriority(os.PRIO_PROCESS, 0)
    bg = BackgroundCheckpoint(tmp_path, writer=_records_nice, nice=nice)
    bg.start(_model(), dict)
    done = _wait_done(bg)
    assert done.ok
    assert int((tmp_path / "child-nice").read_text()) == min(19, parent + nice)
    assert os.getpriority(os.PRIO_PROCESS, 0) == parent
