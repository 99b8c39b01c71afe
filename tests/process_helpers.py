"""Settings and ``fmstream`` child processes for tests, free of the developer's shell.

A test's ``Settings`` and its child processes must see only what the test chose, never an
``FMSTREAM_*`` variable exported in the shell that runs pytest::

    settings = hermetic_settings(run_dir=tmp_path)
    proc = subprocess.Popen([...], env=cli_env(settings, FMSTREAM_TRAINER_NICE="7"))
    wait_for_log(proc, log_path, lambda text: "ready" in text)
    stop_process(proc)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fmstream.settings import Settings


def drop_fmstream_env(mp: pytest.MonkeyPatch) -> None:
    """Unset every ``FMSTREAM_*`` variable of the developer's shell (until ``mp`` undoes it)."""
    for name in list(os.environ):
        if name.upper().startswith("FMSTREAM_"):
            mp.delenv(name)


def hermetic_settings(**values: object) -> Settings:
    """``Settings(**values)`` ignoring any ``FMSTREAM_*`` variable of the developer's shell."""
    with pytest.MonkeyPatch.context() as mp:
        drop_fmstream_env(mp)
        return Settings(**values)  # type: ignore[arg-type]


def cli_env(settings: Settings, *, columns: int = 250, **override: str) -> dict[str, str]:
    """The environment of an ``fmstream`` command run with ``settings``: this process's
    environment without its ``FMSTREAM_*`` variables, every setting as ``FMSTREAM_<FIELD>``, then
    ``override`` (an empty value removes the variable); unbuffered output, ``columns`` wide (log
    lines never wrapped)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FMSTREAM_")}
    env.update(settings.to_env())
    for name, value in override.items():
        if value == "":
            env.pop(name, None)
        else:
            env[name] = value
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = str(columns)
    return env


def wait_for_log(
    proc: subprocess.Popen, log: Path, ready: Callable[[str], bool], timeout_s: float = 120
) -> None:
    """Wait until ``ready(log text)`` holds; fail with the log's tail if ``proc`` exits first or
    ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while not ready(log.read_text(errors="replace")):
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)


def stop_processes(procs: list[subprocess.Popen], timeout_s: float = 60) -> None:
    """SIGTERM to each (a clean stop, all at once), SIGKILL to any still running ``timeout_s``
    later; every one reaped."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def stop_process(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """:func:`stop_processes` of one."""
    stop_processes([proc], timeout_s)
