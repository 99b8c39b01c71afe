"""A record the broker refuses for good (a reply over the response topic's ``max.message.bytes``)
costs its own request only: later replies and dead letters of the worker still go out.

kafka-python 3.0.12's idempotent producer takes any produce error it cannot retry for a fatal
one and fails every later send (bench/RESULTS.md, "wire" and "producer" sections)."""

from __future__ import annotations

import orjson
import redis
from kafka.admin import ConfigResource, ConfigResourceType

from fmstream.settings import Settings
from stream.connect import kafka_admin
from tests.kafka_helpers import KafkaIO
from tests.serving.test_worker_faults import N_ITEMS, publish_items
from tests.worker_helpers import start_worker

SMALL_LIMIT = 2048  # bytes: a k=3 answer fits, a k=200 one does not


def limit_topic(settings: Settings, topic: str, max_bytes: int) -> None:
    """Lower ``topic``'s ``max.message.bytes`` (as an operator may)."""
    admin = kafka_admin(settings.kafka_config())
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic,
                                            configs={"max.message.bytes": str(max_bytes)})])
    finally:
        admin.close()


def i2i(rid: str, n: int, k: int) -> bytes:
    return orjson.dumps({"request_id": rid, "type": "i2i", "item_id": f"i{n % N_ITEMS}", "k": k})


def test_an_answer_over_the_response_topics_limit_costs_only_its_request(
    settings: Settings, redis_client: redis.Redis, kafka_io: KafkaIO
) -> None:
    store = publish_items(settings, redis_client)
    limit_topic(settings, settings.topic_responses, SMALL_LIMIT)
    running = start_worker(settings, store, "refusals-worker")
    try:
        kafka_io.produce(settings.topic_requests, [("big", i2i("big", 1, 200))])
        # the refused answer is dead-lettered (not lost silently), naming the answer's size
        [letter] = kafka_io.consume_until(
            settings.topic_dlq, lambda rs: len(rs) >= 1, timeout_s=60)
        body = orjson.loads(letter.value)
        assert body["stage"] == "reply" and body["source_offset"] == 0, body
        assert "MessageSizeTooLarge" in body["reason"] and "bytes" in body["reason"], body
        good = [f"good{n}" for n in range(3)]
        kafka_io.produce(settings.topic_requests, [(rid, i2i(rid, n, 3))
                                                   for n, rid in enumerate(good)])
        # requests after the refusal are answered (before the fix: never, the producer fatal)
        records = kafka_io.consume_until(
            settings.topic_responses,
            lambda rs: set(good) <= {r.key.decode() for r in rs}, timeout_s=60)
        answers = {r.key.decode(): orjson.loads(r.value) for r in records}
        assert "big" not in answers
        assert all(answers[rid].get("error") is None for rid in good), answers
        # and a later refusal is dead-lettered too
        kafka_io.produce(settings.topic_requests, [("big2", i2i("big2", 2, 200))])
        letters = kafka_io.consume_until(settings.topic_dlq, lambda rs: len(rs) >= 2,
                                         timeout_s=60)
        assert [orjson.loads(r.value)["key"] for r in letters] == ["big", "big2"]
    finally:
        running.close()
