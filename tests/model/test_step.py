"""The closed-form step (model.step) equals the autograd reference, and trains the same model."""

from __future__ import annotations

import numpy as np
import pytest

from model import FeatureSchema, OnlineFM, TrainConfig
from model import step as step_module
from model.errors import FeatureError, InputError
from model.step import StepBatch, step_gradients, step_gradients_reference

LOSSES = ("logistic", "bpr", "hinge")


def random_batch(
    seed: int, context: bool, d: int = 8, invalid: bool = False
) -> tuple[np.ndarray, StepBatch]:
    """Random rows, entities reading 0-6 slots each (shared rows), events with negatives."""
    rng = np.random.default_rng(seed)
    n_rows = int(rng.integers(5, 40))
    nu, ni = int(rng.integers(1, 12)), int(rng.integers(2, 20))
    n_ev = int(rng.integers(1, 30))
    nc = n_ev if context else 0
    m = nu + ni + nc
    per_ent = rng.integers(0, 7, m)
    per_ent[: nu + ni] = np.maximum(per_ent[: nu + ni], 1)
    indptr = np.concatenate([[0], np.cumsum(per_ent)]).astype(np.int64)
    cols = rng.integers(0, n_rows, int(indptr[-1]))
    x = rng.uniform(0.1, 1.5, cols.size).astype(np.float32)
    vals = rng.normal(0, 0.5, (n_rows, d + 1)).astype(np.float32)
    users = rng.integers(0, nu, n_ev)
    items = nu + rng.integers(0, ni, n_ev)
    fixed = [users] + ([nu + ni + np.arange(n_ev)] if context else [])
    labels = rng.choice(np.array([0.0, 1.0, 1.0, 0.3], dtype=np.float32), n_ev)
    owner = np.flatnonzero(rng.random(n_ev) < 0.7)
    k = int(rng.integers(1, 6))
    neg_item = nu + rng.integers(0, ni, (owner.size, k))
    valid = rng.random((owner.size, k)) < 0.8 if invalid else np.ones((owner.size, k), bool)
    batch = StepBatch(
        indptr=indptr,
        cols=cols,
        x=x,
        ev_fixed=np.stack(fixed, axis=1),
        ev_item=items,
        labels=labels,
        neg_owner=owner,
        neg_item=neg_item,
        neg_valid=valid,
    )
    return vals, batch


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("context", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_closed_form_gradients_equal_autograd(loss: str, context: bool, seed: int) -> None:
    vals, batch = random_batch(seed, context, invalid=seed % 3 == 0)
    w0 = 0.3
    got = step_gradients(vals, w0, batch, loss, margin=1.5)
    ref = step_gradients_reference(vals, w0, batch, loss, margin=1.5)
    assert got.count == ref.count
    np.testing.assert_allclose(got.loss, ref.loss, rtol=1e-4, atol=1e-4)
    scale = max(1.0, float(np.abs(ref.grad).max()))
    np.testing.assert_allclose(got.grad, ref.grad, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(got.g0, ref.g0, rtol=1e-4, atol=1e-4)
    if loss != "logistic":  # pairwise: w0 cancels exactly in y+ - y-
        assert got.g0 == 0.0
    assert got.grad.dtype == np.float32 and vals.dtype == np.float32


def test_no_examples_gives_no_gradient() -> None:
    vals, batch = random_batch(1, context=False)
    none = StepBatch(
        indptr=batch.indptr,
        cols=batch.cols,
        x=batch.x,
        ev_fixed=batch.ev_fixed,
        ev_item=batch.ev_item,
        labels=batch.labels,
        neg_owner=batch.neg_owner,
        neg_item=batch.neg_item,
        neg_valid=np.zeros_like(batch.neg_valid),
    )
    for loss in ("bpr", "hinge"):
        res = step_gradients(vals, 0.0, none, loss)
        assert res.count == 0 and res.loss == 0.0 and not res.grad.any()


SCHEMA = FeatureSchema.from_dict(
    {
        "user": {
            "gender": {},
            "age": {"kind": "numeric", "boundaries": [18, 30, 50]},
            "recent": {"kind": "history", "history_len": 4},
        },
        "item": {"genres": {"kind": "multi"}},
        "context": {"hour": {}},
    }
)


def trained(loss: str, reference: bool, **cfg: object) -> OnlineFM:
    # one candidate per negative: hard negatives pick by score, and float-level differences
    # between the two gradient paths could flip a pick; the gradient math is what is compared
    cfg = {"neg_candidates": 1, **cfg}
    fm = OnlineFM(SCHEMA, TrainConfig(dim=8, loss=loss, negatives=3, seed=3, **cfg))  # type: ignore[arg-type]
    if reference:
        fm._gradients = step_gradients_reference
    rng = np.random.default_rng(0)
    users = [f"u{j}" for j in range(30)]
    items = [f"i{j}" for j in range(40)]
    fm.upsert_users(
        users, [{"gender": "MF"[j % 2], "age": 15 + 3 * j} for j in range(len(users))]
    )
    genres = ["a", "b", "c", "d"]
    fm.upsert_items(
        items, [{"genres": genres[: 1 + j % 3]} for j in range(len(items))]
    )
    for step in range(12):
        n = 48
        u = [users[j] for j in rng.integers(0, len(users), n)]
        i = [items[j] for j in rng.integers(0, len(items), n)]
        y = (rng.random(n) < 0.8).astype(np.float32) if loss == "logistic" else None
        ctx = [{"hour": str(h)} for h in rng.integers(0, 5, n)]
        fm.learn_many(u, i, y, contexts=ctx, ts=1e9 + step)
    return fm


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(
    "cfg", [{}, {"step_scaling": "count", "acc_decay": 1.0}, {"neg_sampling": "popularity"}]
)
def test_fast_step_trains_the_model_the_reference_trains(loss: str, cfg: dict) -> None:
    fast, ref = trained(loss, False, **cfg), trained(loss, True, **cfg)
    pf, pr = fast.params, ref.params
    assert pf.shape == pr.shape
    np.testing.assert_allclose(fast.item_vectors()[1], ref.item_vectors()[1], atol=2e-4)
    # latent vectors of every row; w of item rows (user/context w: see below)
    np.testing.assert_allclose(pf[:, 1:], pr[:, 1:], atol=2e-4)
    items = fast._items.keys_of(np.arange(fast.n_items))[0]
    rows = fast._space.key_row[items[items != 0]]
    np.testing.assert_allclose(pf[rows, 0], pr[rows, 0], atol=2e-4)
    if loss == "logistic":
        np.testing.assert_allclose(pf, pr, atol=2e-4)
        assert fast.bias == pytest.approx(ref.bias, abs=1e-4)
    else:
        # pairwise: user/context w and w0 get an exact zero gradient (autograd: rounding noise
        # that Adagrad normalised into steps); the scores' ranking per user is unchanged
        assert fast.bias == 0.0
        users = fast.known_users()[:5]
        for u in users:
            ids = fast.known_items()
            sf = fast.score([u] * len(ids), ids)
            sr = ref.score([u] * len(ids), ids)
            np.testing.assert_allclose(sf - sf.mean(), sr - sr.mean(), atol=5e-4)


@pytest.mark.parametrize("compiled", [True, False])
def test_gather_and_scatter_sums_equal_dense_products(
    compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not compiled:  # the public scipy.sparse path, used when the compiled kernels are absent
        monkeypatch.setattr(step_module, "_kernels", None)
    rng = np.random.default_rng(5)
    m, n, d = 9, 13, 4
    per = rng.integers(0, 4, m)  # some entities read nothing
    indptr = np.concatenate([[0], np.cumsum(per)]).astype(np.int64)
    idx = rng.integers(0, n, int(indptr[-1]))
    w = rng.normal(size=idx.size).astype(np.float32)
    dense = np.zeros((m, n), dtype=np.float64)
    for e in range(m):
        for j in range(indptr[e], indptr[e + 1]):
            dense[e, idx[j]] += w[j]
    table = rng.normal(size=(n, d)).astype(np.float32)
    src = rng.normal(size=(m, d)).astype(np.float32)
    got = step_module.gather_sum(indptr, idx, w, table)
    np.testing.assert_allclose(got, dense @ table, rtol=1e-5, atol=1e-5)
    got = step_module.scatter_sum(indptr, idx, w, src, n)
    np.testing.assert_allclose(got, dense.T @ src, rtol=1e-5, atol=1e-5)
    assert got.dtype == np.float32
    with pytest.raises(ValueError, match="out of range"):
        step_module.gather_sum(indptr, np.where(idx == idx[0], n, idx), w, table)
    with pytest.raises(ValueError, match="indptr"):
        step_module.scatter_sum(indptr[:-1], idx, w, src, n)


def test_hinge_at_its_kink_has_no_gradient_like_autograd() -> None:
    # user entity 0 reads row 0; items 1, 2 read rows 1, 2; y+ - y- = w_1 - w_2 = margin
    vals = np.zeros((3, 5), dtype=np.float32)
    vals[1, 0] = 1.0
    batch = StepBatch(
        indptr=np.array([0, 1, 2, 3]),
        cols=np.array([0, 1, 2]),
        x=np.ones(3, dtype=np.float32),
        ev_fixed=np.array([[0]]),
        ev_item=np.array([1]),
        labels=np.ones(1, dtype=np.float32),
        neg_owner=np.array([0]),
        neg_item=np.array([[2]]),
        neg_valid=np.ones((1, 1), dtype=bool),
    )
    got = step_gradients(vals, 0.0, batch, "hinge", margin=1.0)
    ref = step_gradients_reference(vals, 0.0, batch, "hinge", margin=1.0)
    assert got.count == ref.count == 1 and got.loss == ref.loss == 0.0
    assert not got.grad.any() and not ref.grad.any()


def test_prepared_slices_learn_exactly_what_learn_many_learns() -> None:
    """Ids and context values new to the model recur across slices of one prepared batch."""
    a = OnlineFM(SCHEMA, TrainConfig(dim=8, negatives=3, seed=4))
    b = OnlineFM(SCHEMA, TrainConfig(dim=8, negatives=3, seed=4))
    rng = np.random.default_rng(1)
    for model in (a, b):
        model.learn_many(["u0", "u1"], ["i0", "i1"], ts=1e9)
    n = 60
    users = [f"u{j}" for j in rng.integers(0, 12, n)]
    items = [f"i{j}" for j in rng.integers(0, 15, n)]
    ctx = [{"hour": str(h)} for h in rng.integers(0, 30, n)]
    labels = (rng.random(n) < 0.8).astype(np.float32)
    ts = 1e9 + np.arange(n, dtype=np.float64)
    events = b.prepare_events(users, items, labels, ctx, ts)
    assert (events.users < 0).any() and (events.items < 0).any()
    for lo in range(0, n, 16):
        sl = slice(lo, lo + 16)
        a.learn_many(users[sl], items[sl], labels[sl], contexts=ctx[sl], ts=ts[sl])
        b.learn_prepared(events[sl])
    ha, arr_a = a.state()
    hb, arr_b = b.state()
    assert ha == hb
    for name, arr in arr_a.items():
        np.testing.assert_array_equal(arr, arr_b[name], err_msg=name)


def test_prepare_events_validates_and_changes_nothing() -> None:
    fm = OnlineFM(SCHEMA, TrainConfig(dim=4))
    before = fm.stats()
    with pytest.raises(InputError):
        fm.prepare_events(["u"], ["i"], labels=np.array([2.0]))
    with pytest.raises(FeatureError):
        fm.prepare_events(["u"], [{"not": "an id"}])  # type: ignore[list-item]
    with pytest.raises(FeatureError):
        fm.prepare_events(["u"], ["i"], contexts=[{"hour": ["a", "b"]}])
    events = fm.prepare_events(["u", "v"], ["i", "i"], contexts=[{"hour": "1"}, None])
    assert len(events) == 2 and len(events[1:]) == 1
    assert fm.stats() == before and fm.known_users() == []
    with pytest.raises(TypeError):
        events[0]  # type: ignore[index]


def test_lookup_of_a_batch_known_unknown_numeric_and_restored() -> None:
    fm = OnlineFM(None, TrainConfig(dim=4))
    fm.learn_many(["a", "1"], ["x", "y"], ts=1e9)
    want = [0, -1, 1, 1, 0]
    ids = ["a", "b", 1, "1", "a"]
    assert fm._users.lookup(ids).tolist() == want
    assert fm._users.lookup(["a"]).tolist() == [0] and fm._users.lookup([]).size == 0
    with pytest.raises(FeatureError):
        fm._users.lookup(["a", ["not", "hashable"]])
    restored = OnlineFM.from_state(*fm.state())
    assert restored._users.lookup(ids).tolist() == want
    restored._users.index = dict(restored._users.index)  # a plain dict still works
    assert restored._users.lookup(ids).tolist() == want
