"""Fixtures of every integration test: the real Kafka and Redis this session starts.

``services`` (session) starts a single-node Kafka and a Redis with the same code as
``fmstream up`` (:func:`fmstream.services.up`) under a temporary run dir, and stops them at the end.
It never skips: if a service cannot start, every test that needs it fails with the reason.
``settings`` (per test) gives each test its own topics, consumer groups, Redis key prefix and
checkpoint folder on those shared services. Tests that stop a service need not restart it: the
next ``settings`` brings it back.
"""

from __future__ import annotations

import logging
import re
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

# kafka-python's schema loader uses deprecated importlib.resources calls; silence them here for
# the imports below and in pytest_configure for the tests.
_KAFKA_NOISE = ("read_text is deprecated", "open_text is deprecated")
for _message in _KAFKA_NOISE:
    warnings.filterwarnings("ignore", message=_message, category=DeprecationWarning)

import redis  # noqa: E402

from fmstream import services as fm_services  # noqa: E402
from fmstream.settings import Settings  # noqa: E402
from stream.connect import redis_client as connect_redis  # noqa: E402
from tests.kafka_helpers import KafkaIO, delete_topics  # noqa: E402
from tests.process_helpers import hermetic_settings  # noqa: E402

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
# Away from the defaults of `fmstream up`, so tests never touch a developer's running stack, and
# below 32768 (outside Linux's ephemeral range, where any client socket may hold a port).
PREFERRED_PORTS = {"kafka_port": 19092, "kafka_controller_port": 19093, "redis_port": 16379}


def pytest_configure(config: pytest.Config) -> None:
    """Silence kafka-python's own deprecation noise (importlib.resources in its schema loader)."""
    for message in _KAFKA_NOISE:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:DeprecationWarning")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the session's services as ``integration``."""
    for item in items:
        if "services" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


def _session_ports(preferred: dict[str, int] = PREFERRED_PORTS) -> dict[str, int]:
    """The preferred ports where free (checked by binding), else ports the OS picks (another
    session, a leftover broker). The session must own its services: the fault tests stop and
    restart them."""
    ports = fm_services.free_ports(preferred)
    if ports != preferred:
        logger.warning("ports %s are taken; this session uses %s", preferred, ports)
    return ports


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Start Kafka and Redis for the session (via ``services.up``); yields their base Settings."""
    run_dir = tmp_path_factory.mktemp("services")
    ports = _session_ports()
    base = hermetic_settings(
        run_dir=run_dir,
        kafka_libs=REPO_ROOT / "infra" / "kafka" / "target" / "libs",
        kafka_bootstrap=f"{fm_services.LOOPBACK}:{ports['kafka_port']}",
        redis_url=f"redis://{fm_services.LOOPBACK}:{ports['redis_port']}/0",
        checkpoint_dir=run_dir / "checkpoints",
        # In-process workers share pytest's process: a request loop stuck for the watchdog's
        # limit would end the whole session (status 75). A larger bound than the default keeps
        # that for a real hang; the watchdog's own tests set theirs.
        worker_watchdog_s=120.0,
        **ports,
    )
    try:
        started = fm_services.up(base)
    except fm_services.ServiceError as exc:
        fm_services.down(base)
        pytest.fail(f"could not start the test services (run dir {run_dir}): {exc}", pytrace=False)
    logger.info("test services: %s", started)
    try:
        yield base
    finally:
        fm_services.down(base)


def _heal(base: Settings) -> None:
    """Bring back a service that an earlier test stopped and left down."""
    if fm_services.port_open(base.kafka_port) and fm_services.port_open(base.redis_port):
        return
    logger.info("restarting services an earlier test left stopped")
    try:
        fm_services.up(base)
    except fm_services.ServiceError as exc:
        pytest.fail(f"could not restart the test services: {exc}", pytrace=False)


def _unique_suffix(request: pytest.FixtureRequest) -> str:
    name = re.sub(r"[^A-Za-z0-9-]+", "-", request.node.name).strip("-")[:40]
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def settings(
    services: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Settings]:
    """Per-test Settings: own topics (created), groups, Redis prefix and checkpoint folder."""
    _heal(services)
    suffix = _unique_suffix(request)
    topic_fields = ("events", "users", "items", "requests", "responses", "dlq")
    update: dict[str, object] = {
        f"topic_{f}": f"{getattr(services, f'topic_{f}')}.{suffix}" for f in topic_fields
    }
    update.update(
        trainer_group=f"{services.trainer_group}.{suffix}",
        serving_group=f"{services.serving_group}.{suffix}",
        redis_prefix=f"fmtest:{suffix}:",
        checkpoint_dir=tmp_path / "checkpoints",
    )
    per_test = services.model_copy(update=update)
    fm_services.ensure_topics(per_test)
    yield per_test
    _cleanup(per_test)


def _cleanup(per_test: Settings) -> None:
    """Drop the test's topics and Redis keys (best effort: a test may have stopped a service)."""
    if fm_services.port_open(per_test.kafka_port):
        try:
            delete_topics(per_test, per_test.topic_partitions)
        except Exception as exc:  # noqa: BLE001 - cleanup must not fail the test
            logger.warning("could not delete the test's topics: %r", exc)
    if fm_services.port_open(per_test.redis_port):
        client = connect_redis(per_test.redis_config(), socket_timeout=2.0)
        try:
            keys = list(client.scan_iter(match=per_test.redis_prefix + "*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
        except redis.RedisError as exc:
            logger.warning("could not delete the test's Redis keys: %r", exc)
        finally:
            client.close()


@pytest.fixture
def redis_client(settings: Settings) -> Iterator[redis.Redis]:
    """A client of the session's Redis (bytes in, bytes out)."""
    client = connect_redis(settings.redis_config(), decode_responses=False)
    yield client
    client.close()


@pytest.fixture
def kafka_io(settings: Settings) -> Iterator[KafkaIO]:
    """Raw produce / read-back on the session's broker (see ``tests/kafka_helpers.py``)."""
    io = KafkaIO(settings)
    yield io
    io.close()
