"""The sampled-softmax loss (shared negatives, log-Q correction): closed form vs autograd, and
the model option that uses it (TrainConfig(loss="softmax"))."""

from __future__ import annotations

import numpy as np
import pytest

from model import OnlineFM, TrainConfig
from model.errors import ConfigError
from model.sampler import NegativeSampler
from model.step import softmax_step_gradients, softmax_step_gradients_reference
from tests.model.test_step import random_batch


def shared_set(seed: int, batch, n_items_from: int, n_items_to: int, hits: bool):
    rng = np.random.default_rng(100 + seed)
    n_sh = int(rng.integers(1, 12))
    shared = rng.integers(n_items_from, n_items_to, n_sh)
    if hits:  # make sure some shared negatives are some events' own items
        shared[: min(2, n_sh)] = batch.ev_item[: min(2, n_sh)]
    logq_shared = np.log(rng.uniform(0.01, 0.5, n_sh)).astype(np.float32)
    logq_pos = np.log(rng.uniform(0.01, 0.5, batch.ev_item.size)).astype(np.float32)
    return shared, logq_shared, logq_pos


@pytest.mark.parametrize("context", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_softmax_gradients_equal_autograd(context: bool, seed: int) -> None:
    vals, batch = random_batch(seed, context)
    nu = int(batch.ev_fixed[:, 0].max()) + 1
    n_ent = batch.n_entities - (batch.ev_item.size if context else 0)
    shared, lq_s, lq_p = shared_set(seed, batch, nu, n_ent, hits=seed % 2 == 0)
    got = softmax_step_gradients(vals, batch, shared, lq_s, lq_p)
    ref = softmax_step_gradients_reference(vals, 0.3, batch, shared, lq_s, lq_p)
    assert got.count == ref.count == batch.ev_item.size
    np.testing.assert_allclose(got.loss, ref.loss, rtol=1e-4, atol=1e-4)
    scale = max(1.0, float(np.abs(ref.grad).max()))
    np.testing.assert_allclose(got.grad, ref.grad, rtol=1e-4, atol=1e-5 * scale)
    assert got.g0 == 0.0 and abs(ref.g0) < 1e-4  # w0 cancels in the softmax
    assert got.grad.dtype == np.float32


def test_softmax_log_q_correction_changes_the_gradient() -> None:
    vals, batch = random_batch(3, context=False)
    nu = int(batch.ev_fixed[:, 0].max()) + 1
    shared, lq_s, lq_p = shared_set(3, batch, nu, batch.n_entities, hits=False)
    flat = softmax_step_gradients(vals, batch, shared, np.zeros_like(lq_s), np.zeros_like(lq_p))
    corr = softmax_step_gradients(vals, batch, shared, lq_s, lq_p)
    assert not np.allclose(flat.grad, corr.grad)
    # a constant log q (uniform sampling) cancels exactly
    const = softmax_step_gradients(
        vals, batch, shared, np.full_like(lq_s, -3.0), np.full_like(lq_p, -3.0)
    )
    np.testing.assert_allclose(const.grad, flat.grad, rtol=1e-5, atol=1e-6)


def test_softmax_with_no_events_gives_nothing() -> None:
    vals, batch = random_batch(1, context=False)
    empty = type(batch)(
        indptr=batch.indptr,
        cols=batch.cols,
        x=batch.x,
        ev_fixed=batch.ev_fixed[:0],
        ev_item=batch.ev_item[:0],
        labels=batch.labels[:0],
        neg_owner=batch.neg_owner[:0],
        neg_item=batch.neg_item[:0],
        neg_valid=batch.neg_valid[:0],
    )
    got = softmax_step_gradients(vals, empty, np.array([0]), np.zeros(1), np.zeros(0))
    assert got.count == 0 and not got.grad.any()


# ----------------------------------------------------------------------------- the model option
@pytest.mark.parametrize("sampling", ["uniform", "popularity"])
def test_softmax_learns_planted_clusters(sampling: str) -> None:
    from tests.model.test_online import cluster_precision, train_planted

    cfg = TrainConfig(dim=8, loss="softmax", seed=1, negatives=64, neg_sampling=sampling)  # type: ignore[arg-type]
    fm, users, items, useg, icat, losses = train_planted(cfg)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3])
    assert cluster_precision(fm, users, items, useg, icat) > 0.8


def test_softmax_skips_explicit_negatives_and_replays() -> None:
    fm = OnlineFM(None, TrainConfig(dim=4, loss="softmax", negatives=8, seed=0))
    fm.learn_many(["a", "b"], ["x", "y"], ts=1.0)  # items known
    before = fm._table.params.copy()
    assert fm.learn_many(["a", "b"], ["y", "x"], labels=np.zeros(2), ts=2.0) == 0.0
    np.testing.assert_array_equal(fm._table.params, before)
    n_pos = fm.n_positives
    loss = fm.replay_many(["a", "b"], ["x", "y"])
    assert np.isfinite(loss) and loss > 0
    assert fm.n_positives == n_pos  # replay changes parameters only
    assert not np.array_equal(fm._table.params, before)


def test_softmax_with_one_known_item_has_no_negatives() -> None:
    fm = OnlineFM(None, TrainConfig(dim=4, loss="softmax", negatives=8))
    assert fm.learn_many(["a"], ["x"], ts=1.0) == 0.0  # nothing to contrast with yet


def test_softmax_is_seeded_and_reproducible() -> None:
    from tests.model.test_online import train_planted

    cfg = TrainConfig(dim=4, loss="softmax", seed=3, negatives=16, neg_sampling="popularity")
    a, *_ = train_planted(cfg)
    b, *_ = train_planted(cfg)
    np.testing.assert_array_equal(a._table.params, b._table.params)


def test_softmax_loss_is_validated() -> None:
    TrainConfig(loss="softmax")
    with pytest.raises(ConfigError, match="softmax"):
        TrainConfig(loss="sofmax")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="negatives"):
        TrainConfig(loss="softmax", negatives=0)


# ----------------------------------------------------------------------------- sampler
def test_shared_draws_and_their_log_probabilities() -> None:
    rng = np.random.default_rng(0)
    uni = NegativeSampler("uniform", 0.0, rng)
    items, logq = uni.draw_shared(np.zeros(10), 10, 50, 50)
    assert items.shape == (50,) and items.min() >= 0 and items.max() < 10
    np.testing.assert_allclose(logq, -np.log(10), rtol=1e-6)
    counts = np.array([0, 1, 3, 7, 0], dtype=np.float64)
    pop = NegativeSampler("popularity", 1.0, rng)
    items, logq = pop.draw_shared(counts, 5, 20_000, 20_000)
    w = counts + 1.0
    np.testing.assert_allclose(pop.log_prob(np.arange(5), 5), np.log(w / w.sum()), rtol=1e-5)
    freq = np.bincount(items, minlength=5) / items.size
    np.testing.assert_allclose(freq, w / w.sum(), atol=0.02)
    np.testing.assert_allclose(logq, np.log(w / w.sum())[items], rtol=1e-5)
    # an item newer than the cached distribution gets the smallest weight
    assert pop.log_prob(np.array([7]), 8)[0] == pytest.approx(np.log(1.0 / w.sum()))
    assert uni.draw_shared(np.zeros(3), 3, 0, 5)[0].size == 0
