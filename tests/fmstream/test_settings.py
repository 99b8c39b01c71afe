"""Settings: unknown variables, secrets that never print, connection configs, local ports."""

from __future__ import annotations

import logging
import socket

import pytest
from pydantic import SecretStr, ValidationError

from fmstream import cli
from fmstream import services as svc
from fmstream.settings import Settings, UnknownSettingError, check_environment, redact_urls_in
from stream.config import KafkaConfig, MetricsEndpoint
from stream.connect import RedisConfig, redact_url
from tests.process_helpers import drop_fmstream_env

KAFKA_PW = "kafka-pw-Zq81"
REDIS_PW = "redis-pw-Xw42"
URL_PW = "url-pw-Lk07"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No ``FMSTREAM_*`` variable of the developer's shell leaks into these tests."""
    drop_fmstream_env(monkeypatch)
    return monkeypatch


def secured(**extra: object) -> Settings:
    return Settings(
        kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_username="fm", kafka_password=KAFKA_PW, kafka_ssl_cafile="/certs/ca.pem",
        redis_url=f"rediss://fm:{URL_PW}@redis.example:6380/0", redis_username="fm",
        redis_password=REDIS_PW, **extra,
    )


# --- unknown variables ----------------------------------------------------------------------


def test_a_misspelt_variable_is_an_error_naming_the_closest_setting(clean_env) -> None:
    clean_env.setenv("FMSTREAM_KAFKA_SECURITY_PROTOKOL", "SASL_SSL")
    with pytest.raises(UnknownSettingError) as err:
        Settings()
    assert "FMSTREAM_KAFKA_SECURITY_PROTOKOL" in str(err.value)
    assert "did you mean FMSTREAM_KAFKA_SECURITY_PROTOCOL?" in str(err.value)


def test_every_unknown_variable_is_named_and_case_does_not_hide_one() -> None:
    with pytest.raises(UnknownSettingError) as err:
        check_environment({"fmstream_redis_pasword": "x", "FMSTREAM_NOTHING_LIKE_IT": "1",
                           "FMSTREAM_DIM": "8", "PATH": "/bin"})
    text = str(err.value)
    assert "fmstream_redis_pasword; did you mean FMSTREAM_REDIS_PASSWORD?" in text
    assert "FMSTREAM_NOTHING_LIKE_IT" in text and "FMSTREAM_DIM" not in text


def test_known_variables_are_read(clean_env) -> None:
    clean_env.setenv("FMSTREAM_KAFKA_SECURITY_PROTOCOL", "SSL")
    clean_env.setenv("FMSTREAM_REDIS_PASSWORD", REDIS_PW)
    settings = Settings()
    assert settings.kafka_config().security_protocol == "SSL"
    assert settings.redis_config().client_kwargs()["password"] == REDIS_PW


def test_metrics_bind_loopback_unless_told_and_both_processes_share_the_host(clean_env) -> None:
    clean_env.setenv("FMSTREAM_TRAINER_METRICS_PORT", "9100")
    clean_env.setenv("FMSTREAM_WORKER_METRICS_PORT", "9101")
    assert Settings().trainer_metrics() == MetricsEndpoint(9100, "127.0.0.1")
    clean_env.setenv("FMSTREAM_METRICS_HOST", "0.0.0.0")  # what compose sets
    settings = Settings()
    assert settings.trainer_metrics() == MetricsEndpoint(9100, "0.0.0.0")
    assert settings.worker_metrics() == MetricsEndpoint(9101, "0.0.0.0")
    clean_env.setenv("FMSTREAM_METRICS_HOST", "")
    with pytest.raises(ValidationError):
        Settings()


def test_the_local_ports_alone_move_every_client_to_the_services_of_up(clean_env) -> None:
    """``FMSTREAM_KAFKA_PORT`` / ``_REDIS_PORT`` start ``up``'s services elsewhere, and clients
    without an address of their own follow them (``up`` made its topics on 9092 before: a
    15-s wait and a traceback); an address that is set still wins."""
    assert Settings(kafka_port=1234, redis_port=5678).kafka_bootstrap == "127.0.0.1:1234"
    clean_env.setenv("FMSTREAM_KAFKA_PORT", "23092")
    clean_env.setenv("FMSTREAM_REDIS_PORT", "23379")
    settings = Settings()
    assert settings.kafka_bootstrap == "127.0.0.1:23092"
    assert settings.redis_url == "redis://127.0.0.1:23379/0"
    clean_env.setenv("FMSTREAM_KAFKA_BOOTSTRAP", "kafka.internal:9093")
    clean_env.setenv("FMSTREAM_REDIS_URL", "redis://redis.internal:6380/0")
    settings = Settings()
    assert settings.kafka_bootstrap == "kafka.internal:9093"
    assert settings.redis_url == "redis://redis.internal:6380/0"


def test_a_broker_that_does_not_answer_is_one_line_and_exit_1(clean_env, capsys) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clean_env.setenv("FMSTREAM_KAFKA_BOOTSTRAP", f"127.0.0.1:{port}")
    assert cli.main(["topics"]) == cli.EXIT_SERVICE
    err = capsys.readouterr().err
    assert f"fmstream topics: no Kafka broker answers at 127.0.0.1:{port}" in err
    assert "Traceback" not in err


def test_down_says_what_it_stopped(clean_env, capsys, tmp_path) -> None:
    clean_env.setenv("FMSTREAM_RUN_DIR", str(tmp_path))  # nothing was started from here
    assert cli.main(["down"]) == 0
    assert f"kafka not running, redis not running ({tmp_path})" in capsys.readouterr().out


def test_a_typo_in_a_value_is_an_error_too(clean_env) -> None:
    clean_env.setenv("FMSTREAM_KAFKA_SECURITY_PROTOCOL", "SASL_SSLL")
    with pytest.raises(ValidationError, match="kafka_security_protocol"):
        Settings()
    clean_env.setenv("FMSTREAM_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    clean_env.setenv("FMSTREAM_KAFKA_SASL_MECHANISM", "SCRAM-SHA-1")
    with pytest.raises(ValidationError, match="kafka_sasl_mechanism"):
        Settings()


def test_sasl_without_credentials_or_credentials_without_sasl_are_errors(clean_env) -> None:
    with pytest.raises(ValidationError, match="needs a SASL mechanism"):
        Settings(kafka_security_protocol="SASL_SSL", kafka_password=KAFKA_PW)
    with pytest.raises(ValidationError, match="would not be sent") as err:
        Settings(kafka_username="fm", kafka_password=KAFKA_PW)
    assert KAFKA_PW not in str(err.value)  # errors never echo their input


def test_the_cli_says_which_variable_is_unknown_and_exits_2(clean_env, capsys) -> None:
    clean_env.setenv("FMSTREAM_REDIS_PASWORD", REDIS_PW)
    assert cli.main(["lag"]) == cli.EXIT_SETTINGS
    err = capsys.readouterr().err
    assert "unknown setting FMSTREAM_REDIS_PASWORD; did you mean FMSTREAM_REDIS_PASSWORD?" in err
    assert REDIS_PW not in err


def test_the_cli_reports_an_invalid_value_without_echoing_it(clean_env, capsys) -> None:
    clean_env.setenv("FMSTREAM_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    clean_env.setenv("FMSTREAM_KAFKA_PASSWORD", KAFKA_PW)
    assert cli.main(["lag"]) == cli.EXIT_SETTINGS
    err = capsys.readouterr().err
    assert "needs a SASL mechanism" in err and KAFKA_PW not in err


# --- secrets never print --------------------------------------------------------------------


def test_repr_and_str_hide_every_secret_and_the_url_password(clean_env) -> None:
    settings = secured(kafka_ssl_key_password="key-pw-Mm90")
    for text in (repr(settings), str(settings), repr(settings.kafka_config()),
                 repr(settings.redis_config()), str(settings.kafka_config().describe()),
                 settings.redis_url_display):
        for secret in (KAFKA_PW, REDIS_PW, URL_PW, "key-pw-Mm90"):
            assert secret not in text
    assert settings.redis_url_display == "rediss://fm:***@redis.example:6380/0"


def test_to_env_passes_secrets_to_children_and_they_read_them_back(clean_env) -> None:
    settings = secured()
    env = settings.to_env()
    assert env["FMSTREAM_KAFKA_PASSWORD"] == KAFKA_PW
    assert env["FMSTREAM_REDIS_PASSWORD"] == REDIS_PW
    for name, value in env.items():
        clean_env.setenv(name, value)
    child = Settings()
    assert child.kafka_config().client_config()["sasl_plain_password"] == KAFKA_PW
    assert child == settings


def test_redact_replaces_secrets_and_url_passwords_in_any_text(clean_env) -> None:
    settings = secured()
    text = (f"login {KAFKA_PW} to redis://u:{REDIS_PW}@h:1 and redis://u:{URL_PW}@x and "
            f"redis://:other@y")
    clean = settings.redact(text)
    assert KAFKA_PW not in clean and REDIS_PW not in clean and URL_PW not in clean
    assert "other" not in clean and "redis://:***@y" in clean
    assert redact_urls_in("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("rediss://:pw@[::1]:6380/1") == "rediss://:***@[::1]:6380/1"


def test_log_records_with_a_secret_are_redacted(clean_env, caplog) -> None:
    settings = secured()
    handler = logging.StreamHandler()
    filt = cli._Redact(settings)
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "connecting with %s and %s",
                               (KAFKA_PW, f"redis://fm:{URL_PW}@h"), None)
    assert filt.filter(record)
    assert KAFKA_PW not in handler.format(record) and URL_PW not in handler.format(record)


# --- connection configs ---------------------------------------------------------------------


def test_kafka_connection_maps_to_kafka_python_options() -> None:
    plain = KafkaConfig("h:9092").client_config()
    assert plain == {"bootstrap_servers": "h:9092", "client_id": "fmstream",
                     "security_protocol": "PLAINTEXT"}
    conn = KafkaConfig("h:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-256",
                       username="fm", password=SecretStr("pw"), ssl_cafile="/ca.pem",
                       ssl_check_hostname=False, options={"reconnect_backoff_max_ms": 1000})
    config = conn.client_config()
    assert config["sasl_mechanism"] == "SCRAM-SHA-256"
    assert config["sasl_plain_username"] == "fm" and config["sasl_plain_password"] == "pw"
    assert config["ssl_cafile"] == "/ca.pem" and config["ssl_check_hostname"] is False
    assert config["reconnect_backoff_max_ms"] == 1000
    assert "pw" not in repr(conn) and "pw" not in conn.describe()


def test_redis_connection_turns_on_tls_and_credentials() -> None:
    conn = RedisConfig("redis://h:6380/0", "fm", SecretStr("pw"), ssl=True,
                           ssl_ca_file="/ca.pem")
    assert conn.client_url() == "rediss://h:6380/0"
    kwargs = conn.client_kwargs()
    assert kwargs["username"] == "fm" and kwargs["password"] == "pw"
    assert kwargs["ssl_ca_certs"] == "/ca.pem" and kwargs["ssl_cert_reqs"] == "required"
    assert RedisConfig("redis://h:6379/0").client_kwargs() == {}
    assert "pw" not in repr(RedisConfig("redis://u:pw@h/0", password=SecretStr("pw")))


# --- ports ----------------------------------------------------------------------------------


def test_default_and_preferred_ports_are_below_the_ephemeral_range() -> None:
    from bench.serve import bench_settings
    from tests.conftest import PREFERRED_PORTS

    defaults = Settings.model_fields
    ports = [defaults[f].default for f in ("kafka_port", "kafka_controller_port", "redis_port")]
    ports += list(PREFERRED_PORTS.values())
    ports += list(bench_settings.__defaults__[0])  # type: ignore[index]
    assert all(p not in svc.EPHEMERAL_PORTS and p < 32768 for p in ports), ports


def test_a_port_held_by_a_listener_is_not_free_and_is_replaced() -> None:
    with socket.socket() as holder:
        holder.bind((svc.LOOPBACK, 0))
        holder.listen()
        taken = holder.getsockname()[1]
        assert svc.port_open(taken) and not svc.port_free(taken)
        ports = svc.free_ports({"kafka_port": taken, "redis_port": taken})
    assert ports["kafka_port"] != taken and ports["redis_port"] != taken
    assert ports["kafka_port"] != ports["redis_port"]


def test_a_port_bound_by_a_client_socket_is_not_free_though_connect_finds_nothing() -> None:
    # What broke bench/freshness.py: a client socket holding the port, nothing listening.
    with socket.socket() as client:
        client.bind((svc.LOOPBACK, 0))
        held = client.getsockname()[1]
        assert not svc.port_open(held)
        assert not svc.port_free(held)


def test_free_preferred_ports_are_kept() -> None:
    port = svc.os_picked_port()
    assert svc.free_ports({"a": port}) == {"a": port}


def test_a_port_claimed_by_another_session_is_not_taken_too() -> None:
    """Two sessions that both find a preferred port free must not both start a server on it."""
    import subprocess
    import sys
    from pathlib import Path

    port = svc.os_picked_port()
    code = (f"from fmstream import services as s; import time; assert s._claim({port}); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert svc.port_free(port)
        assert svc.free_ports({"kafka_port": port})["kafka_port"] != port
    finally:
        holder.kill()
        holder.wait()


def test_every_client_is_built_by_the_factories() -> None:
    """Credentials and TLS apply everywhere only if no module builds a client by itself."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    direct = re.compile(r"\b(KafkaConsumer|KafkaProducer|KafkaAdminClient)\(|"
                        r"\bRedis\.from_url\(|\bredis\.Redis\(|\bStrictRedis\(")
    offenders = []
    for folder in ("fmstream", "model", "stream", "serving", "train", "bench", "tests"):
        for path in sorted((root / folder).rglob("*.py")):
            if path.name == "connect.py" and path.parent.name == "stream":
                continue
            if path == Path(__file__).resolve():
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if direct.search(line):
                    offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not offenders, "build clients with stream.connect:\n" + "\n".join(offenders)


def test_neg_updates_reach_the_model_and_bad_values_are_errors(clean_env) -> None:
    from fmstream.app import train_config
    from model.errors import ConfigError

    assert train_config(Settings()).neg_updates == 0  # default: every negative updated
    clean_env.setenv("FMSTREAM_NEG_UPDATES", "128")
    cfg = train_config(Settings())
    assert (cfg.neg_updates, cfg.neg_update_by) == (128, "mass")
    clean_env.setenv("FMSTREAM_NEG_UPDATE_BY", "by-luck")
    with pytest.raises(ValidationError, match="neg_update_by"):
        Settings()
    clean_env.setenv("FMSTREAM_NEG_UPDATE_BY", "uniform")
    clean_env.setenv("FMSTREAM_NEG_UPDATES", "-1")
    with pytest.raises(ValidationError, match="neg_updates"):
        Settings()
    clean_env.setenv("FMSTREAM_NEG_UPDATES", "8")
    clean_env.setenv("FMSTREAM_LOSS", "bpr")
    with pytest.raises(ConfigError, match="softmax"):
        train_config(Settings())


def test_trainer_fetch_options_reach_the_trainer_config(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FMSTREAM_TRAINER_FETCH_DEPTH", "5")
    clean_env.setenv("FMSTREAM_KAFKA_FAST_RECORDS", "false")
    config = Settings().trainer_config()
    assert config.fetch_depth == 5 and config.fast_records is False
    defaults = Settings(trainer_fetch_depth=2, kafka_fast_records=True).trainer_config()
    assert defaults.fetch_depth == 2 and defaults.fast_records is True


def test_a_fetch_depth_below_one_is_refused_with_its_name(clean_env: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    clean_env.setenv("FMSTREAM_TRAINER_FETCH_DEPTH", "0")
    with pytest.raises(ValidationError, match="trainer_fetch_depth"):
        Settings()
    config = Settings(trainer_fetch_depth=1).trainer_config()
    with pytest.raises(ValueError, match="fetch_depth: decoded polls kept ready must be >= 1"):
        replace(config, fetch_depth=0)
