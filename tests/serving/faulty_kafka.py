"""Fault injection for the worker's watchdog tests: real kafka-python consumers whose ``poll``
goes wrong once a trigger is set (no stand-in for Kafka: every other call reaches the broker).

- ``hang``: the poll never returns (the request loop is stuck inside Kafka, as in the worker
  that stopped answering: main thread inside ``KafkaConsumer.poll`` for minutes).
- ``deaf``: the poll returns nothing without calling kafka-python (a consumer that stopped
  trying to join: the heartbeat thread runs on, nothing rejoins the group).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from fmstream.app import KafkaClients


class FaultyConsumer:
    """Delegates everything to ``consumer`` except ``poll`` once ``triggered()``."""

    def __init__(self, consumer: Any, triggered: Callable[[], bool], mode: str) -> None:
        self._consumer = consumer
        self._triggered = triggered
        self._mode = mode
        self.faulty_polls = 0

    def poll(self, timeout_ms: int = 0, **kwargs: Any) -> dict:
        if not self._triggered():
            return self._consumer.poll(timeout_ms=timeout_ms, **kwargs)
        self.faulty_polls += 1
        if self._mode == "hang":
            threading.Event().wait()  # never returns
        threading.Event().wait(timeout_ms / 1000)  # a poll's wait, with nothing polled
        return {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


class FaultyClients(KafkaClients):
    """``fmstream``'s Kafka clients; the first ``faulty`` consumers made are :class:`FaultyConsumer`
    (the watchdog's renewal gets a healthy one)."""

    def __init__(self, settings: Any, triggered: Callable[[], bool], mode: str,
                 faulty: int = 1) -> None:
        super().__init__(settings)
        self.triggered, self.mode, self.faulty = triggered, mode, faulty
        self.made: list[Any] = []

    def consumer(self, group_id: str | None, **overrides: Any) -> Any:
        consumer = super().consumer(group_id, **overrides)
        if len(self.made) < self.faulty:
            consumer = FaultyConsumer(consumer, self.triggered, self.mode)
        self.made.append(consumer)
        return consumer
