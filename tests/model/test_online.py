"""Online training: loss goes down, planted clusters are learned, negatives are never the
positive, seeds make runs reproducible, inputs are validated."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import ConfigError, FeatureSchema, InputError, OnlineFM, TrainConfig
from model.sampler import NegativeSampler

# hypothesis settings of this module (not a global profile: other packages keep theirs)
PROPERTY = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])

SYN = FeatureSchema.from_dict(
    {"user": {"segment": {}}, "item": {"category": {}}, "context": {"hour": {}}}
)
CLUSTERS = 4


def planted(n_users: int = 120, n_items: int = 80, n_events: int = 12_000, seed: int = 0):
    """Users of segment c click items of category c (90%) or anything (10%)."""
    rng = np.random.default_rng(seed)
    useg = rng.integers(0, CLUSTERS, n_users)
    icat = np.arange(n_items) % CLUSTERS
    by_cat = [np.flatnonzero(icat == c) for c in range(CLUSTERS)]
    u = rng.integers(0, n_users, n_events)
    on = rng.random(n_events) < 0.9
    i = np.where(on, [rng.choice(by_cat[useg[x]]) for x in u], rng.integers(0, n_items, n_events))
    users = [f"u{x}" for x in range(n_users)]
    items = [f"i{x}" for x in range(n_items)]
    return users, items, useg, icat, u, i


def train_planted(config: TrainConfig, schema: FeatureSchema = SYN, with_profiles: bool = True):
    users, items, useg, icat, u, i = planted()
    fm = OnlineFM(schema, config)
    if with_profiles:
        fm.upsert_users(users, [{"segment": f"s{s}"} for s in useg])
        fm.upsert_items(items, [{"category": f"c{c}"} for c in icat])
    losses = []
    for lo in range(0, len(u), 256):
        sl = slice(lo, lo + 256)
        losses.append(
            fm.learn_many(
                [users[x] for x in u[sl]],
                [items[x] for x in i[sl]],
                ts=np.full(len(u[sl]), float(lo)),
            )
        )
    return fm, users, items, useg, icat, losses


def cluster_precision(fm: OnlineFM, users, items, useg, icat) -> float:
    eu = fm.user_vectors(users)
    ids, ei = fm.item_vectors(items)
    top = np.argsort(-(eu @ ei.T), axis=1)[:, :10]
    return float((icat[top] == useg[:, None]).mean())


@pytest.mark.parametrize(
    ("loss", "sampling"),
    [("logistic", "popularity"), ("bpr", "uniform"), ("hinge", "uniform"), ("bpr", "popularity")],
)
def test_learns_planted_clusters(loss: str, sampling: str) -> None:
    cfg = TrainConfig(dim=8, loss=loss, seed=1, negatives=4, neg_sampling=sampling)  # type: ignore[arg-type]
    fm, users, items, useg, icat, losses = train_planted(cfg)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3])
    assert cluster_precision(fm, users, items, useg, icat) > 0.8


def test_default_config_learns_planted_clusters_from_ids_alone() -> None:
    cfg = TrainConfig(dim=8, seed=2)
    fm, users, items, useg, icat, _ = train_planted(cfg, FeatureSchema.ids_only(), False)
    assert cluster_precision(fm, users, items, useg, icat) > 0.8


def test_cold_user_gets_cluster_from_profile() -> None:
    fm, users, items, useg, icat, _ = train_planted(TrainConfig(dim=8, seed=3))
    fm.upsert_users(["newbie"], [{"segment": "s2"}])
    ids, ei = fm.item_vectors(items)
    top = np.argsort(-(fm.user_vectors(["newbie"]) @ ei.T)[0])[:10]
    assert (icat[top] == 2).mean() >= 0.8


@PROPERTY
@given(
    st.integers(2, 40),
    st.integers(1, 64),
    st.integers(1, 8),
    st.sampled_from(["uniform", "popularity"]),
    st.integers(0, 10_000),
    st.floats(0, 3),
    st.sampled_from([0, 1, 2, 16]),
)
def test_negatives_never_equal_the_positive(n_items, b, k, mode, seed, alpha, pool) -> None:
    rng = np.random.default_rng(seed)
    counts = np.zeros(n_items, dtype=np.int64)
    counts[0] = 10**6  # a dominant item: popularity keeps drawing it
    s = NegativeSampler(mode, alpha, rng)
    pos = rng.integers(0, n_items, b)
    pos[0] = 0
    neg, valid = s.sample(counts, n_items, pos, k, pool)
    assert neg.shape == (b, k) and valid.all()
    assert (neg != pos[:, None]).all()
    assert ((neg >= 0) & (neg < n_items)).all()


def test_single_item_catalog_has_no_negatives() -> None:
    fm = OnlineFM(config=TrainConfig(dim=4, negatives=3))
    loss = fm.learn_many(["u"], ["only"], ts=[1.0])
    assert np.isfinite(loss)


@pytest.mark.parametrize("pool", [0, 64])
def test_popularity_sampling_follows_counts(pool: int) -> None:
    rng = np.random.default_rng(0)
    counts = np.array([0, 0, 999, 99], dtype=np.int64)
    s = NegativeSampler("popularity", 1.0, rng)
    neg = np.concatenate([s.sample(counts, 4, np.full(200, 0), 1, pool)[0] for _ in range(100)])
    freq = np.bincount(neg.ravel(), minlength=4) / neg.size
    want = (counts + 1.0)[1:] / (counts + 1.0)[1:].sum()
    assert np.allclose(freq[1:], want, atol=0.03)


def _run(seed: int) -> OnlineFM:
    fm, *_ = train_planted(TrainConfig(dim=4, seed=seed))
    return fm


def test_seeded_training_is_reproducible() -> None:
    a, b, c = _run(5), _run(5), _run(6)
    n = a.n_rows
    assert np.array_equal(a.params[:n], b.params[:n])
    assert np.array_equal(a._table.acc[:n], b._table.acc[:n])
    assert a.bias == b.bias
    assert not np.array_equal(a.params[:n], c.params[: c.n_rows][:n])


def test_explicit_negatives_push_scores_down() -> None:
    fm = OnlineFM(config=TrainConfig(dim=4, loss="logistic", negatives=0, lr=0.1))
    for _ in range(50):
        fm.learn_many(["u", "u"], ["good", "bad"], labels=np.array([1, 0]), ts=[1.0, 1.0])
    good, bad = fm.score(["u", "u"], ["good", "bad"])
    assert good > 1.0 > -1.0 > bad


def test_pairwise_losses_skip_explicit_negatives() -> None:
    fm = OnlineFM(config=TrainConfig(dim=4, loss="bpr", negatives=2))
    fm.learn_many(["u", "v"], ["a", "b"], ts=[0.0, 0.0])
    loss = fm.learn_many(["u"], ["b"], labels=np.array([0.0]), ts=[1.0])
    assert loss == 0.0
    assert fm.n_updates == 3


def test_counts_catalog_and_updates() -> None:
    fm = OnlineFM(config=TrainConfig(dim=4))
    fm.learn_many(["u1", "u2", "u1"], ["a", "b", "a"], labels=np.array([1, 1, 0]), ts=[1, 2, 3])
    ids, counts = fm.item_counts()
    assert dict(zip(ids, counts.tolist(), strict=True)) == {"a": 1, "b": 1}
    assert fm.known_users() == ["u1", "u2"] and fm.has_user("u1") and not fm.has_user("x")
    assert fm.known_items() == ["a", "b"] and fm.has_item("b")
    assert fm.n_updates == 3
    before = fm.stats()
    fm.score(["ghost"], ["phantom"])  # scoring never mutates
    fm.user_vectors(["ghost"])
    assert fm.stats() == before and not fm.has_user("ghost")


def test_numeric_ids_are_stringified() -> None:
    fm = OnlineFM(config=TrainConfig(dim=4))
    fm.learn_many([196], [242], ts=[1.0])  # type: ignore[list-item]
    assert fm.has_user("196") and fm.has_item("242") and fm.has_user(196)  # type: ignore[arg-type]


def test_input_validation() -> None:
    fm = OnlineFM(config=TrainConfig(dim=4))
    with pytest.raises(InputError, match="item ids"):
        fm.learn_many(["u"], ["a", "b"])
    with pytest.raises(InputError, match="labels"):
        fm.learn_many(["u"], ["a"], labels=np.array([2.0]))
    with pytest.raises(InputError, match="contexts"):
        fm.learn_many(["u"], ["a"], contexts=[{}, {}])
    with pytest.raises(InputError, match="ts"):
        fm.learn_many(["u"], ["a"], ts=[float("nan")])
    assert fm.learn_many([], []) == 0.0
    assert not fm.has_user("u")  # nothing was applied
    with pytest.raises(ConfigError, match="dim"):
        TrainConfig(dim=0)
    with pytest.raises(ConfigError, match="negatives"):
        TrainConfig(loss="bpr", negatives=0)
    with pytest.raises(ConfigError, match="loss"):
        TrainConfig(loss="mse")  # type: ignore[arg-type]


def test_default_ts_is_now() -> None:
    fm = OnlineFM(config=TrainConfig(dim=4))
    fm.learn_many(["u"], ["a"])
    assert fm._space.watermark > 1.6e9


def test_id_rows_at_are_the_rows_each_id_key_reads_and_a_learn_writes() -> None:
    fm = OnlineFM(FeatureSchema.ids_only(), TrainConfig(dim=4, negatives=1))
    fm.learn_many(["u0", "u1", "u2"], ["i0", "i1", "i0"])
    fm.drain_changed_rows()
    ents = np.arange(fm.n_items)
    items = fm.id_rows_at("item", ents)
    assert items.dtype == np.int64 and items.tolist() == fm.key_rows(
        fm.item_keys_at(ents)[0][:, 0]).tolist()
    own = fm.item_own_rows(ents)
    assert (items[own >= 0] == own[own >= 0]).all()
    fm.learn_many(["u9"], ["i1"])
    changed = fm.drain_changed_rows()
    u9 = fm.id_rows_at("user", np.array([fm.known_users().index("u9")]))
    assert changed[u9].all()  # the row a learn wrote for u9's id
    users = fm.id_rows_at("user", np.arange(len(fm.known_users())))
    assert len(set(users.tolist())) == 4 and not set(users.tolist()) & set(items.tolist())


def test_memory_use_counts_ids_rows_and_array_bytes() -> None:
    dim = 8
    fm = OnlineFM(FeatureSchema.ids_only(), TrainConfig(dim=dim, negatives=1))
    fm.learn_many([f"u{j}" for j in range(50)], [f"i{j % 7}" for j in range(50)])
    use = fm.memory_use()
    assert use.ids == len(fm.known_users()) + len(fm.known_items()) == 57
    assert use.ids <= use.rows_live <= use.rows_capacity
    assert use.params_bytes == use.rows_capacity * (dim + 1 + 2) * 4  # (w, v) + 2 Adagrad
    assert use.scratch_bytes == use.rows_capacity * 4
    assert use.keys_bytes > 0 and use.catalog_bytes > 0
    assert use.arrays_bytes == (use.params_bytes + use.scratch_bytes + use.keys_bytes
                                + use.catalog_bytes)


def test_params_is_a_read_only_view_of_the_live_table() -> None:
    fm = OnlineFM(FeatureSchema.ids_only(), TrainConfig(dim=4, negatives=1))
    fm.learn_many(["u0", "u1"], ["i0", "i1"])
    before = fm.params.copy()
    assert before.dtype == np.float32 and before.shape[1] == 5
    with pytest.raises(ValueError, match="read-only"):
        fm.params[0, 0] = 1.0
    np.testing.assert_array_equal(fm.params, before)
    fm.learn_many(["u0"], ["i1"])
    assert not np.array_equal(fm.params[: before.shape[0]], before)  # a learn shows through


def test_clearing_a_profile_keeps_the_id_row_and_history_and_drops_the_profile_keys() -> None:
    """``clear_user_profiles`` / ``clear_item_profiles`` (a tombstone on a profile topic): the
    entity stays known with its id row and history; the shared keys its vector reads lose the
    profile's and nothing else; unknown ids are ignored (nothing created); vectorised over ids."""
    from model import FeatureSchema

    schema = FeatureSchema.from_dict({"user": {"segment": {}}, "item": {"category": {}}})
    fm = OnlineFM(schema, TrainConfig(dim=4, negatives=2))
    fm.upsert_users(["u1", "u2"], [{"segment": "a"}, {"segment": "b"}])
    fm.upsert_items(["i1", "i2"], [{"category": "x"}, {"category": "y"}])
    fm.learn_many(["u1", "u2", "u1"], ["i1", "i2", "i2"], ts=1.0)
    positives = fm.user_positives(["u1"]).tolist()

    def reads(user: str) -> set[int]:
        _, keys, weights = fm.user_parts([user])
        return set(keys[0][weights[0] != 0].tolist())

    before_u1, before_u2 = reads("u1"), reads("u2")
    items_before = fm.item_keys_at(np.arange(2))
    assert fm.clear_user_profiles(["u1", "ghost", "u1"]) == ["u1"]
    assert fm.clear_item_profiles(["i1"]) == ["i1"]
    assert fm.user_profile("u1") == {} and fm.user_profile("ghost") is None
    assert fm.user_positives(["u1"]).tolist() == positives and fm.known_users() == ["u1", "u2"]
    dropped = before_u1 - reads("u1")
    assert len(dropped) == 1 and reads("u1") < before_u1  # the segment key, nothing else
    assert reads("u2") == before_u2  # another user untouched
    keys, weights = fm.item_keys_at(np.arange(2))
    assert int((weights[0] != 0).sum()) == 1  # i1: its id key alone
    assert keys[0][0] == items_before[0][0][0]
    assert (keys[1] == items_before[0][1]).all() and fm.item_profile("i2") == {"category": "y"}
    assert fm.clear_user_profiles([]) == []
