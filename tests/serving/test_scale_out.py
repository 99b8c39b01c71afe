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
from stream.lag import group_lag
from stream.synthetic import SyntheticStream
from tests.kafka_helpers import consume_all, wait_for
from tests.process_helpers import stop_processes
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


def _committed(settings: Settings) -> dict[int, int]:
    """The serving group's committed offset per request partition (absent: none yet)."""
    lags = group_lag(settings.kafka_config(), settings.serving_group, [settings.topic_requests])
    return {p.partition: p.committed for p in lags if p.committed is not None}


def test_kill_one_of_two_workers_under_load(settings: Settings, redis_client, tmp_path) -> None:
    """What at-least-once delivery guarantees, checked per partition on observable state: every
    request is answered, the client delivers each answer once, and nothing the group had
    committed before the kill is answered again (repeats are only the dead worker's uncommitted
    tail, which the survivor re-reads)."""
    settings = settings.model_copy(update={"worker_session_timeout_ms": 6000})
    stream = _published_model(settings, redis_client)
    store = VectorStore(redis_client, settings.redis_keys())
    workers = [_worker(settings, tmp_path / f"worker{n}.log") for n in range(2)]
    partitions = settings.partitions_requests
    try:
        wait_for(lambda: len(store.worker_versions()) >= 2
                 and all(w.poll() is None for w in workers), 180, "both workers to load")
        with FmClient(settings) as client:
            # both workers answer once the group has settled
            wait_for(lambda: client.request({"type": "u2i", "user_id": "u1"},
                                            timeout=15).error is None, 180, "a first answer")
            futures: list = []
            n = 0

            def send(burst: int = 20) -> list:
                nonlocal n
                sent = []
                for _ in range(burst):
                    sent.append(client.submit(
                        {"type": "u2i", "user_id": f"u{n % stream.users}", "k": 5}, timeout=180))
                    n += 1
                futures.extend(sent)
                return sent

            def answered(fs: list) -> int:
                return sum(1 for f in fs if f.done() and f.exception() is None)

            # load until both workers answered and committed on every partition (observable)
            committed: dict[int, int] = {}
            while not (answered(futures) >= 200 and len(committed) == partitions
                       and all(c > 0 for c in committed.values())):
                send()
                time.sleep(0.1)
                if len(futures) % 200 == 0:
                    committed = _committed(settings)
                assert len(futures) < 40_000, "the group never committed every partition"
            # the wire before the kill: a repeat already there is the start's handover (the
            # two-worker start test's subject), not the kill's
            before = Counter(r.key.decode() for r in consume_all(
                settings, settings.topic_responses, timeout_s=60))
            committed = _committed(settings)  # only grows from here: a lower bound at the kill
            workers[0].send_signal(signal.SIGKILL)
            # load on until 300 requests sent after the kill were answered (by the survivor)
            after: list = []
            while answered(after) < 300:
                after += send()
                time.sleep(0.1)
                assert len(after) < 40_000, "the survivor never answered"
            timed_out, ids = 0, []
            for f in futures:
                try:
                    resp = f.result(timeout=240)
                except ClientTimeout:
                    timed_out += 1
                    continue
                assert resp.error is None, resp.error
                assert len(resp.items) == 5
                ids.append(resp.request_id)
        assert workers[0].wait(10) == -signal.SIGKILL
        assert workers[1].poll() is None, "the survivor died"
        # every request answered (the survivor re-reads what the dead worker never committed)
        assert timed_out == 0 and len(ids) == len(futures), \
            f"{timed_out} of {len(futures)} timed out"
        assert len(set(ids)) == len(ids), "the client delivered a response twice"
        # On the wire, a request the killed worker answered but had not committed yet is
        # answered again by the survivor (the client drops the repeat). Per partition, no
        # request below the offset committed before the kill is ever answered twice.
        where = {r.key.decode(): (r.partition, r.offset)
                 for r in consume_all(settings, settings.topic_requests, expect=len(futures),
                                      timeout_s=60)}
        wire = Counter(r.key.decode() for r in consume_all(
            settings, settings.topic_responses, expect=len(futures), timeout_s=60))
        assert set(wire) >= set(where), "a request was never answered on the wire"
        for rid, count in wire.items():
            if count > 1 and count > before.get(rid, 0):
                partition, offset = where[rid]
                assert offset >= committed[partition], (
                    f"{rid} (partition {partition}, offset {offset}) answered {count} times "
                    f"though the group had committed up to {committed[partition]}")
    finally:
        stop_processes(workers, 20)
