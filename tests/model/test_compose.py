"""Exactness of the folded vectors: <E_user, E_item> = FM logit − w0, and with context the query
vector reproduces the full score; over random models, multi-valued and hashed fields, unseen
and not-yet-admitted values, unknown and profile-only (cold) ids."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import (
    ContextTable,
    FeatureSchema,
    OnlineFM,
    SnapshotError,
    TrainConfig,
    compose_item,
    compose_user,
    context_query,
)

# hypothesis settings of this module (not a global profile: other packages keep theirs)
PROPERTY = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])

SCHEMA = FeatureSchema.from_dict(
    {
        "user": {
            "gender": {},
            "age": {"kind": "numeric", "boundaries": [18, 25, 35, 45]},
            "zip": {"hash_buckets": 7},
            "tags": {"kind": "multi", "min_count": 2},
            "recent": {"kind": "history", "history_len": 3},
            "recent_hashed": {"kind": "history", "history_len": 2, "hash_buckets": 4},
        },
        "item": {
            "genres": {"kind": "multi"},
            "year": {"kind": "numeric", "boundaries": [1980, 1990, 2000]},
            "brand": {"min_count": 3},
            "labels": {"kind": "multi", "hash_buckets": 5},
        },
        "context": {"hour": {}, "device": {"hash_buckets": 3}, "slot": {"kind": "multi"}},
    }
)

_word = st.sampled_from(["a", "b", "c", "d", "e", "f"])


@st.composite
def user_profile(draw: st.DrawFn) -> dict[str, Any]:
    p: dict[str, Any] = {}
    if draw(st.booleans()):
        p["gender"] = draw(st.sampled_from(["M", "F", "X"]))
    if draw(st.booleans()):
        p["age"] = draw(st.integers(0, 80))
    if draw(st.booleans()):
        p["zip"] = draw(st.sampled_from(["100", "945", "021", 94110]))
    if draw(st.booleans()):
        p["tags"] = draw(st.lists(_word, max_size=4))
    return p


@st.composite
def item_profile(draw: st.DrawFn) -> dict[str, Any]:
    p: dict[str, Any] = {}
    if draw(st.booleans()):
        p["genres"] = draw(st.lists(_word, max_size=4))
    if draw(st.booleans()):
        p["year"] = draw(st.floats(1950, 2020))
    if draw(st.booleans()):
        p["brand"] = draw(st.sampled_from(["x", "y", "z", 7]))
    if draw(st.booleans()):
        p["labels"] = draw(st.lists(_word, max_size=3))
    return p


@st.composite
def context(draw: st.DrawFn) -> dict[str, Any]:
    c: dict[str, Any] = {}
    if draw(st.booleans()):
        c["hour"] = draw(st.sampled_from(["1", "2", "3", 4, "never-seen"]))
    if draw(st.booleans()):
        c["device"] = draw(st.sampled_from(["ios", "android", "web"]))
    if draw(st.booleans()):
        c["slot"] = draw(st.lists(_word, max_size=3))
    return c


@st.composite
def scenario(draw: st.DrawFn) -> tuple[OnlineFM, list[str], list[str], list[dict[str, Any]]]:
    dim = draw(st.integers(1, 8))
    fm = OnlineFM(SCHEMA, TrainConfig(dim=dim, seed=draw(st.integers(0, 1000)), negatives=2))
    n_users, n_items = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    users = [f"u{j}" for j in range(n_users)]
    items = [f"i{j}" for j in range(n_items)]
    fm.upsert_users(users, [draw(user_profile()) for _ in users])
    fm.upsert_items(items, [draw(item_profile()) for _ in items])
    n_ev = draw(st.integers(0, 12))
    if n_ev:
        fm.learn_many(
            [users[draw(st.integers(0, n_users - 1))] for _ in range(n_ev)],
            [items[draw(st.integers(0, n_items - 1))] for _ in range(n_ev)],
            contexts=[draw(context()) for _ in range(n_ev)],
            ts=np.arange(n_ev, dtype=float),
        )
    # cold entities: profile only, never in an event (id row not admitted)
    fm.upsert_users(["cold-u"], [draw(user_profile())])
    fm.upsert_items(["cold-i"], [draw(item_profile())])
    # a random model: every row (fallbacks, hashed, admitted) gets random values
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    t = fm._table
    t.params[1 : t.n_rows] = rng.normal(0, 0.7, (t.n_rows - 1, dim + 1)).astype(np.float32)
    fm._w0 = float(rng.normal())
    q_users = users + ["cold-u", "unknown-u"]
    q_items = items + ["cold-i", "unknown-i"]
    n = draw(st.integers(1, 8))
    pu = [q_users[draw(st.integers(0, len(q_users) - 1))] for _ in range(n)]
    pi = [q_items[draw(st.integers(0, len(q_items) - 1))] for _ in range(n)]
    ctx = [draw(context()) for _ in range(n)]
    return fm, pu, pi, [pu, pi, ctx]  # type: ignore[list-item]


def _tol(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 tolerance of <a, b>: relative to |a||b| (the size of the terms summed)."""
    return 2e-6 * (a.shape[1] + 4) * (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1)


@PROPERTY
@given(scenario())
def test_user_item_inner_product_is_logit_minus_bias(sc) -> None:
    fm, pu, pi, _ = sc
    eu = fm.user_vectors(pu)
    ids, ei = fm.item_vectors(pi)
    assert ids == pi
    assert eu.dtype == np.float32 and eu.shape == (len(pu), fm.config.dim + 2)
    got = np.einsum("nd,nd->n", eu.astype(np.float64), ei.astype(np.float64))
    want = fm.score(pu, pi).astype(np.float64) - fm.bias
    assert np.all(np.abs(got - want) <= _tol(eu, ei) + 1e-5 * np.abs(want))


@PROPERTY
@given(scenario())
def test_context_query_reproduces_full_score(sc) -> None:
    fm, pu, pi, (_, _, ctx) = sc
    table = fm.context_table()
    cl, cv = table.encode(ctx)
    q = context_query(fm.user_vectors(pu), cl, cv)
    _, ei = fm.item_vectors(pi)
    got = np.einsum("nd,nd->n", q.astype(np.float64), ei.astype(np.float64))
    want = fm.score(pu, pi, ctx).astype(np.float64) - fm.bias
    assert np.all(np.abs(got - want) <= _tol(q, ei) + 1e-5 * np.abs(want))
    # the serialised table encodes identically
    again = ContextTable.from_bytes(table.to_bytes())
    cl2, cv2 = again.encode(ctx)
    assert np.array_equal(cl, cl2) and np.array_equal(cv, cv2)


@PROPERTY
@given(scenario())
def test_all_item_vectors_match_selected(sc) -> None:
    fm, _, pi, _ = sc
    ids, all_vecs = fm.item_vectors()
    assert ids == fm.known_items()
    sel_ids, sel = fm.item_vectors([i for i in pi if fm.has_item(i)])
    pos = {u: j for j, u in enumerate(ids)}
    for j, u in enumerate(sel_ids):
        assert np.allclose(all_vecs[pos[u]], sel[j], atol=1e-6)


def test_compose_layout() -> None:
    lin = np.array([1.0, 2.0])
    cross = np.array([0.5, -1.0])
    vec = np.arange(6, dtype=np.float64).reshape(2, 3)
    eu = compose_user(lin, cross, vec)
    ei = compose_item(lin, cross, vec)
    assert eu.dtype == ei.dtype == np.float32
    assert np.allclose(eu[:, :2], [[1, 1.5], [1, 1.0]])
    assert np.allclose(ei[:, :2], [[1.5, 1], [1.0, 1]])
    assert np.allclose(eu[:, 2:], vec) and np.allclose(ei[:, 2:], vec)
    q = context_query(eu, np.array([0.25, 0.0]), np.ones((2, 3)))
    assert np.allclose(q[:, 0], 1.0)
    assert np.allclose(q[:, 1], eu[:, 1] + [0.25, 0.0] + vec.sum(1))
    assert np.allclose(q[:, 2:], vec + 1)
    single = context_query(eu[0], np.float64(0.25), np.ones(3))
    assert np.allclose(single, q[0])


def test_context_table_without_context_fields() -> None:
    fm = OnlineFM(FeatureSchema.ids_only(), TrainConfig(dim=4))
    table = fm.context_table()
    cl, cv = table.encode([{}, {"hour": "3"}, None])
    assert cl.shape == (3,) and cv.shape == (3, 4)
    assert not cl.any() and not cv.any()
    again = ContextTable.from_bytes(table.to_bytes())
    assert again.encode([{}])[1].shape == (1, 4)


def test_context_empty_dict_is_zero_and_unseen_uses_fallback() -> None:
    fm = OnlineFM(SCHEMA, TrainConfig(dim=3))
    fm.learn_many(["u"], ["i"], contexts=[{"hour": "5"}], ts=np.array([1.0]))
    table = fm.context_table()
    cl, cv = table.encode([{}, {"hour": "nope"}, {"hour": "other"}, {"hour": "5"}])
    assert cl[0] == 0 and not cv[0].any()
    assert np.array_equal(cv[1], cv[2])  # both unseen -> the same learned fallback row
    assert not np.array_equal(cv[1], cv[3])


def test_context_table_rejects_corrupt_bytes() -> None:
    fm = OnlineFM(SCHEMA, TrainConfig(dim=3))
    blob = bytearray(fm.context_table().to_bytes())
    blob[-1] ^= 0xFF
    with pytest.raises(SnapshotError, match="checksum"):
        ContextTable.from_bytes(bytes(blob))
    with pytest.raises(SnapshotError, match="truncated"):
        ContextTable.from_bytes(bytes(blob[:20]))
