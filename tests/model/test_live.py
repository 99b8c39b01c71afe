"""Live test-then-train hit rate (model/live.py): sampling, cohorts, agreement with a plain
top-k computed by hand, no crash on an empty catalogue."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model import OnlineFM, TrainConfig
from model.live import LiveHitRate


def trained() -> OnlineFM:
    fm = OnlineFM(config=TrainConfig(dim=4, negatives=2))
    rng = np.random.default_rng(0)
    for _ in range(20):
        u = [f"u{x}" for x in rng.integers(0, 10, 64)]
        i = [f"i{x}" for x in rng.integers(0, 40, 64)]
        fm.learn_many(u, i, ts=1.0)
    return fm


def test_hits_match_a_hand_computed_top_k() -> None:
    fm = trained()
    live = LiveHitRate(k=10, sample_every=1, max_per_batch=100)
    users = ["u1", "u2", "u3", "new-user"]
    items = ["i1", "i5", "i39", "i7"]
    assert live.observe(fm, users, items) == 4
    ids, ei = fm.item_vectors()
    s = fm.user_vectors(users) @ ei.T
    want = []
    for j, it in enumerate(items):
        rank = int((s[j] > s[j, ids.index(it)]).sum())
        want.append(rank < 10)
    rates = live.rates()
    assert rates["warm"] == pytest.approx(np.mean(want[:3]))
    assert rates["cold"] == pytest.approx(float(want[3]))
    assert live.counts() == {"warm": 3, "cold": 1}


def test_sampling_every_nth_positive_across_batches_and_cap() -> None:
    fm = trained()
    live = LiveHitRate(sample_every=4, max_per_batch=2, window=100)
    labels = np.array([1, 0, 1, 1, 1, 1, 0, 1], dtype=np.float32)  # 6 positives
    users = [f"u{j}" for j in range(8)]
    items = [f"i{j}" for j in range(8)]
    assert live.observe(fm, users, items, labels) == 2  # positives #0 and #4
    assert live.observe(fm, users[:3], items[:3], labels[:3]) == 0  # stream positives #6, #7
    assert live.observe(fm, users, items, labels) == 2  # #8..#13: #8 and #12
    assert sum(live.counts().values()) == 4
    assert live.observe(fm, users, items, np.zeros(8)) == 0


def test_unknown_items_and_empty_model_are_misses_not_errors() -> None:
    live = LiveHitRate(sample_every=1)
    assert live.observe(OnlineFM(), ["u"], ["i"]) == 1
    assert live.rates()["cold"] == 0.0 and math.isnan(live.rates()["warm"])
    fm = trained()
    live.observe(fm, ["u1"], ["never-seen"])
    assert live.rates()["warm"] == 0.0
    with pytest.raises(ValueError):
        LiveHitRate(k=0)


def test_a_batch_gives_a_fixed_number_of_its_positives_spread_evenly() -> None:
    """The default samples a fixed number of a batch's positives (``max_per_batch``), not one
    in 16: a poll of a paced stream (tens of positives) pays the batch's fixed cost for all of
    them. A larger batch gives ``max_per_batch``, spread over it; ``sampled`` counts them all."""
    fm = trained()
    live = LiveHitRate(window=10)
    users = [f"u{j % 10}" for j in range(200)]
    items = [f"i{j % 40}" for j in range(200)]
    labels = np.tile(np.array([1, 1, 0, 1], dtype=np.float32), 50)  # 150 positives
    assert live.sample(fm, users[:40], items[:40], labels[:40]) == 30  # all 30 positives
    got = live.sample(fm, users, items, labels)
    assert got == live.max_per_batch == 64
    assert live.sample(fm, users, items, labels, limit=5) == 5
    live.score()
    assert live.sampled == 30 + 64 + 5 and live.counts() == {"warm": 10, "cold": 0}  # window 10
