"""The Kafka-path quality check, small (issue 11 item 4): a planted-cluster stream replayed
through Kafka into the real trainer and asked through the request topic at interval boundaries,
scored by ``bench.quality.run`` (the protocol of ``bench/quality.py``) beside the same FM in
process. ``bench/quality_kafka.py`` is the full version on MovieLens."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.quality import Data, Model, make, period, run
from bench.quality_kafka import KafkaFM, Lists, overlap
from fmstream import app
from fmstream.app import new_model, run_trainer, run_worker
from fmstream.settings import Settings
from model import FeatureSchema, OnlineFM
from serving.client import FmClient
from serving.store import VectorStore
from stream.connect import redis_client as connect_redis
from stream.synthetic import SyntheticStream

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "config" / "synthetic.toml"
STREAM = SyntheticStream(users=150, items=100, clusters=5, seed=11)


def synthetic_data(stream: SyntheticStream, n: int) -> Data:
    """The stream as the bench's ``Data`` (every event a positive, in time order)."""
    events = list(stream.events(n))
    users = [p["user_id"] for p in stream.user_profiles()]
    items = [p["item_id"] for p in stream.item_profiles()]
    uix, iix = {u: j for j, u in enumerate(users)}, {i: j for j, i in enumerate(items)}
    return Data(
        u=np.array([uix[e["user_id"]] for e in events]),
        i=np.array([iix[e["item_id"]] for e in events]),
        ts=np.array([e["ts"] for e in events]),
        pos=np.ones(n, dtype=bool),
        user_ids=users,
        item_ids=items,
        user_profiles=[p["features"] for p in stream.user_profiles()],
        item_profiles=[p["features"] for p in stream.item_profiles()],
        segment=np.arange(len(users)) % stream.clusters,
    )


class TrainerModel(Model):
    """The trainer's own model, read directly (scored as ``bench.quality`` scores in process):
    what the worker's answers must reproduce."""

    name = "the trainer's model"
    uses_profile = True

    def __init__(self, d: Data, models: list[OnlineFM]) -> None:
        self.d, self.models = d, models

    def scores(self, users: np.ndarray) -> np.ndarray:
        (fm,) = self.models  # one trainer, one model
        _, e_items = fm.item_vectors(self.d.item_ids)
        e_users = fm.user_vectors([self.d.user_ids[u] for u in users.tolist()])
        return (e_users @ e_items.T).astype(np.float64)


@pytest.fixture
def pipeline(settings: Settings, monkeypatch: pytest.MonkeyPatch
             ) -> Iterator[tuple[Settings, list[OnlineFM]]]:
    """``fmstream train`` and ``fmstream serve`` (their entry points, in threads), and the model
    the trainer built (kept to be read at interval boundaries, when the trainer is idle)."""
    built: list[OnlineFM] = []

    def keep(s: Settings) -> OnlineFM:
        built.append(new_model(s))
        return built[-1]

    monkeypatch.setattr(app, "new_model", keep)
    settings = settings.model_copy(update={
        "dim": 8, "schema_path": SCHEMA, "publish_items_s": 0.2, "publish_active_s": 0.2,
        "checkpoint_every_s": 0.5, "swap_poll_s": 0.05,
    })
    stop, ready = threading.Event(), threading.Event()
    threads = [threading.Thread(target=run_worker, args=(settings, stop, ready), daemon=True),
               threading.Thread(target=run_trainer, args=(settings, stop), daemon=True)]
    for t in threads:
        t.start()
    assert ready.wait(180), "the worker got no partitions of the request topic"
    yield settings, built
    stop.set()
    for t in threads:
        t.join(60)


def test_hit_rate_through_kafka_matches_the_in_process_model(
    pipeline: tuple[Settings, list[OnlineFM]],
) -> None:
    settings, built = pipeline
    d = synthetic_data(STREAM, 6000)
    start, end = period(d, 0.8, 1.0)
    store = VectorStore(connect_redis(settings.redis_config()), settings.redis_keys())
    with FmClient(settings) as client:
        kafka = KafkaFM(d, settings, client, store, timeout_s=180)
        kafka.produce_profiles()
        served, own = Lists(kafka, d), Lists(TrainerModel(d, built), d)
        models = [make(d, ("pop", {}), 0, None),
                  make(d, ("fm", {"dim": 8, "name": "in process"}), 0,
                       FeatureSchema.load(SCHEMA)),
                  served, own]  # own after served: read once the markers were served
        out = run(d, models, start, end, "300", d.n_items)
        kafka.producer.close()
    via, inproc, pop = (out[KafkaFM.name], out["in process"], out["popularity"])
    # the protocol ran through the pipeline: every user of every interval was asked and answered
    # (KafkaFM raises on a missing or failed answer), from versions that had learned it all
    assert via.intervals == 4 and kafka.requests > 0 and via.n["warm"] > 500
    assert via.n == inproc.n and len(kafka.versions) >= 4
    # serving is exact: every answer names an item version holding the interval's last event
    # (the version contract: item_version >= the markers' stamps), and each list is the
    # trainer model's own top-10 (seen and unknown items excluded); with shared-rows versions
    # on (the default) answers come from versions above their item version too
    assert settings.publish_shared_s > 0
    assert kafka.stale_answers == 0
    alike = overlap(own, served)
    assert alike["lists"] > 100 and alike["identical"] == 1.0, alike
    # the planted clusters are learned through Kafka as in process: both well above popularity,
    # and the same within noise (a few hundred hits; polls interleave partitions differently)
    assert inproc.hr("warm") > 1.5 * pop.hr("warm")
    assert via.hr("warm") > 1.5 * pop.hr("warm")
    assert abs(via.hr("warm") - inproc.hr("warm")) <= 0.25 * inproc.hr("warm"), (
        via.hr("warm"), inproc.hr("warm"))
