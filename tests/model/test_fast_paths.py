"""The training step's fast paths equal the plain float64 computations they replace.

Hard negatives (``neg_candidates > 1``) are picked by float32 entity terms composed once per
unique user/candidate (``OnlineFM._terms32``); the picks must be the argmax of the float64
``<E_user, E_item>`` of :func:`model.compose.compose_user` / ``compose_item`` (the former path),
except where two candidates' scores differ by float rounding only.
"""

from __future__ import annotations

import numpy as np
import pytest

from model import FeatureSchema, OnlineFM, TrainConfig
from model.compose import aggregate, compose_item, compose_user

SCHEMA = FeatureSchema.from_dict(
    {
        "user": {
            "gender": {},
            "recent": {"kind": "history", "history_len": 5, "history_decay": 0.7},
        },
        "item": {"genres": {"kind": "multi"}, "year": {"kind": "numeric",
                                                       "boundaries": [1980, 1990]}},
        "context": {"hour": {}},
    }
)
IDS_ONLY = FeatureSchema.ids_only()
# ids admitted after 2 sightings, expiring after 3 s of event time: rows change between the
# draw of a step's candidates and its gradients (admission, expiry)
CHURN = FeatureSchema.from_dict(
    {
        "user": {"user_id": {"min_count": 2, "expire_after_s": 3.0}, "gender": {}},
        "item": {"item_id": {"min_count": 2, "expire_after_s": 3.0}, "genres": {"kind": "multi"}},
        "context": {"hour": {}},
    }
)


def trained(schema: FeatureSchema, seed: int, context: bool, k: int = 4, m: int = 3) -> OnlineFM:
    """A model after a few steps of random events (users with partly filled histories)."""
    fm = OnlineFM(schema, TrainConfig(dim=8, loss="bpr", negatives=k, neg_candidates=m,
                                      neg_sampling="uniform", seed=seed, init_std=0.3))
    rng = np.random.default_rng(seed)
    users = [f"u{j}" for j in range(40)]
    items = [f"i{j}" for j in range(60)]
    if schema is SCHEMA:
        fm.upsert_users(users[:30], [{"gender": "MF"[j % 2]} for j in range(30)])
        genres = ["a", "b", "c", "d"]
        fm.upsert_items(items, [{"genres": genres[: 1 + j % 3], "year": 1970 + j}
                                for j in range(len(items))])
    for step in range(6):
        n = 40
        u = [users[j] for j in rng.integers(0, len(users), n)]
        i = [items[j] for j in rng.integers(0, len(items), n)]
        ctx = [{"hour": str(h)} for h in rng.integers(0, 5, n)] if context else None
        fm.learn_many(u, i, contexts=ctx, ts=1e9 + step)
    return fm


def reference_negatives(fm: OnlineFM, ukeys, uw, owner, positives, k):
    """The former path: float64 E_user, E_item of every candidate, argmax per group; and the
    gap between each group's two best scores (for rounding-level ties)."""
    m = fm.config.neg_candidates
    neg, valid = fm._sampler.sample(fm._items.counts, fm.n_items, positives, k * m,
                                    fm.config.neg_pool)
    e_user = compose_user(*fm._side(ukeys, uw)).astype(np.float64)
    e_item = compose_item(*fm._side(*fm._items.keys_of(neg.ravel()))).astype(np.float64)
    b = positives.size
    scores = np.einsum("bd,bjd->bj", e_user[owner], e_item.reshape(b, k * m, -1))
    scores = scores.reshape(b, k, m)
    best = np.argmax(scores, axis=2)
    top2 = np.sort(scores, axis=2)[..., -2:] if m > 1 else np.zeros((b, k, 2))
    gap = top2[..., 1] - top2[..., 0]
    pick = np.take_along_axis(neg.reshape(b, k, m), best[..., None], axis=2)[..., 0]
    return pick, gap, np.abs(scores).max(initial=1.0)


@pytest.mark.parametrize("schema", [SCHEMA, IDS_ONLY], ids=["profiles+history", "ids-only"])
@pytest.mark.parametrize("context", [False, True])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("b", [1, 7, 33])
def test_hard_negatives_equal_the_float64_argmax(schema, context, seed, b) -> None:
    k, m = 4, 3
    fm = trained(schema, seed, context, k, m)
    rng = np.random.default_rng(100 + seed)
    # duplicate users and duplicate positives on purpose
    ents = fm._users.lookup([f"u{j}" for j in rng.integers(0, 12, b)])
    uu, owner = np.unique(ents, return_inverse=True)
    ukeys, uw = fm._users.keys_of(uu)
    positives = rng.integers(0, fm.n_items, b)
    state = fm._sampler.rng.bit_generator.state
    neg, valid = fm._negatives(ukeys, uw, owner, positives, k)
    fm._sampler.rng.bit_generator.state = state
    expect, gap, scale = reference_negatives(fm, ukeys, uw, owner, positives, k)
    assert neg.shape == (b, k) and valid.shape == (b, k) and valid.all()
    assert fm._sampler.rng.bit_generator.state != state  # the same draws were consumed
    clear = gap > 1e-5 * scale  # picks between rounding-level ties may differ
    assert clear.mean() > 0.5  # the comparison is not vacuous
    assert np.array_equal(neg[clear], expect[clear])
    assert not (neg == positives[:, None]).any()


def test_hard_negatives_of_one_item_catalogue_are_invalid() -> None:
    fm = OnlineFM(IDS_ONLY, TrainConfig(dim=4, loss="bpr", negatives=2, neg_candidates=3))
    fm.learn_many(["u"], ["only"], ts=1e9)
    ents = fm._users.lookup(["u"])
    ukeys, uw = fm._users.keys_of(ents)
    neg, valid = fm._negatives(ukeys, uw, np.zeros(1, np.int64), fm._items.lookup(["only"]), 2)
    assert neg.shape == (1, 2) and not valid.any()


@pytest.mark.parametrize("schema", [SCHEMA, IDS_ONLY], ids=["profiles+history", "ids-only"])
@pytest.mark.parametrize("n", [0, 1, 9])
def test_float32_terms_equal_the_float64_aggregates(schema, n) -> None:
    fm = trained(schema, 1, True)
    for cat, side in ((fm._users, "user"), (fm._items, "item")):
        ents = np.arange(min(n, cat.n))
        if n > 1:
            ents = np.concatenate([ents, ents[:2]])  # duplicates
        keys, weights = cat.keys_of(ents)
        a, vec = fm._terms32(keys, weights, with_a=True)
        none, vec_only = fm._terms32(keys, weights, with_a=False)
        lin, cross, v64 = aggregate(*fm._rows_params(keys), weights)
        assert a.dtype == np.float32 and vec.dtype == np.float32 and none is None
        assert a.shape == (ents.size,) and vec.shape == (ents.size, fm.config.dim)
        np.testing.assert_allclose(vec, v64, rtol=1e-5, atol=1e-6, err_msg=side)
        np.testing.assert_allclose(vec_only, vec, rtol=0, atol=0)
        np.testing.assert_allclose(a, lin + cross, rtol=1e-5, atol=1e-6, err_msg=side)


def twins(loss: str, context: bool, schema: FeatureSchema, fresh: bool = False,
          **cfg: object):
    """Two equal models after a warm-up that admitted every user and item (picks by
    ``_negatives``), and the events of six more steps (``fresh``: with ids never seen)."""
    made = []
    for _ in range(2):
        fm = OnlineFM(schema, TrainConfig(dim=8, loss=loss, negatives=3, neg_candidates=3,  # type: ignore[arg-type]
                                          neg_sampling="uniform", seed=7, init_std=0.3,
                                          l2=0.01, **cfg))
        fm.fused_pick = False
        made.append(fm)
    rng = np.random.default_rng(11)
    users = [f"u{j}" for j in range(25)]
    items = [f"i{j}" for j in range(50)]
    for fm in made:
        if schema is not IDS_ONLY:
            fm.upsert_users(users[:20], [{"gender": "MF"[j % 2]} for j in range(20)])
            # CHURN: a genre of its own per item, so two items whose ids read the fallback row
            # never tie exactly (a tie may be broken either way by float rounding)
            fm.upsert_items(items, [{"genres": ["a", "b", "c"][: 1 + j % 3] if schema is SCHEMA
                                     else [f"g{j}"], "year": 1975 + j}
                                    for j in range(len(items))])
    steps = []
    for step in range(9):
        n = 30 if step < 3 else int(rng.integers(1, 40))
        u = users if step == 0 else [users[j] for j in rng.integers(0, len(users), n)]
        i = (items[:25] if step == 0 else items[25:] if step == 1
             else [items[j] for j in rng.integers(0, len(items), len(u))])
        u = u[: len(i)]
        if fresh and step >= 3:  # new users and items, some seen twice (admitted)
            u = u + [f"new-u{step}", f"new-u{step}", f"new-u{step - 1}"]
            i = i + [f"new-i{step}", f"new-i{step - 1}", f"new-i{step}"]
        y = (rng.random(len(u)) < 0.7).astype(np.float32) if loss == "logistic" else None
        ctx = [{"hour": str(h)} for h in rng.integers(0, 4, len(u))] if context else None
        if y is not None:
            y = np.concatenate([y, np.ones(len(u) - y.size, np.float32)])
        if ctx is not None:
            ctx = ctx + [{"hour": "9"}] * (len(u) - len(ctx))
        steps.append((u, i, y, ctx, 1e9 + step * (2.0 if schema is CHURN else 1.0)))
    for fm in made:
        for u, i, y, ctx, t in steps[:3]:
            fm.learn_many(u, i, y, contexts=ctx, ts=t)
        fm._table.drain_dirty()
    return made[0], made[1], steps[3:]


@pytest.mark.parametrize("loss", ["bpr", "logistic", "hinge"])
@pytest.mark.parametrize("context", [False, True])
@pytest.mark.parametrize("schema", [SCHEMA, IDS_ONLY, CHURN],
                         ids=["profiles+history", "ids-only", "admission+expiry"])
@pytest.mark.parametrize("cfg", [{}, {"step_scaling": "count"}, {"user_acc_decay": None},
                                 {"neg_pool": 0}])
@pytest.mark.parametrize("fresh", [False, True], ids=["known ids", "new ids"])
def test_fused_pick_trains_what_separate_picking_trains(loss, context, schema, cfg,
                                                        fresh) -> None:
    fused, plain, steps = twins(loss, context, schema, fresh, **cfg)
    changed = []
    fused._space.observe = _logging(fused._space.observe, fused._space, changed)
    fused.fused_pick = True
    for u, i, y, ctx, t in steps:
        lf = fused.learn_many(u, i, y, contexts=ctx, ts=t)
        lp = plain.learn_many(u, i, y, contexts=ctx, ts=t)
        assert lf == pytest.approx(lp, rel=1e-5, abs=1e-6)
        # the same rows written (rows only unpicked candidates read are left alone)
        assert np.array_equal(fused._table.drain_dirty(), plain._table.drain_dirty())
    n = plain.n_rows
    assert fused.n_rows == n
    np.testing.assert_allclose(fused.params[:n], plain.params[:n], atol=1e-5)
    np.testing.assert_allclose(fused._table.acc[:n], plain._table.acc[:n], rtol=1e-4, atol=1e-9)
    assert fused.bias == pytest.approx(plain.bias, abs=1e-6)
    if fresh or schema is CHURN:  # the rows-before path ran
        assert any(changed)
    assert fused._space.row_log is None


def _logging(observe, space, out):
    """Wrap ``observe``: record whether rows changed while the trainer logged them."""
    def wrapped(*args, **kwargs):
        n = observe(*args, **kwargs)
        if space.row_log is not None:
            out.append(n)
        return n
    return wrapped


@pytest.mark.parametrize("empty", ["no events", "no positives"])
def test_fused_pick_handles_steps_without_positives(empty) -> None:
    fused, plain, _ = twins("logistic", True, SCHEMA)
    fused.fused_pick = True
    n = 0 if empty == "no events" else 3
    args = (["u1", "u2", "u3"][:n], ["i1", "i2", "i2"][:n], np.zeros(n, np.float32))
    ctx = [{"hour": "1"}] * n
    assert fused.learn_many(*args, contexts=ctx, ts=2e9) == pytest.approx(
        plain.learn_many(*args, contexts=ctx, ts=2e9), rel=1e-6)
    np.testing.assert_allclose(fused.params, plain.params, atol=1e-6)


def test_fused_pick_replay_equals_separate_picking() -> None:
    fused, plain, steps = twins("bpr", True, SCHEMA)
    fused.fused_pick = True
    for u, i, _, ctx, _ in steps:
        assert fused.replay_many(u, i, ctx) == pytest.approx(plain.replay_many(u, i, ctx),
                                                             rel=1e-5, abs=1e-6)
    n = plain.n_rows
    np.testing.assert_allclose(fused.params[:n], plain.params[:n], atol=1e-5)


@pytest.mark.parametrize("entries", [1, 2])
def test_terms_before_recompose_entities_with_the_earliest_logged_rows(entries) -> None:
    from model.features import PAD
    from model.step import entity_terms

    fm = trained(SCHEMA, 0, True)
    keys, weights = fm._items.keys_of(np.arange(6))
    live = keys != PAD
    slot_keys, x = keys[live], weights[live]
    indptr = np.concatenate([[0], np.cumsum(live.sum(axis=1))]).astype(np.int64)
    rows = fm._space.key_row[slot_keys].astype(np.int64)
    uniq, cols = np.unique(rows, return_inverse=True)
    terms = entity_terms(fm.params[uniq], indptr, cols, x)
    ka, kb = int(keys[1, 0]), int(keys[4, 0])  # two items' id keys
    if entries == 1:
        log = [(np.array([min(ka, kb), max(ka, kb)]), np.array([2, 3]))]
        want = {min(ka, kb): 2, max(ka, kb): 3}
    else:  # a key logged twice: its first (earliest) row is the one from before the step
        log = [(np.array([ka]), np.array([2])), (np.array([ka, kb]), np.array([5, 3]))]
        want = {ka: 2, kb: 3}
    got = fm._terms_before(terms, slot_keys, indptr, x, uniq[cols], log)
    before = rows.copy()
    for k, r in want.items():
        before[slot_keys == k] = r
    expect = entity_terms(fm.params[before], indptr, np.arange(before.size), x)
    np.testing.assert_allclose(got.V, expect.V, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.a, expect.a, rtol=1e-6, atol=1e-7)
    assert not np.allclose(got.V, terms.V)  # the logged rows made a difference
    untouched = [0, 2, 3, 5]
    np.testing.assert_array_equal(got.V[untouched], terms.V[untouched])
