"""User vectors composed at request time: record layout, shared rows, and the store read path."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from fmstream.settings import Settings
from model import FeatureSchema
from model.online import OnlineFM, TrainConfig
from serving.errors import SnapshotCorrupt
from serving.store import VectorStore
from serving.users import (
    SharedRows,
    decode_rows,
    decode_user_record,
    encode_rows,
    encode_user_records,
)


def model_with_profiles() -> OnlineFM:
    schema = FeatureSchema.from_dict(
        {"user": {"segment": {}, "tags": {"kind": "multi"}}, "item": {"category": {}}}
    )
    model = OnlineFM(schema, TrainConfig(dim=6, seed=1))
    users = [f"u{j}" for j in range(30)]
    model.upsert_users(users, [{"segment": f"s{j % 3}", "tags": ["a", f"t{j % 4}"]}
                               for j in range(30)])
    rng = np.random.default_rng(2)
    for _ in range(4):
        model.learn_many([users[k] for k in rng.integers(0, 30, 100)],
                         [f"i{k}" for k in rng.integers(0, 20, 100)])
    return model


def test_records_and_rows_round_trip() -> None:
    own = np.arange(8, dtype=np.float32).reshape(2, 4)
    keys = np.array([[5, 9, 0], [7, 0, 0]])
    weights = np.array([[1.0, 0.5, 0.0], [1.0, 0.0, 0.0]], np.float32)
    raw = encode_user_records(3, 12.5, own, keys, weights)
    rec = decode_user_record(raw[0])
    assert rec is not None and rec.version == 3 and rec.published_at == 12.5
    assert rec.keys.tolist() == [5, 9] and rec.weights.tolist() == [1.0, 0.5]
    np.testing.assert_array_equal(rec.own, own[0])
    assert decode_user_record(b"\x01" * 20) is None  # a plain vector of the older layout
    with pytest.raises(SnapshotCorrupt):
        decode_user_record(raw[0][:-1])
    k, p = decode_rows(encode_rows(np.array([3, 1]), np.ones((2, 5), np.float32)))
    assert k.tolist() == [3, 1] and p.shape == (2, 5)
    with pytest.raises(SnapshotCorrupt):
        decode_rows(encode_rows(np.array([3]), np.ones((1, 5), np.float32))[:-2])


def test_shared_rows_update_in_place_and_merge_new_keys() -> None:
    rows = SharedRows(np.array([9, 2]), np.array([[9, 9], [2, 2]], np.float32))
    rows.update(np.array([2, 5]), np.array([[20, 20], [5, 5]], np.float32))
    assert rows.keys.tolist() == [2, 5, 9]
    w, v, found = rows.lookup(np.array([[5, 4], [2, 9]]))
    assert found.tolist() == [[True, False], [True, True]]
    assert w.tolist() == [[5, 0], [20, 9]] and v[1, 0, 0] == 20


def test_composed_records_equal_the_model_for_every_user() -> None:
    model = model_with_profiles()
    ids = [f"u{j}" for j in range(30)] + ["stranger"]
    own, keys, weights = model.user_parts(ids)
    records = [decode_user_record(r) for r in encode_user_records(1, 0.0, own, keys, weights)]
    all_keys = np.unique(keys[keys > 0])
    w, v = model.shared_params(all_keys)
    shared = SharedRows(all_keys, np.concatenate([w[:, None], v], axis=1))
    vecs, missing = shared.compose(records)
    assert missing == 0
    np.testing.assert_allclose(vecs, model.user_vectors(ids), rtol=2e-5, atol=2e-5)


@pytest.mark.integration
def test_store_composes_records_with_the_served_shared_rows(
    redis_client: redis.Redis, settings: Settings
) -> None:
    model = model_with_profiles()
    store = VectorStore(redis_client, settings.redis_keys())
    ids = [f"u{j}" for j in range(30)]
    own, keys, weights = model.user_parts(ids)
    pipe = redis_client.pipeline()
    for uid, raw in zip(ids, encode_user_records(4, 1.5, own, keys, weights), strict=True):
        pipe.set(store.keys.user(uid), raw)
    pipe.execute()
    all_keys = np.unique(keys[keys > 0])
    # the shared rows move on (others' clicks); no record is rewritten
    model.learn_many(["u0"] * 40, ["i3"] * 40)
    w, v = model.shared_params(all_keys)
    shared = SharedRows(all_keys, np.concatenate([w[:, None], v], axis=1))
    got = store.get_user_vectors(ids[1:] + ["nobody"], shared=shared)
    assert got.found.tolist() == [True] * 29 + [False]
    assert got.versions[:29].tolist() == [4] * 29
    np.testing.assert_allclose(got.vectors[:29], model.user_vectors(ids[1:]), rtol=2e-5,
                               atol=2e-5)
