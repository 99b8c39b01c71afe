"""The sampled-softmax loss (shared negatives, log-Q correction): closed form vs autograd, and
the model option that uses it (TrainConfig(loss="softmax"))."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from model import OnlineFM, TrainConfig
from model import step as kernel
from model.errors import ConfigError
from model.sampler import NegativeSampler
from model.step import StepBatch, softmax_step_gradients, softmax_step_gradients_reference
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
    before = fm.params.copy()
    assert fm.learn_many(["a", "b"], ["y", "x"], labels=np.zeros(2), ts=2.0) == 0.0
    np.testing.assert_array_equal(fm.params, before)
    n_pos = fm.n_positives
    loss = fm.replay_many(["a", "b"], ["x", "y"])
    assert np.isfinite(loss) and loss > 0
    assert fm.n_positives == n_pos  # replay changes parameters only
    assert not np.array_equal(fm.params, before)


def test_softmax_with_one_known_item_has_no_negatives() -> None:
    fm = OnlineFM(None, TrainConfig(dim=4, loss="softmax", negatives=8))
    assert fm.learn_many(["a"], ["x"], ts=1.0) == 0.0  # nothing to contrast with yet


def test_softmax_is_seeded_and_reproducible() -> None:
    from tests.model.test_online import train_planted

    cfg = TrainConfig(dim=4, loss="softmax", seed=3, negatives=16, neg_sampling="popularity")
    a, *_ = train_planted(cfg)
    b, *_ = train_planted(cfg)
    np.testing.assert_array_equal(a.params, b.params)


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


# ----------------------------------------------------------------------------- kernel shapes
def test_softmax_merges_repeated_draws_and_hits() -> None:
    """Draws with replacement repeat entities (each copy with its own log q here, the general
    case); the kernel merges them per entity: same loss and gradients as autograd over every
    draw, accidental hits (all copies of an event's own item) left out."""
    vals, batch = random_batch(5, context=True)
    nu = int(batch.ev_fixed[:, 0].max()) + 1
    rng = np.random.default_rng(7)
    items = np.unique(batch.ev_item)
    shared = rng.choice(np.concatenate([items, items[:1] + 0]), 60)  # few entities, many copies
    lq_s = np.log(rng.uniform(0.01, 0.5, shared.size)).astype(np.float32)
    lq_p = np.log(rng.uniform(0.01, 0.5, batch.ev_item.size)).astype(np.float32)
    assert np.isin(batch.ev_item, shared).any() and np.unique(shared).size < shared.size
    got = softmax_step_gradients(vals, batch, shared, lq_s, lq_p)
    ref = softmax_step_gradients_reference(vals, 0.0, batch, shared, lq_s, lq_p)
    np.testing.assert_allclose(got.loss, ref.loss, rtol=1e-4, atol=1e-4)
    scale = max(1.0, float(np.abs(ref.grad).max()))
    np.testing.assert_allclose(got.grad, ref.grad, rtol=1e-4, atol=1e-5 * scale)
    assert nu >= 1


def test_softmax_every_shared_item_a_hit() -> None:
    """An event whose only shared candidate is its own item has the positive alone: zero loss
    and zero gradient from it."""
    vals, batch = random_batch(2, context=False)
    item = int(batch.ev_item[0])
    only = type(batch)(
        **{
            **batch.__dict__,
            "ev_item": np.full_like(batch.ev_item, item),
            "ev_fixed": batch.ev_fixed,
        }
    )
    got = softmax_step_gradients(
        vals,
        only,
        np.array([item, item]),
        np.zeros(2, np.float32),
        np.zeros(only.ev_item.size, np.float32),
    )
    assert got.loss == 0.0 and not got.grad.any()


@pytest.mark.parametrize("context", [False, True])
def test_softmax_negative_far_above_its_positive(context: bool) -> None:
    """Rows are stabilised by the positive's logit; a negative that outscores it by far more
    than float32's exp range (here a log q of -300) takes the max-stabilised path for its rows,
    hits included, and still equals autograd."""
    vals, batch = random_batch(4, context)
    nu = int(batch.ev_fixed[:, 0].max()) + 1
    n_ent = batch.n_entities - (batch.ev_item.size if context else 0)
    other = next(e for e in range(nu, n_ent) if e != batch.ev_item[0])
    shared = np.array([batch.ev_item[0], other, other, batch.ev_item[-1]])
    lq_s = np.array([-1.0, -300.0, -300.0, -2.0], dtype=np.float32)
    lq_p = np.full(batch.ev_item.size, -1.5, dtype=np.float32)
    got = softmax_step_gradients(vals, batch, shared, lq_s, lq_p)
    ref = softmax_step_gradients_reference(vals, 0.0, batch, shared, lq_s, lq_p)
    assert np.isfinite(got.loss) and np.isfinite(got.grad).all()
    np.testing.assert_allclose(got.loss, ref.loss, rtol=1e-4)
    scale = max(1.0, float(np.abs(ref.grad).max()))
    np.testing.assert_allclose(got.grad, ref.grad, rtol=1e-4, atol=1e-5 * scale)


def test_softmax_at_the_default_step_size_equals_autograd() -> None:
    """The production shape: 128 events, 512 popularity draws with repeats over a few hundred
    items, users with many slots, contexts."""
    rng = np.random.default_rng(11)
    d, n_rows, nu, ni, n_ev = 32, 900, 100, 400, 128
    per_ent = np.concatenate([rng.integers(3, 25, nu), rng.integers(1, 5, ni), np.ones(n_ev, int)])
    indptr = np.concatenate([[0], np.cumsum(per_ent)]).astype(np.int64)
    cols = rng.integers(0, n_rows, int(indptr[-1]))
    x = rng.uniform(0.05, 1.0, cols.size).astype(np.float32)
    vals = rng.normal(0, 0.3, (n_rows, d + 1)).astype(np.float32)
    pop = 1.0 / np.arange(1, ni + 1)
    pop /= pop.sum()
    ev_item = nu + rng.choice(ni, n_ev, p=pop)
    batch = StepBatch(
        indptr=indptr,
        cols=cols,
        x=x,
        ev_fixed=np.stack([rng.integers(0, nu, n_ev), nu + ni + np.arange(n_ev)], 1),
        ev_item=ev_item,
        labels=np.ones(n_ev, np.float32),
        neg_owner=np.zeros(0, np.int64),
        neg_item=np.zeros((0, 0), np.int64),
        neg_valid=np.zeros((0, 0), bool),
    )
    draws = rng.choice(ni, 512, p=pop)
    shared = nu + draws
    lq_s = np.log(pop[draws]).astype(np.float32)
    lq_p = np.log(pop[ev_item - nu]).astype(np.float32)
    got = softmax_step_gradients(vals, batch, shared, lq_s, lq_p)
    ref = softmax_step_gradients_reference(vals, 0.0, batch, shared, lq_s, lq_p)
    np.testing.assert_allclose(got.loss, ref.loss, rtol=1e-4)
    scale = max(1.0, float(np.abs(ref.grad).max()))
    np.testing.assert_allclose(got.grad, ref.grad, rtol=1e-3, atol=2e-5 * scale)


@pytest.mark.parametrize("schema_name", ["history", "ids"])
def test_softmax_model_equals_the_plain_kernel_model(monkeypatch, schema_name: str) -> None:
    """Steps of the default loss through OnlineFM: the kernel (repeated draws merged, softmax in
    place) trains the same model as the former plain closed form over every draw (float rounding
    apart; autograd is no model-level reference: its rounding noise in the exact-zero ``w``
    gradients of users and contexts becomes Adagrad steps)."""
    import model.online as online
    from tests.model.test_fast_paths import IDS_ONLY, SCHEMA

    def train() -> OnlineFM:
        schema = SCHEMA if schema_name == "history" else IDS_ONLY
        fm = OnlineFM(schema, TrainConfig(dim=8, negatives=32, seed=4, init_std=0.3))
        rng = np.random.default_rng(4)
        users, items = [f"u{j}" for j in range(30)], [f"i{j}" for j in range(50)]
        for step in range(8):
            u = [users[j] for j in rng.integers(0, 30, 40)]
            i = [items[j] for j in rng.zipf(1.3, 40) % 50]
            ctx = [{"hour": str(h)} for h in rng.integers(0, 4, 40)]
            fm.learn_many(u, i, contexts=ctx, ts=1e9 + step)
        return fm

    fast = train()
    monkeypatch.setattr(online, "softmax_step_gradients", plain_softmax_gradients)
    ref = train()
    n = ref.n_rows
    np.testing.assert_allclose(fast.params[:n], ref.params[:n], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fast._table.acc[:n], ref._table.acc[:n], rtol=1e-3, atol=1e-7)


def plain_softmax_gradients(
    vals: np.ndarray,
    batch: StepBatch,
    shared: np.ndarray,
    logq_shared: np.ndarray,
    logq_pos: np.ndarray,
    check: bool = True,
) -> kernel.StepGrads:
    """The former closed form over every draw (no merging): the model-level reference
    (``check``: the kernel's signature; this form checks nothing)."""
    n_rows, d1 = vals.shape
    m = batch.n_entities
    f32 = np.float32
    x, cols, indptr = batch.x, batch.cols, batch.indptr
    n_ev = batch.ev_item.size
    grad = np.zeros((n_rows, d1), dtype=np.float32)
    if n_ev == 0:
        return kernel.StepGrads(0.0, 0, grad, 0.0)
    shared = np.asarray(shared, dtype=np.int64).reshape(-1)
    ent_of = np.repeat(np.arange(m), np.diff(indptr))
    x2 = x * x
    v = vals[:, 1:]
    sq = np.einsum("rd,rd->r", v, v)
    agg = kernel.gather_sum(indptr, cols, x, vals)
    V = np.ascontiguousarray(agg[:, 1:])
    s2 = np.bincount(ent_of, weights=x2 * sq[cols], minlength=m).astype(np.float32)
    q = agg[:, 0] - f32(0.5) * s2
    a = q + f32(0.5) * np.einsum("md,md->m", V, V)

    ev_fixed, ev_item = batch.ev_fixed, batch.ev_item
    P = np.take(V, ev_fixed[:, 0], axis=0)
    for j in range(1, ev_fixed.shape[1]):
        P += np.take(V, ev_fixed[:, j], axis=0)
    VP = np.take(V, ev_item, axis=0)  # (E, d) the positives' item vectors
    VS = np.take(V, shared, axis=0)  # (M, d) the shared negatives'
    z_pos = np.take(a, ev_item) + np.einsum("ed,ed->e", P, VP) - logq_pos.astype(np.float32)
    z_neg = (np.take(a, shared) - logq_shared.astype(np.float32))[None, :] + P @ VS.T
    hit = shared[None, :] == ev_item[:, None]  # accidental hits: not negatives of that event
    z_neg = np.where(hit, f32(-np.inf), z_neg)
    top = np.maximum(z_pos, z_neg.max(axis=1, initial=-np.inf))
    e_pos = np.exp(z_pos - top)
    e_neg = np.exp(z_neg - top[:, None])
    norm = e_pos + e_neg.sum(axis=1)
    total = float((np.log(norm) + top - z_pos).sum(dtype=np.float64))
    c_pos = (e_pos / norm - f32(1.0)).astype(np.float32)
    c_neg = (e_neg / norm[:, None]).astype(np.float32)

    dP = c_pos[:, None] * VP + c_neg @ VS  # (E, d)
    gent = np.zeros((m, d1), dtype=np.float32)
    dq = np.bincount(ev_item, weights=c_pos, minlength=m)
    dq += np.bincount(shared, weights=c_neg.sum(axis=0), minlength=m)
    gent[:, 0] = dq
    gent[:, 1:] = gent[:, :1] * V
    ones = np.ones(max(n_ev, shared.size) * max(ev_fixed.shape[1], 1), dtype=np.float32)
    gent[:, 1:] += kernel.scatter_sum(
        np.arange(n_ev + 1), ev_item, ones[:n_ev], c_pos[:, None] * P, m
    )
    gent[:, 1:] += kernel.scatter_sum(
        np.arange(shared.size + 1), shared, ones[: shared.size], c_neg.T @ P, m
    )
    n_fixed = ev_fixed.shape[1]
    fixed_ptr = np.arange(0, ev_fixed.size + 1, n_fixed)
    gent[:, 1:] += kernel.scatter_sum(fixed_ptr, ev_fixed.ravel(), ones[: ev_fixed.size], dP, m)

    grad = kernel.scatter_sum(indptr, cols, x, gent, n_rows)
    c2 = np.bincount(cols, weights=x2 * gent[ent_of, 0], minlength=n_rows).astype(np.float32)
    grad[:, 1:] -= c2[:, None] * v
    return kernel.StepGrads(total, n_ev, np.ascontiguousarray(grad, dtype=np.float32), 0.0)


def test_log_prob_follows_each_rebuilt_distribution() -> None:
    """log q is read from a table made once per cached distribution: a rebuild (or a cdf
    restored from a checkpoint) is reflected at once, bit for bit the cdf's own ratios."""
    pop = NegativeSampler("popularity", 1.0, np.random.default_rng(0))
    pop.draw_shared(np.array([0, 1, 3, 7], dtype=np.float64), 4, 8, 1)
    first = pop.log_prob(np.arange(5), 4)
    pop.since_rebuild = 10**9  # due: the next draw rebuilds from the new counts
    pop.draw_shared(np.array([9, 0, 0, 0, 0], dtype=np.float64), 5, 8, 1)
    w = np.array([10.0, 1, 1, 1, 1])
    np.testing.assert_allclose(pop.log_prob(np.arange(5), 5), np.log(w / w.sum()), rtol=1e-6)
    assert not np.allclose(pop.log_prob(np.arange(4), 5), first[:4])
    pop.cdf = np.cumsum([1.0, 3.0])  # as OnlineFM.from_state sets it
    np.testing.assert_allclose(pop.log_prob(np.arange(3), 3), np.log([0.25, 0.75, 0.25]))
    cdf = pop.cdf
    expect = (np.log(np.diff(cdf, prepend=0.0)) - np.log(cdf[-1])).astype(np.float32)
    np.testing.assert_array_equal(pop.log_prob(np.arange(2), 2), expect)


def _searched(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The draws by binary search over the cdf (what the draw table replaces)."""
    return np.minimum(np.searchsorted(cdf, u, side="right"), cdf.size - 1)


@pytest.mark.parametrize("alpha", [1.0, 0.0, 0.5])
def test_draw_table_draws_what_the_binary_search_draws(alpha: float) -> None:
    """Popularity weights ``(count + 1) ** alpha`` are integers for alpha 1 and 0: draws are
    then read from a table by ``floor(u)``, the same indices as the binary search for every
    ``u`` (cdf values and the points between them included) and draw for draw from one
    generator state; other alphas keep the search."""
    counts = np.random.default_rng(3).zipf(1.5, 500).clip(0, 300).astype(np.int64)
    counts[:7] = 0
    s = NegativeSampler("popularity", alpha, np.random.default_rng(7))
    state = s.rng.bit_generator.state
    items, _ = s.draw_shared(counts, 500, 5000, 1)
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    np.testing.assert_array_equal(items, _searched(s.cdf, rng.random(5000) * s.cdf[-1]))
    assert items.dtype == np.int64
    table = s._draw_table()
    assert (table is not None) == (alpha in (0.0, 1.0))
    if table is not None:
        total = int(s.cdf[-1])
        u = np.arange(4 * total) / 4.0  # every integer, every cdf value, points between
        np.testing.assert_array_equal(
            table.take(np.minimum(u.astype(np.int64), table.size - 1)), _searched(s.cdf, u)
        )


def test_draw_table_follows_the_cdf_and_its_size_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebuilt or restored cdf gets its own table; a cdf whose total exceeds the cap (or
    whose weights are not integers) is searched, with the same draws."""
    import model.sampler as sampler

    s = NegativeSampler("popularity", 1.0, np.random.default_rng(0))
    s.cdf = np.cumsum([1.0, 3.0])  # as OnlineFM.from_state sets it
    np.testing.assert_array_equal(s._draw_table(), [0, 1, 1, 1])
    s.cdf = np.cumsum([2.0, 0.0, 1.0])  # a zero weight: never drawn
    np.testing.assert_array_equal(s._draw_table(), [0, 0, 2])
    s.cdf = np.cumsum([1.5, 2.0])
    assert s._draw_table() is None
    monkeypatch.setattr(sampler, "_TABLE_MAX", 100)
    counts = np.full(10, 20, dtype=np.int64)  # total 210 > 100
    s.since_rebuild = 10**9
    state = s.rng.bit_generator.state
    items, _ = s.draw_shared(counts, 10, 300, 1)
    assert s._draw_table() is None
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    np.testing.assert_array_equal(items, _searched(s.cdf, rng.random(300) * 210.0))


def test_softmax_refuses_entity_indices_out_of_range() -> None:
    """With its checks on (the default) the kernel refuses events, fixed parts or shared draws
    that name no entity of the slot matrix, instead of reading past its arrays."""
    vals, batch = random_batch(3, True)
    nu = int(batch.ev_fixed[:, 0].max()) + 1
    shared, lq_s, lq_p = shared_set(3, batch, nu, batch.n_entities - batch.ev_item.size, True)
    m = batch.n_entities
    bad_item = dataclasses.replace(batch, ev_item=batch.ev_item + m)
    bad_fixed = dataclasses.replace(batch, ev_fixed=batch.ev_fixed - m)
    for b, sh in ((bad_item, shared), (bad_fixed, shared), (batch, np.asarray(shared) + m)):
        with pytest.raises(ValueError, match="out of range"):
            softmax_step_gradients(vals, b, sh, lq_s, lq_p)
    ok = softmax_step_gradients(vals, batch, shared, lq_s, lq_p)
    unchecked = softmax_step_gradients(vals, batch, shared, lq_s, lq_p, check=False)
    np.testing.assert_array_equal(ok.grad, unchecked.grad)
    assert ok.loss == unchecked.loss
