"""The one place where Kafka and Redis clients are built, from small typed connection configs.

Every producer, consumer and admin client of fmstream comes from :func:`kafka_producer`,
:func:`kafka_consumer` or :func:`kafka_admin`, and every Redis client from :func:`redis_client`,
so TLS, SASL and ACL credentials apply everywhere or nowhere. The configs are frozen
dataclasses (:class:`stream.config.KafkaConfig`, :class:`RedisConfig`) built from
``fmstream.settings.Settings`` at the entry point (``settings.kafka_config()``,
``settings.redis_config()``); lower packages take them and never read settings themselves.

Secrets are :class:`pydantic.SecretStr`: their ``repr`` and ``str`` are ``'**********'``, so a
config that ends up in a log line or an exception never shows them. A Redis URL may carry a
password too (``redis://user:pw@host``): show it with :func:`redact_url`.

Credential and TLS failures raise :class:`ConnectError` subclasses whose message says what was
tried and what to check, without the secret (see :func:`check_kafka`, :func:`check_redis`).
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr

from stream.config import KafkaConfig, SaslMechanism, SecurityProtocol, secret_value

if TYPE_CHECKING:
    import redis
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

log = logging.getLogger(__name__)



# --- errors ---------------------------------------------------------------------------------


class ConnectError(RuntimeError):
    """A Kafka or Redis connection could not be made; the message says what to check.

    Attributes:
        service: ``"kafka"`` or ``"redis"``.
    """

    service = "kafka"

    def __init__(self, message: str, *, service: str = "kafka") -> None:
        super().__init__(message)
        self.service = service


class AuthenticationFailed(ConnectError):
    """The server refused the credentials (SASL, Redis AUTH/ACL) or the user lacks a right."""


class TlsFailed(ConnectError):
    """The TLS handshake failed (unknown CA, wrong host name, bad client certificate)."""


class ProtocolMismatch(ConnectError):
    """The broker closed the connection at the first request: the listener speaks another
    security protocol (TLS, SASL) than the one configured."""


class Unreachable(ConnectError):
    """Nothing answered at the address within the bound."""


class NotAuthorized(ConnectError):
    """The broker authenticated the principal but its ACLs deny it a topic or group it needs."""


class PasswordNotChecked(ConnectError):
    """A Redis password is configured, but the server checks none for that user (no
    ``requirepass``): it takes any password, and connections without one too. Failing closed:
    the settings say Redis is protected and it is not."""


# --- configs --------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: safe to print or log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host += f":{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@dataclass(frozen=True)
class RedisConfig:
    """How to reach and authenticate to Redis.

    Args:
        url: ``redis://host:port/db`` (or ``rediss://`` for TLS; a password in the URL works
            but prefer ``password``: the URL is shown redacted, the field never).
        username, password: ACL user (Redis 6+) or ``requirepass`` password (no username).
        ssl: TLS even when the URL says ``redis://``.
        ssl_ca_file: PEM of the CA that signed the server certificate (default: system store).
        ssl_certfile, ssl_keyfile: client certificate (when the server checks clients).
        ssl_check_hostname: verify that the server certificate names the host.
    """

    url: str
    username: str | None = None
    password: SecretStr | None = field(default=None, repr=False)
    ssl: bool = False
    ssl_ca_file: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True

    def __repr__(self) -> str:
        return (f"RedisConfig(url={redact_url(self.url)!r}, username={self.username!r}, "
                f"password={'**********' if self.password is not None else None}, "
                f"ssl={self.uses_tls})")

    @property
    def uses_tls(self) -> bool:
        return self.ssl or self.url.startswith("rediss://")

    def display_url(self) -> str:
        """The URL without its password, for messages."""
        return redact_url(self.url)

    def client_kwargs(self) -> dict[str, Any]:
        """``redis.Redis.from_url`` keyword arguments (secrets in clear: never log them)."""
        kwargs: dict[str, Any] = {}
        if self.username:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = secret_value(self.password)
        if self.uses_tls:
            kwargs.update(
                ssl_ca_certs=self.ssl_ca_file,
                ssl_certfile=self.ssl_certfile,
                ssl_keyfile=self.ssl_keyfile,
                ssl_check_hostname=self.ssl_check_hostname,
                ssl_cert_reqs="required",
            )
        return kwargs

    def password_setting(self) -> str | None:
        """Where the configured password comes from (a setting's name), None when there is none."""
        if self.password is not None:
            return "FMSTREAM_REDIS_PASSWORD"
        try:
            in_url = urlsplit(self.url).password
        except ValueError:
            return None
        return "the password in FMSTREAM_REDIS_URL" if in_url else None

    def user(self) -> str | None:
        """The ACL user to authenticate as (the field, else the URL's), None for ``default``."""
        user = self.username
        if not user:
            try:
                user = urlsplit(self.url).username
            except ValueError:
                user = None
        return None if not user or user == "default" else user

    def client_url(self) -> str:
        """The URL to connect with: ``rediss://`` when TLS is asked for by ``ssl``."""
        if self.ssl and self.url.startswith("redis://"):
            return "rediss://" + self.url[len("redis://"):]
        return self.url


# --- factories ------------------------------------------------------------------------------


RECONNECT = {"reconnect_backoff_ms": 50, "reconnect_backoff_max_ms": 1000}
"""Reconnect backoff of every Kafka client (overridable): a restarted broker is reconnected
within about a second (kafka-python's default cap, 30 s, kept workers silent 20-50 s)."""


def kafka_producer(conn: KafkaConfig, **overrides: Any) -> KafkaProducer:
    """A ``KafkaProducer`` on ``conn``; ``overrides`` are kafka-python producer options."""
    from kafka import KafkaProducer

    return KafkaProducer(**(RECONNECT | conn.client_config() | overrides))


def kafka_consumer(conn: KafkaConfig, **overrides: Any) -> KafkaConsumer:
    """A ``KafkaConsumer`` on ``conn`` (``group_id`` etc. in ``overrides``)."""
    from kafka import KafkaConsumer

    return KafkaConsumer(**(RECONNECT | conn.client_config() | overrides))


def kafka_admin(conn: KafkaConfig, **overrides: Any) -> KafkaAdminClient:
    """A ``KafkaAdminClient`` on ``conn``."""
    from kafka import KafkaAdminClient

    return KafkaAdminClient(**(RECONNECT | conn.client_config() | overrides))


def redis_client(conn: RedisConfig, **overrides: Any) -> redis.Redis:
    """A ``redis.Redis`` on ``conn``; ``overrides`` are client options (timeouts, retry, ...).

    Values are bytes unless ``decode_responses=True`` is passed.
    """
    import redis

    return redis.Redis.from_url(conn.client_url(), **(conn.client_kwargs() | overrides))


# --- fail closed: explain a refused connection ----------------------------------------------


def _is_tls_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ssl.SSLError | ssl.CertificateError):
            return True
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text or "SSL" in text and "handshake" in text.lower():
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def explain_kafka_error(conn: KafkaConfig, exc: BaseException) -> ConnectError | None:
    """The :class:`ConnectError` for a Kafka failure that no retry can fix (credentials,
    rights, TLS), or None for anything else (a broker that is away, a timeout)."""
    import kafka.errors as errors

    where = conn.describe()
    if isinstance(exc, errors.SaslAuthenticationFailedError | errors.IllegalSaslStateError):
        return AuthenticationFailed(
            f"Kafka at {where} refused the credentials ({type(exc).__name__}); check "
            "FMSTREAM_KAFKA_USERNAME, FMSTREAM_KAFKA_PASSWORD and FMSTREAM_KAFKA_SASL_MECHANISM"
        )
    if isinstance(exc, errors.AuthorizationError):
        return AuthenticationFailed(
            f"Kafka at {where}: user {conn.username!r} is not allowed to do this "
            f"({type(exc).__name__}); grant the ACLs the README's Security section lists"
        )
    if _is_tls_error(exc):
        return TlsFailed(
            f"TLS to Kafka at {where} failed ({type(exc).__name__}: {exc}); check "
            "FMSTREAM_KAFKA_SSL_CAFILE (the CA of the broker certificate) and that the "
            "certificate names the bootstrap host (or FMSTREAM_KAFKA_SSL_CHECK_HOSTNAME)"
        )
    return None


def explain_redis_error(conn: RedisConfig, exc: BaseException) -> ConnectError | None:
    """The :class:`ConnectError` for a Redis failure that no retry can fix, else None."""
    import redis

    where = conn.display_url()
    text = str(exc)
    auth_errors = (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError)
    if isinstance(exc, auth_errors) or any(
        marker in text for marker in ("WRONGPASS", "NOAUTH", "invalid username-password")
    ):
        if conn.password_setting() is None and not conn.user():
            return AuthenticationFailed(
                f"Redis at {where} requires a password ({type(exc).__name__}) and none is set; "
                "set FMSTREAM_REDIS_PASSWORD (and FMSTREAM_REDIS_USERNAME for an ACL user)",
                service="redis",
            )
        return AuthenticationFailed(
            f"Redis at {where} refused the credentials ({type(exc).__name__}); check "
            "FMSTREAM_REDIS_USERNAME and FMSTREAM_REDIS_PASSWORD (or the URL's user/password)",
            service="redis",
        )
    if isinstance(exc, redis.exceptions.NoPermissionError) or "NOPERM" in text:
        return AuthenticationFailed(
            f"Redis at {where}: user {conn.username!r} lacks a permission ({text[:200]}); "
            "the ACL needs the fmstream key prefix and the commands the README lists",
            service="redis",
        )
    if _is_tls_error(exc):
        return TlsFailed(
            f"TLS to Redis at {where} failed ({type(exc).__name__}); check "
            "FMSTREAM_REDIS_SSL_CA_FILE and the server certificate's host name",
            service="redis",
        )
    return None


# Why a hand-made probe: kafka-python 3.0.12 drops the broker's SaslAuthenticate error when the
# broker closes the connection right after it (its reader aborts on EOF before handing over the
# bytes read with it), and a TLS handshake failure is only logged; both end as a bootstrap
# timeout after 30 s. The probe below speaks the two SASL requests itself (SaslHandshake v1,
# SaslAuthenticate v0; KIP-152) with kafka-python's own SCRAM/PLAIN token code, so a wrong
# password is reported as such, at once.
_SASL_HANDSHAKE, _SASL_AUTHENTICATE, _METADATA, _FIND_COORDINATOR = 17, 36, 3, 10
_TOPIC_AUTHORIZATION_FAILED, _GROUP_AUTHORIZATION_FAILED = 29, 30


def _hosts(bootstrap: str) -> list[tuple[str, int]]:
    out = []
    for entry in bootstrap.split(","):
        host, _, port = entry.strip().rpartition(":")
        out.append((host.strip("[]") or "localhost", int(port or 9092)))
    return out


def _frame(api_key: int, version: int, correlation: int, body: bytes) -> bytes:
    client = b"fmstream-check"
    header = struct.pack(">hhih", api_key, version, correlation, len(client)) + client
    payload = header + body
    return struct.pack(">i", len(payload)) + payload


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        data += chunk
    return data


def _call(sock: socket.socket, api_key: int, version: int, correlation: int,
          body: bytes) -> bytes:
    sock.sendall(_frame(api_key, version, correlation, body))
    (size,) = struct.unpack(">i", _read_exact(sock, 4))
    payload = _read_exact(sock, size)
    return payload[4:]  # after the correlation id


def _mechanisms(body: bytes) -> list[str]:
    """The mechanisms a SaslHandshake response lists (after its error code); [] if none."""
    try:
        (n,) = struct.unpack(">i", body[:4])
        out, at = [], 4
        for _ in range(max(n, 0)):
            (size,) = struct.unpack(">h", body[at : at + 2])
            out.append(body[at + 2 : at + 2 + size].decode("utf-8", "replace"))
            at += 2 + size
        return out
    except struct.error:
        return []


def _sasl_probe(sock: socket.socket, conn: KafkaConfig, host: str) -> None:
    """Authenticate on ``sock`` or raise :class:`AuthenticationFailed`."""
    from kafka.net.sasl import get_sasl_mechanism

    mech = (conn.sasl_mechanism or "").encode()
    body = _call(sock, _SASL_HANDSHAKE, 1, 1, struct.pack(">h", len(mech)) + mech)
    (error,) = struct.unpack(">h", body[:2])
    if error != 0:
        offered = _mechanisms(body[2:])
        if not offered:  # a PLAINTEXT or SSL listener answers "illegal SASL state", no list
            raise ProtocolMismatch(
                f"Kafka at {conn.describe()} offers no SASL mechanism on this listener "
                f"(error {error}): the listener expects another security protocol; check "
                "FMSTREAM_KAFKA_SECURITY_PROTOCOL (and the port of FMSTREAM_KAFKA_BOOTSTRAP)"
            )
        raise AuthenticationFailed(
            f"Kafka at {conn.describe()} does not offer SASL mechanism {conn.sasl_mechanism} "
            f"(error {error}; it offers {', '.join(offered)}); check "
            "FMSTREAM_KAFKA_SASL_MECHANISM"
        )
    mechanism = get_sasl_mechanism(conn.sasl_mechanism)(host=host, **conn.client_config())
    correlation = 2
    while not mechanism.is_done():
        token = mechanism.auth_bytes()
        try:
            body = _call(sock, _SASL_AUTHENTICATE, 0, correlation,
                         struct.pack(">i", len(token)) + token)
        except ConnectionError:
            raise AuthenticationFailed(
                f"Kafka at {conn.describe()} closed the connection during SASL authentication; "
                "check FMSTREAM_KAFKA_USERNAME, FMSTREAM_KAFKA_PASSWORD and the mechanism"
            ) from None
        correlation += 1
        (error, msg_len) = struct.unpack(">hh", body[:4])
        message = body[4:4 + msg_len].decode("utf-8", "replace") if msg_len > 0 else ""
        rest = body[4 + max(msg_len, 0):]
        if error != 0:
            raise AuthenticationFailed(
                f"Kafka at {conn.describe()} refused the credentials ({message or error}); "
                "check FMSTREAM_KAFKA_USERNAME, FMSTREAM_KAFKA_PASSWORD and "
                "FMSTREAM_KAFKA_SASL_MECHANISM"
            )
        (token_len,) = struct.unpack(">i", rest[:4])
        try:
            mechanism.receive(rest[4:4 + max(token_len, 0)])
        except Exception as exc:  # noqa: BLE001 - a server proof that does not verify
            raise AuthenticationFailed(
                f"SASL with Kafka at {conn.describe()} failed ({type(exc).__name__}): the "
                "server's proof did not verify"
            ) from None


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">h", len(raw)) + raw


def _authorization_probe(
    sock: socket.socket, conn: KafkaConfig, topics: Sequence[str], groups: Sequence[str]
) -> None:
    """Ask for each topic's metadata (Describe) and each group's coordinator (Describe on the
    group) and raise :class:`NotAuthorized` when the broker's ACLs deny one. A topic that does
    not exist is not an error here (it is created or waited for elsewhere)."""
    who = f"{conn.username!r}" if conn.username else "this client"
    denied_topics, denied_groups = [], []
    correlation = 100
    for topic in topics:  # one per request: only the first topic's error code is read
        correlation += 1
        # Metadata v4: topics [name], allow_auto_topic_creation=false (a probe creates nothing)
        body = _call(sock, _METADATA, 4, correlation,
                     struct.pack(">i", 1) + _string(topic) + b"\x00")
        pos = 4  # throttle_time_ms
        (n_brokers,) = struct.unpack_from(">i", body, pos)
        pos += 4
        for _ in range(n_brokers):  # node_id, host, port, rack (nullable)
            pos += 4
            (host_len,) = struct.unpack_from(">h", body, pos)
            pos += 2 + host_len + 4
            (rack_len,) = struct.unpack_from(">h", body, pos)
            pos += 2 + max(rack_len, 0)
        (cluster_len,) = struct.unpack_from(">h", body, pos)
        pos += 2 + max(cluster_len, 0) + 4  # cluster_id, controller_id
        (n_topics,) = struct.unpack_from(">i", body, pos)
        if n_topics >= 1:
            (error,) = struct.unpack_from(">h", body, pos + 4)
            if error == _TOPIC_AUTHORIZATION_FAILED:
                denied_topics.append(topic)
    for group in groups:
        correlation += 1
        body = _call(sock, _FIND_COORDINATOR, 1, correlation, _string(group) + b"\x00")
        (error,) = struct.unpack_from(">h", body, 4)  # after throttle_time_ms
        if error == _GROUP_AUTHORIZATION_FAILED:
            denied_groups.append(group)
    if denied_topics or denied_groups:
        what = "; ".join(part for part in (
            f"topics {', '.join(denied_topics)}" if denied_topics else "",
            f"consumer groups {', '.join(denied_groups)}" if denied_groups else "",
        ) if part)
        raise NotAuthorized(
            f"Kafka at {conn.describe()} authenticated {who} but its ACLs deny it {what}; grant "
            "the principal Describe, Read and Write on the fmstream topics and Read on its "
            "consumer group (README, Security), or use another FMSTREAM_KAFKA_USERNAME"
        )


def check_kafka(
    conn: KafkaConfig,
    *,
    timeout_s: float = 10.0,
    topics: Sequence[str] = (),
    groups: Sequence[str] = (),
) -> None:
    """Connect to the first bootstrap broker that answers, finish TLS and SASL, or raise.

    With ``topics`` / ``groups``, also check that the broker's ACLs let the principal see them
    (Describe): a principal without rights is refused at once, not after retries.

    Raises:
        TlsFailed: the handshake failed (unknown CA, host name not in the certificate).
        AuthenticationFailed: the broker refused the credentials or the mechanism.
        NotAuthorized: authenticated, but denied one of ``topics`` or ``groups``.
        Unreachable: no bootstrap broker accepted a connection within ``timeout_s``.
    """
    problems = []
    for host, port in _hosts(conn.bootstrap):
        try:
            raw = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as exc:
            problems.append(f"{host}:{port}: {exc.strerror or type(exc).__name__}")
            continue
        sock: socket.socket = raw
        try:
            sock.settimeout(timeout_s)
            if conn.uses_tls:
                from kafka.net.transport import KafkaSSLTransport

                # The very context the clients build, so the probe trusts exactly what they do.
                context = KafkaSSLTransport._build_ssl_context(
                    conn.client_config() | {"ssl_context": None, "ssl_crlfile": None}
                )
                try:
                    sock = context.wrap_socket(raw, server_hostname=host)
                except (ssl.SSLError, ssl.CertificateError) as exc:
                    raise TlsFailed(
                        f"TLS to Kafka at {conn.describe()} failed ({exc}); check "
                        "FMSTREAM_KAFKA_SSL_CAFILE (the CA of the broker certificate), that "
                        "the certificate names the bootstrap host, and that the listener "
                        "speaks TLS"
                    ) from None
            if conn.security_protocol.startswith("SASL_"):
                _sasl_probe(sock, conn, host)
            try:  # one ordinary request (metadata of no topic): the session works
                _call(sock, _METADATA, 1, 99, struct.pack(">i", 0))
            except ConnectionError:
                raise ProtocolMismatch(
                    f"Kafka at {conn.describe()} closed the connection at the first request: "
                    "the listener expects another security protocol; check "
                    "FMSTREAM_KAFKA_SECURITY_PROTOCOL (and the port of FMSTREAM_KAFKA_BOOTSTRAP)"
                ) from None
            if topics or groups:
                _authorization_probe(sock, conn, topics, groups)
            return
        except (OSError, struct.error) as exc:
            problems.append(f"{host}:{port}: {type(exc).__name__}")
        finally:
            sock.close()
    raise Unreachable(
        f"no Kafka broker answered at {conn.describe()} within {timeout_s:.0f} s "
        f"({'; '.join(problems)}); check FMSTREAM_KAFKA_BOOTSTRAP and "
        "FMSTREAM_KAFKA_SECURITY_PROTOCOL"
    )


def check_redis(conn: RedisConfig, *, timeout_s: float = 5.0) -> None:
    """PING Redis once with the configured credentials, or raise (see :func:`check_kafka`)."""
    import redis

    client = redis_client(conn, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        explained = explain_redis_error(conn, exc)
        if explained is not None:
            raise explained from None
        raise Unreachable(
            f"Redis at {conn.display_url()} did not answer ({type(exc).__name__}); check "
            "FMSTREAM_REDIS_URL and FMSTREAM_REDIS_SSL", service="redis",
        ) from None
    finally:
        client.close()
    _check_password_is_checked(conn, timeout_s)


def _check_password_is_checked(conn: RedisConfig, timeout_s: float) -> None:
    """Raise :class:`PasswordNotChecked` when a password is configured for the ``default``
    user and the server lets a connection without any credentials in.

    redis-py 8 authenticates with ``HELLO 3 AUTH default <password>``, which a server without
    ``requirepass`` accepts whatever the password (the old ``AUTH <password>`` was refused with
    "called without any password configured"): without this probe such a misconfiguration
    passed silently, and the operator believed Redis protected. A named ACL user is not probed
    (its password is checked unless that user was made ``nopass``, which only an admin can
    see).
    """
    import redis

    setting = conn.password_setting()
    if setting is None or conn.user():
        return
    parts = urlsplit(conn.client_url())
    bare_url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    kwargs = {k: v for k, v in conn.client_kwargs().items() if k not in ("username", "password")}
    bare = redis.Redis.from_url(bare_url, socket_timeout=timeout_s,
                                socket_connect_timeout=timeout_s, **kwargs)
    try:
        opened = bool(bare.ping())
    except (redis.RedisError, OSError):
        opened = False  # refused without credentials (NOAUTH): the password is what lets us in
    finally:
        bare.close()
    if opened:
        raise PasswordNotChecked(
            f"Redis at {conn.display_url()} checks no password (it lets in a connection "
            f"without one), but a password is set ({setting}): it protects nothing. Set it in "
            "Redis (requirepass, or an ACL user with FMSTREAM_REDIS_USERNAME), or drop "
            f"{setting} for a Redis that is meant to be open",
            service="redis",
        )


__all__ = [
    "AuthenticationFailed", "ConnectError", "PasswordNotChecked", "ProtocolMismatch",
    "KafkaConfig", "RedisConfig",
    "SaslMechanism", "SecurityProtocol", "TlsFailed", "Unreachable", "check_kafka",
    "check_redis", "explain_kafka_error", "explain_redis_error", "kafka_admin",
    "kafka_consumer", "kafka_producer", "redact_url", "redis_client",
]
