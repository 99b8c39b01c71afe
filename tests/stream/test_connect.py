"""The start-up probe (stream/connect.py) against the session's plaintext broker: a SASL
client is told that the listener does not speak SASL, not to change its mechanism."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from fmstream.settings import Settings
from stream.config import KafkaConfig
from stream.connect import ProtocolMismatch, check_kafka


def test_sasl_to_a_plaintext_listener_names_the_security_protocol(settings: Settings) -> None:
    conn = KafkaConfig(settings.kafka_bootstrap, security_protocol="SASL_PLAINTEXT",
                       sasl_mechanism="SCRAM-SHA-512", username="bob",
                       password=SecretStr("pw-Tr93"))
    with pytest.raises(ProtocolMismatch) as err:  # it said: check FMSTREAM_KAFKA_SASL_MECHANISM
        check_kafka(conn)
    text = str(err.value)
    assert "offers no SASL mechanism" in text and "FMSTREAM_KAFKA_SECURITY_PROTOCOL" in text
    assert "FMSTREAM_KAFKA_SASL_MECHANISM" not in text and "pw-Tr93" not in text
