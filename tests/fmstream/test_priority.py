"""``FMSTREAM_TRAINER_NICE``: `fmstream train` lowers its own priority (and its children's), with
real Kafka and Redis; bad values are refused with the setting's name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fmstream.app import lower_priority
from fmstream.errors import PriorityError
from fmstream.settings import Settings
from tests.process_helpers import cli_env, stop_process, wait_for_log

REPO_ROOT = Path(__file__).resolve().parents[2]


def _start(settings: Settings, log: Path, command: str, **env: str) -> subprocess.Popen:
    """``fmstream -v COMMAND`` with the test's settings and ``env``, its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "fmstream.cli", "-v", command], cwd=REPO_ROOT,
            env=cli_env(settings, **env), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _assert_refused(settings: Settings, command: str, setting: str, value: str) -> None:
    """``fmstream COMMAND`` with ``FMSTREAM_<SETTING>=value`` exits non-zero naming the setting."""
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "fmstream.cli", command], cwd=REPO_ROOT,
        env=cli_env(settings, **{f"FMSTREAM_{setting.upper()}": value}), capture_output=True,
        text=True, timeout=120, check=False,
    )
    assert done.returncode != 0
    assert setting in (done.stdout + done.stderr).lower()


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
    with pytest.raises(PriorityError,
                       match="only lowering.*got -1: set FMSTREAM_TRAINER_NICE") as exc:
        lower_priority(-1)
    assert isinstance(exc.value, ValueError)  # callers that caught ValueError still do
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # nothing changed here


def test_the_trainer_and_its_fetch_child_run_at_the_configured_niceness(
    settings: Settings, tmp_path: Path
) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    want = min(19, base + 7)
    log = tmp_path / "trainer.log"
    proc = _start(settings, log, "train", FMSTREAM_TRAINER_NICE="7",
                  FMSTREAM_TRAINER_FETCH_PROCESS="true")
    try:
        wait_for_log(proc, log, lambda text: "running at niceness" in text
                     and bool(_children(proc.pid)))
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == want
        kids = _children(proc.pid)
        assert kids and all(os.getpriority(os.PRIO_PROCESS, k) == want for k in kids)
        assert f"running at niceness {want} (FMSTREAM_TRAINER_NICE=7)" in log.read_text()
    finally:
        stop_process(proc)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base


@pytest.mark.parametrize("value", ["-2", "20", "lots"])
def test_a_bad_niceness_is_refused_with_the_settings_name(
    settings: Settings, value: str
) -> None:
    _assert_refused(settings, "train", "trainer_nice", value)


# --- FMSTREAM_WORKER_SLICE_US: the serving threads' scheduler slice ---------------------------


def _kernel_takes_slices() -> bool:
    """Linux >= 6.12 (EEVDF custom slices) on an architecture the helper knows."""
    import platform

    from fmstream.app import SYS_SCHED_ATTR

    if sys.platform != "linux" or platform.machine() not in SYS_SCHED_ATTR:
        return False
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    return (major, minor) >= (6, 12)


def _in_a_thread(fn):  # noqa: ANN001, ANN202 - runs fn on a fresh thread, returns its result
    """Scheduler attributes are per thread: the test changes a throw-away thread's only."""
    import threading

    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(60)
    return out[0]


def test_request_slice_sets_every_thread_of_the_process_and_those_started_later() -> None:
    code = (
        "import threading, time\n"
        "from fmstream.app import request_slice, thread_slice_us\n"
        "stop = threading.Event()\n"
        "early = threading.Thread(target=stop.wait); early.start()\n"
        "ok = request_slice(300)\n"
        "seen = []\n"
        "late = threading.Thread(target=lambda: seen.append(thread_slice_us())); late.start()\n"
        "late.join()\n"
        "print(ok, thread_slice_us(), thread_slice_us(early.native_id), seen[0])\n"
        "stop.set()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True, timeout=120)
    if _kernel_takes_slices():
        assert out.stdout.split() == ["True", "300", "300", "300"], out.stderr
    else:
        assert out.stdout.split()[0] == "False", out.stderr


def test_request_slice_zero_changes_nothing_and_bad_values_are_refused() -> None:
    from fmstream.app import request_slice, thread_slice_us

    def body() -> tuple[bool, int | None, int | None]:
        before = thread_slice_us()
        return request_slice(0), before, thread_slice_us()

    ok, before, after = _in_a_thread(body)
    assert ok is False and before == after
    for bad in (-1, 99, 100_001):
        with pytest.raises(PriorityError, match=rf"slice must be 0 .*100\.\.100000 us, got {bad}: "
                           "set FMSTREAM_WORKER_SLICE_US") as exc:
            request_slice(bad)
        assert isinstance(exc.value, ValueError)


def test_request_slice_reports_a_refused_syscall(monkeypatch, caplog) -> None:
    """A kernel without the call (ENOSYS here: a syscall number no kernel has) is logged and
    reported as not in force; the thread keeps its slice."""
    import platform

    from fmstream import app

    if platform.machine() not in app.SYS_SCHED_ATTR:
        pytest.fail(f"no sched_setattr number known for {platform.machine()}")
    monkeypatch.setitem(app.SYS_SCHED_ATTR, platform.machine(), (4095, 4094))

    def body() -> bool:
        return app.request_slice(300)

    with caplog.at_level("WARNING", logger="fmstream.app"):
        assert _in_a_thread(body) is False
    assert "sched_setattr failed" in caplog.text


def test_request_slice_elsewhere_is_a_logged_no_op(monkeypatch, caplog) -> None:
    import platform

    from fmstream import app

    monkeypatch.setattr(platform, "machine", lambda: "s390x")
    with caplog.at_level("WARNING", logger="fmstream.app"):
        assert _in_a_thread(lambda: app.request_slice(300)) is False
    assert "FMSTREAM_WORKER_SLICE_US=300 ignored" in caplog.text


def test_the_worker_runs_every_thread_at_the_configured_slice(
    settings: Settings, tmp_path: Path
) -> None:
    from fmstream.app import thread_slice_us

    log = tmp_path / "worker.log"
    proc = _start(settings, log, "serve", FMSTREAM_WORKER_SLICE_US="250")
    try:
        said = ("scheduler slice 250 us" if _kernel_takes_slices()
                else "FMSTREAM_WORKER_SLICE_US=250 not in force")
        # the request loop's Kafka clients run IO threads of their own: wait for them
        wait_for_log(proc, log, lambda text: said in text
                     and len(os.listdir(f"/proc/{proc.pid}/task")) >= 4)
        tids = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
        slices = {tid: thread_slice_us(tid) for tid in tids}
        if _kernel_takes_slices():
            assert set(slices.values()) == {250}, slices
        else:
            assert 250 not in slices.values(), slices
    finally:
        stop_process(proc)


@pytest.mark.parametrize("value", ["-1", "99", "100001", "short"])
def test_a_bad_slice_is_refused_with_the_settings_name(settings: Settings, value: str) -> None:
    _assert_refused(settings, "serve", "worker_slice_us", value)


def test_a_thread_configured_later_runs_faiss_with_the_settings_threads() -> None:
    """OpenMP's thread count is per thread: a thread started after ``configure_threads`` (the
    trainer's publisher) gets one OpenMP thread per core unless it calls
    ``configure_thread`` itself."""
    code = ("import threading, faiss; from fmstream.app import configure_threads, "
            "configure_thread; from fmstream.settings import Settings; s = Settings(); "
            "configure_threads(s); got = []\n"
            "def plain(): got.append(faiss.omp_get_max_threads())\n"
            "def configured(): configure_thread(s); got.append(faiss.omp_get_max_threads())\n"
            "for f in (plain, configured):\n"
            "    t = threading.Thread(target=f); t.start(); t.join()\n"
            "print(faiss.omp_get_max_threads(), *got)")
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith("FMSTREAM_") and k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True, timeout=120, env=env)
    main, plain, configured = (int(x) for x in out.stdout.split())
    assert (main, configured) == (1, 1)
    assert plain == os.cpu_count()  # what the publisher's searches ran with before
