"""What the Kafka-wire code needs to know, as small frozen configs built at the entry point.

``fmstream.settings.Settings`` builds these (``settings.kafka_config()``, ``settings.topics()``);
nothing under ``stream/`` reads the settings or the environment itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import SecretStr

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


def secret_value(value: SecretStr | str | None) -> str | None:
    """The clear text of a secret (None stays None); for handing to a client only."""
    if value is None:
        return None
    return value.get_secret_value() if isinstance(value, SecretStr) else value


@dataclass(frozen=True)
class KafkaConfig:
    """How to reach and authenticate to the brokers (defaults: plaintext, no credentials).

    Every client is built from it by ``stream.connect`` (``kafka_producer``,
    ``kafka_consumer``, ``kafka_admin``), so TLS and SASL apply to all of them.

    Attributes:
        bootstrap: bootstrap servers, ``host:port[,host:port]``.
        client_id: the client id every producer and consumer reports.
        options: further kafka-python client options given to every client (no secrets here:
            they would show in a repr; e.g. reconnect backoff).
        security_protocol: ``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``.
        sasl_mechanism: ``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512`` (SASL_* only).
        username, password: SASL credentials (the password is a ``SecretStr``: never printed).
        ssl_cafile: PEM of the CA(s) of the broker certificate (default: the system's store).
        ssl_certfile, ssl_keyfile, ssl_key_password: client certificate (mutual TLS).
        ssl_check_hostname: the broker certificate must name the host connected to.
    """

    bootstrap: str
    client_id: str = "fmstream"
    options: Mapping[str, Any] = field(default_factory=dict)
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    username: str | None = None
    password: SecretStr | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_key_password: SecretStr | None = field(default=None, repr=False)
    ssl_check_hostname: bool = True

    def __post_init__(self) -> None:
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and (self.sasl_mechanism is None or not self.username or self.password is None):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs a SASL mechanism, a username "
                "and a password (FMSTREAM_KAFKA_SASL_MECHANISM, FMSTREAM_KAFKA_USERNAME, "
                "FMSTREAM_KAFKA_PASSWORD)"
            )
        if not sasl and (self.username or self.password is not None):
            raise ValueError(
                f"a Kafka username/password is set but security_protocol is "
                f"{self.security_protocol}: they would not be sent; use SASL_SSL or "
                "SASL_PLAINTEXT"
            )

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def client_config(self) -> dict[str, Any]:
        """The kafka-python keyword arguments of every client (secrets in clear: hand them to
        a client, never log them)."""
        config: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "client_id": self.client_id,
            **self.options,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol.startswith("SASL_"):
            config.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.username,
                sasl_plain_password=secret_value(self.password),
            )
        if self.uses_tls:
            config.update(
                ssl_cafile=self.ssl_cafile,
                ssl_certfile=self.ssl_certfile,
                ssl_keyfile=self.ssl_keyfile,
                ssl_password=secret_value(self.ssl_key_password),
                ssl_check_hostname=self.ssl_check_hostname,
            )
        return config

    def describe(self) -> str:
        """``bootstrap (protocol, mechanism as user)`` for messages; never the password."""
        extra = self.security_protocol
        if self.security_protocol.startswith("SASL_"):
            extra += f", {self.sasl_mechanism} as {self.username!r}"
        return f"{self.bootstrap} ({extra})"


@dataclass(frozen=True)
class MetricsEndpoint:
    """Where a process serves Prometheus ``/metrics`` (``stream.metrics.serve_process_metrics``).

    Attributes:
        port: the TCP port; 0: no endpoint.
        host: the address the server binds: ``127.0.0.1`` (this host only, the default) or an
            interface's address; ``0.0.0.0`` / ``::`` for every interface (a Prometheus in
            another container or on another host).
    """

    port: int = 0
    host: str = "127.0.0.1"


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
