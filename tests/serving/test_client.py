"""FmClient against the real Kafka, answered by a tiny echo loop standing in for a worker."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest
from kafka import TopicPartition
from kafka_helpers import delete_topics

from fmstream import services as fm_services
from fmstream.settings import Settings
from serving.client import FmClient
from serving.errors import ClientError, ClientTimeout
from stream.connect import kafka_consumer, kafka_producer
from stream.schemas import Request, Response, ScoredItem, dumps, loads_object

SILENT_USER = "silent"  # the echo never answers requests for this user


class Echo:
    """Reads the request topic (no group) and answers each request on its reply topic.

    Each polled batch is answered in shuffled order, with a stray response for an unknown id
    first, so correlation must be by request id, not by order.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = threading.Event()
        self.seen = 0
        self.consumer = kafka_consumer(
            settings.kafka_config(), group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", fetch_max_wait_ms=10,
        )
        parts = self.consumer.partitions_for_topic(settings.topic_requests)
        self.consumer.assign([TopicPartition(settings.topic_requests, p) for p in parts])
        self.producer = kafka_producer(settings.kafka_config(), linger_ms=0)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        rng = random.Random(0)
        while not self.stop.is_set():
            records = [r for batch in self.consumer.poll(timeout_ms=50).values() for r in batch]
            rng.shuffle(records)
            if records:
                stray = Response(request_id="not-a-request-of-anyone")
                self.producer.send(self.settings.topic_responses, value=dumps(stray))
            for record in records:
                req = Request.model_validate(loads_object(record.value))
                self.seen += 1
                if req.user_id == SILENT_USER:
                    continue
                reply = Response(
                    request_id=req.request_id,
                    items=[ScoredItem(item_id=f"{req.user_id}:{j}", score=float(req.k))
                           for j in range(min(req.k, 3))],
                    model_version=1,
                )
                topic = req.reply_to or self.settings.topic_responses
                self.producer.send(topic, key=record.key, value=dumps(reply))
            self.producer.flush()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.consumer.close()
        self.producer.close(timeout=5)


@pytest.fixture
def echo(settings: Settings) -> Iterator[Echo]:
    e = Echo(settings)
    yield e
    e.close()


def test_round_trip_with_generated_id(settings: Settings, echo: Echo) -> None:
    with FmClient(settings) as client:
        response = client.request({"type": "u2i", "user_id": "196", "k": 2}, timeout=10)
        assert len(response.request_id) == 32  # uuid4 hex
        assert [i.item_id for i in response.items] == ["196:0", "196:1"]
        assert response.model_version == 1
        typed = client.request(Request(request_id="r-typed", type="u2i", user_id="7"))
        assert typed.request_id == "r-typed"


def test_many_in_flight_are_correlated_by_id(settings: Settings, echo: Echo) -> None:
    with FmClient(settings) as client:
        reqs = [{"request_id": f"r{i}", "type": "u2i", "user_id": f"u{i}", "k": 1 + i % 7}
                for i in range(300)]
        responses = client.request_many(reqs, timeout=20)
        assert all(r is not None for r in responses)
        for req, resp in zip(reqs, responses, strict=True):
            assert resp is not None and resp.request_id == req["request_id"]
            assert resp.items[0].item_id == f"{req['user_id']}:0"
            assert resp.items[0].score == req["k"]
        futures = [client.submit({"type": "i2i", "item_id": "x", "user_id": f"f{i}"})
                   for i in range(50)]
        assert [f.result(10).items[0].item_id for f in futures] == [f"f{i}:0" for i in range(50)]
        assert client.in_flight == 0


def test_timeout_raises_and_unanswered_are_none(settings: Settings, echo: Echo) -> None:
    with FmClient(settings) as client:
        started = time.monotonic()
        with pytest.raises(ClientTimeout, match="no response to request"):
            client.request({"type": "u2i", "user_id": SILENT_USER}, timeout=0.5)
        assert 0.5 <= time.monotonic() - started < 3
        got = client.request_many(
            [{"type": "u2i", "user_id": "a"}, {"type": "u2i", "user_id": SILENT_USER}], timeout=2
        )
        assert got[0] is not None and got[1] is None
        future = client.submit({"type": "u2i", "user_id": SILENT_USER}, timeout=0.3)
        with pytest.raises(ClientTimeout):
            future.result(5)
        assert client.in_flight == 0


def test_custom_reply_topic(settings: Settings, echo: Echo) -> None:
    mine = settings.model_copy(update={"topic_responses": settings.topic_responses + ".mine"})
    fm_services.ensure_topics(mine)
    try:
        with FmClient(settings, reply_topic=mine.topic_responses) as client:
            response = client.request({"type": "u2i", "user_id": "z"}, timeout=10)
            assert response.items[0].item_id == "z:0"
            with pytest.raises(ClientError, match="would never arrive"):
                client.submit({"type": "u2i", "user_id": "z", "reply_to": "elsewhere"})
    finally:
        delete_topics(settings, [mine.topic_responses])


def test_invalid_request_and_missing_topic(settings: Settings) -> None:
    with FmClient(settings) as client:
        with pytest.raises(ClientError, match="invalid request"):
            client.submit({"type": "nonsense"})
    with pytest.raises(ClientError, match="not found"):
        FmClient(settings, reply_topic="no-such-topic-" + settings.redis_prefix.strip(":"),
                 connect_timeout=1.0)
