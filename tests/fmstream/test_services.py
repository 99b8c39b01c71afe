"""Local services: topics, idempotent `up`, a foreign client, restarts (Kafka keeps its data;
Redis starts empty by default and keeps its data with AOF)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from kafka.admin import ConfigResource, ConfigResourceType

from fmstream import services as svc
from fmstream.settings import Settings
from stream.connect import RedisConfig
from stream.connect import redis_client as connect_redis
from tests.kafka_helpers import KafkaIO, delete_topics


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((svc.LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextmanager
def _squatter() -> Iterator[int]:
    """A loopback port held by a socket that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind((svc.LOOPBACK, 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _kcat() -> str:
    found = shutil.which("kcat")
    if found is None:
        pytest.fail("kcat is not installed: run `make redis` (installs redis-server and kcat)")
    return found


# --- without services: errors say what to do ------------------------------------------------


def test_wait_redis_times_out_naming_the_log(tmp_path: Path) -> None:
    log = tmp_path / "redis.log"
    with pytest.raises(svc.ServiceTimeoutError, match=str(log)):
        svc.wait_redis(RedisConfig(f"redis://127.0.0.1:{_free_port()}/0"), timeout_s=0.3,
                       log_file=log)


def test_ensure_topics_without_broker_says_how_to_start_one(tmp_path: Path) -> None:
    nowhere = Settings(run_dir=tmp_path, kafka_bootstrap=f"127.0.0.1:{_free_port()}")
    with pytest.raises(svc.KafkaUnavailableError, match="fmstream up"):
        svc.ensure_topics(nowhere, timeout_s=1.0)


def test_start_redis_refuses_a_port_held_by_another_process(tmp_path: Path) -> None:
    with _squatter() as port:
        taken = Settings(run_dir=tmp_path, redis_port=port)
        with pytest.raises(svc.PortInUseError, match="FMSTREAM_REDIS_PORT"):
            svc.start_redis(taken, timeout_s=2.0)
    assert not (tmp_path / "redis" / "redis.pid").exists()


def test_start_kafka_refuses_a_port_held_by_another_process(tmp_path: Path) -> None:
    with _squatter() as port:
        taken = Settings(run_dir=tmp_path, kafka_port=_free_port(), kafka_controller_port=port)
        with pytest.raises(svc.PortInUseError, match="FMSTREAM_KAFKA_CONTROLLER_PORT"):
            svc.start_kafka(taken, timeout_s=2.0)
    assert not (tmp_path / "kafka" / "kafka.pid").exists()


def test_up_refuses_a_port_that_answers_but_not_as_redis(tmp_path: Path) -> None:
    with _squatter() as port:
        taken = Settings(run_dir=tmp_path, redis_port=port)
        with pytest.raises(svc.PortInUseError, match="not as Redis.*FMSTREAM_REDIS_PORT"):
            svc.up(taken, timeout_s=1.0)
    assert not (tmp_path / "redis" / "redis.pid").exists()


# --- against the session's services ---------------------------------------------------------


def test_topics_have_their_partition_counts_and_profiles_are_compacted(settings: Settings) -> None:
    names = list(settings.topic_partitions)
    with svc.kafka_admin(settings.kafka_config()) as admin:
        described = {t["name"]: t for t in admin.describe_topics(names)}
        resources = [ConfigResource(ConfigResourceType.TOPIC, n, ["cleanup.policy"]) for n in names]
        configs = admin.describe_configs(resources, config_filter="all")["topic"]
    for name, partitions in settings.topic_partitions.items():
        assert len(described[name]["partitions"]) == partitions, name
        policy = configs[name]["cleanup.policy"]["value"]
        assert policy == ("compact" if name in settings.compacted_topics else "delete"), name


def test_ensure_topics_is_idempotent(settings: Settings) -> None:
    assert svc.ensure_topics(settings) == []


def test_up_twice_reuses_what_is_running(services: Settings) -> None:
    before = svc.status(services)
    assert svc.up(services) == {"kafka": "reused", "redis": "reused", "topics": "present"}
    assert svc.status(services) == before
    assert before["kafka"].startswith("running (pid")


def test_down_stops_only_what_its_run_dir_started(services: Settings, tmp_path: Path) -> None:
    elsewhere = services.model_copy(update={"run_dir": tmp_path})
    assert svc.down(elsewhere) == {"kafka": "not running", "redis": "not running"}
    assert svc.port_open(services.kafka_port) and svc.port_open(services.redis_port)


def test_kcat_sees_the_broker_and_exchanges_messages(settings: Settings, kafka_io: KafkaIO) -> None:
    kcat, bootstrap = _kcat(), settings.kafka_bootstrap
    listing = subprocess.run(
        [kcat, "-b", bootstrap, "-L", "-J"], capture_output=True, text=True, timeout=30, check=True
    )
    metadata = json.loads(listing.stdout)
    assert len(metadata["brokers"]) == 1
    partitions = {t["topic"]: len(t["partitions"]) for t in metadata["topics"]}
    for name, count in settings.topic_partitions.items():
        assert partitions[name] == count

    # kcat produces, kafka-python reads; kafka-python produces, kcat reads.
    subprocess.run(
        [kcat, "-b", bootstrap, "-P", "-t", settings.topic_dlq, "-K", ":"],
        input="k1:from-kcat\n",
        text=True,
        timeout=30,
        check=True,
    )
    records = kafka_io.consume_until(settings.topic_dlq, lambda rs: len(rs) >= 1)
    assert [(r.key, r.value) for r in records] == [(b"k1", b"from-kcat")]
    kafka_io.produce(settings.topic_dlq, [(b"k2", b"from-python")])
    read = subprocess.run(
        [
            kcat,
            "-b",
            bootstrap,
            "-C",
            "-t",
            settings.topic_dlq,
            "-o",
            "beginning",
            "-e",
            "-f",
            "%k=%s\n",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert read.stdout.splitlines() == ["k1=from-kcat", "k2=from-python"]


def test_redis_restarts_empty_by_default(
    services: Settings, settings: Settings, redis_client: redis.Redis
) -> None:
    """No persistence (README 'Redis persistence'): no AOF, no RDB saves, a restart is empty."""
    assert services.redis_persistence == "none"
    assert redis_client.config_get("appendonly")["appendonly"] == "no"
    assert redis_client.config_get("save")["save"] == ""
    key = settings.redis_key("restart")
    redis_client.set(key, b"gone")
    assert svc.stop_redis(services, kill=True)
    assert not svc.port_open(services.redis_port)
    svc.start_redis(services)
    assert redis_client.get(key) is None  # the same client reconnects to an empty store
    assert not (svc.redis_dir(services) / "appendonlydir").exists()


def test_redis_with_aof_keeps_data_and_rewrites_only_past_the_configured_size(
    services: Settings, tmp_path: Path
) -> None:
    """``redis_persistence=aof``: a restart replays the append-only file; the rewrite threshold
    of the settings is the server's."""
    port = _free_port()
    own = services.model_copy(update={
        "run_dir": tmp_path, "redis_port": port, "redis_persistence": "aof",
        "redis_aof_rewrite_min_mb": 100, "redis_url": f"redis://{svc.LOOPBACK}:{port}/0",
    })
    conf = svc.redis_conf(own).splitlines()
    assert "auto-aof-rewrite-min-size 100mb" in conf and "appendonly yes" in conf
    svc.start_redis(own)
    client = connect_redis(own.redis_config())
    try:
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert int(client.config_get("auto-aof-rewrite-min-size")[
            "auto-aof-rewrite-min-size"]) == 100 << 20
        client.set("restart", b"kept")
        assert svc.stop_redis(own)  # SIGTERM: the AOF is flushed
        svc.start_redis(own)
        assert client.get("restart") == b"kept"
    finally:
        client.close()
        svc.stop_redis(own)
    with pytest.raises(ValueError, match="redis_aof_rewrite_min_mb"):
        Settings(redis_aof_rewrite_min_mb=1)
    with pytest.raises(ValueError, match="redis_persistence"):
        Settings(redis_persistence="rdb")


def test_kafka_restart_keeps_messages(
    services: Settings, settings: Settings, kafka_io: KafkaIO
) -> None:
    kafka_io.produce(settings.topic_events, [(b"u1", b"before-restart")])
    first = svc.status(services)["kafka"]
    svc.restart_kafka(services)
    assert svc.status(services)["kafka"] != first  # a new pid
    # generous bounds, not sleeps: on a loaded box the restarted broker takes a while to lead
    # its partitions again; the producer's own retries deliver once it does
    kafka_io.produce(settings.topic_events, [(b"u1", b"after-restart")], timeout_s=120)
    values = [r.value for r in kafka_io.consume_all(settings.topic_events, expect=2,
                                                     timeout_s=120)]
    assert values == [b"before-restart", b"after-restart"]


@pytest.mark.parametrize("username", [None, "fmapp"], ids=["requirepass", "acl-user"])
def test_a_local_redis_started_with_a_password_in_the_settings_requires_it(
    services: Settings, tmp_path: Path, username: str | None
) -> None:
    """``fmstream up`` with ``FMSTREAM_REDIS_PASSWORD`` set: its Redis requires that password
    (it used to start an open Redis, which the start-up probe now refuses: the settings said
    Redis was protected)."""
    from pydantic import SecretStr

    from stream.connect import AuthenticationFailed, check_redis

    port = _free_port()
    password = 'pw with "quotes" and spaces'
    own = services.model_copy(update={
        "run_dir": tmp_path, "redis_port": port, "redis_url": f"redis://{svc.LOOPBACK}:{port}/0",
        "redis_username": username, "redis_password": SecretStr(password),
    })
    svc.start_redis(own)
    try:
        check_redis(own.redis_config())  # accepted, and the password is checked
        anonymous = own.model_copy(update={"redis_username": None, "redis_password": None})
        with pytest.raises(AuthenticationFailed, match="requires a password"):
            check_redis(anonymous.redis_config())
        wrong = own.model_copy(update={"redis_password": SecretStr("wrong")})
        with pytest.raises(AuthenticationFailed, match="refused the credentials"):
            check_redis(wrong.redis_config())
        assert (svc.redis_dir(own) / "redis.conf").stat().st_mode & 0o777 == 0o600
    finally:
        svc.stop_redis(own)


def test_topics_creates_a_reply_topic_and_refuses_names_workers_would_refuse(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fmstream topics --reply NAME`: the one way the README gives to make the topic a
    request's ``reply_to`` names (workers never create one); a name workers would refuse to
    answer on is refused before anything is created, saying why."""
    from fmstream import cli

    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is not None:
            monkeypatch.setenv(f"FMSTREAM_{name.upper()}", str(value))
    mine = f"fm.replies.{settings.topic_requests}"
    try:
        assert cli.main(["topics", "--reply", mine]) == 0
        assert mine in capsys.readouterr().out
        with svc.kafka_admin(settings.kafka_config()) as admin:
            (described,) = admin.describe_topics([mine])
        assert len(described["partitions"]) == settings.partitions_responses
        assert cli.main(["topics", "--reply", mine]) == 0  # idempotent
        assert "every topic exists" in capsys.readouterr().out
        elsewhere = f"elsewhere.{settings.topic_requests}"
        for bad, why in ((settings.topic_events, "input"), (settings.topic_requests, "input"),
                         (elsewhere, "not allowed"), ("a b", "topic name")):
            assert cli.main(["topics", "--reply", bad]) == cli.EXIT_SERVICE, bad
            err = capsys.readouterr().err
            assert "reply_to" in err and why in err and "FMSTREAM_REPLY_TOPIC_PREFIXES" in err, err
        with svc.kafka_admin(settings.kafka_config()) as admin:
            assert elsewhere not in admin.list_topics()
    finally:
        delete_topics(settings, [mine])
