"""Checkpoints written by a forked child, so the trainer thread is not stopped by them.

Redis' BGSAVE scheme: :meth:`BackgroundCheckpoint.start` forks; the child holds a copy-on-write
snapshot of the whole process as it was at the fork, serialises the model from it, writes and
fsyncs a temp file (:func:`model.checkpoint.write_pending`) and leaves with ``os._exit`` (0 when
the file is complete). The parent's only cost is the fork itself (copying page tables) and, while
the child runs, a page copy on the parent's first write to each shared page.

The parent polls :meth:`BackgroundCheckpoint.poll` (``waitpid(WNOHANG)``) from its loop and, on a
clean exit, installs the file under its checkpoint name itself (:func:`install_pending`: rename,
fsync of the folder) — so the caller decides, at install time, whether the file may still be
published (e.g. its lease is still provably held). A child that failed or was killed leaves no
file under a checkpoint name; its temp file is removed.

The child touches only the model's arrays and Python objects, its own temp file and the
filesystem: no logging (inherited handlers and their locks), no sockets, no threads (only the
forking thread exists in it), no BLAS; the garbage collector is off (it would touch, and so copy,
every object). It runs at a lower priority (:data:`CHILD_NICE`), so on a shared host it takes
only idle cores. It dies with the trainer (``PR_SET_PDEATHSIG``, and a parent check), so a kill -9
of the trainer never leaves a writer behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.checkpoint import pending_path, prune_checkpoints, write_pending
from model.online import OnlineFM
from train.errors import CheckpointBusy

Writer = Callable[[Path, OnlineFM, dict[str, Any]], None]
"""``write_pending``'s signature; tests pass one that fails to prove the failure paths."""

def _resolve_prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up once in the parent: the child must not dlopen/dlsym (another
    thread may have held the dynamic loader's lock at the fork)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # not glibc Linux: the getppid check covers it
        return None


_PRCTL = _resolve_prctl()

EXIT_OK = 0
EXIT_FAILED = 3  # the writer raised (disk full, unserialisable metadata, ...)
CHILD_NICE = 10
"""Niceness the writer adds to itself: it is background work (seconds of a core at 1M users)
that must not take a core from the trainer thread, a serving worker or Redis on a shared host;
it runs whenever a core is otherwise idle. Checkpoints come later when the host is saturated."""


@dataclass(frozen=True)
class ChildResult:
    """How a background checkpoint ended.

    Attributes:
        ok: the temp file is complete and fsynced (the child exited 0).
        pending: the temp file (removed already when not ``ok``).
        token: what the caller passed to :meth:`BackgroundCheckpoint.start`.
        status: the child's exit code, or ``-signal`` when a signal killed it.
        wall_s: fork to reaped exit.
        cpu_s: the child's own CPU (user + system), from ``wait4``.
        timed_out: killed by :meth:`BackgroundCheckpoint.poll` after ``timeout_s``.
    """

    ok: bool
    pending: Path
    token: Any
    status: int
    wall_s: float
    cpu_s: float
    timed_out: bool = False


class BackgroundCheckpoint:
    """At most one checkpoint writer child at a time (see the module docstring).

    Args:
        directory: the checkpoint folder.
        writer: writes the temp file in the child (default: this module's
            :func:`~model.checkpoint.write_pending`, looked up at each start).
        keep: the child first deletes all but the newest ``keep`` checkpoints (so the caller
            installs with ``install_pending(pending, keep=None)``: deleting old files, ~0.1 s
            each at 1M users, is then off the caller's thread); None: the child deletes none.
        timeout_s: a child still running this long after its fork is killed by :meth:`poll`
            (reported as failed, ``timed_out``): a writer stuck for good (e.g. on a lock some
            other thread held at the fork) must not stop checkpoints for good.
        nice: niceness the child adds to itself (:data:`CHILD_NICE`; 0: none).
    """

    def __init__(
        self,
        directory: Path,
        writer: Writer | None = None,
        keep: int | None = None,
        timeout_s: float = 600.0,
        nice: int = CHILD_NICE,
    ) -> None:
        self.directory = Path(directory)
        self.nice = nice
        self.writer = writer
        self.keep = keep
        self.timeout_s = timeout_s
        self._pid: int | None = None
        self._pending: Path | None = None
        self._token: Any = None
        self._started = 0.0

    @property
    def running(self) -> bool:
        """A child was started and not reaped yet."""
        return self._pid is not None

    @property
    def pid(self) -> int | None:
        """The writing child's pid while it runs (until reaped), else None."""
        return self._pid

    def start(
        self, model: OnlineFM, metadata: Callable[[], dict[str, Any]], token: Any = None
    ) -> None:
        """Fork a child that writes ``model`` and ``metadata()`` (evaluated in the child, on the
        snapshot) to a new temp file. The caller makes sure nothing changes the model during the
        call (the fork copies the process as it is).

        Raises:
            CheckpointBusy: a child is still running (at most one in flight; a
                ``RuntimeError``).
            OSError: the temp file or the fork could not be made (nothing is running then).
        """
        if self._pid is not None:
            raise CheckpointBusy(f"a background checkpoint is still running (pid {self._pid}): "
                                 "wait for poll() to return its result, or cancel() it")
        pending = pending_path(self.directory)
        parent = os.getpid()
        writer = self.writer or write_pending
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(pending)
            raise
        if pid == 0:  # the child: never returns
            _child(parent, pending, writer, model, metadata, self.keep, self.nice)
        self._pid, self._pending, self._token = pid, pending, token
        self._started = time.monotonic()

    def poll(self) -> ChildResult | None:
        """The result once the child has exited (reaping it), else None (also when idle); a
        child running past ``timeout_s`` is killed and reported failed."""
        if self._pid is None:
            return None
        pid, status, usage = os.wait4(self._pid, os.WNOHANG)
        if pid == 0:
            if time.monotonic() - self._started <= self.timeout_s:
                return None
            return self.cancel(timed_out=True)
        return self._finish(status, usage)

    def wait(self, timeout_s: float) -> ChildResult | None:
        """Wait up to ``timeout_s`` for the child (polling its exit); None if none ran or it is
        still running."""
        deadline = time.monotonic() + timeout_s
        delay = 0.001
        while self._pid is not None:
            done = self.poll()
            if done is not None or time.monotonic() >= deadline:
                return done
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return None

    def cancel(self, *, timed_out: bool = False) -> ChildResult | None:
        """Kill a running child, reap it and remove its temp file (idempotent)."""
        if self._pid is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signal.SIGKILL)
        _, status, usage = os.wait4(self._pid, 0)
        return self._finish(status, usage, timed_out)

    def _finish(
        self, status: int, usage: resource.struct_rusage, timed_out: bool = False
    ) -> ChildResult:
        code = os.waitstatus_to_exitcode(status)
        pending, token = self._pending, self._token
        assert pending is not None  # set with _pid
        self._pid, self._pending, self._token = None, None, None
        ok = code == EXIT_OK and pending.exists()
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(pending)
        return ChildResult(
            ok=ok,
            pending=pending,
            token=token,
            status=code,
            wall_s=time.monotonic() - self._started,
            cpu_s=usage.ru_utime + usage.ru_stime,
            timed_out=timed_out,
        )


def _child(
    parent: int, pending: Path, writer: Writer, model: OnlineFM,
    metadata: Callable[[], dict[str, Any]], keep: int | None, nice: int = 0,
) -> None:
    """The forked writer: exits with EXIT_OK once ``pending`` is complete and fsynced."""
    code = EXIT_FAILED
    try:
        gc.disable()  # a collection would touch (copy) every tracked object of the snapshot
        if _PRCTL is not None:
            _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the trainer died before prctl took effect
            os._exit(EXIT_FAILED)
        with contextlib.suppress(ValueError, OSError):  # the trainer's handlers are not ours
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the trainer decides
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if nice:
            with contextlib.suppress(OSError):  # a lower priority only; never a failure
                os.nice(nice)
        if keep is not None:
            prune_checkpoints(pending.parent, keep)  # what the last install left for us
        writer(pending, model, metadata())
        code = EXIT_OK
    except BaseException:  # noqa: BLE001 - reported through the exit code, never logged here
        code = EXIT_FAILED
    finally:
        os._exit(code)
