"""The publisher's versions on the real Redis: deltas make exactly what a full snapshot makes,
every user's vector stays exact without rewriting inactive users, and versions only go up."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import redis

from fmstream.settings import Settings
from model import FeatureSchema
from model.online import OnlineFM, TrainConfig
from serving.follow import IndexFollower
from serving.store import VectorStore
from train.deltas import RESTART_GAP, DeltaConfig, VersionedPublisher
from train.store_writer import StoreWriter

pytestmark = pytest.mark.integration

SCHEMA = {"user": {"segment": {}}, "item": {"category": {}}, "context": {"hour": {}}}


def new_model(items_with_profiles: bool = True) -> OnlineFM:
    schema = FeatureSchema.from_dict(SCHEMA if items_with_profiles else {"user": {"segment": {}}})
    model = OnlineFM(schema, TrainConfig(dim=8, seed=5))
    model.upsert_users([f"u{j}" for j in range(200)],
                       [{"segment": f"s{j % 4}"} for j in range(200)])
    if items_with_profiles:
        model.upsert_items([f"i{j}" for j in range(300)],
                           [{"category": f"c{j % 5}"} for j in range(300)])
    return model


def learn(model: OnlineFM, rng: np.random.Generator, users: int, items: int, n: int = 64) -> None:
    u = [f"u{k}" for k in rng.integers(0, users, n)]
    i = [f"i{k}" for k in rng.integers(0, items, n)]
    model.learn_many(u, i, contexts=[{"hour": str(k % 24)} for k in range(n)])


def trained(seed: int) -> tuple[OnlineFM, np.random.Generator]:
    """A model that learned one batch over every user and item; the generator, to go on."""
    model = new_model()
    rng = np.random.default_rng(seed)
    learn(model, rng, 200, 300)
    return model, rng


def deltas_only(**fields: object) -> DeltaConfig:
    """A config whose full snapshots never come by time, rows or bytes (unless ``fields`` say)."""
    return DeltaConfig(**{"full_every_s": 1e9, "full_after_rows": 1e9, "full_after_bytes": 1e9,
                          **fields})


@pytest.fixture
def stores(redis_client: redis.Redis, settings: Settings) -> tuple[StoreWriter, VectorStore]:
    keys = settings.redis_keys()
    return StoreWriter(redis_client, keys, 3), VectorStore(redis_client, keys)


def check_exact(
    follower: IndexFollower, reader: VectorStore, model: OnlineFM, pub: VersionedPublisher
) -> None:
    """The worker's items equal the model's (vectors form: bit for bit; parts form: composed
    from float32 parameter rows, to float32 rounding) and, bit for bit, the publisher's mirror
    (what full snapshots are made of); every user's vector equals the model's."""
    state = follower.current()
    assert state is not None
    snap = state.loaded.snapshot
    ids, vectors = model.item_vectors()
    rows = [snap.row_of[i] for i in ids]
    if pub.config.form == "vectors":
        np.testing.assert_array_equal(snap.vectors[rows], vectors)
    else:
        np.testing.assert_allclose(snap.vectors[rows], vectors, rtol=1e-5, atol=1e-6)
    assert pub._mirror is not None
    np.testing.assert_array_equal(snap.vectors, pub._mirror.vectors())
    assert snap.bias == pytest.approx(model.bias)
    check_users(follower, reader, model, model.known_users())


@pytest.mark.parametrize("form", ["parts", "vectors"])
def test_deltas_equal_the_model_at_every_version_for_items_and_all_users(
    stores, form: str
) -> None:
    writer, reader = stores
    model, rng = trained(0)
    pub = VersionedPublisher(writer, model, deltas_only(form=form))
    first = pub.publish_items(now=1.0)
    assert first is not None and first.full and first.version == 1
    pub.publish_users(model.known_users())  # every user once
    follower = IndexFollower(reader)
    assert follower.refresh()
    check_exact(follower, reader, model, pub)
    for step in range(8):
        # only users u0..u9 are active; items i300.. are new; every other user is inactive
        learn(model, rng, 10, 320)
        active = sorted({f"u{k}" for k in range(10)})
        published = pub.publish_items(now=2.0 + step)
        assert published is not None and not published.full
        assert published.shared_rows > 0  # the segment rows moved: shipped once, not per user
        pub.publish_users(active)
        assert follower.refresh()
        assert follower.version == published.version
        check_exact(follower, reader, model, pub)
    assert follower.full_loads == 1 and follower.deltas_applied == 8
    late = IndexFollower(reader)  # a new worker: full snapshot v1 + the deltas after it
    assert late.refresh()
    check_exact(late, reader, model, pub)


def test_a_delta_ships_only_the_items_that_read_changed_rows(stores) -> None:
    writer, _ = stores
    model = new_model(items_with_profiles=False)  # items: id rows only, nothing shared
    rng = np.random.default_rng(1)
    learn(model, rng, 200, 300, n=600)
    pub = VersionedPublisher(writer, model)
    pub.publish_items(now=1.0)
    model.learn_many(["u1", "u2"], ["i5", "i6"])
    published = pub.publish_items(now=2.0)
    assert published is not None
    assert 2 <= published.rows <= 2 * (1 + model.config.negatives)
    assert pub.publish_items(now=3.0) is None  # nothing changed: no version


@pytest.mark.parametrize("form", ["parts", "vectors"])
def test_an_item_profile_change_ships_that_item_alone_with_no_event(stores, form: str) -> None:
    """A new category and a profile tombstone change two items' vectors though no parameter
    row was written: the next version ships those two (the model marks the rows they read),
    exactly; an upsert of the same profile again changes nothing and makes no version."""
    writer, reader = stores
    model, _ = trained(2)
    pub = VersionedPublisher(writer, model, deltas_only(form=form))
    assert pub.publish_items(now=1.0) is not None
    pub.publish_users(model.known_users())
    follower = IndexFollower(reader)
    assert follower.refresh()
    model.upsert_items(["i3"], [{"category": "c1"}])  # was c3
    assert model.clear_item_profiles(["i4"]) == ["i4"]
    published = pub.publish_items(now=2.0)
    assert published is not None and not published.full and published.rows == 2
    assert follower.refresh()
    check_exact(follower, reader, model, pub)
    model.upsert_items(["i5", "i3"], [{"category": "c0"}, {"category": "c1"}])  # as they are
    assert pub.publish_items(now=3.0) is None


def test_versions_continue_above_the_checkpoint_after_redis_loss(stores) -> None:
    writer, reader = stores
    model, _ = trained(2)
    pub = VersionedPublisher(writer, model)
    for t in range(3):
        learn(model, np.random.default_rng(t), 200, 300)
        pub.publish_items(now=float(t))
    assert pub.version == 3 and not pub.store_lost()
    writer.redis.flushall()
    assert pub.store_lost()
    pub.republish(model.known_users(), now=10.0)
    assert pub.version == 4 and reader.current_item_version() == 4
    # a restarted trainer (checkpoint says v4) into an empty Redis jumps past anything unsaved
    writer.redis.flushall()
    restarted = VersionedPublisher(writer, model, version_floor=4)
    assert restarted.version == 4 + RESTART_GAP
    # ...and with Redis intact, continues from the store's version
    restarted.publish_items(now=20.0)
    again = VersionedPublisher(writer, model, version_floor=4)
    assert again.version == 5 + RESTART_GAP


def test_records_written_ahead_of_a_version_wait_for_keys_no_version_carries(stores) -> None:
    writer, reader = stores
    model, _ = trained(4)
    pub = VersionedPublisher(writer, model)
    pub.publish_items(now=1.0)
    model.upsert_users(["fresh", "u1"], [{"segment": "brand-new"}, {"segment": "s1"}])
    later = pub.publish_users(["fresh", "u1"], ahead=True)
    assert later == ["fresh"]  # its segment value has no row in any version yet
    rec = reader.redis.get(reader.keys.user("u1"))
    assert rec is not None and reader.redis.get(reader.keys.user("fresh")) is None
    published = pub.publish_items(now=2.0)
    assert published is not None and published.shared_rows >= 1
    assert pub.publish_users(later) == []
    follower = IndexFollower(reader)
    follower.refresh()
    got = reader.get_user_vectors(["fresh", "u1"], shared=follower.current().users)
    assert got.found.all() and got.versions.tolist() == [published.version] * 2
    np.testing.assert_allclose(got.vectors, model.user_vectors(["fresh", "u1"]), rtol=3e-5,
                               atol=3e-5)


def test_records_stamped_with_the_current_version_wait_for_keys_it_does_not_carry(
    stores,
) -> None:
    """``known_only`` (records written right after a version, stamped with it): a user
    reading a key created after that version's build waits for the next version."""
    writer, reader = stores
    model, _ = trained(5)
    pub = VersionedPublisher(writer, model)
    first = pub.publish_items(now=1.0)
    assert first is not None
    model.upsert_users(["fresh", "u1"], [{"segment": "brand-new"}, {"segment": "s1"}])
    later = pub.publish_users(["fresh", "u1"], known_only=True)
    assert later == ["fresh"] and not pub.owes  # no version is owed: stamped with v itself
    assert reader.redis.get(reader.keys.user("fresh")) is None
    assert reader.get_user_vectors(["u1"]).versions.tolist() == [first.version]
    shared = pub.publish_shared(now=1.1)
    assert shared is not None and shared.shared_rows >= 1
    assert pub.publish_users(later, known_only=True) == []
    follower = IndexFollower(reader)
    follower.refresh()
    got = reader.get_user_vectors(["fresh"], shared=follower.current().users)
    assert got.found.all() and got.versions.tolist() == [shared.version]
    np.testing.assert_allclose(got.vectors, model.user_vectors(["fresh"]), rtol=3e-5,
                               atol=3e-5)


def shipped_of(follower: IndexFollower, ids: list[str]) -> np.ndarray:
    snap = follower.current().loaded.snapshot
    return snap.vectors[[snap.row_of[i] for i in ids]]


def relative_change(now: np.ndarray, then: np.ndarray) -> np.ndarray:
    return np.linalg.norm(now - then, axis=1) / np.linalg.norm(then, axis=1)


def a_version_then_small_moves(
    writer: StoreWriter, reader: VectorStore, *, seed: int, tolerance: float, max_age_s: float
) -> tuple[VersionedPublisher, IndexFollower, list[str], np.ndarray, np.ndarray]:
    """A first version (vectors form) a worker follows, then a few events: the publisher, the
    worker, the item ids and their vectors before and after the events."""
    model, rng = trained(seed)
    pub = VersionedPublisher(
        writer, model, DeltaConfig(tolerance=tolerance, max_age_s=max_age_s, form="vectors")
    )
    pub.publish_items(now=0.0)
    follower = IndexFollower(reader)
    assert follower.refresh()
    ids, before = model.item_vectors()
    learn(model, rng, 200, 300, n=8)
    _, after = model.item_vectors()
    return pub, follower, ids, before, after


def test_rows_over_the_tolerance_ship_next_version_and_the_rest_wait(stores) -> None:
    writer, reader = stores
    pub, follower, ids, before, after = a_version_then_small_moves(
        writer, reader, seed=6, tolerance=0.02, max_age_s=1e6)
    moved = relative_change(after, before)
    tol = float(np.median(moved))  # half the rows each way
    pub.config = replace(pub.config, tolerance=tol)
    published = pub.publish_items(now=1.0)
    assert published is not None and not published.full
    over = moved > tol
    assert 0 < over.sum() < len(ids)
    assert published.rows == over.sum() and published.held == (~over & (moved > 0)).sum()
    assert follower.refresh()
    got = shipped_of(follower, ids)
    np.testing.assert_array_equal(got[over], after[over])  # shipped: exactly the model's
    np.testing.assert_array_equal(got[~over], before[~over])  # held: the last shipped value


def test_a_row_under_the_tolerance_ships_by_its_max_age(stores) -> None:
    writer, reader = stores
    pub, follower, ids, before, after = a_version_then_small_moves(
        writer, reader, seed=7, tolerance=1e9, max_age_s=10.0)
    first = pub.publish_items(now=1.0)  # every change is under the tolerance: all held
    assert first is not None and first.rows == 0 and first.held > 0
    assert pub.publish_items(now=5.9) is None  # nothing new, nothing due (max age x [0.5, 1])
    follower.refresh()
    np.testing.assert_array_equal(shipped_of(follower, ids), before)
    due = pub.publish_items(now=11.0)  # 10 s after the change: every held row is due
    assert due is not None and due.rows == first.held and due.held == 0
    assert follower.refresh() and follower.version == due.version
    np.testing.assert_array_equal(shipped_of(follower, ids), after)


def test_held_rows_never_mix_versions_a_full_snapshot_equals_the_deltas_path(stores) -> None:
    writer, reader = stores
    model, rng = trained(8)
    pub = VersionedPublisher(
        writer, model, deltas_only(tolerance=0.05, max_age_s=3.0, form="vectors"))
    pub.publish_items(now=0.0)
    follower = IndexFollower(reader)
    assert follower.refresh()
    for step in range(6):
        learn(model, rng, 200, 320, n=16)  # i300.. are new: new items ship at once
        if step == 3:
            pub.request_full()
        published = pub.publish_items(now=1.0 + step)
        assert published is not None
        assert follower.refresh() and follower.version == published.version
        late = IndexFollower(reader)  # the newest full snapshot + the deltas after it
        assert late.refresh() and late.version == published.version
        a, b = follower.current().loaded.snapshot, late.current().loaded.snapshot
        assert a.item_ids == b.item_ids == model.known_items()
        np.testing.assert_array_equal(a.vectors, b.vectors)  # one content per version
    assert follower.full_loads == 1  # followed by deltas throughout


class CountingLock:
    """The trainer's model lock, counting how often a reader takes it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.taken = 0

    def __enter__(self) -> None:
        self.lock.acquire()
        self.taken += 1

    def __exit__(self, *exc) -> None:
        self.lock.release()


def test_a_version_waits_for_the_trainers_lock_once_for_all_its_reads(stores) -> None:
    writer, reader = stores
    model, rng = trained(9)
    lock = CountingLock()
    pub = VersionedPublisher(writer, model, model_lock=lock)
    pub.publish_items(now=1.0)
    learn(model, rng, 200, 300)
    lock.taken = 0
    published = pub.publish_items(now=2.0)
    assert published is not None and published.rows > 0
    assert lock.taken == 2  # the version's reads, then the popularity counts
    follower = IndexFollower(reader)
    assert follower.refresh()
    np.testing.assert_allclose(shipped_of(follower, model.known_items()),
                               model.item_vectors()[1], rtol=1e-5, atol=1e-6)


def test_records_written_ahead_get_their_version_even_when_nothing_else_changed(stores) -> None:
    writer, reader = stores
    model, _ = trained(10)
    pub = VersionedPublisher(writer, model)
    pub.publish_items(now=1.0)
    assert pub.publish_items(now=2.0) is None  # nothing changed, nothing owed: no version
    assert pub.publish_users(["u1"], ahead=True) == []  # stamped with the next version
    published = pub.publish_items(now=3.0)
    assert published is not None and published.rows == 0
    follower = IndexFollower(reader)
    assert follower.refresh()
    got = reader.get_user_vectors(["u1"], shared=follower.current().users)
    assert got.found.all() and follower.version >= int(got.versions.max())
    assert pub.publish_items(now=4.0) is None


@pytest.mark.parametrize("form", ["parts", "vectors"])
def test_a_full_snapshot_comes_once_the_deltas_since_the_last_weigh_as_much(
    stores, redis_client: redis.Redis, settings: Settings, form: str
) -> None:
    """``full_after_bytes``: the deltas written since the last full snapshot reach that many
    times its bytes -> the next version is full too (not before); each full is exact."""
    writer, reader = stores
    model, rng = trained(11)
    pub = VersionedPublisher(writer, model, deltas_only(full_after_bytes=0.5, form=form))
    keys = settings.redis_keys()

    def full_bytes(v: int) -> int:
        import orjson

        m = orjson.loads(redis_client.get(keys.items_manifest(v)))
        return m["vector_bytes"] + sum(m["extra"].values())

    first = pub.publish_items(now=1.0)
    assert first is not None and first.full
    pub.publish_users(model.known_users())
    last_full, since, fulls = full_bytes(first.version), 0, 0
    follower = IndexFollower(reader)
    for step in range(40):
        learn(model, rng, 200, 300, n=16)
        got = pub.publish_items(now=2.0 + step)
        assert got is not None
        pub.publish_users(model.known_users())
        assert got.full == (since >= 0.5 * last_full), (step, since, last_full)
        if got.full:
            fulls += 1
            last_full, since = full_bytes(got.version), 0
            assert follower.refresh() and follower.version == got.version
            check_exact(follower, reader, model, pub)
        else:
            assert got.delta_bytes > 0
            since += got.delta_bytes
    assert fulls >= 2  # the rule fired, more than once


def test_full_after_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="full_after_bytes"):
        DeltaConfig(full_after_bytes=0)


def check_users(follower: IndexFollower, reader: VectorStore, model: OnlineFM,
                users: list[str]) -> None:
    """Every one of ``users``' vectors, composed by the worker from its record and the shared
    rows of the version it serves, equals the model's now."""
    state = follower.current()
    assert state is not None
    got = reader.get_user_vectors(users, shared=state.users)
    assert got.found.all()
    np.testing.assert_allclose(got.vectors, model.user_vectors(users), rtol=3e-5, atol=3e-5)


@pytest.mark.parametrize("form", ["parts", "vectors"])
def test_shared_rows_versions_move_inactive_users_and_leave_the_items_to_the_next_version(
    stores, form: str
) -> None:
    """``publish_shared``: a version of the changed shared user rows only. Inactive users'
    vectors are exact at it (their segment rows moved); the item rows it drained are not lost:
    the next item version ships them and every item and user is exact again, also for a new
    worker replaying the deltas (shared-rows ones included) from the full snapshot."""
    writer, reader = stores
    model, rng = trained(11)
    pub = VersionedPublisher(writer, model, deltas_only(form=form))
    first = pub.publish_items(now=1.0)
    assert first is not None and first.full
    pub.publish_users(model.known_users())
    follower = IndexFollower(reader)
    assert follower.refresh()
    inactive = [f"u{k}" for k in range(10, 200)]
    items = model.known_items()
    published = first
    for step in range(3):
        shipped = shipped_of(follower, items)
        learn(model, rng, 10, 300)  # u0..u9 active: the segment rows of everyone move
        assert not np.allclose(model.item_vectors()[1], shipped)
        shared = pub.publish_shared(now=2.0 + step)
        assert shared is not None and shared.rows == 0 and shared.shared_rows > 0
        assert not shared.full and follower.refresh() and follower.version == shared.version
        # the version contract: its items are the last item version's, and it says so
        assert follower.current().item_version == published.version == pub.item_version
        check_users(follower, reader, model, inactive)
        # the items stay as the last item version shipped them
        np.testing.assert_array_equal(shipped_of(follower, items), shipped)
        assert pub.publish_shared(now=2.5 + step) is None  # nothing changed since: no version
        published = pub.publish_items(now=3.0 + step)  # nothing learned since the shared one
        assert published is not None and published.rows > 0
        assert published.shared_rows == 0  # shipped by the shared-rows version already
        pub.publish_users([f"u{k}" for k in range(10)])
        assert follower.refresh()
        assert follower.current().item_version == published.version == follower.version
        check_exact(follower, reader, model, pub)
    late = IndexFollower(reader)  # full v1 + item deltas + shared-rows deltas
    assert late.refresh()
    check_exact(late, reader, model, pub)
    learn(model, rng, 10, 300)
    shared = pub.publish_shared(now=9.0)
    assert shared is not None
    later = IndexFollower(reader)  # ...ending at a shared-rows version: its item version
    assert later.refresh() and later.version == shared.version
    assert later.current().item_version == published.version < shared.version


def test_an_item_version_always_follows_a_shared_rows_version(stores) -> None:
    """A client waiting for ``item_version >= stamp`` (the version contract) must see one come:
    after a shared-rows version the next :meth:`publish_items` makes an item version even when
    no item changed (only records were stamped); then nothing is owed."""
    writer, reader = stores
    model, _ = trained(16)
    pub = VersionedPublisher(writer, model)
    first = pub.publish_items(now=1.0)
    assert first is not None and pub.item_version == first.version
    assert pub.publish_users(["u1"], ahead=True) == []
    owed = pub.publish_shared(now=2.0)  # only the record's stamp: no row changed
    assert owed is not None and owed.shared_rows == 0 and pub.item_version == first.version
    follower = IndexFollower(reader)
    assert follower.refresh() and follower.version == owed.version
    assert follower.current().item_version == first.version
    stamp = int(reader.get_user_vectors(["u1"]).versions[0])
    assert stamp == owed.version
    items = pub.publish_items(now=2.5)
    assert items is not None and items.rows == 0 and pub.item_version == items.version > stamp
    assert follower.refresh() and follower.current().item_version == items.version
    assert pub.publish_items(now=3.0) is None  # nothing changed, nothing owed
    assert reader.get_status()["item_version"] == items.version


def test_a_shared_rows_version_carries_records_written_ahead_and_new_keys(stores) -> None:
    """Records stamped with the next version (``ahead``) get it from a shared-rows version
    even when nothing else changed; a user naming a segment value no version shipped yet is
    written once a shared-rows version ships its row."""
    writer, reader = stores
    model, _ = trained(12)
    pub = VersionedPublisher(writer, model)
    assert pub.publish_shared(now=0.5) is None  # nothing of ours in Redis yet: items first
    pub.publish_items(now=1.0)
    assert pub.publish_shared(now=1.5) is None  # nothing changed, nothing owed
    assert pub.publish_users(["u1"], ahead=True) == []
    owed = pub.publish_shared(now=2.0)
    assert owed is not None and owed.shared_rows == 0
    model.upsert_users(["fresh"], [{"segment": "brand-new"}])
    assert pub.publish_users(["fresh"], ahead=True) == ["fresh"]
    carried = pub.publish_shared(now=3.0)
    assert carried is not None and carried.shared_rows >= 1
    assert pub.publish_users(["fresh"]) == []
    follower = IndexFollower(reader)
    assert follower.refresh() and follower.version == carried.version
    got = reader.get_user_vectors(["u1", "fresh"], shared=follower.current().users)
    assert got.versions.tolist() == [owed.version, carried.version]
    check_users(follower, reader, model, ["u1", "fresh"])


def test_no_shared_rows_version_while_a_full_snapshot_is_due(stores) -> None:
    writer, reader = stores
    model, _ = trained(13)
    pub = VersionedPublisher(writer, model)
    pub.publish_items(now=1.0)
    pub.request_full()
    learn(model, np.random.default_rng(14), 200, 300)
    assert pub.publish_shared(now=2.0) is None  # the item version writes the full one
    published = pub.publish_items(now=3.0)
    assert published is not None and published.full and published.shared_rows > 0


def test_a_full_snapshot_comes_before_the_deltas_outnumber_what_redis_keeps(stores) -> None:
    """Many small versions (shared-rows ones) since the last full snapshot: the next item
    version is full before trimming to ``keep_deltas`` could drop a delta that the oldest kept
    full snapshot needs; a worker starting then loads and follows."""
    writer, reader = stores
    model, rng = trained(15)
    pub = VersionedPublisher(writer, model, deltas_only(keep_deltas=10))
    assert pub.publish_items(now=1.0).full
    shared = 0
    for t in range(30):
        learn(model, rng, 5, 300, n=4)
        if pub.publish_shared(now=2.0 + t) is None:
            break
        shared += 1
    assert shared == 9  # FULL_AT_DELTAS x keep_deltas: then the item version is due, full
    published = pub.publish_items(now=40.0)
    assert published is not None and published.full
    assert pub.publish_shared(now=41.0) is None  # nothing changed since
    learn(model, rng, 5, 300, n=4)
    assert pub.publish_shared(now=42.0) is not None  # shared-rows versions again
    pub.publish_users(model.known_users())
    late = IndexFollower(reader)
    assert late.refresh() and late.version == pub.version
    check_users(late, reader, model, model.known_users())


def test_deltas_are_trimmed_after_each_version_is_announced(stores) -> None:
    """The trim runs after the notice now (off the path to the workers): every kind of version
    still leaves at most ``keep_deltas`` deltas, its own among them, announced on the channel."""
    writer, _ = stores
    model, rng = trained(16)
    sub = writer.redis.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(writer.keys.items_notice())
    try:
        _wait_subscribed(writer.redis, writer.keys.items_notice())
        pub = VersionedPublisher(writer, model, deltas_only(keep_deltas=4))
        assert pub.publish_items(now=1.0).full
        made, fulls = [], []
        for t in range(12):
            learn(model, rng, 5, 300, n=4)
            got = pub.publish_shared(now=2.0 + t) if t % 3 else None
            got = got or pub.publish_items(now=2.0 + t)  # (a full is due: no shared-rows one)
            assert got is not None
            made.append(got.version)
            fulls += [got.version] if got.full else []
            kept = pub.log.versions()
            assert kept[-1] == got.version and len(kept) <= 4
        assert fulls  # a full snapshot's trim too (deltas not newer than the oldest full)
        heard: list[int] = []
        deadline = time.monotonic() + 30
        while len(heard) < len(made) + 1 and time.monotonic() < deadline:
            msg = sub.get_message(timeout=0.5)
            if msg is not None:
                heard.append(int(msg["data"]))
        assert heard[1:] == made
    finally:
        sub.close()


def _wait_subscribed(client: redis.Redis, channel: str) -> None:
    deadline = time.monotonic() + 30
    while not dict(client.pubsub_numsub(channel)).get(channel.encode()):
        assert time.monotonic() < deadline, "the test never subscribed"
        time.sleep(0.01)
