"""fmstream on a secured Kafka and Redis: the real commands, the real servers, no secret printed.

``secure_stack`` (session; only these tests start it) runs a second local broker with a
SASL_SSL listener (SCRAM-SHA-512 user created at format time, certificate signed by a CA this
session makes with ``openssl``) and an authorizer (that user is a super user; others get only
what ACLs grant), which creates no topic by itself, and a Redis that accepts only an ACL user,
over TLS only. The commands run as subprocesses (``python -m fmstream.cli``) with their
settings in ``FMSTREAM_*`` variables, as deployed; every byte they print (logs at INFO
included) and every /metrics page is searched for the passwords.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import redis

from fmstream import services as svc
from fmstream.settings import Settings
from tests.certs import make_certs
from tests.kafka_helpers import wait_for
from tests.process_helpers import cli_env, hermetic_settings, stop_process

REPO_ROOT = Path(__file__).resolve().parents[1]
SECURE_PORTS = {"kafka_port": 19192, "kafka_controller_port": 19193, "sasl_port": 19194,
                "redis_port": 16479}
USER = "fmstream-app"
# What README "Security" says the Redis user needs: its key prefix (keys, and channels for the
# version notices), no admin commands.
REDIS_ACL = "resetkeys ~fmsec:* resetchannels &fmsec:* -@all +@read +@write +@scripting " \
    "+@keyspace +@connection +publish +subscribe +unsubscribe -@admin -@dangerous"


@dataclass(frozen=True)
class SecureStack:
    settings: Settings  # clients: SASL_SSL Kafka, ACL user on TLS Redis
    kafka_password: str
    redis_password: str
    key_password: str

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.kafka_password, self.redis_password, self.key_password)


@pytest.fixture(scope="session")
def secure_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureStack]:
    """A SASL_SSL (SCRAM) broker and an ACL + TLS Redis of their own, for this module only."""
    run_dir = tmp_path_factory.mktemp("secure")
    # Distinct, greppable secrets; a fresh set per session.
    kafka_pw, redis_pw, key_pw = (f"{what}-{secrets.token_hex(8)}"
                                  for what in ("kafkapw", "redispw", "keypw"))
    try:
        certs = make_certs(run_dir / "certs", key_pw)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    ports = svc.free_ports(SECURE_PORTS)
    security = svc.LocalSecurity(
        ca_file=certs.ca_file, cert_file=certs.cert_file, key_file=certs.key_file,
        kafka_keystore=certs.kafka_keystore, key_password=key_pw,
        kafka_sasl_port=ports["sasl_port"], host="127.0.0.1", scram_mechanism="SCRAM-SHA-512",
        kafka_users={USER: kafka_pw}, redis_users={USER: redis_pw}, redis_tls=True,
        redis_acl=REDIS_ACL, kafka_super_users=(USER,),  # the broker authorizes (ACLs)
        kafka_auto_create_topics=False,  # a topic nobody created stays missing (as in prod)
    )
    settings = hermetic_settings(
        run_dir=run_dir,
        kafka_libs=REPO_ROOT / "infra" / "kafka" / "target" / "libs",
        kafka_heap="384m",
        kafka_port=ports["kafka_port"],
        kafka_controller_port=ports["kafka_controller_port"],
        redis_port=ports["redis_port"],
        kafka_bootstrap=f"127.0.0.1:{ports['sasl_port']}",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_username=USER,
        kafka_password=kafka_pw,
        kafka_ssl_cafile=certs.ca_file,
        redis_url=f"redis://127.0.0.1:{ports['redis_port']}/0",
        redis_username=USER,
        redis_password=redis_pw,
        redis_ssl=True,
        redis_ssl_ca_file=certs.ca_file,
        redis_prefix="fmsec:",
        checkpoint_dir=run_dir / "checkpoints",
        partitions_events=2, partitions_requests=2, partitions_profiles=1,
        partitions_responses=2,
    )
    try:
        svc.up(settings, security=security)
    except svc.ServiceError as exc:
        svc.down(settings)
        pytest.fail(f"could not start the secured services (run dir {run_dir}): {exc}",
                    pytrace=False)
    try:
        yield SecureStack(settings, kafka_pw, redis_pw, key_pw)
    finally:
        svc.down(settings)


@pytest.fixture
def stack(secure_stack: SecureStack, tmp_path: Path) -> SecureStack:
    """The secured stack with this test's own topics, groups, key prefix and checkpoints."""
    suffix = uuid.uuid4().hex[:8]
    base = secure_stack.settings
    update: dict[str, object] = {
        f"topic_{f}": f"{getattr(base, f'topic_{f}')}.{suffix}"
        for f in ("events", "users", "items", "requests", "responses", "dlq")
    }
    update.update(trainer_group=f"{base.trainer_group}.{suffix}",
                  serving_group=f"{base.serving_group}.{suffix}",
                  redis_prefix=f"fmsec:{suffix}:", checkpoint_dir=tmp_path / "checkpoints")
    settings = base.model_copy(update=update)
    svc.ensure_topics(settings)  # through the SASL_SSL listener
    return SecureStack(settings, secure_stack.kafka_password, secure_stack.redis_password,
                       secure_stack.key_password)


# --- running commands -----------------------------------------------------------------------


def _env(settings: Settings, **override: str) -> dict[str, str]:
    return cli_env(settings, columns=200, **override)


def _fmstream(*args: str) -> list[str]:
    return [sys.executable, "-m", "fmstream.cli", *args]


@dataclass
class Ran:
    args: tuple[str, ...]
    returncode: int
    output: str  # stdout and stderr


def run(settings: Settings, *args: str, timeout: float = 180.0, **override: str) -> Ran:
    done = subprocess.run(  # noqa: S603
        _fmstream(*args), cwd=REPO_ROOT, env=_env(settings, **override), capture_output=True,
        text=True, timeout=timeout, check=False,
    )
    return Ran(args, done.returncode, done.stdout + done.stderr)


def assert_no_secret(stack: SecureStack, *texts: str) -> None:
    for text in texts:
        for secret in stack.secrets:
            assert secret not in text, f"a password was printed:\n{text[-3000:]}"


# --- the round trip -------------------------------------------------------------------------


@pytest.mark.integration
def test_train_serve_query_lag_through_sasl_ssl_and_acl_tls_redis(stack: SecureStack,
                                                                  tmp_path: Path) -> None:
    """produce -> train -> publish -> serve -> query -> lag, all through the secured servers."""
    s = stack.settings
    outputs: list[str] = []
    metrics_port = svc.os_picked_port()
    # `up` and `lag` with the Redis password in the URL instead: it must be shown redacted.
    url_with_password = (f"rediss://{USER}:{stack.redis_password}@127.0.0.1:{s.redis_port}/0")
    in_url = {"FMSTREAM_REDIS_URL": url_with_password, "FMSTREAM_REDIS_USERNAME": "",
              "FMSTREAM_REDIS_PASSWORD": ""}

    up = run(s, "up", **in_url)
    outputs.append(up.output)
    assert up.returncode == 0, up.output
    assert f"rediss://{USER}:***@127.0.0.1:{s.redis_port}/0" in up.output

    replay = run(s, "-v", "replay", "--users", "40", "--items", "30", "--clusters", "3",
                 "--events", "1500")
    outputs.append(replay.output)
    assert replay.returncode == 0, replay.output
    assert "produced 1500 events" in replay.output

    train = run(s, "-v", "train", "--idle-exit", "3", timeout=300)
    outputs.append(train.output)
    assert train.returncode == 0, train.output
    assert "applied 1500 events, 0 dead letters" in train.output

    log_file = tmp_path / "serve.log"
    with log_file.open("w") as out:
        worker = subprocess.Popen(  # noqa: S603
            _fmstream("-v", "serve"), cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
            env=_env(s, FMSTREAM_WORKER_METRICS_PORT=str(metrics_port)),
        )
    try:
        def answered() -> dict | None:
            assert worker.poll() is None, log_file.read_text()
            q = run(s, "query", "u2i", "--user", "u7", "-k", "5", "--json", "--timeout", "5")
            outputs.append(q.output)
            if q.returncode != 0:
                return None
            resp = orjson.loads(q.output.strip().splitlines()[-1])
            return resp if resp["items"] and resp.get("fallback") is None else None

        resp = wait_for(answered, timeout=180, what="a u2i answer from the trained model",
                        poll_s=1.0)
        assert len(resp["items"]) == 5 and resp["model_version"] >= 1

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            page = r.read().decode()
        outputs.append(page)
        assert "fmstream_model_version" in page

        lag = run(s, "lag", **in_url)
        outputs.append(lag.output)
        assert lag.returncode == 0, lag.output
        lag_json = run(s, "lag", "--json", **in_url)
        outputs.append(lag_json.output)
        assert lag_json.returncode == 0, lag_json.output
        report = orjson.loads(lag_json.output.strip().splitlines()[-1])
        assert report["total_lag"][s.trainer_group] == 0
        assert report["model_version"] is not None and not report["problems"]
    finally:
        stop_process(worker, 30)
    outputs.append(log_file.read_text())
    assert worker.returncode == 0, outputs[-1]
    assert_no_secret(stack, *outputs)


# --- wrong credentials fail closed ----------------------------------------------------------


def _each_exits_3(cases: list[tuple[tuple[str, ...], dict[str, str], str]],
                  env_for: Callable[[dict[str, str]], dict[str, str]],
                  problems_of: Callable[[tuple[str, ...], dict[str, str], str, str], list[str]],
                  ) -> None:
    """Run each ``(args, environment override, expected)`` case as an ``fmstream`` process, all
    at once; each must exit 3 within 120 s without a traceback, and ``problems_of(args,
    override, expected, output)`` names whatever else is wrong with its output."""
    procs = [subprocess.Popen(  # noqa: S603
        _fmstream("-v", *args), cwd=REPO_ROOT, env=env_for(override),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for args, override, _ in cases]
    failures = []
    for (args, override, expected), proc in zip(cases, procs, strict=True):
        try:
            output, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            failures.append(f"{args} {list(override)}: still running after 120 s\n{output}")
            continue
        problems = [] if proc.returncode == 3 else [f"exit {proc.returncode}"]
        problems += ["a traceback"] if "Traceback" in output else []
        problems += problems_of(args, override, expected, output)
        if problems:
            failures.append(f"{args} {list(override)}: {', '.join(problems)}\n{output[-2000:]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.integration
def test_wrong_credentials_make_every_command_exit_non_zero_with_a_clear_message(
    stack: SecureStack,
) -> None:
    """Each command, in parallel, with one wrong credential: exit 3, one clear line, no
    traceback, no password (neither the right nor the wrong one)."""
    s = stack.settings
    wrong_kafka = {"FMSTREAM_KAFKA_PASSWORD": "wrong-kafka-secret-1"}
    wrong_redis = {"FMSTREAM_REDIS_PASSWORD": "wrong-redis-secret-2"}
    no_redis_password = {"FMSTREAM_REDIS_USERNAME": "", "FMSTREAM_REDIS_PASSWORD": ""}
    redis_needs_one = "requires a password (AuthenticationError) and none is set; set " \
        "FMSTREAM_REDIS_PASSWORD"
    no_ca = {"FMSTREAM_KAFKA_SSL_CAFILE": ""}
    no_sasl = {"FMSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL", "FMSTREAM_KAFKA_SASL_MECHANISM": "",
               "FMSTREAM_KAFKA_USERNAME": "", "FMSTREAM_KAFKA_PASSWORD": ""}
    kafka_refused = "refused the credentials"
    cases = [
        (("train",), wrong_kafka, kafka_refused),
        (("serve",), wrong_kafka, kafka_refused),
        (("lag",), wrong_kafka, kafka_refused),
        (("lag", "--json"), wrong_kafka, kafka_refused),
        (("query", "u2i", "--user", "u1"), wrong_kafka, kafka_refused),
        (("replay", "--events", "10"), wrong_kafka, kafka_refused),
        (("topics",), wrong_kafka, kafka_refused),
        (("train",), wrong_redis, "Redis at"),
        (("serve",), wrong_redis, "Redis at"),
        (("lag",), wrong_redis, "Redis at"),
        (("lag", "--json"), wrong_redis, "refused the credentials"),
        (("train",), no_redis_password, redis_needs_one),
        (("serve",), no_redis_password, redis_needs_one),
        (("lag",), no_redis_password, redis_needs_one),
        (("serve",), no_ca, "TLS to Kafka"),
        (("train",), no_sasl, "expects another security protocol"),
    ]

    def problems(args, override, expected, output: str) -> list[str]:
        found = [] if expected in output else [f"no {expected!r}"]
        wrong = [v for k, v in override.items() if k.endswith("PASSWORD")]
        return found + ["a password" for secret in (*stack.secrets, *wrong)
                        if secret and secret in output]

    _each_exits_3(cases, lambda override: _env(s, **override), problems)


@pytest.mark.integration
def test_a_password_redis_does_not_check_fails_closed(settings: Settings) -> None:
    """A Redis password is set, but the Redis (the session's, no ``requirepass``) checks none:
    redis-py's ``HELLO 3 AUTH default <password>`` is accepted whatever the password, so every
    command used to run on as if Redis were protected. Each process that talks to Redis exits 3
    at start with one line naming the setting, no traceback, no password."""
    password = f"unchecked-{secrets.token_hex(8)}"
    in_field = {"FMSTREAM_REDIS_PASSWORD": password}
    url = f"redis://:{password}@127.0.0.1:{settings.redis_port}/0"
    in_url = {"FMSTREAM_REDIS_URL": url}
    cases = [
        (("train",), in_field, "(FMSTREAM_REDIS_PASSWORD)"),
        (("serve",), in_field, "(FMSTREAM_REDIS_PASSWORD)"),
        (("lag",), in_field, "(FMSTREAM_REDIS_PASSWORD)"),
        (("lag", "--json"), in_field, "(FMSTREAM_REDIS_PASSWORD)"),
        (("train",), in_url, "(the password in FMSTREAM_REDIS_URL)"),
    ]

    def problems(args, override, setting, output: str) -> list[str]:
        found = [] if (f"fmstream {args[0]}: Redis at" in output
                       and "checks no password" in output
                       and f"a password is set {setting}" in output) \
            else ["no clear line naming the setting"]
        return found + (["the password"] if password in output else [])

    _each_exits_3(cases, lambda override: _env(settings, **override), problems)


@pytest.mark.integration
def test_factories_reach_the_secured_servers_and_refuse_plaintext(stack: SecureStack) -> None:
    """The Python clients (factories) work through SASL_SSL / TLS; without TLS they do not."""
    from stream.config import KafkaConfig
    from stream.connect import (
        AuthenticationFailed,
        ProtocolMismatch,
        TlsFailed,
        check_kafka,
        check_redis,
        explain_redis_error,
        redis_client,
    )
    from tests.kafka_helpers import KafkaIO

    s = stack.settings
    io = KafkaIO(s)
    try:
        io.produce(s.topic_events, [(b"k", b"v")])
        assert [r.value for r in io.consume_all(s.topic_events, expect=1)] == [b"v"]
    finally:
        io.close()
    client = redis_client(s.redis_config())
    try:
        client.set(s.redis_key("probe"), b"1")
        assert client.get(s.redis_key("probe")) == b"1"
        # The ACL is in force: outside its prefix, or an admin command, the user is refused.
        with pytest.raises(redis.exceptions.NoPermissionError) as denied:
            client.set("elsewhere:probe", b"1")
        explained = explain_redis_error(s.redis_config(), denied.value)
        assert isinstance(explained, AuthenticationFailed)
        assert "lacks a permission" in str(explained)
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.flushall()
    finally:
        client.close()
    check_kafka(s.kafka_config())
    check_redis(s.redis_config())
    with pytest.raises(AuthenticationFailed, match="does not offer SASL mechanism"):
        check_kafka(s.model_copy(update={"kafka_sasl_mechanism": "SCRAM-SHA-256"})
                    .kafka_config())
    # A protocol that does not match the listener fails at once, saying so.
    with pytest.raises(ProtocolMismatch, match="expects another security protocol"):
        check_kafka(KafkaConfig(s.kafka_bootstrap))  # PLAINTEXT to the SASL_SSL listener
    with pytest.raises(ProtocolMismatch):
        check_kafka(KafkaConfig(s.kafka_bootstrap, security_protocol="SSL",
                                ssl_cafile=s.kafka_ssl_cafile and str(s.kafka_ssl_cafile)))
    with pytest.raises(TlsFailed, match="speaks TLS"):  # TLS to the plaintext listener
        check_kafka(KafkaConfig(f"127.0.0.1:{s.kafka_port}", security_protocol="SSL"))
    started = time.monotonic()
    from stream.connect import ConnectError

    with pytest.raises(ConnectError):
        check_redis(s.model_copy(update={"redis_ssl": False}).redis_config(), timeout_s=3)
    assert time.monotonic() - started < 30


def _grant_all(admin, user: str) -> None:
    """ACLs allowing ``user`` everything on every topic and group (the broker authorizes)."""
    from kafka.admin import (
        ACL,
        ACLOperation,
        ACLPermissionType,
        ACLResourcePatternType,
        ResourcePattern,
        ResourceType,
    )

    acls = [ACL(f"User:{user}", "*", ACLOperation.ALL, ACLPermissionType.ALLOW,
                ResourcePattern(kind, "*", ACLResourcePatternType.LITERAL))
            for kind in (ResourceType.TOPIC, ResourceType.GROUP)]
    result = admin.create_acls(acls)
    assert not result.get("failed"), result


@pytest.mark.integration
@pytest.mark.parametrize("fetch_process", ["true", "false"], ids=["fetch-process", "fetch-thread"])
def test_credentials_revoked_while_running_stop_train_and_serve_with_a_clear_message(
    stack: SecureStack, fetch_process: str,
) -> None:
    """A SCRAM user deleted while `train` and `serve` run: both notice within a bounded time
    (FMSTREAM_CREDENTIALS_CHECK_S), stop as on SIGTERM and exit 3 with one clear line, no
    traceback and no password (instead of retrying for ever once a connection drops). The
    trainer polls in a child process (the default) or in a thread of its own process."""
    from kafka.admin._users import UserScramCredentialDeletion, UserScramCredentialUpsertion
    from kafka.errors import KafkaError

    from serving.store import VectorStore
    from stream.connect import kafka_admin, kafka_producer, redis_client
    from stream.lag import LagReader

    s = stack.settings
    store = VectorStore(redis_client(s.redis_config()), s.redis_keys())
    producer = kafka_producer(s.kafka_config())  # as the stack's own user, never revoked
    probe = f"probe-{secrets.token_hex(4)}"
    user, password = f"revokee-{secrets.token_hex(4)}", f"revokedpw-{secrets.token_hex(8)}"
    admin = kafka_admin(s.kafka_config())
    try:
        assert admin.alter_user_scram_credentials(
            [UserScramCredentialUpsertion(user, "SCRAM-SHA-512", password)]) == {user: None}
        _grant_all(admin, user)  # the broker authorizes: give the new user what fmstream needs
        as_revokee = {"FMSTREAM_KAFKA_USERNAME": user, "FMSTREAM_KAFKA_PASSWORD": password,
                      "FMSTREAM_CREDENTIALS_CHECK_S": "1",
                      "FMSTREAM_TRAINER_FETCH_PROCESS": fetch_process}
        procs = {cmd: subprocess.Popen(  # noqa: S603
            _fmstream("-v", cmd), cwd=REPO_ROOT, env=_env(s, **as_revokee),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ) for cmd in ("train", "serve")}
        printed: dict[str, list[str]] = {cmd: [] for cmd in procs}
        readers = [threading.Thread(target=lambda p=p, out=printed[cmd]: out.extend(p.stdout),
                                    daemon=True) for cmd, p in procs.items()]
        for r in readers:
            r.start()
        try:
            # running and authenticated (observable state, not a sleep): an event produced
            # now went through the trainer's consumer (the revokee's) into the model and out
            # to Redis; the worker is a member of its group
            producer.send(s.topic_events, key=probe.encode(), value=orjson.dumps(
                {"user_id": probe, "item_id": "i1", "label": 1, "ts": time.time()}))
            producer.flush()
            with LagReader(s.kafka_config(), admin=admin) as lag:

                def running() -> bool:
                    if not store.get_user_vectors([probe]).found.all():
                        return False
                    try:  # a fresh broker has no group coordinator for a moment
                        members = lag.group_states([s.serving_group])[s.serving_group].members
                    except KafkaError:
                        return False
                    return members >= 1

                wait_for(running, 180, "train and serve to run as the new user")
            assert all(p.poll() is None for p in procs.values())
            assert admin.alter_user_scram_credentials(
                [UserScramCredentialDeletion(user, "SCRAM-SHA-512")]) == {user: None}
            for p in procs.values():
                p.wait(timeout=180)  # a bound: FMSTREAM_CREDENTIALS_CHECK_S=1, two refusals
            for r in readers:
                r.join(30)
            outputs = {cmd: "".join(lines) for cmd, lines in printed.items()}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
    finally:
        admin.close()
        producer.close()
    for cmd, p in procs.items():
        out = outputs[cmd]
        assert p.returncode == 3, f"{cmd}: exit {p.returncode}\n{out[-3000:]}"
        assert f"fmstream {cmd}: Kafka at" in out and "refused the credentials" in out, out[-3000:]
        assert "credentials refused 2 times in a row, stopping" in out
        assert "Traceback" not in out, out[-3000:]
        for secret in (*stack.secrets, password):
            assert secret not in out, f"{cmd} printed a password"


@pytest.mark.integration
def test_a_principal_without_rights_is_refused_clearly(stack: SecureStack) -> None:
    """A SCRAM user the broker authenticates but no ACL grants anything: every command that
    needs topics or groups exits 3 at once with one line naming what is denied (no retries, no
    traceback, no password)."""
    from kafka.admin._users import UserScramCredentialDeletion, UserScramCredentialUpsertion

    from stream.connect import kafka_admin

    s = stack.settings
    user, password = f"norights-{secrets.token_hex(4)}", f"norightspw-{secrets.token_hex(8)}"
    admin = kafka_admin(s.kafka_config())
    try:
        assert admin.alter_user_scram_credentials(
            [UserScramCredentialUpsertion(user, "SCRAM-SHA-512", password)]) == {user: None}
        env = {"FMSTREAM_KAFKA_USERNAME": user, "FMSTREAM_KAFKA_PASSWORD": password}
        cases = [(("train",), f"{s.topic_events}"), (("serve",), f"{s.topic_requests}"),
                 (("replay", "--events", "10"), f"{s.topic_events}"),
                 (("query", "u2i", "--user", "u1"), f"{s.topic_requests}")]
        procs = [subprocess.Popen(  # noqa: S603
            _fmstream("-v", *args), cwd=REPO_ROOT, env=_env(s, **env),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for args, _ in cases]
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        admin.alter_user_scram_credentials([UserScramCredentialDeletion(user, "SCRAM-SHA-512")])
        admin.close()
    for (args, topic), p, out in zip(cases, procs, outputs, strict=True):
        assert p.returncode == 3, f"{args}: exit {p.returncode}\n{out[-3000:]}"
        assert f"authenticated {user!r} but its ACLs deny it" in out and topic in out, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        for secret in (*stack.secrets, password):
            assert secret not in out


@pytest.mark.integration
def test_a_reply_topic_the_worker_may_not_write_costs_its_request_not_the_worker(
    stack: SecureStack, tmp_path: Path
) -> None:
    """``reply_to`` a topic the worker's user may Describe but not Write (an ACL): the broker
    lists it, so the worker sends, and the broker refuses the write. That request ends as a
    dead letter (stage ``reply``, the authorization error in its reason); the requests around
    it, and after it, are answered, and the worker keeps running."""
    from kafka.admin import (
        ACL,
        ACLOperation,
        ACLPermissionType,
        ACLResourcePatternType,
        NewTopic,
        ResourcePattern,
        ResourceType,
    )
    from kafka.admin._users import UserScramCredentialDeletion, UserScramCredentialUpsertion
    from kafka.structs import TopicPartition

    from stream.connect import kafka_admin
    from tests.kafka_helpers import KafkaIO

    s = stack.settings
    user, password = f"replier-{secrets.token_hex(4)}", f"replierpw-{secrets.token_hex(8)}"
    denied = f"fm.replies.readonly-{secrets.token_hex(4)}"  # within the default prefixes
    admin = kafka_admin(s.kafka_config())
    io = KafkaIO(s)  # the stack's own (super) user: requests in, answers and letters out
    log_file = tmp_path / "serve.log"
    try:
        assert admin.alter_user_scram_credentials(
            [UserScramCredentialUpsertion(user, "SCRAM-SHA-512", password)]) == {user: None}
        _grant_all(admin, user)
        result = admin.create_acls([ACL(
            f"User:{user}", "*", ACLOperation.WRITE, ACLPermissionType.DENY,
            ResourcePattern(ResourceType.TOPIC, denied, ACLResourcePatternType.LITERAL))])
        assert not result.get("failed"), result
        admin.create_topics([NewTopic(denied, 1, 1)])
        with log_file.open("w") as out:
            worker = subprocess.Popen(  # noqa: S603
                _fmstream("-v", "serve"), cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                env=_env(s, FMSTREAM_KAFKA_USERNAME=user, FMSTREAM_KAFKA_PASSWORD=password),
            )
        try:
            def request(rid: str, **fields: object) -> tuple[bytes, bytes]:
                return rid.encode(), orjson.dumps(
                    {"request_id": rid, "type": "i2i", "item_id": "i1", "k": 2, **fields})

            def answers() -> dict[str, dict]:
                return {b["request_id"]: b for b in (
                    orjson.loads(r.value) for r in io.consume_all(s.topic_responses))}

            probes: list[str] = []

            def serving() -> bool:  # the worker starts at the end: ask until it answers
                assert worker.poll() is None, log_file.read_text()[-3000:]
                probes.append(f"probe-{len(probes)}")
                io.produce(s.topic_requests, [request(probes[-1])], partition=0)
                return bool(set(probes) & set(answers()))

            wait_for(serving, 180, "the worker to answer as the new user", poll_s=1.0)
            dlq_start = io.end_offsets(s.topic_dlq)
            sent = [request(f"denied-{n}", reply_to=denied) if n % 3 == 1 else
                    request(f"good-{n}") for n in range(12)]
            io.produce(s.topic_requests, sent, partition=0)
            good = {f"good-{n}" for n in range(12) if n % 3 != 1}
            wait_for(lambda: good <= set(answers()), 120, "the good requests answered")

            def letters() -> list[dict]:
                return [orjson.loads(r.value) for r in io.consume_all(s.topic_dlq)
                        if r.offset >= dlq_start.get(TopicPartition(r.topic, r.partition), 0)]

            wait_for(lambda: len(letters()) >= 4, 120, "a dead letter per denied request")
            io.produce(s.topic_requests, [request("after")], partition=0)
            wait_for(lambda: "after" in answers(), 120, "a request after them answered")
            assert worker.poll() is None, log_file.read_text()[-3000:]
            dead, got = letters(), answers()
        finally:
            stop_process(worker, 30)
    finally:
        io.close()
        admin.alter_user_scram_credentials([UserScramCredentialDeletion(user, "SCRAM-SHA-512")])
        admin.close()
    assert worker.returncode == 0, log_file.read_text()[-3000:]
    assert all(got[r]["error"]["code"] == "not_ready" for r in good | {"after"})  # no model
    assert not any(r.startswith("denied") for r in got), got.keys()  # nowhere else either
    assert sorted(d["id"].rsplit("/", 1)[0] for d in dead) == [f"{s.topic_requests}/0"] * 4
    for d in dead:
        assert d["stage"] == "reply" and d["error_class"] == "TopicAuthorizationFailedError", d
        assert d["reason"].startswith(f"reply to {denied!r} ("), d
        assert " bytes) failed: TopicAuthorizationFailedError" in d["reason"], d


def _metric(port: int, name: str) -> float | None:
    """One unlabelled sample of the process's /metrics page (None: not there)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    return None


def _assert_resumed(s: Settings, io, n_valid: int, printed: Callable[[], str],
                    metric: Callable[[str], float | None],
                    lag_problems: Callable[[], list[str]]) -> None:
    """Once the dead-letter topic ``s.topic_dlq`` takes letters: every valid event applied, the
    one letter (offset 6 of events partition 0) delivered, the lag warning gone, the log says so."""
    dlq = s.topic_dlq
    wait_for(lambda: metric("fmstream_trainer_events_applied_total") == n_valid
             and metric("fmstream_dead_letter_topic_blocked_seconds") == 0, 180,
             "every valid event applied and the dead-letter topic unblocked", poll_s=1.0)
    assert metric("fmstream_dead_letters_waiting") == 0
    letters = [orjson.loads(r.value) for r in io.consume_all(dlq, expect=1)]
    assert [d["id"] for d in letters] == [f"{s.topic_events}/0/6"], letters
    wait_for(lambda: not [p for p in lag_problems() if "dead-letter" in p], 60,
             "the lag warning to go", poll_s=1.0)
    assert f"dead-letter topic {dlq} takes letters again" in printed()


def _trainer_probes(s: Settings, log_file: Path, trainer: subprocess.Popen, metrics_port: int,
                    ) -> tuple[Callable[[], str], Callable[[str], float | None],
                               Callable[[], list[str]]]:
    """What a test watches of a running ``fmstream train``: its log (wrapped lines joined), one
    of its metrics (None until /metrics serves; the trainer must still run), and the problems
    ``fmstream lag --json`` reports."""
    def printed() -> str:  # log lines may be wrapped: compare with spaces collapsed
        return " ".join(log_file.read_text().split())

    def metric(name: str) -> float | None:
        assert trainer.poll() is None, log_file.read_text()[-3000:]
        try:
            return _metric(metrics_port, name)
        except OSError:  # not serving /metrics yet
            return None

    def lag_problems() -> list[str]:
        lag = run(s, "lag", "--json")
        assert lag.returncode == 0, lag.output
        return orjson.loads(lag.output.strip().splitlines()[-1])["problems"]

    return printed, metric, lag_problems


@pytest.mark.integration
@pytest.mark.parametrize("fetch_process", ["true", "false"], ids=["fetch-process", "fetch-thread"])
def test_a_dead_letter_topic_the_trainer_may_not_write_holds_intake_visibly_and_resumes(
    stack: SecureStack, tmp_path: Path, fetch_process: str,
) -> None:
    """An ACL denies the trainer's user Write on the dead-letter topic, and a bad event arrives
    among valid ones. The trainer checkpoints and commits nothing past the letter it cannot
    deliver (no loss), and says so: one log line naming the topic and the fix, the metrics
    ``fmstream_dead_letters_waiting`` / ``fmstream_dead_letter_topic_blocked_seconds``, and a
    warning in ``fmstream lag``. Once Write is granted it resumes by itself: the letter is
    delivered, every valid event applied, the warning gone."""
    from kafka.admin import (
        ACL,
        ACLFilter,
        ACLOperation,
        ACLPermissionType,
        ACLResourcePatternType,
        ResourcePattern,
        ResourcePatternFilter,
        ResourceType,
    )
    from kafka.admin._users import UserScramCredentialDeletion, UserScramCredentialUpsertion

    from stream.connect import kafka_admin
    from tests.kafka_helpers import KafkaIO

    s = stack.settings
    dlq = s.topic_dlq
    user, password = f"dlqblocked-{secrets.token_hex(4)}", f"dlqblockedpw-{secrets.token_hex(8)}"
    deny = (f"User:{user}", "*", ACLOperation.WRITE, ACLPermissionType.DENY)
    admin = kafka_admin(s.kafka_config())
    io = KafkaIO(s)  # the stack's own (super) user
    metrics_port = svc.os_picked_port()
    log_file = tmp_path / "train.log"
    valid = [(f"u{n}", {"user_id": f"u{n}", "item_id": f"i{n % 3}", "label": 1, "ts": 1e9 + n})
             for n in range(12)]
    try:
        assert admin.alter_user_scram_credentials(
            [UserScramCredentialUpsertion(user, "SCRAM-SHA-512", password)]) == {user: None}
        _grant_all(admin, user)
        result = admin.create_acls([ACL(*deny, ResourcePattern(
            ResourceType.TOPIC, dlq, ACLResourcePatternType.LITERAL))])
        assert not result.get("failed"), result
        io.produce_json(s.topic_events, valid[:6], partition=0)
        io.produce(s.topic_events, [(b"bad", b"{not json")], partition=0)  # offset 6
        io.produce_json(s.topic_events, valid[6:], partition=0)
        with log_file.open("w") as out:
            trainer = subprocess.Popen(  # noqa: S603
                _fmstream("-v", "train"), cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                env=_env(s, FMSTREAM_KAFKA_USERNAME=user, FMSTREAM_KAFKA_PASSWORD=password,
                         FMSTREAM_TRAINER_METRICS_PORT=str(metrics_port),
                         FMSTREAM_TRAINER_FETCH_PROCESS=fetch_process,
                         FMSTREAM_CHECKPOINT_EVERY_S="2"),
            )
        try:
            printed, metric, lag_problems = _trainer_probes(s, log_file, trainer, metrics_port)

            wait_for(lambda: (metric("fmstream_dead_letter_topic_blocked_seconds") or 0) > 0,
                     180, "the trainer to report the dead-letter topic blocked", poll_s=1.0)
            assert metric("fmstream_dead_letters_waiting") == 1
            assert (f"dead-letter topic {dlq} takes no letters (TopicAuthorizationFailedError)"
                    in printed()), log_file.read_text()[-3000:]
            assert f"grant the trainer's Kafka user (FMSTREAM_KAFKA_USERNAME) Write on topic " \
                f"{dlq}" in printed()
            warned = wait_for(
                lambda: [p for p in lag_problems() if f"dead-letter topic {dlq}" in p], 60,
                "fmstream lag to warn about the dead-letter topic", poll_s=1.0)
            assert "TopicAuthorizationFailedError; 1 waiting" in warned[0], warned
            assert io.consume_all(dlq) == []  # nothing got through, nothing was committed
            assert trainer.poll() is None

            # grant Write (remove the deny): the trainer resumes by itself
            [(_, deleted, error)] = admin.delete_acls([ACLFilter(*deny, ResourcePatternFilter(
                ResourceType.TOPIC, dlq, ACLResourcePatternType.LITERAL))])
            assert error is not None and not error.errno and len(deleted) == 1, (deleted, error)
            _assert_resumed(s, io, len(valid), printed, metric, lag_problems)
        finally:
            stop_process(trainer, 60)
    finally:
        io.close()
        admin.delete_acls([ACLFilter(*deny, ResourcePatternFilter(
            ResourceType.TOPIC, dlq, ACLResourcePatternType.LITERAL))])
        admin.alter_user_scram_credentials([UserScramCredentialDeletion(user, "SCRAM-SHA-512")])
        admin.close()
    out = log_file.read_text()
    assert trainer.returncode == 0, out[-3000:]
    assert f"applied {len(valid)} events, 1 dead letters" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    for secret in (*stack.secrets, password):
        assert secret not in out


@pytest.mark.integration
@pytest.mark.parametrize("fetch_process", ["true", "false"], ids=["fetch-process", "fetch-thread"])
def test_a_missing_dead_letter_topic_is_reported_within_seconds_and_intake_resumes_once_created(
    stack: SecureStack, tmp_path: Path, fetch_process: str,
) -> None:
    """The dead-letter topic does not exist and the broker creates no topic by itself, and a bad
    event arrives among valid ones. The trainer says so within seconds (kafka-python's producer
    would wait 60 s for the topic's metadata per letter; the dead-letter producer waits
    DEAD_LETTER_MAX_BLOCK_MS): the log line naming the topic and `fmstream topics`, the metrics,
    the ``fmstream lag`` warning; nothing past the letter is lost. Once the topic is created it
    resumes by itself: the letter is delivered, every valid event applied."""
    from tests.kafka_helpers import KafkaIO

    s = stack.settings.model_copy(update={"topic_dlq": f"{stack.settings.topic_dlq}.missing"})
    dlq = s.topic_dlq
    io = KafkaIO(s)
    metrics_port = svc.os_picked_port()
    log_file = tmp_path / "train.log"
    valid = [(f"u{n}", {"user_id": f"u{n}", "item_id": f"i{n % 3}", "label": 1, "ts": 1e9 + n})
             for n in range(12)]
    try:
        with log_file.open("w") as out:
            trainer = subprocess.Popen(  # noqa: S603
                _fmstream("-v", "train"), cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                env=_env(s, FMSTREAM_TRAINER_METRICS_PORT=str(metrics_port),
                         FMSTREAM_TRAINER_FETCH_PROCESS=fetch_process,
                         FMSTREAM_CHECKPOINT_EVERY_S="2"),
            )
        try:
            printed, metric, lag_problems = _trainer_probes(s, log_file, trainer, metrics_port)

            # the trainer is up (serving /metrics) before the events arrive
            wait_for(lambda: metric("fmstream_trainer_events_applied_total") is not None, 180,
                     "the trainer to serve /metrics", poll_s=0.5)
            io.produce_json(s.topic_events, valid[:6], partition=0)
            io.produce(s.topic_events, [(b"bad", b"{not json")], partition=0)  # offset 6
            io.produce_json(s.topic_events, valid[6:], partition=0)
            # seconds, not a minute per letter (the old producer's metadata wait)
            wait_for(lambda: (metric("fmstream_dead_letter_topic_blocked_seconds") or 0) > 0,
                     30, "the trainer to report the missing dead-letter topic", poll_s=0.5)
            assert metric("fmstream_dead_letters_waiting") == 1
            assert f"dead-letter topic {dlq} takes no letters (KafkaTimeoutError)" in printed(), \
                log_file.read_text()[-3000:]
            assert f"create topic {dlq} (`fmstream topics`), or let the broker create topics" \
                in printed()
            warned = wait_for(
                lambda: [p for p in lag_problems() if f"dead-letter topic {dlq}" in p], 60,
                "fmstream lag to warn about the dead-letter topic", poll_s=1.0)
            assert "KafkaTimeoutError; 1 waiting" in warned[0], warned
            assert "`fmstream topics`" in warned[0], warned
            if fetch_process == "true":  # the child holds the batch (a fetch thread's events
                # are applied meanwhile, only the checkpoints wait)
                assert metric("fmstream_trainer_events_applied_total") < len(valid)
            assert trainer.poll() is None

            assert dlq in svc.ensure_topics(s)  # what `fmstream topics` does
            _assert_resumed(s, io, len(valid), printed, metric, lag_problems)
        finally:
            stop_process(trainer, 60)
    finally:
        io.close()
    out = log_file.read_text()
    assert trainer.returncode == 0, out[-3000:]
    assert f"applied {len(valid)} events, 1 dead letters" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
