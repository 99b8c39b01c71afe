"""Local Kafka (single-node KRaft) and Redis on loopback, without Docker.

``fmstream up`` and the test session both call :func:`up`. A service whose port already answers
is reused; otherwise it is started as a detached process in its own session (so it outlives the
CLI that started it), with its data, logs and a pid file under ``settings.run_dir``::

    run_dir/kafka/  server.properties  log4j2.xml  cluster.id  kafka.pid  kafka.out
                    logs/server.log (the broker's log)  data/ (its log.dirs)
    run_dir/redis/  redis.conf  redis.pid  redis.log  appendonlydir/

:func:`down` stops only what a pid file in ``run_dir`` says was started there. The stop/start
helpers keep the data folders, so "broker restarted" and "Redis restarted" keep their data.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal
from xml.sax.saxutils import escape

import kafka.errors as kafka_errors
import redis
from kafka.admin import KafkaAdminClient

from fmstream.settings import Settings

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 90.0
"""Default bound on waiting for a service (a cold JVM on two cores takes ~5-10 s)."""
STOP_TIMEOUT_S = 30.0
"""Default grace between SIGTERM and SIGKILL."""
LOOPBACK = "127.0.0.1"

State = Literal["started", "reused"]

# What /proc/<pid>/cmdline of our processes contains (guards against a recycled pid).
_KAFKA_MARKER = "kafka.Kafka"
_REDIS_MARKER = "redis-server"  # redis rewrites its title to "redis-server 127.0.0.1:PORT"

# Processes started by this Python process, kept so that they can be reaped (an exited child
# stays a zombie that `kill(pid, 0)` still finds) and so Popen never warns they are running.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


# --- errors ---------------------------------------------------------------------------------


class ServiceError(RuntimeError):
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


def _kafka_properties(settings: Settings, data_dir: Path) -> str:
    port, cport = settings.kafka_port, settings.kafka_controller_port
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{LOOPBACK}:{cport}",
        "listeners": f"PLAINTEXT://{LOOPBACK}:{port},CONTROLLER://{LOOPBACK}:{cport}",
        "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
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


def _prepare_kafka(settings: Settings, libs: Path) -> Path:
    """Write the broker's config and format its storage the first time; returns the config."""
    home = kafka_dir(settings).resolve()
    data_dir = home / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    kafka_log_file(settings).parent.mkdir(parents=True, exist_ok=True)
    props = home / "server.properties"
    props.write_text(_kafka_properties(settings, data_dir))
    (home / "log4j2.xml").write_text(_log4j2_xml(kafka_log_file(settings).resolve()))
    if (data_dir / "meta.properties").is_file():
        return props
    id_file = home / "cluster.id"
    if not id_file.is_file():
        id_file.write_text(_new_cluster_id() + "\n")
    cluster_id = id_file.read_text().strip()
    logger.info("formatting Kafka storage in %s (cluster id %s)", data_dir, cluster_id)
    fmt = [*_java_args(settings, libs), "kafka.tools.StorageTool", "format"]
    done = subprocess.run(  # noqa: S603
        [*fmt, "-t", cluster_id, "-c", str(props)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise ServiceStartError(
            f"formatting Kafka storage in {data_dir} failed (exit {done.returncode}): "
            f"{(done.stdout + done.stderr)[-2000:]}"
        )
    return props


def _kafka_ready(bootstrap: str, timeout_s: float) -> bool:
    """One readiness probe: the broker answers and at least one broker is registered."""
    budget_ms = max(500, int(timeout_s * 1000))
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="fmstream-services",
            bootstrap_timeout_ms=budget_ms,
            request_timeout_ms=max(budget_ms, 2000),
        )
    except (kafka_errors.KafkaError, OSError):
        return False
    try:
        brokers = admin.describe_cluster().get("brokers", [])
        return any(not b.get("is_fenced", False) for b in brokers)
    except (kafka_errors.KafkaError, OSError):
        return False
    finally:
        admin.close()


def _hosts_ports(bootstrap: str) -> list[tuple[str, int]]:
    out = []
    for entry in bootstrap.split(","):
        host, _, port = entry.strip().rpartition(":")
        out.append((host or LOOPBACK, int(port or 9092)))
    return out


def wait_kafka(
    bootstrap: str,
    *,
    timeout_s: float = START_TIMEOUT_S,
    pid: int | None = None,
    log_file: Path | None = None,
) -> None:
    """Block until a Kafka broker at ``bootstrap`` answers metadata requests.

    Args:
        bootstrap: ``host:port[,host:port]``.
        timeout_s: bound on the wait.
        pid: the broker's process, if we started it: its exit ends the wait at once.
        log_file: the log to name in the error.

    Raises:
        ServiceStartError: the process exited.
        ServiceTimeoutError: not ready within ``timeout_s``.
    """
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
            if _kafka_ready(bootstrap, min(max(left, 0.5), 5.0)):
                return
        if time.monotonic() >= deadline:
            raise ServiceTimeoutError(
                f"Kafka at {bootstrap} not ready after {timeout_s:.0f} s{read}"
            )
        time.sleep(0.2)


def start_kafka(settings: Settings, *, timeout_s: float = START_TIMEOUT_S) -> int:
    """Start the local broker (or return the pid of the one already started here).

    Data stays in ``run_dir/kafka/data``: a restart keeps every topic and message.

    Returns:
        The broker's pid.

    Raises:
        PortInUseError: another process holds the broker or controller port.
        MissingDependencyError, ServiceStartError, ServiceTimeoutError.
    """
    pid_file = _kafka_pid_file(settings)
    pid = _owned_pid(pid_file, _KAFKA_MARKER)
    if pid is not None:
        wait_kafka(
            _local_bootstrap(settings),
            timeout_s=timeout_s,
            pid=pid,
            log_file=kafka_log_file(settings),
        )
        return pid
    for port, what in (
        (settings.kafka_port, "FMSTREAM_KAFKA_PORT"),
        (settings.kafka_controller_port, "FMSTREAM_KAFKA_CONTROLLER_PORT"),
    ):
        if port_open(port):
            raise PortInUseError(
                f"port {port} is already taken by a process not started from {settings.run_dir}; "
                f"stop it or choose another port with {what}"
            )
    libs = ensure_kafka_jars(settings)
    props = _prepare_kafka(settings, libs)
    args = [*_java_args(settings, libs), "kafka.Kafka", str(props)]
    pid = _spawn(args, _kafka_out_file(settings), pid_file, cwd=kafka_dir(settings))
    logger.info(
        "started Kafka (pid %s) on %s; log %s",
        pid,
        _local_bootstrap(settings),
        kafka_log_file(settings),
    )
    try:
        wait_kafka(
            _local_bootstrap(settings),
            timeout_s=timeout_s,
            pid=pid,
            log_file=kafka_log_file(settings),
        )
    except ServiceStartError as exc:
        pid_file.unlink(missing_ok=True)
        raise ServiceStartError(
            f"{exc}\n{_kafka_out_file(settings)}:\n{_tail(_kafka_out_file(settings))}"
        ) from None
    return pid


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


def restart_kafka(settings: Settings, *, kill: bool = False) -> int:
    """Stop and start the local broker, keeping its data; returns the new pid."""
    stop_kafka(settings, kill=kill)
    return start_kafka(settings)


def _local_bootstrap(settings: Settings) -> str:
    return f"{LOOPBACK}:{settings.kafka_port}"


# --- Redis ----------------------------------------------------------------------------------


def _redis_conf(settings: Settings) -> str:
    home = redis_dir(settings).resolve()

    def quoted(path: Path) -> str:
        return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "\n".join(
        [
            "# written by fmstream.services at every start; edit Settings, not this file",
            f"bind {LOOPBACK}",
            f"port {settings.redis_port}",
            "protected-mode yes",
            "daemonize no",
            f"dir {quoted(home)}",
            f"logfile {quoted(home / 'redis.log')}",
            "loglevel notice",
            # The append-only file is the persistence; a restart replays it.
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "",
        ]
    )


def _redis_url(settings: Settings) -> str:
    return f"redis://{LOOPBACK}:{settings.redis_port}/0"


def wait_redis(
    url: str,
    *,
    timeout_s: float = START_TIMEOUT_S,
    pid: int | None = None,
    log_file: Path | None = None,
) -> None:
    """Block until the Redis at ``url`` answers PING (after loading its append-only file).

    Raises:
        ServiceStartError: the process exited.
        ServiceTimeoutError: not ready within ``timeout_s``.
    """
    read = f"; read {log_file}" if log_file else ""
    deadline = time.monotonic() + timeout_s
    client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
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
            except redis.RedisError:
                pass  # refused, or still loading the append-only file
            if time.monotonic() >= deadline:
                raise ServiceTimeoutError(f"Redis at {url} not ready after {timeout_s:.0f} s{read}")
            time.sleep(0.1)
    finally:
        client.close()


def start_redis(settings: Settings, *, timeout_s: float = START_TIMEOUT_S) -> int:
    """Start the local ``redis-server`` (or return the pid of the one already started here).

    Append-only persistence in ``run_dir/redis``: a restart keeps every key.

    Returns:
        The server's pid.

    Raises:
        PortInUseError, MissingDependencyError, ServiceStartError, ServiceTimeoutError.
    """
    pid_file = _redis_pid_file(settings)
    pid = _owned_pid(pid_file, _REDIS_MARKER)
    if pid is not None:
        wait_redis(
            _redis_url(settings), timeout_s=timeout_s, pid=pid, log_file=redis_log_file(settings)
        )
        return pid
    if port_open(settings.redis_port):
        raise PortInUseError(
            f"port {settings.redis_port} is already taken by a process not started from "
            f"{settings.run_dir}; stop it or choose another port with FMSTREAM_REDIS_PORT"
        )
    server = _require_binary(
        "redis-server",
        "install Debian's redis-server (`make redis` or `apt-get install redis-server`)",
    )
    home = redis_dir(settings).resolve()
    home.mkdir(parents=True, exist_ok=True)
    conf = home / "redis.conf"
    conf.write_text(_redis_conf(settings))
    pid = _spawn([server, str(conf)], home / "redis.out", pid_file, cwd=home)
    logger.info(
        "started Redis (pid %s) on port %s; log %s",
        pid,
        settings.redis_port,
        redis_log_file(settings),
    )
    try:
        wait_redis(
            _redis_url(settings), timeout_s=timeout_s, pid=pid, log_file=redis_log_file(settings)
        )
    except ServiceStartError as exc:
        pid_file.unlink(missing_ok=True)
        raise ServiceStartError(
            f"{exc}\n{home / 'redis.out'}:\n{_tail(home / 'redis.out')}"
        ) from None
    return pid


def stop_redis(
    settings: Settings, *, timeout_s: float = STOP_TIMEOUT_S, kill: bool = False
) -> bool:
    """Stop the Redis started from this ``run_dir`` (SIGTERM flushes the append-only file).

    Args:
        kill: SIGKILL at once, as a crash would (up to a second of writes may be lost).

    Returns:
        Whether a server was stopped.
    """
    return _stop_pid("Redis", _redis_pid_file(settings), _REDIS_MARKER, timeout_s, kill)


def restart_redis(settings: Settings, *, kill: bool = False) -> int:
    """Stop and start the local Redis, keeping its data; returns the new pid."""
    stop_redis(settings, kill=kill)
    return start_redis(settings)


# --- topics ---------------------------------------------------------------------------------


@contextmanager
def kafka_admin(bootstrap: str, *, timeout_s: float = 10.0) -> Iterator[KafkaAdminClient]:
    """A connected admin client, closed on exit.

    Raises:
        KafkaUnavailableError: no broker answered within ``timeout_s``.
    """
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="fmstream-admin",
            bootstrap_timeout_ms=int(timeout_s * 1000),
            request_timeout_ms=max(int(timeout_s * 1000), 5000),
        )
    except (kafka_errors.KafkaError, OSError) as exc:
        raise KafkaUnavailableError(
            f"no Kafka broker answers at {bootstrap} within {timeout_s:.0f} s ({exc!r}); start "
            "the local one with `fmstream up` (or `make up`), or set FMSTREAM_KAFKA_BOOTSTRAP"
        ) from exc
    try:
        yield admin
    finally:
        admin.close()


def _topic_spec(settings: Settings, name: str) -> dict[str, object]:
    configs = {"cleanup.policy": "compact"} if name in settings.compacted_topics else {}
    # replication_factor -1: the broker's default (1 on a single node, more on a cluster).
    return {
        "num_partitions": settings.topic_partitions[name],
        "replication_factor": -1,
        "configs": configs,
    }


def ensure_topics(settings: Settings, *, timeout_s: float = 30.0) -> list[str]:
    """Create every topic of ``settings.topic_partitions`` that is missing; idempotent.

    Profile topics (``settings.compacted_topics``) get ``cleanup.policy=compact``. Returns once
    metadata shows every topic with a leader for every partition.

    Returns:
        The names of the topics this call created.

    Raises:
        KafkaUnavailableError: no broker answers.
        TopicError: creation failed, timed out, or a topic exists with another partition count.
    """
    wanted = settings.topic_partitions
    deadline = time.monotonic() + timeout_s
    created: list[str] = []
    with kafka_admin(settings.kafka_bootstrap, timeout_s=min(timeout_s, 15.0)) as admin:
        pending = set(wanted) - set(admin.list_topics())
        while pending:
            spec = {name: _topic_spec(settings, name) for name in sorted(pending)}
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
            settings.redis_url,
            settings.redis_port,
        )


def _ensure_kafka(settings: Settings, timeout_s: float) -> State:
    ours = _owned_pid(_kafka_pid_file(settings), _KAFKA_MARKER)
    if ours is None and port_open(settings.kafka_port):
        try:
            wait_kafka(_local_bootstrap(settings), timeout_s=min(timeout_s, 15.0))
        except ServiceTimeoutError:
            raise PortInUseError(
                f"port {settings.kafka_port} answers but not as a Kafka broker; stop that process "
                "or choose another port with FMSTREAM_KAFKA_PORT"
            ) from None
        logger.info("reusing the Kafka broker already on %s", _local_bootstrap(settings))
        return "reused"
    start_kafka(settings, timeout_s=timeout_s)  # when ours runs: only waits until it is ready
    return "started" if ours is None else "reused"


def _ensure_redis(settings: Settings, timeout_s: float) -> State:
    ours = _owned_pid(_redis_pid_file(settings), _REDIS_MARKER)
    if ours is None and port_open(settings.redis_port):
        try:
            wait_redis(_redis_url(settings), timeout_s=min(timeout_s, 10.0))
        except ServiceTimeoutError:
            raise PortInUseError(
                f"port {settings.redis_port} answers but not as Redis; stop that process or "
                "choose another port with FMSTREAM_REDIS_PORT"
            ) from None
        logger.info("reusing the Redis already on port %s", settings.redis_port)
        return "reused"
    start_redis(settings, timeout_s=timeout_s)
    return "started" if ours is None else "reused"


def up(settings: Settings, *, timeout_s: float = START_TIMEOUT_S) -> dict[str, str]:
    """Make Kafka and Redis answer on loopback and create the topics; idempotent.

    A service whose port already answers is reused, never started twice.

    Returns:
        ``{"kafka": "started"|"reused", "redis": "started"|"reused", "topics": "..."}``
        where ``topics`` lists the topics this call created (``"present"`` when none).

    Raises:
        ServiceError: a subclass saying what is missing or which log to read.
    """
    _warn_if_elsewhere(settings)
    Path(settings.run_dir).mkdir(parents=True, exist_ok=True)
    redis_state = _ensure_redis(settings, timeout_s)
    kafka_state = _ensure_kafka(settings, timeout_s)
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
        settings.redis_url,
        timeout_s=timeout_s,
        pid=_owned_pid(_redis_pid_file(settings), _REDIS_MARKER),
        log_file=redis_log_file(settings),
    )
    wait_kafka(
        settings.kafka_bootstrap,
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
