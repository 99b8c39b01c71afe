"""docker-compose.yml runs the Kafka that the tests run (the jars of infra/kafka/pom.xml)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_compose_broker_is_the_kafka_of_the_jars() -> None:
    pom = ET.parse(ROOT / "infra" / "kafka" / "pom.xml").getroot()
    ns = {"m": pom.tag.partition("}")[0].lstrip("{")} if pom.tag.startswith("{") else {}
    version = pom.find("m:properties/m:kafka.version" if ns else "properties/kafka.version", ns)
    assert version is not None and version.text
    images = re.findall(r"^\s*image:\s*apache/kafka:(\S+)", (ROOT / "docker-compose.yml")
                        .read_text(), flags=re.MULTILINE)
    assert images == [version.text.strip()], (
        f"docker-compose.yml runs apache/kafka:{images}, the jars are Kafka {version.text}")


def test_every_published_port_is_bound_to_the_hosts_loopback() -> None:
    """Kafka and Redis run without credentials in the compose file and Grafana admits anonymous
    viewers: a port published on every host interface would open them to the network."""
    text = (ROOT / "docker-compose.yml").read_text()
    blocks = re.findall(r"^(\s*)ports:\n((?:\1\s+(?:-.*|#.*)\n)+)", text, flags=re.MULTILINE)
    ports = [line.strip()[1:].strip().split("#")[0].strip().strip('"')
             for _, block in blocks for line in block.splitlines() if line.strip().startswith("-")]
    assert len(ports) == 5, ports  # kafka, redis, trainer /metrics, prometheus, grafana
    assert all(p.startswith("127.0.0.1:") and p.count(":") == 2 for p in ports), ports
