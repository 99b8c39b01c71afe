"""The whole loop on the real Kafka and Redis: events in, trainer, publisher, worker, answers out,
from our client and from kcat (a Kafka client we did not write)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from fmstream.settings import Settings
from serving.client import FmClient
from serving.store import VectorStore
from stream.connect import redis_client
from stream.consume import make_producer
from stream.replay import produce_events, produce_profiles
from stream.synthetic import SyntheticStream
from tests.kafka_helpers import wait_for
from tests.worker_helpers import trainer_and_worker

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
STREAM = SyntheticStream(users=300, items=200, clusters=5, seed=3)


@pytest.fixture
def loop(settings: Settings) -> Iterator[Settings]:
    """Trainer and worker running in threads on this test's topics."""
    settings = settings.model_copy(update={
        "dim": 16, "schema_path": ROOT / "config" / "synthetic.toml",
        "publish_items_s": 0.5, "publish_active_s": 0.2, "checkpoint_every_s": 1.0,
    })
    with trainer_and_worker(settings):
        yield settings



def test_u2i_returns_the_users_planted_cluster(loop: Settings) -> None:
    settings = loop
    producer = make_producer(settings.kafka_config())
    produce_profiles(producer, settings.topics(), STREAM.user_profiles(), STREAM.item_profiles())
    produce_events(producer, settings.topics(), STREAM.events(20_000))
    producer.send(settings.topic_events, key=b"u1", value=b"{malformed")
    producer.close()

    users = [f"u{n}" for n in range(0, 300, 15)]
    store = VectorStore(redis_client(settings.redis_config()), settings.redis_keys())
    wait_for(lambda: int(store.get_status().get("events_applied", 0)) >= 20_000, 120,
              "the trainer to apply the whole stream")
    # the trainer's test-then-train hit rate reaches the status hash (`fmstream lag` shows it)
    wait_for(lambda: "live_hit_rate_warm" in store.get_status(), 60, "a live hit rate")
    assert 0.0 < float(store.get_status()["live_hit_rate_warm"]) <= 1.0
    assert 0 < int(store.get_status()["live_samples_warm"]) <= 2000  # its window

    def served_newest() -> bool:
        newest = int(store.get_status().get("model_version", 0))
        served = store.worker_versions().values()
        return bool(served) and min(served) >= newest

    wait_for(served_newest, 60, "the worker to serve the newest snapshot")
    with FmClient(settings) as client:
        responses = client.request_many(
            [{"type": "u2i", "user_id": u, "k": 10} for u in users], timeout=20)
    same = total = 0
    for u, resp in zip(users, responses, strict=True):
        assert resp is not None and resp.error is None, resp
        assert len(resp.items) == 10
        total += 10
        same += sum(STREAM.item_cluster(i.item_id) == STREAM.user_cluster(u) for i in resp.items)
    # chance is 1/5; a model that learned the planted structure is far above it
    assert same / total > 0.6, f"only {same}/{total} recommendations from the user's cluster"


def _kcat(*args: str, data: bytes | None = None, timeout: float = 30) -> bytes:
    return subprocess.run(["kcat", *args], input=data, capture_output=True, check=True,
                          timeout=timeout).stdout


def test_kcat_events_and_requests_are_answered(loop: Settings) -> None:
    settings = loop
    b = settings.kafka_bootstrap
    lines = [orjson.dumps({"user_id": f"k{n % 7}", "item_id": f"x{n % 11}", "label": 1,
                           "ts": 1.7e9 + n, "context": {"hour": "14"}}) for n in range(300)]
    payload = b"".join(f"k{n % 7}|".encode() + line + b"\n" for n, line in enumerate(lines))
    _kcat("-b", b, "-P", "-t", settings.topic_events, "-K", "|", data=payload)

    rid = f"kcat-{uuid.uuid4().hex[:8]}"
    request = orjson.dumps({"request_id": rid, "type": "u2i", "user_id": "k3", "k": 5})

    def answered():
        _kcat("-b", b, "-P", "-t", settings.topic_requests, "-k", rid, data=request + b"\n")
        out = _kcat("-b", b, "-C", "-t", settings.topic_responses, "-o", "beginning", "-e",
                    "-f", "%k\t%s\n")
        for line in out.decode().splitlines():
            key, _, body = line.partition("\t")
            if key == rid:
                resp = orjson.loads(body)
                if resp["error"] is None and resp.get("fallback") is None:
                    return resp
        return None

    resp = wait_for(answered, 90, "kcat's request to be answered")
    assert resp["request_id"] == rid
    assert len(resp["items"]) == 5
    assert all(i["item_id"].startswith("x") for i in resp["items"])
    assert resp["model_version"] >= 1
