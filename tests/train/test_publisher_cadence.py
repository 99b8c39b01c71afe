"""The publisher's cadences on the real Redis: between two item versions (``publish_items_s``),
versions of the changed shared user rows only (``publish_shared_s``) move inactive users'
vectors; a user reading a brand-new shared key is written right after the version carrying it."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from fmstream.settings import Settings
from model import FeatureSchema
from model.online import OnlineFM, TrainConfig
from serving.follow import IndexFollower
from serving.store import VectorStore
from train.config import PublishConfig
from train.publisher import I2I_SLICE, Publisher
from train.store_writer import StoreWriter

pytestmark = pytest.mark.integration


class Ev:
    def __init__(self, user_id: str, item_id: str, label: int = 1) -> None:
        self.user_id, self.item_id, self.label = user_id, item_id, label


def setup(redis_client: redis.Redis, settings: Settings, shared_s: float, *, n_users: int = 40,
          n_items: int = 7, **config: float) -> tuple[OnlineFM, Publisher, VectorStore]:
    """A model of ``n_users`` users (3 segments) who liked ``n_items`` items, and its publisher
    (``config``: more :class:`PublishConfig` fields) after its first tick."""
    keys = settings.redis_keys()
    writer, reader = StoreWriter(redis_client, keys, 3), VectorStore(redis_client, keys)
    model = OnlineFM(FeatureSchema.from_dict({"user": {"segment": {}}}),
                     TrainConfig(dim=4, seed=3))
    users = [f"u{j}" for j in range(n_users)]
    model.upsert_users(users, [{"segment": f"s{j % 3}"} for j in range(n_users)])
    model.learn_many(users, [f"i{j % n_items}" for j in range(n_users)])
    pub = Publisher(PublishConfig(**{"publish_active_s": 0.1, "publish_items_s": 0.5,
                                     "publish_shared_s": shared_s, "offline_i2i_s": 1e9,
                                     "lost_check_s": 1e9, **config}), writer, model)
    pub.profiles_changed(users)
    pub.tick(100.0)  # an empty Redis: everything (the first version, full)
    return model, pub, reader


def learn(model: OnlineFM, pub: Publisher, users: list[str]) -> None:
    model.learn_many(users, ["i1"] * len(users))
    pub.applied([Ev(u, "i1") for u in users])


def test_shared_rows_versions_come_between_item_versions(
    redis_client: redis.Redis, settings: Settings
) -> None:
    model, pub, reader = setup(redis_client, settings, 0.1)
    first = pub.version
    follower = IndexFollower(reader)
    assert follower.refresh()
    inactive = [f"u{j}" for j in range(2, 40)]
    learn(model, pub, ["u0", "u1"])  # u0, u1 active: their segments' rows moved
    pub.tick(100.1)
    shared = pub.versions.last
    assert shared is not None and pub.version == first + 1
    assert shared.rows == 0 and shared.shared_rows >= 1 and not shared.full
    assert follower.refresh()
    state = follower.current()
    assert state.item_version == first < state.version  # its items: the last item version's
    got = reader.get_user_vectors(inactive + ["u0", "u1"], shared=state.users)
    np.testing.assert_allclose(got.vectors, model.user_vectors(inactive + ["u0", "u1"]),
                               rtol=3e-5, atol=3e-5)
    pub.tick(100.15)  # neither cadence due
    assert pub.version == first + 1
    learn(model, pub, ["u3"])
    pub.tick(100.5)  # the item version (it carries the shared rows too)
    assert pub.version == first + 2 and pub.versions.last.rows > 0
    assert pub.versions.item_version == pub.version
    assert follower.refresh() and follower.current().item_version == first + 2
    assert pub.times.shared == 100.5
    pub.tick(100.55)  # shared cadence counts from the item version
    assert pub.version == first + 2


def test_the_item_version_owed_after_a_shared_rows_version_comes_at_the_item_cadence(
    redis_client: redis.Redis, settings: Settings
) -> None:
    """A shared-rows version made for records alone (nothing for the items left to ship):
    the next item cadence still makes an item version (clients wait for item_version)."""
    model, pub, reader = setup(redis_client, settings, 0.1)
    first = pub.version
    pub.profiles_changed(["u5"])  # a record to write, no row changed
    pub._items_dirty = False  # only the record is due (e.g. a user whose id row expired)
    pub.tick(100.2)  # the record, stamped ahead: the shared-rows version gives its stamp
    assert pub.version == first + 1 and pub.versions.item_version == first
    assert int(reader.get_user_vectors(["u5"]).versions[0]) == first + 1
    pub.tick(100.6)
    assert pub.version == first + 2 and pub.versions.item_version == first + 2
    pub.tick(101.2)
    assert pub.version == first + 2  # nothing owed any more


def test_no_shared_rows_versions_when_the_cadence_is_zero(
    redis_client: redis.Redis, settings: Settings
) -> None:
    model, pub, _ = setup(redis_client, settings, 0.0)
    first = pub.version
    learn(model, pub, ["u0", "u1"])
    for t in (100.1, 100.2, 100.3, 100.4):
        pub.tick(t)
    assert pub.version == first  # records only; the next version is the item version
    pub.tick(100.5)
    assert pub.version == first + 1 and pub.versions.last.rows > 0


def test_a_user_with_a_new_segment_value_is_written_right_after_the_shared_version(
    redis_client: redis.Redis, settings: Settings
) -> None:
    model, pub, reader = setup(redis_client, settings, 0.1)
    model.upsert_users(["newbie"], [{"segment": "never-seen"}])
    pub.profiles_changed(["newbie"])
    pub.tick(100.1)  # held back by the records' pass (no version has its key), then shipped
    assert reader.redis.get(reader.keys.user("newbie")) is not None
    follower = IndexFollower(reader)
    assert follower.refresh()
    got = reader.get_user_vectors(["newbie"], shared=follower.current().users)
    assert got.found.all() and int(got.versions[0]) <= follower.version
    np.testing.assert_allclose(got.vectors, model.user_vectors(["newbie"]), rtol=3e-5,
                               atol=3e-5)


def test_a_shared_rows_version_is_current_before_the_records_stamped_with_it(
    redis_client: redis.Redis, settings: Settings
) -> None:
    """In a tick making a shared-rows version, the version goes first and the records after
    it, stamped with it: the rows moving inactive users' vectors never wait for the records'
    writes, and a record is never written before the version it names."""
    model, pub, reader = setup(redis_client, settings, 0.1)
    first = pub.version
    writes: list[tuple[int, int | None]] = []  # (stamp, the current version when written)
    put = pub.store.put_user_records

    def watched(user_ids, version, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        writes.append((version, reader.current_item_version()))
        return put(user_ids, version, *args, **kwargs)

    pub.store.put_user_records = watched
    learn(model, pub, ["u0", "u1"])  # rows moved and records due
    pub.tick(100.2)  # both cadences due (records, shared rows)
    assert pub.version == first + 1 and pub.versions.item_version == first
    assert writes == [(first + 1, first + 1)]
    got = reader.get_user_vectors(["u0", "u1"])
    assert got.found.all() and set(got.versions.tolist()) == {first + 1}
    writes.clear()
    learn(model, pub, ["u2"])
    pub.tick(100.5)  # an item version: records first, stamped ahead (unchanged)
    assert pub.version == first + 2 and pub.versions.item_version == first + 2
    assert writes == [(first + 2, first + 1)]


def test_the_offline_i2i_budget_is_spread_over_ticks_after_their_versions(
    redis_client: redis.Redis, settings: Settings
) -> None:
    """A cadence's i2i budget goes out I2I_SLICE items per tick (a version due meanwhile
    waits for a slice, not the whole budget), all of it within the cadence."""
    keys = settings.redis_keys()
    # the first tick: an empty Redis, everything, a whole i2i budget at once
    model, pub, reader = setup(redis_client, settings, 0.1, n_users=80, n_items=80,
                               offline_i2i_s=1.0, offline_i2i_per_tick=I2I_SLICE + 8)
    current = int(reader.redis.get(keys.i2i_current()))
    assert reader.redis.hlen(keys.i2i(current)) == I2I_SLICE + 8
    calls: list[tuple[int, int]] = []  # (budget, the version current when it ran)
    refresh = pub.versions.refresh_i2i

    def watched(budget=None):  # noqa: ANN001, ANN202
        calls.append((budget, pub.version))
        return refresh(budget)

    pub.versions.refresh_i2i = watched
    learn(model, pub, ["u0", "u1"])
    pub.tick(101.0)  # the item version first, then the first slice
    assert calls == [(I2I_SLICE, pub.version)] and pub.versions.item_version == pub.version
    learn(model, pub, ["u2"])
    pub.tick(101.2)  # a shared-rows version, then the rest of the budget
    assert calls[1:] == [(8, pub.version)] and pub.versions.item_version < pub.version
    pub.tick(101.25)
    pub.tick(101.9)
    assert len(calls) == 2  # the budget is spent until the next cadence
    pub.tick(102.0)
    assert len(calls) == 3 and calls[2][0] == I2I_SLICE
