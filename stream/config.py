"""What the Kafka-wire code needs to know, as small frozen configs built at the entry point.

``fmstream.settings.Settings`` builds these (``settings.kafka_config()``, ``settings.topics()``);
nothing under ``stream/`` reads the settings or the environment itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KafkaConfig:
    """How to reach the brokers.

    Attributes:
        bootstrap: bootstrap servers, ``host:port[,host:port]``.
        client_id: the client id every producer and consumer reports.
        options: further kafka-python client options given to every client (e.g. security).
    """

    bootstrap: str
    client_id: str = "fmstream"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Topics:
    """The topic names of the contract (DESIGN.md)."""

    events: str = "fm.events"
    users: str = "fm.users"
    items: str = "fm.items"
    requests: str = "fm.requests"
    responses: str = "fm.responses"
    dlq: str = "fm.dlq"

    @property
    def training(self) -> tuple[str, str, str]:
        """What the trainer consumes: profiles first, then events."""
        return (self.users, self.items, self.events)
