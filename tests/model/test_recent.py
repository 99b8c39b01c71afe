"""What the model keeps for serving's recovery: each user's recent positive items (in the
checkpoint) and the users whose own id row expired (their published records are stale)."""

from __future__ import annotations

import numpy as np
import pytest

from model import FeatureSchema
from model.checkpoint import load_checkpoint, save_checkpoint
from model.errors import ConfigError
from model.online import OnlineFM, TrainConfig


def test_recent_items_are_the_newest_positives_newest_first_with_wraparound() -> None:
    fm = OnlineFM(config=TrainConfig(dim=4, recent_items=3))
    fm.learn_many(["a", "a", "b"], ["i1", "i2", "i9"], labels=np.array([1, 1, 1]))
    fm.learn_many(["a", "a"], ["i3", "i4"], labels=np.array([1, 0]))  # i4 is a negative
    assert fm.recent_items(["a", "b", "nobody"]) == [["i3", "i2", "i1"], ["i9"], []]
    # a burst longer than the ring in one batch keeps its newest, in event order
    fm.learn_many(["a"] * 5, [f"j{k}" for k in range(5)])
    assert fm.recent_items(["a"]) == [["j4", "j3", "j2"]]


def test_recent_items_off_by_default_and_learning_is_unchanged() -> None:
    users, items = ["a", "b", "a", "c"] * 8, [f"i{k % 5}" for k in range(32)]
    plain = OnlineFM(config=TrainConfig(dim=4, seed=3))
    kept = OnlineFM(config=TrainConfig(dim=4, seed=3, recent_items=7))
    for fm in (plain, kept):
        fm.learn_many(users, items)
    assert plain.recent_items(["a"]) == [[]]
    assert len(kept.recent_items(["a"])[0]) == 7
    np.testing.assert_array_equal(plain.user_vectors(["a", "b"]), kept.user_vectors(["a", "b"]))


def test_recent_items_survive_a_checkpoint(tmp_path) -> None:
    fm = OnlineFM(config=TrainConfig(dim=4, recent_items=4))
    fm.learn_many([f"u{k % 50}" for k in range(600)], [f"i{k % 31}" for k in range(600)])
    users = fm.known_users()
    path = save_checkpoint(tmp_path, fm, {})
    back, _ = load_checkpoint(path)
    assert back.recent_items(users) == fm.recent_items(users)
    back.learn_many(["u1"], ["new"])  # and it keeps appending after the restore
    assert back.recent_items(["u1"])[0][0] == "new"


@pytest.mark.parametrize("bad", [-1, True, 2.5])
def test_recent_items_config_is_checked(bad) -> None:
    with pytest.raises(ConfigError, match="recent_items"):
        TrainConfig(recent_items=bad)


def test_users_whose_own_row_expired_are_drained_once() -> None:
    schema = FeatureSchema.from_dict({"user": {"user_id": {"expire_after_s": 100.0}}})
    fm = OnlineFM(schema, TrainConfig(dim=4))
    fm.learn_many(["old", "kept"], ["i", "i"], ts=[0.0, 0.0])
    own_before, _, _ = fm.user_parts(["old"])
    assert np.abs(own_before).sum() > 0
    assert fm.drain_expired_users() == []
    fm.learn_many(["kept"], ["i"], ts=[150.0])  # "old" unseen for > 100 s: its row goes back
    assert fm.drain_expired_users() == ["old"]
    assert fm.drain_expired_users() == []
    own_after, keys, _ = fm.user_parts(["old"])
    assert np.abs(own_after).sum() == 0  # its vector now reads the fallback row (shared)
    assert keys[0, 0] != 0
