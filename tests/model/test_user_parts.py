"""A user's vector = its own part + the shared rows it reads (composed where it is served)."""

from __future__ import annotations

import numpy as np
import pytest

from model import FeatureSchema
from model.compose import compose_user_parts
from model.online import OnlineFM, TrainConfig


def trained(schema: FeatureSchema, *, id_spec: dict | None = None) -> OnlineFM:
    model = OnlineFM(schema, TrainConfig(dim=8, seed=3))
    rng = np.random.default_rng(0)
    users = [f"u{j}" for j in range(60)]
    model.upsert_users(
        users[:40],
        [{"gender": "MF"[j % 2], "age": 20 + j, "zip": f"z{j % 9}", "tags": ["a", f"t{j % 3}"],
          "occupation": f"o{j % 4}"} for j in range(40)],
    )
    for _ in range(6):
        u = [users[k] for k in rng.integers(0, 60, 200)]
        i = [f"i{k}" for k in rng.integers(0, 30, 200)]
        model.learn_many(u, i, contexts=[{"hour": "3"}] * 200)
    return model


def composed(model: OnlineFM, ids: list[str]) -> np.ndarray:
    own, keys, weights = model.user_parts(ids)
    w, v = model.shared_params(keys)
    return compose_user_parts(own, w, v, weights)


@pytest.mark.parametrize("fixture", ["rich_schema", "movielens", "ids_only"])
def test_own_part_plus_shared_rows_is_the_user_vector(
    fixture: str, request: pytest.FixtureRequest, config_dir
) -> None:
    if fixture == "rich_schema":
        schema = request.getfixturevalue("rich_schema")
    elif fixture == "movielens":
        schema = FeatureSchema.load(config_dir / "movielens.toml")
    else:
        schema = FeatureSchema.ids_only()
    model = trained(schema)
    ids = [f"u{j}" for j in range(60)] + ["never-seen"]
    np.testing.assert_allclose(composed(model, ids), model.user_vectors(ids), rtol=2e-5,
                               atol=2e-5)


def test_a_shared_row_change_reaches_every_user_without_new_own_parts(rich_schema) -> None:
    model = trained(rich_schema)
    ids = [f"u{j}" for j in range(40)]
    own, keys, weights = model.user_parts(ids)
    model.drain_changed_rows()
    # only u0 and u1 click: their own rows and the shared rows (gender, age, ...) move
    model.learn_many(["u0", "u1"] * 50, ["i1", "i2"] * 50)
    changed = model.drain_changed_rows()
    assert changed[model.key_rows(keys[5][keys[5] > 0])].any()  # u5 reads a changed row
    w, v = model.shared_params(keys)
    now = compose_user_parts(own, w, v, weights)
    # users other than u0/u1 kept their own parts: still exact with the new shared rows
    np.testing.assert_allclose(now[2:], model.user_vectors(ids)[2:], rtol=2e-5, atol=2e-5)
    assert not np.allclose(now[0], model.user_vectors(["u0"])[0], atol=1e-6)  # its own row moved


def test_items_reading_changed_rows(rich_schema) -> None:
    model = trained(rich_schema)
    model.drain_changed_rows()
    assert model.items_reading(model.drain_changed_rows()) == []
    model.learn_many(["u3"], ["i7"])  # i7 and its sampled negatives move (no item profiles)
    got = set(model.items_reading(model.drain_changed_rows()))
    assert "i7" in got and len(got) <= 1 + model.config.negatives
