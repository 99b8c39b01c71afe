"""TrainConfig.neg_updates: the item side of only a subset of a softmax step's shared negatives
is updated (model.step.update_subset), unbiased; users still learn against all of them."""

from __future__ import annotations

import numpy as np
import pytest

from model import OnlineFM, TrainConfig
from model.errors import ConfigError
from model.step import softmax_step_gradients, update_subset
from tests.model.test_online import cluster_precision, train_planted
from tests.model.test_step import random_batch


# ----------------------------------------------------------------------------- update_subset
@pytest.mark.parametrize("by", ["uniform", "mass"])
def test_update_subset_is_unbiased(by: str) -> None:
    rng = np.random.default_rng(0)
    mass = np.concatenate([[5.0, 2.0], rng.uniform(0.0, 0.1, 40)]).astype(np.float32)
    g = rng.normal(size=(mass.size, 3)) * mass[:, None]  # gradients scale with the mass
    est = np.zeros(3)
    sizes = []
    n = 4000
    for _ in range(n):
        kept, w = update_subset(mass, 8, by, rng)
        assert np.all(np.diff(kept) > 0) and w.shape == kept.shape and w.dtype == np.float32
        est += (w[:, None] * g[kept]).sum(axis=0)
        sizes.append(kept.size)
    np.testing.assert_allclose(est / n, g.sum(axis=0), atol=0.05 * np.abs(g).sum(axis=0).max())
    assert abs(np.mean(sizes) - 8) < 0.2  # k kept (uniform: exactly; mass: in expectation)


def test_update_subset_by_mass_keeps_the_heavy_negatives() -> None:
    mass = np.array([0.01, 9.0, 0.02, 0.01, 4.0, 0.03, 0.02], dtype=np.float32)
    for seed in range(20):
        kept, w = update_subset(mass, 3, "mass", np.random.default_rng(seed))
        assert {1, 4} <= set(kept.tolist())
        np.testing.assert_array_equal(w[np.isin(kept, [1, 4])], [1.0, 1.0])  # p = 1: weight 1
        assert np.all(w >= 1.0)


@pytest.mark.parametrize("seed", range(6))
def test_update_subset_by_mass_threshold_sums_to_k(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mass = (rng.pareto(1.0, 300) * rng.random(300)).astype(np.float32)  # heavy-tailed
    k = int(rng.integers(2, 120))
    kept, w = update_subset(mass, k, "mass", rng)
    light = w > 1.0  # kept with p < 1: weight 1/p = τ / mass
    tau = float(np.median(w[light] * mass[kept][light]))
    np.testing.assert_allclose(w[light] * mass[kept][light], tau, rtol=1e-5)
    assert np.minimum(1.0, mass / tau).sum() == pytest.approx(k, rel=1e-5)


def test_update_subset_uniform_picks_exactly_k() -> None:
    kept, w = update_subset(np.ones(10, np.float32), 4, "uniform", np.random.default_rng(1))
    assert kept.size == 4 and np.all(w == np.float32(2.5))


def test_update_subset_edge_cases() -> None:
    rng = np.random.default_rng(2)
    kept, w = update_subset(np.ones(3, np.float32), 5, "mass", rng)  # k >= n: all, weight 1
    np.testing.assert_array_equal(kept, [0, 1, 2])
    np.testing.assert_array_equal(w, [1.0, 1.0, 1.0])
    kept, w = update_subset(np.zeros(6, np.float32), 2, "mass", rng)  # no mass: no gradient
    assert kept.size == 0 and w.size == 0


# ----------------------------------------------------------------------------- the kernel
def _shared(batch, seed: int):
    rng = np.random.default_rng(50 + seed)
    nu = int(batch.ev_fixed[:, 0].max()) + 1
    n_items = batch.n_entities - (batch.ev_item.size if batch.ev_fixed.shape[1] > 1 else 0)
    shared = rng.integers(nu, n_items, 30)
    lq_s = np.log(rng.uniform(0.01, 0.5, shared.size)).astype(np.float32)
    lq_p = np.log(rng.uniform(0.01, 0.5, batch.ev_item.size)).astype(np.float32)
    return shared, lq_s, lq_p


def _rows_of(batch, ents: np.ndarray) -> np.ndarray:
    return np.unique(np.concatenate([batch.cols[batch.indptr[e] : batch.indptr[e + 1]]
                                     for e in ents] + [np.zeros(0, np.int64)]))


@pytest.mark.parametrize("context", [False, True])
@pytest.mark.parametrize("by", ["uniform", "mass"])
def test_kernel_subset_leaves_users_alone_and_is_unbiased(context: bool, by: str) -> None:
    for seed in range(4):
        vals, batch = random_batch(seed, context, d=4)
        shared, lq_s, lq_p = _shared(batch, seed)
        full = softmax_step_gradients(vals, batch, shared, lq_s, lq_p)
        n_u = np.unique(shared).size
        k = max(1, n_u // 3)
        rng = np.random.default_rng(seed)
        acc = np.zeros_like(full.grad, dtype=np.float64)
        n = 1500
        for _ in range(n):
            sub = softmax_step_gradients(vals, batch, shared, lq_s, lq_p, neg_updates=k,
                                         neg_update_by=by, rng=rng)
            assert sub.loss == full.loss and sub.count == full.count
            assert sub.skipped is not None and sub.skipped.size >= 0
            # rows read only by negatives left out (and not positives): no gradient at all
            others = np.union1d(np.setdiff1d(np.arange(batch.n_entities), sub.skipped),
                                batch.ev_item)
            only = np.setdiff1d(_rows_of(batch, sub.skipped), _rows_of(batch, others))
            assert not sub.grad[only].any()
            np.testing.assert_array_equal(sub.rows, _rows_of(batch, others))  # what is updated
            acc += sub.grad
        # rows that no item entity reads (user and context rows) get exactly the full gradient
        items = np.unique(np.concatenate([shared, batch.ev_item]))
        user_only = np.setdiff1d(
            _rows_of(batch, np.setdiff1d(np.arange(batch.n_entities), items)),
            _rows_of(batch, items),
        )
        np.testing.assert_array_equal(sub.grad[user_only], full.grad[user_only])
        scale = max(1.0, float(np.abs(full.grad).max()))
        np.testing.assert_allclose(acc / n, full.grad, atol=0.06 * scale)


def test_kernel_subset_of_all_equals_the_full_step() -> None:
    vals, batch = random_batch(5, True, d=4)
    shared, lq_s, lq_p = _shared(batch, 5)
    full = softmax_step_gradients(vals, batch, shared, lq_s, lq_p)
    same = softmax_step_gradients(vals, batch, shared, lq_s, lq_p, neg_updates=10_000,
                                  rng=np.random.default_rng(0))
    np.testing.assert_array_equal(same.grad, full.grad)
    assert same.skipped is None and full.skipped is None


def test_kernel_subset_keeps_the_rows_the_caller_names() -> None:
    vals, batch = random_batch(7, False, d=4)
    shared, lq_s, lq_p = _shared(batch, 7)
    got = softmax_step_gradients(vals, batch, shared, lq_s, lq_p, neg_updates=1,
                                 rng=np.random.default_rng(0), keep=np.unique(shared))
    np.testing.assert_array_equal(got.rows, np.unique(batch.cols))  # every row read
    assert got.skipped is not None and got.skipped.size


def test_kernel_subset_needs_an_rng() -> None:
    vals, batch = random_batch(6, False, d=4)
    shared, lq_s, lq_p = _shared(batch, 6)
    with pytest.raises(ValueError, match="rng"):
        softmax_step_gradients(vals, batch, shared, lq_s, lq_p, neg_updates=1)


# ----------------------------------------------------------------------------- the model option
def test_neg_updates_is_validated() -> None:
    TrainConfig(neg_updates=64, neg_update_by="mass")
    for bad in (-1, True, 2.5):
        with pytest.raises(ConfigError, match="neg_updates"):
            TrainConfig(neg_updates=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="softmax"):
        TrainConfig(loss="bpr", negatives=4, neg_updates=8)
    with pytest.raises(ConfigError, match="neg_update_by"):
        TrainConfig(neg_update_by="random")  # type: ignore[arg-type]


def _pair(neg_updates: int) -> tuple[OnlineFM, list[str]]:
    fm = OnlineFM(None, TrainConfig(dim=4, negatives=64, seed=0, neg_updates=neg_updates,
                                    neg_update_by="mass", user_acc_decay=None))
    items = [f"i{j}" for j in range(200)]
    fm.learn_many([f"u{j % 3}" for j in range(200)], items, ts=1.0)  # every item has its row
    return fm, items


def test_model_updates_only_the_kept_negatives_rows() -> None:
    full, items = _pair(0)
    sub, _ = _pair(4)
    for fm in (full, sub):
        fm._table.drain_dirty()
    users, pos = ["u0", "u1", "u2"], ["i3", "i4", "i5"]
    full.learn_many(users, pos, ts=2.0)
    sub.learn_many(users, pos, ts=2.0)
    n_full, n_sub = full._table.drain_dirty().size, sub._table.drain_dirty().size
    # users (3 rows) + positives (3) + at most 4 kept negatives' id rows, vs ~40 draws' rows
    assert n_sub <= 3 + 3 + 4 < n_full
    # rows not updated keep their parameters and accumulators exactly
    before = sub.params.copy(), sub._table.acc.copy()
    sub.learn_many(users, pos, ts=3.0)
    changed = sub._table.drain_dirty()
    untouched = np.setdiff1d(np.arange(1, sub.n_rows), changed)
    np.testing.assert_array_equal(sub.params[untouched], before[0][untouched])
    np.testing.assert_array_equal(sub._table.acc[untouched], before[1][untouched])


def test_model_with_neg_updates_learns_and_is_reproducible() -> None:
    cfg = TrainConfig(dim=8, seed=1, negatives=64, neg_updates=16, neg_update_by="mass")
    fm, users, items, useg, icat, losses = train_planted(cfg)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3])
    assert cluster_precision(fm, users, items, useg, icat) > 0.8
    again, *_ = train_planted(cfg)
    np.testing.assert_array_equal(fm.params, again.params)


def test_neg_updates_survives_a_checkpoint() -> None:
    cfg = TrainConfig(dim=4, seed=2, negatives=32, neg_updates=8, neg_update_by="uniform")
    a = OnlineFM(None, cfg)
    users = [f"u{j % 7}" for j in range(60)]
    items = [f"i{(3 * j) % 23}" for j in range(60)]
    a.learn_many(users[:30], items[:30], ts=1.0)
    b = OnlineFM.from_state(*a.state())
    assert b.config.neg_updates == 8 and b.config.neg_update_by == "uniform"
    a.learn_many(users[30:], items[30:], ts=2.0)
    b.learn_many(users[30:], items[30:], ts=2.0)
    np.testing.assert_array_equal(a.params, b.params)


def test_set_rows_equals_fancy_assignment() -> None:
    from model.optim import set_rows

    rng = np.random.default_rng(3)
    for width in (1, 2, 33):
        a = rng.normal(size=(50, width)).astype(np.float32)
        b = a.copy()
        rows = rng.choice(50, 17, replace=False)
        vals = rng.normal(size=(17, width)).astype(np.float32)
        set_rows(a, rows, vals)
        b[rows] = vals
        np.testing.assert_array_equal(a, b)
    # a table that is not C-contiguous takes the plain assignment
    t = np.zeros((6, 4), dtype=np.float32)[:, :3]
    set_rows(t, np.array([1, 4]), np.ones((2, 3), dtype=np.float32))
    assert t[[1, 4]].all() and not t[[0, 2, 3, 5]].any()
