"""Publishing off the training path: the trainer hands over what changed, a thread publishes it.

The trainer calls the :class:`~train.loop.EventSink` methods of :class:`PublisherThread` after
each applied batch; they only record what changed (O(batch), under a short lock) and return.
The publisher thread wakes every ``interval_s`` (or when told), takes *everything* recorded since
its last turn at once (coalesced: one history write for all those events, one set of changed
users, only the newest checkpoint report) and hands it to the sink, normally a
:class:`~train.resilience.GuardedSink` around the :class:`~train.publisher.Publisher`, then lets
the sink publish what is due (``tick``). So a slow Redis or a big publish delays publishing, never
training.

Bounded: at most ``max_events`` applied events wait for the thread; beyond that the oldest
batches are dropped with a warning (their Redis history only; the users stay marked active, so
their vectors are still published). During a Redis outage the sink keeps its own bounded queue
(:class:`~train.resilience.GuardedSink`), as before.

Only the content (what is written where) is the publisher's; this module is only the hand-over.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from stream.schemas import EventColumns
from train.errors import TrainError
from train.resilience import GuardedSink

log = logging.getLogger(__name__)

HISTORY_CHUNK = 8192
"""Events per ``applied`` call to the sink (bounds one Redis script call)."""


class LockedModel:
    """The model as a publisher in another thread sees it: every attribute read and method call
    runs under ``lock``, the lock the trainer holds while it changes the model.

    Each call is consistent on its own (the model's read methods return copies); between two
    calls the model may move on, which the publisher tolerates (a row changed meanwhile is marked
    changed again and goes out with the next version).
    """

    def __init__(self, model: Any, lock: Any) -> None:
        self._model = model
        self._lock = lock

    def __getattr__(self, name: str) -> Any:
        with self._lock:
            attr = getattr(self._model, name)
        if not callable(attr):
            return attr
        lock = self._lock

        def locked(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return attr(*args, **kwargs)

        return locked


class PublisherFailed(TrainError, RuntimeError):
    """The publisher thread stopped on an unexpected error (the cause is chained)."""


class PublisherThread:
    """Runs ``sink`` in its own thread, fed through a bounded, coalescing hand-over.

    Args:
        sink: what publishes (``applied``, ``profiles_changed``, ``checkpointed``, ``tick``);
            called only from the publisher thread, wrapped in a ``GuardedSink``.
        interval_s: the thread's turn (it also ticks the sink's cadences this often).
        max_events: most applied events waiting for the thread (oldest dropped beyond).
        on_start: called first in the new thread (per-thread settings: OpenMP's thread count
            is the calling thread's, see ``fmstream.app.configure_thread``).
    """

    def __init__(self, sink: Any, *, interval_s: float = 0.05, max_events: int = 200_000,
                 on_start: Callable[[], None] | None = None) -> None:
        # Redis errors pause publishing (history kept, bounded), never the thread.
        self.sink = sink if isinstance(sink, GuardedSink) else GuardedSink(sink)
        self.interval_s = interval_s
        self.max_events = max_events
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._events: deque[Sequence[Any]] = deque()
        self._n_events = 0
        self._profiles: list[str] = []
        self._items: dict[str, None] = {}  # items whose profile changed (insertion order)
        self._checkpoint: Any = None
        self._report: dict[str, Any] = {}  # status fields, the newest of each
        self._posted = 0  # hand-overs recorded (trainer side)
        self._delivered = 0  # hand-overs the thread has passed to the sink
        self._done = threading.Condition(self._lock)
        self._failed: BaseException | None = None
        self.dropped = 0
        self.busy_s = 0.0  # seconds the thread spent publishing
        self.cpu_s = 0.0  # CPU seconds the thread used so far
        self._on_start = on_start
        self._thread = threading.Thread(target=self._run, daemon=True, name="fmstream-publish")

    # --- the trainer's side (cheap) ----------------------------------------------------------

    def start(self) -> PublisherThread:
        self._thread.start()
        return self

    def applied(self, events: Sequence[Any]) -> None:
        self._check()
        with self._lock:
            self._events.append(events)
            self._n_events += len(events)
            while self._n_events > self.max_events and len(self._events) > 1:
                old = self._events.popleft()
                self._n_events -= len(old)
                self.dropped += len(old)
                self._profiles.extend(dict.fromkeys(_user_ids(old)))  # still publish vectors
                log.warning(
                    "publisher behind: dropped the history of %d events (over %d waiting)",
                    len(old), self.max_events,
                )
            self._posted += 1

    def profiles_changed(self, user_ids: Sequence[str]) -> None:
        self._check()
        with self._lock:
            self._profiles.extend(user_ids)
            self._posted += 1

    def items_changed(self, item_ids: Sequence[str]) -> None:
        self._check()
        with self._lock:
            self._items.update(dict.fromkeys(item_ids))
            self._posted += 1

    def checkpointed(self, progress: Any) -> None:
        """Keep (a copy of) the newest checkpoint report; older ones are superseded."""
        self._check()
        report = copy.copy(progress)
        with self._lock:
            self._checkpoint = report
            self._posted += 1
        self._wake.set()

    def report(self, fields: Mapping[str, Any]) -> None:
        """Status fields for the sink (the newest value of each wins)."""
        self._check()
        with self._lock:
            self._report.update(fields)
            self._posted += 1
        self._wake.set()

    def tick(self, now: float) -> None:
        """Nothing to do here (the thread keeps the cadences); raises if the thread failed."""
        self._check()

    def _check(self) -> None:
        if self._failed is not None:
            failed = self._failed
            raise PublisherFailed(f"the publisher thread failed: {failed!r}") from failed

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until everything handed over so far reached the sink (False on timeout)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._posted
            self._wake.set()
            while self._delivered < target and self._failed is None:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._done.wait(min(left, 0.1))
                self._wake.set()
        self._check()
        return True

    def close(self, timeout: float = 60.0) -> None:
        """Deliver what is waiting, then stop the thread."""
        if self._thread.is_alive():
            self.flush(timeout)
            self._stopping.set()
            self._wake.set()
            self._thread.join(timeout)

    @property
    def version(self) -> int:
        """The publisher's newest version (what the trainer stores with its checkpoints)."""
        inner = getattr(self.sink, "sink", self.sink)
        return int(getattr(inner, "version", 0) or 0)

    @property
    def waiting_events(self) -> int:
        """Applied events not yet handed to the sink."""
        return self._n_events

    # --- the publisher thread ----------------------------------------------------------------

    def _take(self) -> tuple[list[Sequence[Any]], list[str], list[str], Any, dict[str, Any],
                             int]:
        with self._lock:
            events, self._events = list(self._events), deque()
            self._n_events = 0
            profiles, self._profiles = self._profiles, []
            items, self._items = list(self._items), {}
            checkpoint, self._checkpoint = self._checkpoint, None
            report, self._report = self._report, {}
            return events, profiles, items, checkpoint, report, self._posted

    def _run(self) -> None:
        cpu0 = time.thread_time()
        try:
            if self._on_start is not None:
                try:
                    self._on_start()
                except BaseException as exc:  # noqa: BLE001 - surfaced in the trainer's thread
                    self._fail(exc, "publisher thread could not start")
                    return
            self._turns()
        finally:
            self.cpu_s = time.thread_time() - cpu0

    def _fail(self, exc: BaseException, what: str) -> None:
        """Log ``exc`` and keep it for the trainer's thread (its next call raises it)."""
        log.exception(what)
        with self._lock:
            self._failed = exc
            self._done.notify_all()

    def _turns(self) -> None:
        cpu0 = time.thread_time()
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            events, profiles, items, checkpoint, report, posted = self._take()
            t0 = time.perf_counter()
            try:
                self._deliver(events, profiles, checkpoint, report, items)
            except BaseException as exc:  # noqa: BLE001 - surfaced in the trainer's thread
                self._fail(exc, "publisher thread failed")
                return
            finally:
                self.busy_s += time.perf_counter() - t0
                self.cpu_s = time.thread_time() - cpu0
            with self._lock:
                self._delivered = max(self._delivered, posted)
                self._done.notify_all()
                if self._stopping.is_set() and self._delivered >= self._posted:
                    return

    def _deliver(self, events: list[Sequence[Any]], profiles: list[str], checkpoint: Any,
                 report: dict[str, Any] | None = None, items: list[str] | None = None) -> None:
        sink = self.sink
        if profiles:
            sink.profiles_changed(list(dict.fromkeys(profiles)))
        if items:
            sink.items_changed(items)
        if events:
            if all(isinstance(batch, EventColumns) for batch in events):
                merged: Any = EventColumns.concat(events)
                chunk = merged.take
            else:
                merged = [e for batch in events for e in batch]
                chunk = merged.__getitem__
            for start in range(0, len(merged), HISTORY_CHUNK):
                sink.applied(chunk(slice(start, start + HISTORY_CHUNK)))
        if checkpoint is not None:
            sink.checkpointed(checkpoint)
        if report:
            sink.report(report)
        sink.tick(time.time())


def _user_ids(events: Sequence[Any]) -> Sequence[str]:
    """The user id of each event (columns or event tuples)."""
    if isinstance(events, EventColumns):
        return events.user_ids
    return [e.user_id for e in events]
