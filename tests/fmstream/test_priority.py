"""``FMSTREAM_TRAINER_NICE``: `fmstream train` lowers its own priority (and its children's), with
real Kafka and Redis; bad values are refused with the setting's name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fmstream.app import lower_priority
from fmstream.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FMSTREAM_")}
    env.update(settings.to_env())
    env.update(PYTHONUNBUFFERED="1", COLUMNS="250", **extra)
    return env


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def test_lower_priority_only_lowers() -> None:
    code = ("from fmstream.app import lower_priority; import os; "
            "print(lower_priority(0), lower_priority(4), os.getpriority(os.PRIO_PROCESS, 0))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True, timeout=120)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert out.stdout.split() == [str(base), str(min(19, base + 4)), str(min(19, base + 4))]
    with pytest.raises(ValueError, match="only lowering"):
        lower_priority(-1)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # nothing changed here


def test_the_trainer_and_its_fetch_child_run_at_the_configured_niceness(
    settings: Settings, tmp_path: Path
) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    want = min(19, base + 7)
    log = tmp_path / "trainer.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "fmstream.cli", "-v", "train"], cwd=REPO_ROOT,
            env=_env(settings, FMSTREAM_TRAINER_NICE="7", FMSTREAM_TRAINER_FETCH_PROCESS="true"),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 120
        while ("running at niceness" not in log.read_text(errors="replace")
               or not _children(proc.pid)):
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == want
        kids = _children(proc.pid)
        assert kids and all(os.getpriority(os.PRIO_PROCESS, k) == want for k in kids)
        assert f"running at niceness {want} (FMSTREAM_TRAINER_NICE=7)" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base


@pytest.mark.parametrize("value", ["-2", "20", "lots"])
def test_a_bad_niceness_is_refused_with_the_settings_name(
    settings: Settings, value: str
) -> None:
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "fmstream.cli", "train"], cwd=REPO_ROOT,
        env=_env(settings, FMSTREAM_TRAINER_NICE=value), capture_output=True, text=True,
        timeout=120, check=False,
    )
    assert done.returncode != 0
    assert "trainer_nice" in (done.stdout + done.stderr).lower()
