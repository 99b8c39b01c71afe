"""serve_process_metrics: the /metrics plumbing the trainer and a worker share, against the
session's broker (the lag collector reads the real group)."""

from __future__ import annotations

import socket
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from fmstream.settings import Settings
from stream.config import MetricsEndpoint
from stream.metrics import serve_process_metrics
from tests.kafka_helpers import wait_for


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int, host: str = "127.0.0.1") -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_port_zero_serves_nothing_and_attaches_nothing(settings: Settings) -> None:
    attached: list[Any] = []
    built: list[CollectorRegistry] = []
    with serve_process_metrics(MetricsEndpoint(0), settings.kafka_config(), settings.trainer_group,
                               [settings.topic_events], built.append, attached.append) as m:
        assert m is None
    assert attached == [] and built == []


def test_metrics_and_group_lag_are_served_attached_then_detached(settings: Settings) -> None:
    port = _free_port()
    attached: list[Any] = []

    def build(registry: CollectorRegistry) -> Counter:
        return Counter("fmstream_test_things", "things", registry=registry)

    with serve_process_metrics(MetricsEndpoint(port), settings.kafka_config(),
                               settings.trainer_group, [settings.topic_events], build,
                               attached.append) as metrics:
        assert isinstance(metrics, Counter) and attached == [metrics]
        metrics.inc(3)
        text = wait_for(lambda: (t := _scrape(port)) and "kafka_consumergroup_lag{" in t and t,
                        what="the group's lag in a scrape")
        assert "fmstream_test_things_total 3.0" in text
        assert f'consumergroup="{settings.trainer_group}"' in text
        assert f'topic="{settings.topic_events}"' in text
        assert "process_cpu_seconds_total" in text  # new_registry's process collector
    assert attached == [metrics, None]
    with pytest.raises(OSError):
        _scrape(port)  # the server is down once the block exits


def test_the_metrics_host_setting_is_the_address_the_server_binds(settings: Settings) -> None:
    """FMSTREAM_METRICS_HOST reaches the socket: bound to 127.0.0.2, the endpoint answers there
    and not on 127.0.0.1 (the same port: only the address differs)."""
    port = _free_port()
    settings = settings.model_copy(update={"metrics_host": "127.0.0.2",
                                           "trainer_metrics_port": port})
    endpoint = settings.trainer_metrics()
    assert endpoint == MetricsEndpoint(port, "127.0.0.2")
    with serve_process_metrics(endpoint, settings.kafka_config(), settings.trainer_group,
                               [settings.topic_events], lambda registry: None, lambda m: None):
        assert "process_cpu_seconds_total" in _scrape(port, "127.0.0.2")
        with pytest.raises(OSError):
            _scrape(port, "127.0.0.1")
