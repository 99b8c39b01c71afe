"""Two workers share the request partitions; kill -9 one under steady load and every request is
still answered (by the survivor after the rebalance), each exactly once to the client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fmstream.settings import Settings
from model.online import OnlineFM, TrainConfig
from model.schema import FeatureSchema
from serving.client import FmClient
from serving.errors import ClientTimeout
from serving.store import VectorStore
from stream.synthetic import SyntheticStream
from tests.kafka_helpers import consume_all
from train.publisher import Publisher
from train.store_writer import StoreWriter

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _published_model(settings: Settings, redis_client) -> SyntheticStream:
    stream = SyntheticStream(users=200, items=300, clusters=5, seed=5)
    model = OnlineFM(FeatureSchema.load(ROOT / "config" / "synthetic.toml"), TrainConfig(dim=8))
    events = list(stream.events(5000))
    for i in range(0, len(events), 1000):
        chunk = events[i:i + 1000]
        model.learn_many([e["user_id"] for e in chunk], [e["item_id"] for e in chunk],
                         contexts=[e["context"] for e in chunk])
    writer = StoreWriter(redis_client, settings.redis_keys(), settings.keep_versions)
    Publisher(settings.publish_config(), writer, model).publish_all()
    return stream


def _worker(settings: Settings, log: Path) -> subprocess.Popen:
    env = {**os.environ, **settings.to_env()}
    return subprocess.Popen([sys.executable, "-m", "fmstream.cli", "-v", "serve"], env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)


def test_kill_one_of_two_workers_under_load(settings: Settings, redis_client, tmp_path) -> None:
    settings = settings.model_copy(update={"worker_session_timeout_ms": 6000})
    stream = _published_model(settings, redis_client)
    store = VectorStore(redis_client, settings.redis_keys())
    workers = [_worker(settings, tmp_path / f"worker{n}.log") for n in range(2)]
    try:
        deadline = time.monotonic() + 90
        while len(store.worker_versions()) < 2:
            assert time.monotonic() < deadline, "workers did not load the index"
            assert all(w.poll() is None for w in workers), "a worker died at start"
            time.sleep(0.3)
        with FmClient(settings) as client:
            # both workers answer once the group has settled
            for _ in range(60):
                if client.request({"type": "u2i", "user_id": "u1"}, timeout=15).error is None:
                    break
            futures = []
            start = time.monotonic()
            killed = False
            n = 0
            while time.monotonic() - start < 14:
                for _ in range(20):
                    futures.append(client.submit(
                        {"type": "u2i", "user_id": f"u{n % stream.users}", "k": 5}, timeout=45))
                    n += 1
                if not killed and time.monotonic() - start > 4:
                    workers[0].send_signal(signal.SIGKILL)
                    killed = True
                time.sleep(0.1)
            answered, timed_out, ids = 0, 0, []
            for f in futures:
                try:
                    resp = f.result(timeout=60)
                except ClientTimeout:
                    timed_out += 1
                    continue
                assert resp.error is None, resp.error
                assert len(resp.items) == 5
                answered += 1
                ids.append(resp.request_id)
        assert killed and workers[0].wait(10) == -signal.SIGKILL
        assert workers[1].poll() is None, "the survivor died"
        # every request answered (the survivor re-reads what the dead worker never committed)
        assert answered + timed_out == len(futures)
        assert answered == len(futures), f"{timed_out} of {len(futures)} timed out"
        assert len(set(ids)) == len(ids), "the client delivered a response twice"
        # On the wire, a request the killed worker answered but had not committed yet is
        # answered again by the survivor; the client drops the repeat (counted here).
        wire = Counter(r.key for r in consume_all(settings, settings.topic_responses))
        repeats = sum(c - 1 for c in wire.values() if c > 1)
        assert repeats < len(futures) * 0.05
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(20)
            except subprocess.TimeoutExpired:
                w.kill()
