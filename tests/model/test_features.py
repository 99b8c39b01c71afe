"""Encoding and online vocabularies: tokens, growth, fallback rows, admission, expiry."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from model import FeatureError, FeatureSchema, OnlineFM, TrainConfig
from model.features import (
    FeatureSpace,
    _ring_weights,
    bucketize,
    canon,
    stable_hash,
    tokenize_column,
)
from model.optim import RowTable
from model.schema import FieldSpec


def _fm(schema: FeatureSchema, **kw) -> OnlineFM:
    return OnlineFM(schema, TrainConfig(**{"dim": 4, "negatives": 1, **kw}))


def _row(fm: OnlineFM, field: str, value: str) -> int:
    return fm.feature_row(field, value)


def _fallback_row(fm: OnlineFM, field: str) -> int:
    return fm.fallback_row(field)


def test_canon_and_hash_are_stable() -> None:
    assert canon("x") == "x"
    assert canon(3) == "3" and canon(3.0) == "3" and canon(2.5) == "2.5"
    assert canon(True) == "true" and canon(np.int64(7)) == "7"
    with pytest.raises(FeatureError):
        canon([1])
    # blake2b: the same bucket in every process (not Python's salted hash)
    digest = hashlib.blake2b(b"hello", digest_size=8).digest()
    assert stable_hash("hello", 1000) == int.from_bytes(digest, "little") % 1000 == 191
    assert stable_hash("94110", 200) == 68  # pinned: changing the hash remaps every model
    assert 0 <= stable_hash("zip-94110", 7) < 7


def test_bucketize_edges() -> None:
    b = (18.0, 25.0)
    assert bucketize(b, np.array([-1, 17.9, 18, 24.9, 25, 99])).tolist() == [0, 0, 1, 1, 2, 2]


def test_tokenize_kinds_and_errors() -> None:
    multi = FieldSpec("g", "item", "multi")
    assert tokenize_column(multi, [["a", "b", "a"], "c", [], None, [1, 2.0]]) == [
        ["a", "b"],
        ["c"],
        None,
        None,
        ["1", "2"],
    ]
    num = FieldSpec("age", "user", "numeric", boundaries=(10.0, 20.0))
    assert tokenize_column(num, [5, "15", None, float("nan"), 25.0]) == [0, 1, None, None, 2]
    with pytest.raises(FeatureError, match="age"):
        tokenize_column(num, ["old"])
    cat = FieldSpec("c", "user")
    with pytest.raises(FeatureError, match="multi"):
        tokenize_column(cat, [["a"]])
    hashed = FieldSpec("z", "user", hash_buckets=5)
    assert tokenize_column(hashed, ["abc"]) == [stable_hash("abc", 5)]


def test_multi_values_weigh_one_over_n() -> None:
    schema = FeatureSchema.from_dict({"item": {"genres": {"kind": "multi"}}})
    fm = _fm(schema)
    fm.upsert_items(["i1", "i2"], [{"genres": ["a", "b", "c", "a"]}, {"genres": "solo"}])
    keys, w = fm._items.keys_of(np.array([0, 1]))
    assert w[0].tolist() == pytest.approx([1.0, 1 / 3, 1 / 3, 1 / 3])
    assert w[1].tolist() == pytest.approx([1.0, 1.0, 0.0, 0.0])
    assert keys[1, 2] == 0  # padding


def test_new_value_mid_stream_gets_its_own_row() -> None:
    schema = FeatureSchema.from_dict({"context": {"hour": {}}})
    fm = _fm(schema)
    fm.learn_many(["u1"], ["i1"], contexts=[{"hour": "1"}], ts=[1.0])
    assert _row(fm, "hour", "1") != _fallback_row(fm, "hour")
    assert _row(fm, "hour", "2") == _fallback_row(fm, "hour")  # unseen
    keys = fm.stats()["keys"]
    before = fm.score(["u1"], ["i1"], [{"hour": "2"}])
    fm.score(["u1"], ["i1"], [{"hour": "3"}])  # scoring never creates anything
    assert fm.stats()["keys"] == keys
    fm.learn_many(["u2"], ["i2"], contexts=[{"hour": "2"}], ts=[2.0])
    r2 = _row(fm, "hour", "2")
    assert r2 not in (_fallback_row(fm, "hour"), _row(fm, "hour", "1"))
    assert fm.has_user("u2") and fm.has_item("i2")
    assert before.shape == (1,)


def test_growth_is_amortised_by_doubling() -> None:
    fm = _fm(FeatureSchema.ids_only(), loss="logistic", negatives=0)
    caps = set()
    for start in range(0, 6000, 500):
        ids = [f"u{j}" for j in range(start, start + 500)]
        fm.learn_many(ids, ids, ts=np.full(500, 1.0))
        caps.add(fm.memory_use().rows_capacity)
    # 12000 new rows over 12 batches: only a handful of reallocations, each a doubling
    assert all(b == 2 * a for a, b in zip(sorted(caps), sorted(caps)[1:], strict=False))
    assert len(caps) <= 5
    assert fm.memory_use().rows_live >= 12000


def test_admission_after_min_count_sightings() -> None:
    schema = FeatureSchema.from_dict(
        {"user": {"user_id": {"min_count": 3}, "city": {"min_count": 2}}}
    )
    fm = _fm(schema)
    fm.upsert_users(["a"], [{"city": "paris"}])
    fb_user = _fallback_row(fm, "user_id")
    sp = fm._space
    key_a = int(fm._users.ent_key[fm._users.index["a"]])
    for k in range(2):
        fm.learn_many(["a"], ["i"], ts=[float(k)])
        assert sp.key_row[key_a] == fb_user  # 1, 2 sightings: still the fallback
    assert _row(fm, "city", "paris") != _fallback_row(fm, "city")  # admitted at 2 sightings
    fm.learn_many(["a"], ["i"], ts=[3.0])
    assert sp.key_row[key_a] != fb_user  # third sighting: its own row
    # sightings within one batch count too
    fm.learn_many(["b", "b", "b"], ["i", "i", "i"], ts=[4.0, 4.0, 4.0])
    key_b = int(fm._users.ent_key[fm._users.index["b"]])
    assert sp.key_row[key_b] != fb_user


def test_unadmitted_values_share_the_learned_fallback() -> None:
    schema = FeatureSchema.from_dict({"user": {"user_id": {"min_count": 1000}}})
    fm = _fm(schema, lr=0.1)
    fb = _fallback_row(fm, "user_id")
    before = fm.params[fb].copy()
    fm.learn_many([f"u{j}" for j in range(50)], [f"i{j % 5}" for j in range(50)], ts=np.ones(50))
    assert not np.array_equal(before, fm.params[fb])  # trained by unadmitted users
    e = fm.user_vectors(["u1", "u2", "never-seen"])
    assert np.array_equal(e[0], e[1]) and np.array_equal(e[0], e[2])


def test_expiry_reuses_and_resets_rows() -> None:
    schema = FeatureSchema.from_dict({"user": {"user_id": {"expire_after_s": 100.0}}})
    fm = _fm(schema, lr=0.5)
    sp, table = fm._space, fm._table
    fm.learn_many(["old"], ["i"], ts=[0.0])
    key_old = int(fm._users.ent_key[fm._users.index["old"]])
    row_old = int(sp.key_row[key_old])
    assert row_old != _fallback_row(fm, "user_id")
    for t in range(1, 5):  # train the row a little
        fm.learn_many(["old"], ["i"], ts=[float(t)])
    trained = table.params[row_old].copy()
    # "i" keeps being seen, "old" does not: after > 100 s it expires and its row is freed
    fm.learn_many(["other"], ["i"], ts=[200.0])
    assert sp.key_row[key_old] == _fallback_row(fm, "user_id")
    assert sp.n_expired >= 1
    assert fm.has_user("old")  # the catalog keeps the user; only the row went back
    # the freed row is handed to the next new value, reset (w = 0, fresh v, zero accumulators)
    n_rows = table.n_rows
    fm.learn_many(["newcomer"], ["i"], ts=[201.0])
    key_new = int(fm._users.ent_key[fm._users.index["newcomer"]])
    assert int(sp.key_row[key_new]) == row_old
    assert table.n_rows == n_rows  # no new row allocated
    assert not np.array_equal(table.params[row_old], trained)
    # "old" comes back: admitted again with a fresh row
    fm.learn_many(["old"], ["i"], ts=[202.0])
    assert sp.key_row[key_old] != _fallback_row(fm, "user_id")


def test_hashed_and_numeric_fields_have_fixed_rows() -> None:
    schema = FeatureSchema.from_dict(
        {"user": {"zip": {"hash_buckets": 4}, "age": {"kind": "numeric", "boundaries": [30]}}}
    )
    fm = _fm(schema)
    n0 = fm.n_rows
    fm.upsert_users(
        [f"u{j}" for j in range(20)], [{"zip": f"z{j}", "age": j * 3} for j in range(20)]
    )
    assert fm.n_rows == n0  # no rows for profiles; only events admit ids
    keys, _ = fm._users.keys_of(np.arange(20))
    zips = {int(k) for k in keys[:, 1:].ravel()} - {0}
    base_zip = int(fm._space.base_key[fm._space.index_of["zip"]])
    base_age = int(fm._space.base_key[fm._space.index_of["age"]])
    assert zips <= set(range(base_zip, base_zip + 4)) | {base_age, base_age + 1}


def test_hashed_ids_need_no_vocabulary() -> None:
    schema = FeatureSchema.from_dict({"user": {"user_id": {"hash_buckets": 16}}})
    fm = _fm(schema)
    fm.learn_many(["a", "b"], ["i", "j"], ts=[1.0, 2.0])
    e1 = fm.user_vectors(["zzz"])  # unknown, hashed: its bucket, deterministic
    e2 = fm.user_vectors(["zzz"])
    assert np.array_equal(e1, e2)


def test_bad_profile_changes_nothing() -> None:
    schema = FeatureSchema.from_dict(
        {"user": {"age": {"kind": "numeric", "boundaries": [1]}, "city": {}}}
    )
    fm = _fm(schema)
    n_keys = fm.stats()["keys"]
    with pytest.raises(FeatureError, match="age"):
        fm.upsert_users(["a", "b"], [{"city": "new-city"}, {"age": "not a number"}])
    assert fm.stats()["keys"] == n_keys
    assert not fm.has_user("a")
    with pytest.raises(FeatureError):
        fm.upsert_users(["a"], ["not a dict"])  # type: ignore[list-item]


def test_profile_replace_merge_and_unknown_fields() -> None:
    schema = FeatureSchema.from_dict({"user": {"gender": {}, "city": {}}})
    fm = _fm(schema)
    fm.upsert_users(["a"], [{"gender": "F", "city": "rome", "shoe": 42}])
    assert fm.user_profile("a") == {"gender": "F", "city": "rome"}  # unknown field ignored
    fm.upsert_users(["a"], [{"city": "oslo"}], merge=True)
    assert fm.user_profile("a") == {"gender": "F", "city": "oslo"}
    fm.upsert_users(["a"], [{"city": "lima"}])  # replace
    assert fm.user_profile("a") == {"city": "lima"}
    fm.upsert_users(["a", "a"], [{"gender": "M"}, {"city": None}], merge=True)
    assert fm.user_profile("a") == {"gender": "M"}  # in order; None removes a field


def test_feature_space_is_independent_of_rows() -> None:
    table = RowTable(2, 0.1, np.random.default_rng(0))
    space = FeatureSpace(FeatureSchema.from_dict({"user": {"c": {}}}), table)
    keys, w = space.encode("user", [{"c": "x"}, {"c": "x"}, {}], create=True)
    assert keys[0, 0] == keys[1, 0] and keys.shape == (3, 1) and w[2, 0] == 0.0
    assert not space.is_admitted(keys[:1, 0]).any()


def test_history_field_keeps_last_items_and_moves_the_user_at_once() -> None:
    schema = FeatureSchema.from_dict(
        {"user": {"user_id": {"min_count": 100}, "recent": {"kind": "history", "history_len": 3}}}
    )
    fm = _fm(schema, negatives=2)
    fm.learn_many(["x", "x"], ["warm-a", "warm-b"], ts=[0.0, 0.0])  # a catalog to sample from
    assert fm.user_history("x") == {"recent": ["warm-a", "warm-b"]}
    before = fm.user_vectors(["u"])
    fm.learn_many(["u"], ["a"], ts=[1.0])
    # u's id is not admitted (min_count 100) but its history now holds "a" with its own row
    assert fm.user_history("u") == {"recent": ["a"]}
    assert not np.array_equal(before, fm.user_vectors(["u"]))
    fm.learn_many(["u", "u", "u"], ["b", "c", "d"], ts=[2.0, 2.0, 2.0])
    assert fm.user_history("u") == {"recent": ["b", "c", "d"]}  # oldest dropped
    fm.learn_many(["u", "u"], ["e", "f"], labels=np.array([1.0, 0.0]), ts=[3.0, 3.0])
    assert fm.user_history("u") == {"recent": ["c", "d", "e"]}  # explicit negatives not kept
    keys, w = fm._users.keys_of(np.array([fm._users.index["u"]]))
    assert w[0, -3:].tolist() == pytest.approx([1 / 3] * 3)
    assert fm.user_history("nobody") == {"recent": []}
    # profiles cannot overwrite the model-kept history
    fm.upsert_users(["u"], [{"recent": ["zzz"]}])
    assert fm.user_history("u") == {"recent": ["c", "d", "e"]}


def test_history_of_one_batch_excludes_its_own_item() -> None:
    schema = FeatureSchema.from_dict({"user": {"recent": {"kind": "history", "history_len": 5}}})
    fm = _fm(schema)
    fm.learn_many(["u"] * 7, [f"i{j}" for j in range(7)], ts=np.zeros(7))
    assert fm.user_history("u") == {"recent": ["i2", "i3", "i4", "i5", "i6"]}


def test_history_decay_weighs_recent_items_more() -> None:
    """history_decay=d: the item liked a clicks before the newest weighs d**a (normalised)."""
    schema = FeatureSchema.from_dict(
        {"user": {"recent": {"kind": "history", "history_len": 3, "history_decay": 0.5}}}
    )
    assert FeatureSchema.from_dict(schema.to_dict()) == schema
    fm = _fm(schema, negatives=2)
    fm.learn_many(["x", "x"], ["warm-a", "warm-b"], ts=[0.0, 0.0])
    f = next(j for j, spec in enumerate(fm._space.specs) if spec.name == "recent")

    def weights(user: str) -> dict[str, float]:
        vocab = {k: v for v, k in fm._space.vocab[f].items()}
        keys, w = fm._users.keys_of(np.array([fm._users.index[user]]))
        return {vocab[k]: float(x) for k, x in zip(keys[0, -3:], w[0, -3:], strict=True) if x}

    fm.learn_many(["u", "u"], ["a", "b"], ts=[1.0, 1.0])
    assert weights("u") == pytest.approx({"b": 2 / 3, "a": 1 / 3})
    for j, item in enumerate(["c", "d", "e"]):  # the ring wraps: slots are reused
        fm.learn_many(["u"], [item], ts=[2.0 + j])
    assert weights("u") == pytest.approx({"e": 4 / 7, "d": 2 / 7, "c": 1 / 7})
    with pytest.raises(Exception, match="history_decay"):
        FieldSpec("h", "user", "history", history_decay=0.0)


def _ring_weights_direct(n_seen: np.ndarray, h: int, decay: float) -> np.ndarray:
    """The weights computed per row from each ring's own append count (float32), as keys_of
    computed them before the per-field table, for comparison."""
    return _ring_weights(n_seen, h, decay).astype(np.float32)


@pytest.mark.parametrize("decay", [1.0, 0.7])
def test_history_weights_from_the_table_equal_the_direct_computation(decay: float) -> None:
    """keys_of reads history weights from a per-field table by fill count / rotation: bit for
    bit the weights computed per row (empty, partial, full and wrapped rings)."""
    h = 5
    schema = FeatureSchema.from_dict(
        {"user": {"recent": {"kind": "history", "history_len": h, "history_decay": decay}}}
    )
    fm = _fm(schema)
    users = [f"u{j}" for j in range(13)]
    for step in range(4):  # user j clicks j times in all (0 .. 12 appends: wraps twice)
        u = [x for j, x in enumerate(users) for _ in range(max(0, min(j - 4 * step, 4)))]
        if u:
            fm.learn_many(u, [f"i{k % 7}" for k in range(len(u))], ts=1e9 + step)
    ents = fm._users.lookup(users)
    ents = ents[ents >= 0]
    _, w = fm._users.keys_of(ents)
    f = fm._space.index_of["recent"]
    n_seen = fm._users.hist_n[f][ents]
    assert set(n_seen.tolist()) >= {1, 4, 5, 6, 10, 12}
    np.testing.assert_array_equal(w[:, 1:], _ring_weights_direct(n_seen, h, decay))


def test_ring_append_of_bursts_keeps_the_newest_in_order() -> None:
    """Several events of one user in a batch append in event order; a burst longer than the
    ring keeps only its newest values; users with one event each take the short path."""
    from model.features import _ring_append, ring_newest_first

    ring = np.zeros((4, 3), dtype=np.int32)
    count = np.zeros(4, dtype=np.int64)
    _ring_append(ring, count, np.array([2, 0, 1]), np.array([7, 8, 9]))  # one event each
    _ring_append(ring, count, np.array([1, 3, 1, 1, 3, 1, 1]), np.array([1, 2, 3, 4, 5, 6, 7]))
    got, m = ring_newest_first(ring, count)
    assert count.tolist() == [1, 6, 1, 2]
    assert [got[r, : m[r]].tolist() for r in range(4)] == [[8], [7, 6, 4], [7], [5, 2]]


def test_context_keys_resolved_per_slice_equal_encoding_each_slice() -> None:
    """Keys looked up once per batch and finished per slice (known_keys + resolve_keys) are the
    keys encode_tokens(create=True) gives slice by slice: same keys, created in the same order,
    missing values as padding; multi-valued fields are left to encode_tokens."""
    schema = FeatureSchema.from_dict(
        {"context": {"hour": {}, "device": {}, "slot": {"hash_buckets": 16}}}
    )
    ctx = [
        {"hour": "1", "device": "a", "slot": "x"},
        {"hour": "2", "slot": "y"},
        {"hour": "1", "device": "b", "slot": "x"},
        {"hour": None, "device": "a", "slot": "z"},
        {"hour": "3", "device": "c", "slot": "x"},
        {"hour": "2", "device": "b", "slot": "w"},
    ]
    a, b = _fm(schema), _fm(schema)
    a._space.encode("context", ctx[:1], create=True)  # a value known before the batch
    b._space.encode("context", ctx[:1], create=True)
    cols = a._space.tokenize("context", ctx)
    known = a._space.known_keys("context", cols, len(ctx))
    assert known is not None and (known < 0).any() and (known == 0).any()
    for lo, hi in ((0, 2), (2, 5), (5, 6)):
        got = a._space.resolve_keys("context", known[lo:hi], [c[lo:hi] for c in cols])
        want = b._space.encode_tokens("context", [c[lo:hi] for c in cols], True, hi - lo)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    assert a._space.vocab == b._space.vocab and a._space.n_keys == b._space.n_keys
    multi = _fm(FeatureSchema.from_dict({"context": {"tags": {"kind": "multi"}}}))
    tags = multi._space.tokenize("context", [{"tags": ["a", "b"]}])
    assert multi._space.known_keys("context", tags, 1) is None


def test_sighting_counts_are_computed_only_when_a_key_waits() -> None:
    """observe takes the sighting multiplicities as an array or as a function; the function is
    called only when some key still waits for admission, and counts as the array would."""
    schema = FeatureSchema.from_dict({"user": {"city": {"min_count": 3}}})
    fm = _fm(schema)
    fm.upsert_users(["u"], [{"city": "x"}])
    sp = fm._space
    key = int(fm._users.prof_keys[fm._users.index["u"], 0])
    calls = []

    def mult(at: np.ndarray) -> np.ndarray:  # the sightings of the waiting keys only
        calls.append(at.tolist())
        return np.array([2, 0]).take(at)

    assert sp.observe(np.array([key, 0]), 1.0, mult) == 0  # 2 of 3 sightings
    assert sp.observe(np.array([key, 0]), 2.0, np.array([1, 0])) == 1  # admitted
    assert sp.observe(np.array([key, 0]), 3.0, mult) == 0
    assert calls == [[0]] and int(sp.key_count[key]) == 3


def test_feature_rows_are_read_without_creating_anything() -> None:
    schema = FeatureSchema.from_dict({
        "user": {"zip": {"hash_buckets": 4}, "age": {"kind": "numeric", "boundaries": [30]},
                 "tags": {"kind": "multi"}},
        "context": {"hour": {}},
    })
    fm = _fm(schema)
    fm.learn_many(["u1"], ["i1"], contexts=[{"hour": "1"}], ts=[1.0])
    keys, n_rows = fm.stats()["keys"], fm.n_rows
    assert fm.feature_row("hour", "never") == fm.fallback_row("hour")
    assert fm.feature_row("age", 10) != fm.feature_row("age", 40)  # fixed rows, one per bucket
    assert len({fm.feature_row("zip", f"z{j}") for j in range(50)}) <= 4  # 4 buckets
    assert fm.feature_row("hour", "1") < fm.n_rows and fm.fallback_row("user_id") < fm.n_rows
    assert (fm.stats()["keys"], fm.n_rows) == (keys, n_rows)
    for field, value, why in (("nope", "x", "no field 'nope'"), ("user_id", "u1", "an id field"),
                              ("tags", "a", "multi"), ("hour", None, "no value"),
                              ("age", "old", "age")):
        with pytest.raises(FeatureError, match=why):
            fm.feature_row(field, value)
    with pytest.raises(FeatureError, match="fixed rows"):
        fm.fallback_row("zip")
