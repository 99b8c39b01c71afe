"""The trainer's model lock: the publisher gets the model between two optimiser steps.

The trainer holds the lock for a whole decoded poll (up to ``max_poll_records`` events, many
steps of ``LearnPolicy.step_events``). A version the publisher builds meanwhile used to wait for
the whole poll. :meth:`ModelLock.let_waiters_in` is called by the holder at each step boundary:
when a reader waits, the holder releases the lock, waits until a reader has taken it, and takes
it back before any reader that was not already waiting (a plain ``Lock`` released and re-taken
by a running thread is usually re-taken by that same thread: the waiter would not get in; and a
reader reading in a loop would keep the holder out). So a reader waits for at most one step, the
poll for the readers that were waiting, and a reader only ever sees the model between two whole
steps.

What a reader sees mid-poll is the model after the first ``k`` steps of the poll: versions carry
no Kafka offsets (only checkpoints do, and those are taken by the trainer thread between polls),
so nothing stamped with an offset can see a part of a poll.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class ModelLock:
    """A non-reentrant lock whose holder can hand it to a waiting reader and take it back.

    Attributes:
        handoffs: times the holder let a waiting reader in (:meth:`let_waiters_in`).
        on_boundary: called by :meth:`let_waiters_in` before it looks for waiters (a test's
            hook: it sees every step boundary of a poll being learned).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = threading.Condition(threading.Lock())
        self._waiting = 0  # threads inside acquire(), not yet holding the lock
        self._taken = 0  # acquisitions so far
        self._handing = False  # the holder released the lock for a waiting reader
        self._reclaiming = False  # ...who took it: the holder takes it back before new readers
        self.handoffs = 0
        self.on_boundary: Callable[[], None] | None = None

    @property
    def waiting(self) -> int:
        """Threads waiting to take the lock now."""
        return self._waiting

    def acquire(self) -> bool:
        with self._state:
            # the holder taking the lock back after a hand-off goes first (else a reader that
            # reads in a loop could take it again and again while a poll waits)
            self._state.wait_for(lambda: not self._reclaiming)
            self._waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._state:
                self._waiting -= 1
                self._taken += 1
                if self._handing:  # taken in a hand-off: the holder takes it back next
                    self._handing, self._reclaiming = False, True
                self._state.notify_all()
        return True

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> ModelLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def let_waiters_in(self) -> bool:
        """Called by the holder between two steps: if a thread waits for the lock, release it
        until a waiter has taken it, then take it back (after that waiter released it). Returns
        whether a waiter got in."""
        if self.on_boundary is not None:
            self.on_boundary()
        with self._state:
            if not self._waiting:
                return False
            taken = self._taken
            self._handing = True
        self._lock.release()
        try:
            with self._state:
                self._state.wait_for(lambda: self._taken != taken or not self._waiting)
                self._handing = False
        finally:
            try:
                self._lock.acquire()
            finally:
                with self._state:
                    self._reclaiming = False
                    self._state.notify_all()
        self.handoffs += 1
        return True
