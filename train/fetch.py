"""Polling and decoding overlapped with the model update: a fetch thread owns the consumer.

kafka-python's consumer is not thread-safe, so every call on it (poll, assign, seek, commit,
close) is made by one thread, the fetch thread, while it runs. It polls, hands the records to
``decode`` (which also dead-letters what is unusable) and puts the decoded batch on a bounded
queue (``depth`` batches); the trainer thread takes batches from the queue and applies them.
Other consumer calls (the trainer's group commits) are queued with :meth:`Fetcher.call` and run by
the fetch thread between polls.

Exactly once is untouched: the trainer records a partition's position only when it has applied
the batch holding it, and checkpoints those positions; batches still in the queue (or in flight)
at a crash are read again by the next trainer from the checkpoint.

While ``may_fetch()`` is False (the trainer lease is not provably ours) the thread neither polls
nor decodes, so nothing is consumed and no dead letter is written.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from kafka.errors import KafkaError

log = logging.getLogger(__name__)

B = TypeVar("B")


class FetchFailed(RuntimeError):
    """The fetch thread stopped on an unexpected error (the cause is chained)."""


class Fetcher(Generic[B]):
    """Polls and decodes in its own thread; :meth:`get` returns decoded batches in poll order.

    Args:
        consumer: the ``KafkaConsumer`` (used only by the fetch thread while it runs).
        decode: turns one poll's records (a non-empty list) into a batch; runs in the fetch
            thread.
        may_fetch: polled before each poll; while False the thread waits.
        before_poll: run before each poll in the fetch thread (e.g. refresh the assignment).
        depth: decoded batches waiting at most (bounded: memory and work ahead of the model).
        poll_timeout_ms: one poll's wait when nothing has arrived.
        timings: a dict where ``poll`` and ``decode`` seconds are accumulated.
    """

    def __init__(
        self,
        consumer: Any,
        decode: Callable[[list], B],
        *,
        may_fetch: Callable[[], bool] = lambda: True,
        before_poll: Callable[[], None] = lambda: None,
        depth: int = 2,
        poll_timeout_ms: int = 200,
        timings: dict[str, float] | None = None,
    ) -> None:
        self.consumer = consumer
        self._decode = decode
        self._may_fetch = may_fetch
        self._before_poll = before_poll
        self._queue: queue.Queue[B] = queue.Queue(maxsize=depth)
        self._calls: queue.SimpleQueue[tuple[Callable[[Any], Any], Future]] = queue.SimpleQueue()
        self._poll_timeout_ms = poll_timeout_ms
        self._stop = threading.Event()
        self._failed: BaseException | None = None
        self.cpu_s = 0.0  # CPU seconds the fetch thread used so far
        self.timings = timings if timings is not None else {}
        self.timings.setdefault("poll", 0.0)
        self.timings.setdefault("decode", 0.0)
        self._thread = threading.Thread(target=self._run, daemon=True, name="fmstream-fetch")

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> Fetcher[B]:
        self._thread.start()
        return self

    def get(self, timeout: float) -> B | None:
        """The next decoded batch, or None if none arrives within ``timeout`` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            if self._failed is not None:
                raise FetchFailed(f"the fetch thread failed: {self._failed!r}") from self._failed
            return None

    def call(self, fn: Callable[[Any], Any]) -> Future:
        """Run ``fn(consumer)`` on the thread that owns the consumer; its result as a future.

        When the fetch thread is not running, ``fn`` runs here and now.
        """
        future: Future = Future()
        if not self.running:
            _run_call(fn, self.consumer, future)
            return future
        self._calls.put((fn, future))
        return future

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread (batches still queued are dropped: they were never applied)."""
        self._stop.set()
        if self.running:
            # Unblock a put() waiting on a full queue.
            while self.running:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(0.05)
                timeout -= 0.05
                if timeout <= 0:
                    log.warning("the fetch thread did not stop in time")
                    break
        self._run_calls()

    # --- the fetch thread ---------------------------------------------------------------------

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            _run_call(fn, self.consumer, future)

    def _run(self) -> None:
        cpu0 = time.thread_time()
        try:
            while not self._stop.is_set():
                self.cpu_s = time.thread_time() - cpu0
                self._run_calls()
                if not self._may_fetch():
                    self._stop.wait(0.05)
                    continue
                t0 = time.perf_counter()
                try:
                    self._before_poll()
                    polled = self.consumer.poll(timeout_ms=self._poll_timeout_ms)
                except KafkaError as exc:
                    # Broker away: positions stay in the consumer; retry shortly, never die.
                    log.warning("poll failed (%s); retrying", exc)
                    self._stop.wait(min(1.0, self._poll_timeout_ms / 1000))
                    continue
                finally:
                    self.timings["poll"] += time.perf_counter() - t0
                records = [r for batch in polled.values() for r in batch]
                if not records:
                    continue
                t0 = time.perf_counter()
                batch = self._decode(records)
                self.timings["decode"] += time.perf_counter() - t0
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.05)
                        break
                    except queue.Full:
                        self._run_calls()  # commits keep flowing while the trainer is busy
        except BaseException as exc:  # noqa: BLE001 - surfaced in the trainer's thread by get()
            log.exception("fetch thread failed")
            self._failed = exc
        finally:
            self.cpu_s = time.thread_time() - cpu0


def _run_call(fn: Callable[[Any], Any], consumer: Any, future: Future) -> None:
    try:
        future.set_result(fn(consumer))
    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
        future.set_exception(exc)
