"""Local Kafka (single-node KRaft) and Redis on loopback, without Docker.

``fmstream up`` and the test session both call :func:`up`. A service whose port already answers
is reused; otherwise it is started as a detached process in its own session (so it outlives the
CLI that started it), with its data, logs and a pid file under ``settings.run_dir``::

    run_dir/kafka/  server.properties  log4j2.xml  cluster.id  kafka.pid  kafka.out
                    logs/server.log (the broker's log)  data/ (its log.dirs)
    run_dir/redis/  redis.conf  redis.pid  redis.log  (appendonlydir/ with aof)

:func:`down` stops only what a pid file in ``run_dir`` says was started there. The stop/start
helpers keep the data folders, so a restarted broker keeps its data (Redis too with
``redis_persistence=aof``; by default it has none and starts empty: the trainer republishes).
Every wait is bounded and fails with a :class:`ServiceError` naming the log file to read.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit, urlunsplit
from xml.sax.saxutils import escape

import kafka.errors as kafka_errors
import redis
from kafka.admin import KafkaAdminClient

from fmstream.errors import FmstreamError
from fmstream.settings import Settings
from stream import connect
from stream.config import KafkaConfig, secret_value
from stream.connect import RedisConfig

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 90.0
"""Default bound on waiting for a service (a cold JVM on two cores takes ~5-10 s)."""
STOP_TIMEOUT_S = 30.0
"""Default grace between SIGTERM and SIGKILL."""
LOOPBACK = "127.0.0.1"
EPHEMERAL_PORTS = range(32768, 61000)
"""Linux's default ``ip_local_port_range``: client sockets take these, so a fixed server port in
this range can be held by a stranger's connection (or its TIME-WAIT) at any time."""

State = Literal["started", "reused"]

# What /proc/<pid>/cmdline of our processes contains (guards against a recycled pid).
_KAFKA_MARKER = "kafka.Kafka"
_REDIS_MARKER = "redis-server"  # redis rewrites its title to "redis-server 127.0.0.1:PORT"

# Processes started by this Python process, kept so that they can be reaped (an exited child
# stays a zombie that `kill(pid, 0)` still finds) and so Popen never warns they are running.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


# --- errors ---------------------------------------------------------------------------------


class ServiceError(FmstreamError, RuntimeError):
    """Base of every error raised while starting, waiting for or stopping local services."""


class MissingDependencyError(ServiceError):
    """A binary (java, mvn, redis-server) or the Kafka jars are not installed."""


class PortInUseError(ServiceError):
    """The port answers, but not as the expected service."""


class ServiceStartError(ServiceError):
    """The process exited while starting."""


class ServiceTimeoutError(ServiceError):
    """The service did not become ready within the bound."""


class KafkaUnavailableError(ServiceError):
    """No Kafka broker answers at the configured bootstrap address."""


class TopicError(ServiceError):
    """A topic could not be created, or exists with another shape than the settings ask for."""


# --- secured local services (tests) ---------------------------------------------------------


@dataclass(frozen=True)
class LocalSecurity:
    """Secured listeners for the local services (the test session's; `fmstream up` uses none).

    Args:
        ca_file: PEM of the CA that signed the server certificate (clients trust it).
        cert_file, key_file: the server's certificate and its PKCS#8 key, encrypted with
            ``key_password`` (Redis's TLS port uses these two).
        kafka_keystore: the broker's PEM keystore (key + certificate chain in one file).
        key_password: password of the server key.
        kafka_sasl_port: port of the broker's SASL_SSL listener (advertised as ``host``).
        host: the name clients connect to (the certificate must name it).
        scram_mechanism: ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``.
        kafka_users: SCRAM users created when the storage is formatted (user -> password).
        redis_users: Redis ACL users (user -> password); the default user is switched off.
        redis_acl: the rules every ACL user gets (keys and commands).
        redis_tls: Redis listens with TLS only (on ``settings.redis_port``).
        kafka_super_users: with any, the broker authorizes (KRaft's StandardAuthorizer): these
            SCRAM users (and the local plaintext/controller listeners' ANONYMOUS) may do
            everything, any other principal only what an ACL grants it.
        kafka_auto_create_topics: the broker creates a topic a client asks about
            (``auto.create.topics.enable``); False: a topic nobody created stays missing.
    """

    ca_file: Path
    cert_file: Path
    key_file: Path
    kafka_keystore: Path
    key_password: str = field(repr=False)
    kafka_sasl_port: int
    host: str = "localhost"
    scram_mechanism: str = "SCRAM-SHA-512"
    kafka_users: dict[str, str] = field(default_factory=dict, repr=False)
    redis_users: dict[str, str] = field(default_factory=dict, repr=False)
    redis_tls: bool = True
    redis_acl: str = "~* &* +@all"
    kafka_super_users: tuple[str, ...] = ()
    kafka_auto_create_topics: bool = True


# --- paths ----------------------------------------------------------------------------------


def kafka_dir(settings: Settings) -> Path:
    """Folder of the local broker's config, data, logs and pid file."""
    return Path(settings.run_dir) / "kafka"


def redis_dir(settings: Settings) -> Path:
    """Folder of the local Redis's config, append-only file, log and pid file."""
    return Path(settings.run_dir) / "redis"


def kafka_log_file(settings: Settings) -> Path:
    """The broker's log (log4j2, INFO)."""
    return kafka_dir(settings) / "logs" / "server.log"


def redis_log_file(settings: Settings) -> Path:
    """The Redis server's log."""
    return redis_dir(settings) / "redis.log"


def _kafka_pid_file(settings: Settings) -> Path:
    return kafka_dir(settings) / "kafka.pid"


def _redis_pid_file(settings: Settings) -> Path:
    return redis_dir(settings) / "redis.pid"


def _kafka_out_file(settings: Settings) -> Path:
    # The JVM's own stdout/stderr: crashes before log4j is up (bad heap size, missing class).
    return kafka_dir(settings) / "kafka.out"


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


# --- small process and socket helpers -------------------------------------------------------


def port_open(port: int, host: str = LOOPBACK, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def port_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a server could listen on ``host:port`` now: bind and listen, with SO_REUSEADDR
    as servers set it (a TIME-WAIT left by an old connection does not count, a listener or a
    connection bound there does). A connect probe misses a port held by a client socket."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1)
        except OSError:
            return False
    return True


def os_picked_port(host: str = LOOPBACK) -> int:
    """A port the OS says is free now (bind to port 0)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# Port claims of this process (fd of each lock file), held until it exits.
_CLAIMS: dict[int, int] = {}


def _claim(port: int) -> bool:
    """Take this machine's advisory lock on ``port`` for the life of this process.

    Two test or bench sessions that both find a preferred port free would otherwise both start a
    server on it (a JVM binds its port seconds after the check); the lock makes the second one
    pick another port instead.
    """
    if port in _CLAIMS:
        return True
    import fcntl
    import tempfile

    path = Path(tempfile.gettempdir()) / f"fmstream-port-{port}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _CLAIMS[port] = fd
    return True


def free_ports(preferred: dict[str, int], host: str = LOOPBACK) -> dict[str, int]:
    """``preferred`` (name -> port) where each one is free by :func:`port_free` and not claimed
    by another fmstream session on this machine (it is then claimed for this process's life); a
    taken one is replaced by a port the OS picks. Preferred ports belong below 32768 (outside
    Linux's ephemeral range, where client sockets could hold them)."""
    out: dict[str, int] = {}
    for name, port in preferred.items():
        if port in out.values() or not port_free(port, host) or not _claim(port):
            picked = os_picked_port(host)
            while picked in out.values() or picked in preferred.values():
                picked = os_picked_port(host)
            logger.info("port %s (%s) is taken; using %s", port, name, picked)
            port = picked
        out[name] = port
    return out


def _pid_alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # A zombie has exited; only its parent has not reaped it yet.
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _pid_matches(pid: int, marker: str) -> bool:
    """Whether ``pid`` still runs the program we started (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return not Path("/proc").is_dir()  # no procfs (macOS): trust the pid file
    return marker in cmdline


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _owned_pid(pid_file: Path, marker: str) -> int | None:
    """The pid recorded in ``pid_file`` if that process is alive and ours; clears stale files."""
    pid = _read_pid(pid_file)
    if pid is None:
        return None
    if _pid_alive(pid) and _pid_matches(pid, marker):
        return pid
    logger.info("removing stale pid file %s (pid %s is gone)", pid_file, pid)
    pid_file.unlink(missing_ok=True)
    return None


def _wait_dead(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            _CHILDREN.pop(pid, None)
            return True
        time.sleep(0.05)
    return False


def _stop_pid(name: str, pid_file: Path, marker: str, timeout_s: float, kill: bool) -> bool:
    pid = _owned_pid(pid_file, marker)
    if pid is None:
        return False
    sig = signal.SIGKILL if kill else signal.SIGTERM
    logger.info("stopping %s (pid %s) with %s", name, pid, sig.name)
    os.kill(pid, sig)
    if not _wait_dead(pid, timeout_s):
        logger.warning(
            "%s (pid %s) ignored SIGTERM for %.0f s; sending SIGKILL", name, pid, timeout_s
        )
        os.kill(pid, signal.SIGKILL)
        if not _wait_dead(pid, 10.0):
            raise ServiceError(f"{name} (pid {pid}) survived SIGKILL; stop it by hand")
    pid_file.unlink(missing_ok=True)
    return True


def _spawn(args: list[str], out_file: Path, pid_file: Path, cwd: Path) -> int:
    """Start ``args`` detached (own session, no stdin), output appended to ``out_file``."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with out_file.open("ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - fixed argument list, no shell
            args,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    _CHILDREN[proc.pid] = proc
    pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _require_binary(name: str, hint: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise MissingDependencyError(f"`{name}` is not on PATH; {hint}")
    return found


# --- Kafka ----------------------------------------------------------------------------------


def resolve_kafka_libs(settings: Settings) -> Path:
    """The folder of the Kafka jars: ``settings.kafka_libs``, relative to cwd or to the repo."""
    libs = Path(settings.kafka_libs)
    if libs.is_absolute():
        return libs
    in_cwd, in_repo = Path.cwd() / libs, _repo_root() / libs
    for candidate in (in_cwd, in_repo):
        if any(candidate.glob("*.jar")):
            return candidate
    return in_repo if (_repo_root() / "infra" / "kafka" / "pom.xml").is_file() else in_cwd


def ensure_kafka_jars(settings: Settings) -> Path:
    """Resolve the Kafka broker jars from Maven Central unless they are already there.

    Returns:
        The folder of the jars.

    Raises:
        MissingDependencyError: no ``mvn``, no pom to resolve from, or resolution failed.
    """
    libs = resolve_kafka_libs(settings)
    if any(libs.glob("*.jar")):
        return libs
    pom = _repo_root() / "infra" / "kafka" / "pom.xml"
    if not pom.is_file():
        raise MissingDependencyError(
            f"no Kafka jars in {libs} and no {pom} to resolve them from; run `make kafka` in the "
            "fmstream repository and point FMSTREAM_KAFKA_LIBS at its infra/kafka/target/libs"
        )
    mvn = _require_binary("mvn", "install Maven (`apt-get install maven`) or run `make kafka`")
    logger.info("resolving Kafka jars into %s (mvn, one time)", libs)
    cmd = [
        mvn,
        "-q",
        "-B",
        "-Dstyle.color=never",
        "-f",
        str(pom),
        f"-Dfmstream.libs={libs.resolve()}",
    ]
    done = subprocess.run(  # noqa: S603
        [*cmd, "dependency:copy-dependencies"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0 or not any(libs.glob("*.jar")):
        raise MissingDependencyError(
            f"`mvn dependency:copy-dependencies` failed (exit {done.returncode}); it needs "
            f"Maven Central. Output:\n{(done.stdout + done.stderr)[-2000:]}"
        )
    return libs


def _kafka_properties(
    settings: Settings, data_dir: Path, security: LocalSecurity | None = None
) -> str:
    port, cport = settings.kafka_port, settings.kafka_controller_port
    listeners = f"PLAINTEXT://{LOOPBACK}:{port},CONTROLLER://{LOOPBACK}:{cport}"
    advertised = f"PLAINTEXT://{LOOPBACK}:{port}"
    protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    secured: dict[str, str] = {}
    if security is not None:
        sport, mech = security.kafka_sasl_port, security.scram_mechanism
        listeners += f",SASL_SSL://{LOOPBACK}:{sport}"
        advertised += f",SASL_SSL://{security.host}:{sport}"
        protocols += ",SASL_SSL:SASL_SSL"
        secured = {
            "sasl.enabled.mechanisms": mech,
            f"listener.name.sasl_ssl.{mech.lower()}.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(security.kafka_keystore),
            "ssl.key.password": security.key_password,
            "ssl.client.auth": "none",
        }
        if not security.kafka_auto_create_topics:
            secured["auto.create.topics.enable"] = "false"
        if security.kafka_super_users:
            secured["authorizer.class.name"] = (
                "org.apache.kafka.metadata.authorizer.StandardAuthorizer")
            secured["super.users"] = ";".join(
                f"User:{u}" for u in ("ANONYMOUS", *security.kafka_super_users))
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{LOOPBACK}:{cport}",
        "listeners": listeners,
        "advertised.listeners": advertised,
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": protocols,
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data_dir),
        "num.partitions": "1",
        "offsets.topic.replication.factor": "1",
        # One broker: 50 coordinator partitions only slow down the first group join.
        "offsets.topic.num.partitions": "5",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "5",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        # After a crash (SIGKILL) the restarted broker cannot register until the old incarnation's
        # session expires (default 9 s); a short session makes crash-restart tests quick.
        "broker.heartbeat.interval.ms": "1000",
        "broker.session.timeout.ms": "3000",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
        **secured,
    }
    header = "# written by fmstream.services at every start; edit Settings, not this file\n"
    return header + "".join(f"{key}={value}\n" for key, value in props.items())


def _log4j2_xml(log_file: Path) -> str:
    name = escape(str(log_file), {'"': "&quot;"})
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- written by fmstream.services: the local broker logs INFO to one rolling file -->
<Configuration status="WARN">
  <Appenders>
    <RollingFile name="server" fileName="{name}" filePattern="{name}.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="20 MB"/></Policies>
      <DefaultRolloverStrategy max="3"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Logger name="kafka.authorizer.logger" level="WARN"/>
    <Root level="INFO"><AppenderRef ref="server"/></Root>
  </Loggers>
</Configuration>
"""


def _new_cluster_id() -> str:
    # Kafka's Uuid.randomUuid(): URL-safe base64 of 16 random bytes, never starting with "-".
    while True:
        value = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not value.startswith("-"):
            return value


def _java_args(settings: Settings, libs: Path) -> list[str]:
    java = _require_binary("java", "install Java 17+ (`apt-get install default-jre-headless`)")
    home = kafka_dir(settings)
    return [
        java,
        f"-Xmx{settings.kafka_heap}",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={home / 'log4j2.xml'}",
        f"-Dkafka.logs.dir={kafka_log_file(settings).parent}",
        "-cp",
        f"{libs.resolve()}/*",
    ]


def _prepare_kafka(settings: Settings, libs: Path, security: LocalSecurity | None = None) -> Path:
    """Write the broker's config and format its storage the first time; returns the config.

    With ``security``, the SCRAM users are created at format time (KIP-900, ``--add-scram``).
    """
    home = kafka_dir(settings).resolve()
    data_dir = home / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    kafka_log_file(settings).parent.mkdir(parents=True, exist_ok=True)
    props = home / "server.properties"
    props.write_text(_kafka_properties(settings, data_dir, security))
    props.chmod(0o600)  # it may hold the key password
    (home / "log4j2.xml").write_text(_log4j2_xml(kafka_log_file(settings).resolve()))
    if (data_dir / "meta.properties").is_file():
        return props
    id_file = home / "cluster.id"
    if not id_file.is_file():
        id_file.write_text(_new_cluster_id() + "\n")
    cluster_id = id_file.read_text().strip()
    logger.info("formatting Kafka storage in %s (cluster id %s)", data_dir, cluster_id)
    fmt = [*_java_args(settings, libs), "kafka.tools.StorageTool", "format"]
    scram: list[str] = []
    if security is not None:
        for user, password in security.kafka_users.items():
            scram += ["--add-scram",
                      f"{security.scram_mechanism}=[name={user},password={password}]"]
    done = subprocess.run(  # noqa: S603
        [*fmt, "-t", cluster_id, "-c", str(props), *scram],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-2000:]
        for password in (security.kafka_users.values() if security else ()):
            output = output.replace(password, "***")
        raise ServiceStartError(
            f"formatting Kafka storage in {data_dir} failed (exit {done.returncode}): {output}"
        )
    return props


def _kafka_ready(kafka: KafkaConfig, timeout_s: float) -> bool:
    """One readiness probe: the broker answers and at least one broker is registered.

    Raises:
        ConnectError: wrong credentials or TLS (waiting longer cannot help).
    """
    budget_ms = max(500, int(timeout_s * 1000))
    admin = None
    try:
        admin = connect.kafka_admin(
            kafka,
            client_id="fmstream-services",
            bootstrap_timeout_ms=budget_ms,
            request_timeout_ms=max(budget_ms, 2000),
        )
        brokers = admin.describe_cluster().get("brokers", [])
        return any(not b.get("is_fenced", False) for b in brokers)
    except (kafka_errors.KafkaError, OSError) as exc:
        explained = connect.explain_kafka_error(kafka, exc)
        if explained is not None:
            raise explained from None
        return False
    finally:
        if admin is not None:
            admin.close()


def _hosts_ports(bootstrap: str) -> list[tuple[str, int]]:
    out = []
    for entry in bootstrap.split(","):
        host, _, port = entry.strip().rpartition(":")
        out.append((host or LOOPBACK, int(port or 9092)))
    return out


def wait_kafka(
    kafka: KafkaConfig,
    *,
    timeout_s: float = START_TIMEOUT_S,
    pid: int | None = None,
    log_file: Path | None = None,
) -> None:
    """Block until a Kafka broker at ``kafka.bootstrap`` answers metadata requests.

    Args:
        kafka: the address and credentials to probe with.
        timeout_s: bound on the wait.
        pid: the broker's process, if we started it: its exit ends the wait at once.
        log_file: the log to name in the error.

    Raises:
        ServiceStartError: the process exited.
        ServiceTimeoutError: not ready within ``timeout_s``.
        ConnectError: the broker refused the credentials or the TLS handshake failed.
    """
    bootstrap = kafka.bootstrap
    read = f"; read {log_file}" if log_file else ""
    deadline = time.monotonic() + timeout_s
    while True:
        if pid is not None and not _pid_alive(pid):
            raise ServiceStartError(
                f"Kafka (pid {pid}) exited while starting{read}. Last lines:\n"
                + (_tail(log_file) if log_file else "")
            )
        left = deadline - time.monotonic()
        # Probe the socket first: kafka-python logs every refused connection as an error.
        if any(port_open(port, host) for host, port in _hosts_ports(bootstrap)):
            if _kafka_ready(kafka, min(max(left, 0.5), 5.0)):
                return
        if time.monotonic() >= deadline:
            raise ServiceTimeoutError(
                f"Kafka at {bootstrap} not ready after {timeout_s:.0f} s{read}"
            )
        time.sleep(0.2)


def _start_owned(
    name: str,
    pid_file: Path,
    marker: str,
    ports: list[tuple[int, str]],
    settings: Settings,
    wait: Callable[[int], None],
    launch: Callable[[], tuple[int, Path]],
    where: str,
    log_file: Path,
) -> int:
    """The start of either service: the process started from this ``run_dir`` if there is one
    (once ``wait(pid)`` says it is ready); else, with every one of ``ports`` free (each with the
    setting that moves it), ``launch()`` (its pid and output file) and ``wait(pid)``. A process
    that exits while starting loses its pid file; the error shows the end of its output."""
    pid = _owned_pid(pid_file, marker)
    if pid is not None:
        wait(pid)
        return pid
    for port, what in ports:
        if not port_free(port):
            raise PortInUseError(
                f"port {port} is already taken by a process not started from {settings.run_dir}; "
                f"stop it or choose another port with {what}"
            )
    pid, out_file = launch()
    logger.info("started %s (pid %s) on %s; log %s", name, pid, where, log_file)
    try:
        wait(pid)
    except ServiceStartError as exc:
        pid_file.unlink(missing_ok=True)
        raise ServiceStartError(f"{exc}\n{out_file}:\n{_tail(out_file)}") from None
    return pid


def start_kafka(
    settings: Settings,
    *,
    timeout_s: float = START_TIMEOUT_S,
    security: LocalSecurity | None = None,
) -> int:
    """Start the local broker (or return the pid of the one already started here).

    Data stays in ``run_dir/kafka/data``: a restart keeps every topic and message. With
    ``security``, the broker also listens with SASL_SSL (SCRAM) on ``security.kafka_sasl_port``.

    Returns:
        The broker's pid.

    Raises:
        PortInUseError: another process holds the broker or controller port.
        MissingDependencyError, ServiceStartError, ServiceTimeoutError.
    """
    pid_file = _kafka_pid_file(settings)
    ports = [
        (settings.kafka_port, "FMSTREAM_KAFKA_PORT"),
        (settings.kafka_controller_port, "FMSTREAM_KAFKA_CONTROLLER_PORT"),
    ]
    if security is not None:
        ports.append((security.kafka_sasl_port, "LocalSecurity.kafka_sasl_port"))

    def wait(pid: int) -> None:
        wait_kafka(_local_kafka(settings), timeout_s=timeout_s, pid=pid,
                   log_file=kafka_log_file(settings))

    def launch() -> tuple[int, Path]:
        libs = ensure_kafka_jars(settings)
        props = _prepare_kafka(settings, libs, security)
        args = [*_java_args(settings, libs), "kafka.Kafka", str(props)]
        out_file = _kafka_out_file(settings)
        return _spawn(args, out_file, pid_file, cwd=kafka_dir(settings)), out_file

    return _start_owned("Kafka", pid_file, _KAFKA_MARKER, ports, settings, wait, launch,
                        _local_bootstrap(settings), kafka_log_file(settings))


def stop_kafka(
    settings: Settings, *, timeout_s: float = STOP_TIMEOUT_S, kill: bool = False
) -> bool:
    """Stop the broker started from this ``run_dir`` (SIGTERM, SIGKILL after ``timeout_s``).

    Args:
        kill: SIGKILL at once, as a crash would (the next start recovers the logs).

    Returns:
        Whether a broker was stopped.
    """
    return _stop_pid("Kafka", _kafka_pid_file(settings), _KAFKA_MARKER, timeout_s, kill)


def restart_kafka(
    settings: Settings, *, kill: bool = False, security: LocalSecurity | None = None
) -> int:
    """Stop and start the local broker, keeping its data; returns the new pid."""
    stop_kafka(settings, kill=kill)
    return start_kafka(settings, security=security)


def _local_bootstrap(settings: Settings) -> str:
    return f"{LOOPBACK}:{settings.kafka_port}"


def _local_kafka(settings: Settings) -> KafkaConfig:
    """The local broker's plaintext loopback listener (readiness probes, inter-broker)."""
    return KafkaConfig(_local_bootstrap(settings))


# --- Redis ----------------------------------------------------------------------------------


def redis_conf(settings: Settings, security: LocalSecurity | None = None) -> str:
    """The redis.conf text :func:`start_redis` writes for ``settings`` (port, TLS and ACL users
    when ``security`` is given, else the settings' Redis password as ``requirepass`` or, with
    ``FMSTREAM_REDIS_USERNAME``, as that ACL user's; persistence)."""
    home = redis_dir(settings).resolve()

    def quoted(path: Path | str) -> str:
        return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'

    secured: list[str] = []
    port = [f"port {settings.redis_port}"]
    password = _redis_password(settings.redis_config())
    if security is None and password is not None:
        # the settings' password is the server's too: a Redis that checks none is refused by
        # every command (stream.connect.check_redis), and it would protect nothing
        user = settings.redis_config().user()
        secured = [f"requirepass {quoted(password)}"] if user is None else [
            "user default off", f"user {user} on {quoted('>' + password)} ~* &* +@all"]
    if security is not None:
        # Only the ACL users may connect: the default user is switched off.
        secured = ["user default off"] + [
            f"user {user} on >{password} {security.redis_acl}"
            for user, password in security.redis_users.items()
        ]
        if security.redis_tls:
            port = [
                "port 0",
                f"tls-port {settings.redis_port}",
                f"tls-cert-file {quoted(security.cert_file)}",
                f"tls-key-file {quoted(security.key_file)}",
                f"tls-key-file-pass {quoted(security.key_password)}",
                f"tls-ca-cert-file {quoted(security.ca_file)}",
                "tls-auth-clients no",
            ]
    return "\n".join(
        [
            "# written by fmstream.services at every start; edit Settings, not this file",
            f"bind {LOOPBACK}",
            *port,
            *secured,
            "protected-mode yes",
            "daemonize no",
            f"dir {quoted(home)}",
            f"logfile {quoted(home / 'redis.log')}",
            "loglevel notice",
            *_redis_persistence_conf(settings),
            'save ""',  # never RDB snapshots (each one forks Redis like an AOF rewrite)
            "",
        ]
    )


def _redis_password(conn: RedisConfig) -> str | None:
    """The Redis password of ``conn`` in clear (the field's, else the URL's), or None."""
    if conn.password is not None:
        return secret_value(conn.password)
    try:
        in_url = urlsplit(conn.url).password
    except ValueError:
        return None
    return None if in_url is None else unquote(in_url)


def _redis_persistence_conf(settings: Settings) -> list[str]:
    """The persistence lines of the local Redis (README 'Redis persistence').

    ``none``: everything fmstream keeps in Redis is rebuilt by the trainer (the publisher
    republishes from the model when its version is gone; the lease and worker registrations are
    re-taken and re-written within seconds), so the store is a cache: no disk writes, no forks.
    ``aof``: the append-only file; a clean restart replays it. Redis rewrites it (a fork plus a
    child writing the whole data set, seconds of a core) each time it doubled past
    ``redis_aof_rewrite_min_mb`` (bench/RESULTS.md 'Redis AOF bytes by kind').
    """
    if settings.redis_persistence == "none":
        return ["appendonly no"]
    return [
        "appendonly yes",
        "appendfsync everysec",
        "auto-aof-rewrite-percentage 100",
        f"auto-aof-rewrite-min-size {settings.redis_aof_rewrite_min_mb}mb",
    ]


def _local_redis(settings: Settings) -> RedisConfig:
    """The local Redis with the credentials and TLS of ``settings`` (none by default), those in
    the URL's scheme and user part included."""
    conn = settings.redis_config()
    parts = urlsplit(conn.url)
    scheme = parts.scheme if parts.scheme in ("redis", "rediss") else "redis"
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (f"{userinfo}@" if userinfo else "") + f"{LOOPBACK}:{settings.redis_port}"
    return replace(conn, url=urlunsplit((scheme, netloc, "/0", "", "")))


def wait_redis(
    redis_conn: RedisConfig,
    *,
    timeout_s: float = START_TIMEOUT_S,
    pid: int | None = None,
    log_file: Path | None = None,
) -> None:
    """Block until the Redis of ``redis_conn`` answers PING (after loading its append-only file).

    Raises:
        ServiceStartError: the process exited.
        ServiceTimeoutError: not ready within ``timeout_s``.
        ConnectError: Redis refused the credentials or the TLS handshake failed.
    """
    read = f"; read {log_file}" if log_file else ""
    url = redis_conn.display_url()
    deadline = time.monotonic() + timeout_s
    client = connect.redis_client(redis_conn, socket_connect_timeout=1.0, socket_timeout=2.0)
    try:
        while True:
            if pid is not None and not _pid_alive(pid):
                raise ServiceStartError(
                    f"redis-server (pid {pid}) exited while starting{read}. Last lines:\n"
                    + (_tail(log_file) if log_file else "")
                )
            try:
                if client.ping():
                    return
            except redis.RedisError as exc:
                explained = connect.explain_redis_error(redis_conn, exc)
                if explained is not None and not isinstance(explained, connect.TlsFailed):
                    raise explained from None
                # refused, still loading the append-only file, or a TLS port not up yet
            if time.monotonic() >= deadline:
                raise ServiceTimeoutError(f"Redis at {url} not ready after {timeout_s:.0f} s{read}")
            time.sleep(0.1)
    finally:
        client.close()


def start_redis(
    settings: Settings,
    *,
    timeout_s: float = START_TIMEOUT_S,
    security: LocalSecurity | None = None,
) -> int:
    """Start the local ``redis-server`` (or return the pid of the one already started here).

    Persistence as ``settings.redis_persistence``: ``none`` (default) starts empty after every
    restart (the trainer republishes); ``aof`` keeps every key in ``run_dir/redis``.

    Returns:
        The server's pid.

    Raises:
        PortInUseError, MissingDependencyError, ServiceStartError, ServiceTimeoutError.
    """
    pid_file = _redis_pid_file(settings)

    def wait(pid: int) -> None:
        wait_redis(_local_redis(settings), timeout_s=timeout_s, pid=pid,
                   log_file=redis_log_file(settings))

    def launch() -> tuple[int, Path]:
        server = _require_binary(
            "redis-server",
            "install Debian's redis-server (`make redis` or `apt-get install redis-server`)",
        )
        home = redis_dir(settings).resolve()
        home.mkdir(parents=True, exist_ok=True)
        conf = home / "redis.conf"
        conf.write_text(redis_conf(settings, security))
        conf.chmod(0o600)  # it may hold ACL passwords
        out_file = home / "redis.out"
        return _spawn([server, str(conf)], out_file, pid_file, cwd=home), out_file

    return _start_owned("Redis", pid_file, _REDIS_MARKER,
                        [(settings.redis_port, "FMSTREAM_REDIS_PORT")], settings, wait, launch,
                        f"port {settings.redis_port}", redis_log_file(settings))


def stop_redis(
    settings: Settings, *, timeout_s: float = STOP_TIMEOUT_S, kill: bool = False
) -> bool:
    """Stop the Redis started from this ``run_dir`` (SIGTERM flushes the append-only file when
    ``redis_persistence`` is ``aof``; with ``none`` its keys are gone).

    Args:
        kill: SIGKILL at once, as a crash would (with ``aof`` up to a second of writes is lost).

    Returns:
        Whether a server was stopped.
    """
    return _stop_pid("Redis", _redis_pid_file(settings), _REDIS_MARKER, timeout_s, kill)


# --- topics ---------------------------------------------------------------------------------


@contextmanager
def kafka_admin(kafka: KafkaConfig, *, timeout_s: float = 10.0) -> Iterator[KafkaAdminClient]:
    """A connected admin client, closed on exit.

    Raises:
        KafkaUnavailableError: no broker answered within ``timeout_s``.
        ConnectError: the broker refused the credentials or the TLS handshake failed.
    """
    try:
        admin = connect.kafka_admin(
            kafka,
            client_id="fmstream-admin",
            bootstrap_timeout_ms=int(timeout_s * 1000),
            request_timeout_ms=max(int(timeout_s * 1000), 5000),
        )
    except (kafka_errors.KafkaError, OSError) as exc:
        explained = connect.explain_kafka_error(kafka, exc)
        if explained is not None:
            raise explained from None
        raise KafkaUnavailableError(
            f"no Kafka broker answers at {kafka.describe()} within {timeout_s:.0f} s "
            f"({type(exc).__name__}); start the local one with `fmstream up` (or `make up`), "
            "or set FMSTREAM_KAFKA_BOOTSTRAP"
        ) from None
    try:
        yield admin
    finally:
        admin.close()


def _topic_spec(settings: Settings, name: str, partitions: int) -> dict[str, object]:
    configs = {"cleanup.policy": "compact"} if name in settings.compacted_topics else {}
    # replication_factor -1: the broker's default (1 on a single node, more on a cluster).
    return {
        "num_partitions": partitions,
        "replication_factor": -1,
        "configs": configs,
    }


def ensure_topics(
    settings: Settings, *, timeout_s: float = 30.0, reply_topics: Sequence[str] = ()
) -> list[str]:
    """Create every topic of ``settings.topic_partitions`` that is missing; idempotent.

    Profile topics (``settings.compacted_topics``) get ``cleanup.policy=compact``. Returns once
    metadata shows every topic with a leader for every partition. ``reply_topics``: topics for
    requests' ``reply_to`` (workers never create one), each with the response topic's partition
    count; a name the workers would refuse (``serving.answering.check_reply_to``) raises
    :class:`TopicError` saying why, before anything is created.

    Returns:
        The names of the topics this call created.

    Raises:
        KafkaUnavailableError: no broker answers.
        TopicError: creation failed, timed out, or a topic exists with another partition count.
    """
    wanted = dict(settings.topic_partitions)
    if reply_topics:
        from serving.answering import check_reply_to
        from serving.errors import InvalidRequest

        for name in reply_topics:
            try:
                check_reply_to(name, settings.serving_config())
            except InvalidRequest as exc:
                raise TopicError(f"not a reply topic: {exc} (FMSTREAM_REPLY_TOPIC_PREFIXES "
                                 "says which names workers answer on)") from None
            wanted.setdefault(name, settings.partitions_responses)
    deadline = time.monotonic() + timeout_s
    created: list[str] = []
    with kafka_admin(settings.kafka_config(), timeout_s=min(timeout_s, 15.0)) as admin:
        pending = set(wanted) - set(admin.list_topics())
        while pending:
            spec = {name: _topic_spec(settings, name, wanted[name]) for name in sorted(pending)}
            result = admin.create_topics(spec, timeout_ms=10_000, raise_errors=False)
            retry: dict[str, str] = {}
            for topic in result["topics"]:
                error = kafka_errors.for_code(topic["error_code"])
                if error is kafka_errors.NoError:
                    created.append(topic["name"])
                elif error is kafka_errors.TopicAlreadyExistsError:
                    pass  # a concurrent `up` or another worker made it first
                elif error.retriable or error is kafka_errors.InvalidReplicationFactorError:
                    # A broker that just started may not be registered yet (no replicas).
                    retry[topic["name"]] = f"{error.__name__}: {topic.get('error_message')}"
                else:
                    raise TopicError(
                        f"creating topic {topic['name']!r} at {settings.kafka_bootstrap} failed: "
                        f"{error.__name__}: {topic.get('error_message')}"
                    )
            if retry and time.monotonic() >= deadline:
                raise TopicError(f"topics not created after {timeout_s:.0f} s: {retry}")
            pending = set(retry)
            if pending:
                time.sleep(0.25)
        left_ms = max(1000, int((deadline - time.monotonic()) * 1000))
        try:
            admin.wait_for_topics(list(wanted), timeout_ms=left_ms)
        except kafka_errors.KafkaTimeoutError as exc:
            raise TopicError(f"topics not visible in metadata: {exc}") from exc
        # a reply topic may have any partition count (a client reads all of them)
        _check_partitions(settings, admin.describe_topics(list(wanted)))
    if created:
        logger.info("created topics %s at %s", ", ".join(created), settings.kafka_bootstrap)
    return created


def _check_partitions(settings: Settings, described: list[dict[str, object]]) -> None:
    wanted = settings.topic_partitions
    for topic in described:
        name = str(topic["name"])
        have = len(topic.get("partitions") or [])  # type: ignore[arg-type]
        if name in wanted and have != wanted[name]:
            raise TopicError(
                f"topic {name!r} has {have} partitions but the settings ask for {wanted[name]}; "
                f"delete the topic, use another name, or set the partition count to {have}"
            )


# --- everything together --------------------------------------------------------------------


def _warn_if_elsewhere(settings: Settings) -> None:
    if str(settings.kafka_port) not in settings.kafka_bootstrap:
        logger.warning(
            "FMSTREAM_KAFKA_BOOTSTRAP=%s does not point at the local broker on port %s",
            settings.kafka_bootstrap,
            settings.kafka_port,
        )
    if str(settings.redis_port) not in settings.redis_url:
        logger.warning(
            "FMSTREAM_REDIS_URL=%s does not point at the local Redis on port %s",
            settings.redis_url_display,
            settings.redis_port,
        )


def _ensure(
    called: str,
    ours: int | None,
    port: int,
    setting: str,
    probe: Callable[[], None],
    where: str,
    start: Callable[[], int],
) -> State:
    """Reuse the service ``called`` that answers ``probe()`` on ``port`` though not started from
    this ``run_dir`` (another process on the port: an error naming ``setting``); else
    ``start()``, which only waits until ours is ready when ``ours`` runs."""
    if ours is None and port_open(port):
        try:
            probe()
        except ServiceTimeoutError:
            raise PortInUseError(
                f"port {port} answers but not as {called}; stop that process or choose another "
                f"port with {setting}"
            ) from None
        logger.info("reusing %s already on %s", called, where)
        return "reused"
    start()
    return "started" if ours is None else "reused"


def _ensure_kafka(settings: Settings, timeout_s: float, security: LocalSecurity | None) -> State:
    return _ensure(
        "a Kafka broker", _owned_pid(_kafka_pid_file(settings), _KAFKA_MARKER),
        settings.kafka_port, "FMSTREAM_KAFKA_PORT",
        lambda: wait_kafka(_local_kafka(settings), timeout_s=min(timeout_s, 15.0)),
        _local_bootstrap(settings),
        lambda: start_kafka(settings, timeout_s=timeout_s, security=security),
    )


def _ensure_redis(settings: Settings, timeout_s: float, security: LocalSecurity | None) -> State:
    return _ensure(
        "Redis", _owned_pid(_redis_pid_file(settings), _REDIS_MARKER),
        settings.redis_port, "FMSTREAM_REDIS_PORT",
        lambda: wait_redis(_local_redis(settings), timeout_s=min(timeout_s, 10.0)),
        f"port {settings.redis_port}",
        lambda: start_redis(settings, timeout_s=timeout_s, security=security),
    )


def up(
    settings: Settings,
    *,
    timeout_s: float = START_TIMEOUT_S,
    security: LocalSecurity | None = None,
) -> dict[str, str]:
    """Make Kafka and Redis answer on loopback and create the topics; idempotent.

    A service whose port already answers is reused, never started twice. With ``security``
    (the test session's secured services), Kafka also listens with SASL_SSL and Redis takes only
    ACL users (over TLS when ``security.redis_tls``); topics are created through
    ``settings.kafka_config()``, so point it at the SASL_SSL listener.

    Returns:
        ``{"kafka": "started"|"reused", "redis": "started"|"reused", "topics": "..."}``
        where ``topics`` lists the topics this call created (``"present"`` when none).

    Raises:
        ServiceError: a subclass saying what is missing or which log to read.
    """
    _warn_if_elsewhere(settings)
    Path(settings.run_dir).mkdir(parents=True, exist_ok=True)
    redis_state = _ensure_redis(settings, timeout_s, security)
    kafka_state = _ensure_kafka(settings, timeout_s, security)
    created = ensure_topics(settings, timeout_s=min(timeout_s, 60.0))
    return {
        "kafka": kafka_state,
        "redis": redis_state,
        "topics": ("created " + ", ".join(created)) if created else "present",
    }


def wait_ready(settings: Settings, *, timeout_s: float = START_TIMEOUT_S) -> None:
    """Block until ``settings.kafka_bootstrap`` and ``settings.redis_url`` both answer.

    Raises:
        ServiceStartError, ServiceTimeoutError: naming the log to read when started here.
    """
    deadline = time.monotonic() + timeout_s
    wait_redis(
        settings.redis_config(),
        timeout_s=timeout_s,
        pid=_owned_pid(_redis_pid_file(settings), _REDIS_MARKER),
        log_file=redis_log_file(settings),
    )
    wait_kafka(
        settings.kafka_config(),
        timeout_s=max(1.0, deadline - time.monotonic()),
        pid=_owned_pid(_kafka_pid_file(settings), _KAFKA_MARKER),
        log_file=kafka_log_file(settings),
    )


def down(settings: Settings, *, timeout_s: float = STOP_TIMEOUT_S) -> dict[str, str]:
    """Stop what :func:`up` started from this ``run_dir``; data folders stay.

    Returns:
        ``{"kafka": "stopped"|"not running", "redis": ...}``.
    """
    kafka_stopped = stop_kafka(settings, timeout_s=timeout_s)
    redis_stopped = stop_redis(settings, timeout_s=timeout_s)
    return {
        "kafka": "stopped" if kafka_stopped else "not running",
        "redis": "stopped" if redis_stopped else "not running",
    }


def status(settings: Settings) -> dict[str, str]:
    """One line per service: started here (pid), answering (not started here), or down."""
    out: dict[str, str] = {}
    checks = (
        ("kafka", _kafka_pid_file(settings), _KAFKA_MARKER, settings.kafka_port),
        ("redis", _redis_pid_file(settings), _REDIS_MARKER, settings.redis_port),
    )
    for name, pid_file, marker, port in checks:
        pid = _owned_pid(pid_file, marker)
        if pid is not None:
            out[name] = f"running (pid {pid}, port {port}, started from {settings.run_dir})"
        elif port_open(port):
            out[name] = f"answering on port {port} (not started from {settings.run_dir})"
        else:
            out[name] = f"down (port {port})"
    return out
