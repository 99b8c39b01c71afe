"""A serving worker (``Worker.run``) on a thread of the test, on the test session's real Kafka::

    running = start_worker(settings, store, "w1")  # returns once it owns partitions
    try:
        ...
    finally:
        running.close()  # fails the test if the worker does not stop

or the whole pipeline, ``fmstream train`` and ``fmstream serve`` by their entry points::

    with trainer_and_worker(settings):
        ...
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fmstream.app import new_worker, run_trainer, run_worker
from fmstream.settings import Settings
from serving.store import VectorStore
from serving.worker import Worker


@dataclass
class RunningWorker:
    worker: Worker
    stop: threading.Event
    thread: threading.Thread
    ready: threading.Event

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until the worker owns its partitions (positioned); else stop it and fail."""
        if not self.ready.wait(timeout_s):  # a bound on state, generous for a loaded box
            self.stop.set()
            raise AssertionError(f"{self.thread.name} never got its partitions")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the worker did not stop"


def launch_worker(settings: Settings, store: VectorStore, worker_id: str) -> RunningWorker:
    """A worker from ``settings`` serving ``store``, started on a daemon thread of that name (not
    waited for)."""
    worker = new_worker(settings, store, worker_id=worker_id)
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), kwargs={"ready": ready},
                              daemon=True, name=worker_id)
    thread.start()
    return RunningWorker(worker, stop, thread, ready)


def start_worker(
    settings: Settings, store: VectorStore, worker_id: str, *, timeout_s: float = 180
) -> RunningWorker:
    """:func:`launch_worker`, returning once the worker owns its partitions."""
    running = launch_worker(settings, store, worker_id)
    running.wait_ready(timeout_s)
    return running


@contextmanager
def trainer_and_worker(settings: Settings, timeout_s: float = 60) -> Iterator[None]:
    """The trainer and a worker (``run_trainer``, ``run_worker``) on daemon threads for the
    block, entered once the worker owns partitions of the request topic."""
    stop, ready = threading.Event(), threading.Event()
    threads = [threading.Thread(target=run_trainer, args=(settings, stop), daemon=True),
               threading.Thread(target=run_worker, args=(settings, stop, ready), daemon=True)]
    for t in threads:
        t.start()
    try:
        assert ready.wait(timeout_s), "the worker got no partitions of the request topic"
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(60)
