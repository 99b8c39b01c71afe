"""docker-compose.yml runs the Kafka that the tests run (the jars of infra/kafka/pom.xml)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from fmstream.services import kafka_dir
from fmstream.settings import Settings

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


# The apache/kafka image writes every KAFKA_* variable into server.properties (KAFKA_ dropped,
# lower case, `_` -> `.`) except these, which its launch scripts hand to the JVM instead
# (ExcludeServerPropsEnv in apache/kafka core/src/main/scala/kafka/docker/KafkaDockerWrapper.scala;
# bin/kafka-server-start.sh reads KAFKA_HEAP_OPTS).
IMAGE_EXCLUDES = {"KAFKA_VERSION", "KAFKA_HEAP_OPTS", "KAFKA_LOG4J_OPTS", "KAFKA_OPTS",
                  "KAFKA_JMX_OPTS", "KAFKA_JVM_PERFORMANCE_OPTS", "KAFKA_GC_LOG_OPTS",
                  "KAFKA_LOG4J_ROOT_LOGLEVEL", "KAFKA_LOG4J_LOGGERS", "KAFKA_TOOLS_LOG4J_LOGLEVEL",
                  "KAFKA_JMX_HOSTNAME"}


def _kafka_environment() -> dict[str, str]:
    """The ``environment:`` mapping of the compose file's ``kafka`` service."""
    text = (ROOT / "docker-compose.yml").read_text()
    service = re.search(r"^  kafka:\n((?:    .*\n|\s*\n)+)", text, flags=re.MULTILINE)
    assert service, "no kafka service in docker-compose.yml"
    env = re.search(r"^    environment:\n((?:      .*\n)+)", service.group(1), flags=re.MULTILINE)
    assert env, "the kafka service has no environment"
    pairs = (line.strip().split(":", 1) for line in env.group(1).splitlines()
             if line.strip() and not line.strip().startswith("#"))
    return {k.strip(): v.split(" #")[0].strip().strip('"') for k, v in pairs}


def test_every_kafka_variable_is_a_local_broker_property_or_left_to_the_jvm(
        services: Settings) -> None:
    """The compose broker is configured as fmstream/services.py configures the local one: each
    KAFKA_* variable the image turns into a server.properties entry names a property the local
    broker sets; the rest are variables the image keeps out of server.properties (a JVM option
    such as KAFKA_HEAP_OPTS written there would be a bogus property, and the heap the default)."""
    written = (kafka_dir(services) / "server.properties").read_text()  # the session's broker
    local = {line.split("=", 1)[0] for line in written.splitlines()
             if line and not line.startswith("#")}
    env = _kafka_environment()
    assert env["KAFKA_HEAP_OPTS"].startswith("-Xmx"), env
    as_properties = {k: k.removeprefix("KAFKA_").lower().replace("_", ".") for k in env
                     if k.startswith("KAFKA_") and k not in IMAGE_EXCLUDES}
    unknown = {k: p for k, p in as_properties.items() if p not in local}
    assert not unknown, f"KAFKA_* variables that are no local-broker property: {unknown}"
    assert len(as_properties) >= 15, as_properties  # the parse found the service's settings
