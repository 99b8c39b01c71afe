"""The worker's one door to kafka-python's private group coordinator, on a real
``KafkaConsumer``: fails on a kafka-python upgrade that drops or changes what the worker reads
(then update ``serving/coordinator.py`` and its pin in pyproject.toml together)."""

from __future__ import annotations

import inspect
import logging
import time
from importlib.metadata import version

import pytest
from kafka import KafkaConsumer
from kafka.structs import MemberState

from fmstream.settings import Settings
from serving import coordinator as coordinator_module
from serving.coordinator import USED, WRITTEN_AGAINST, GroupCoordinator
from stream.config import KafkaConfig
from stream.connect import kafka_consumer
from tests.kafka_helpers import wait_for


@pytest.fixture
def consumer():
    # no broker is needed: nothing here polls; api_version skips the version probe
    consumer = kafka_consumer(KafkaConfig("127.0.0.1:1"), group_id="coordinator-test",
                              api_version=(3, 9))
    yield consumer
    consumer.close(autocommit=False, timeout_ms=0)


def test_kafka_python_is_the_release_the_door_was_written_against() -> None:
    installed = version("kafka-python")
    assert installed.split(".")[:2] == WRITTEN_AGAINST.split(".")[:2], (
        f"kafka-python {installed} installed; serving/coordinator.py reads private attributes "
        f"as of {WRITTEN_AGAINST}: check them, then update WRITTEN_AGAINST and the pin")


def test_every_private_attribute_the_worker_reads_is_there(consumer: KafkaConsumer) -> None:
    door = GroupCoordinator(consumer)
    assert door.missing() == [], f"kafka-python {version('kafka-python')} dropped {door.missing()}"
    assert door.last_heartbeat() == float("-inf")  # never heartbeated: a float, not None
    assert inspect.iscoroutinefunction(door.commit_in_listener())
    assert list(inspect.signature(door.commit_in_listener()).parameters) == [
        "offsets", "timeout_ms"]


@pytest.mark.integration
def test_on_a_real_group_heartbeats_are_seen_and_a_requested_rejoin_happens(
    settings: Settings,
) -> None:
    consumer = kafka_consumer(settings.kafka_config(), group_id=settings.serving_group,
                              session_timeout_ms=6000, heartbeat_interval_ms=300)
    try:
        door = GroupCoordinator(consumer)
        consumer.subscribe([settings.topic_requests])

        def stable_generation() -> int | None:
            consumer.poll(timeout_ms=500)
            meta = consumer.group_metadata()
            return meta.generation_id if meta.state is MemberState.STABLE else None

        first = wait_for(stable_generation, 60, "a stable member")
        joined = time.monotonic()
        wait_for(lambda: stable_generation() and door.last_heartbeat() > joined, 60,
                 "a heartbeat answered after the join")
        assert not door.rejoin_needed()
        assert door.request_rejoin() and door.rejoin_needed()
        wait_for(lambda: (stable_generation() or 0) > first, 60, "a rejoin (a new generation)")
        assert not door.rejoin_needed()
    finally:
        consumer.close(autocommit=False)


def test_without_a_coordinator_everything_degrades_and_says_so_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(coordinator_module, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="serving.coordinator"):
        door = GroupCoordinator(object())
        GroupCoordinator(object())
    assert door.missing() == list(USED)
    assert door.last_heartbeat() is None and not door.rejoin_needed()
    assert not door.request_rejoin() and door.commit_in_listener() is None
    assert caplog.text.count("lacks heartbeat.last_receive") == 1
