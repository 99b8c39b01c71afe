"""IndexFollower against the real Redis of the test session: deltas, gaps, loss, concurrency."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from serving.deltas import DeltaLog, ItemDelta, encode_delta
from serving.follow import IndexFollower
from serving.graph import GraphKeeper
from serving.index import FlatIndex, ItemSnapshot
from serving.store import VectorStore
from tests.serving.test_deltas import evolve
from train.store_writer import StoreWriter

pytestmark = pytest.mark.integration

DIM = 6


def same(follower: IndexFollower, full: ItemSnapshot) -> None:
    state = follower.current()
    assert state is not None and state.version == full.version
    snap = state.loaded.snapshot
    assert snap.item_ids == full.item_ids
    np.testing.assert_array_equal(snap.vectors, full.vectors)
    assert snap.bias == full.bias


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_deltas_from_redis_equal_a_full_snapshot_of_the_same_version(
    store: VectorStore, kind: str,
    writer: StoreWriter,
) -> None:
    base, deltas, full = evolve(400, 10)
    log = DeltaLog(store.redis, store.key)
    writer.put_item_snapshot(base)
    graphs = GraphKeeper(m=8, ef_search=64) if kind == "hnsw" else None
    follower = IndexFollower(store, kind=kind, graphs=graphs)
    assert follower.refresh() and follower.version == 1
    for d in deltas[:4]:  # one at a time
        log.put(d)
        assert follower.refresh()
    for d in deltas[4:]:  # several at once
        log.put(d)
    assert follower.refresh()
    same(follower, full)
    assert follower.full_loads == 1 and follower.deltas_applied == len(deltas)
    # a fresh follower (a new worker) gets there from the full snapshot + the kept deltas
    late = IndexFollower(store, kind=kind, graphs=graphs)
    assert late.refresh()
    same(late, full)
    queries = np.random.default_rng(3).standard_normal((16, DIM)).astype(np.float32)
    want = FlatIndex(full.vectors).search(queries, 5)[1]
    if kind == "flat":
        np.testing.assert_array_equal(follower.current().loaded.search(queries, 5)[1], want)
        np.testing.assert_array_equal(late.current().loaded.search(queries, 5)[1], want)
    # both copies (held and standby) are now at the head: one more delta applies to each
    extra = ItemDelta(full.version + 1, ["i0"], np.ones((1, DIM), np.float32), bias=2.0)
    log.put(extra)
    assert follower.refresh()
    assert follower.current().loaded.snapshot.vectors[0].tolist() == [1.0] * DIM
    log.put(ItemDelta(full.version + 2, ["i1"], np.full((1, DIM), 2, np.float32)))
    assert follower.refresh()
    snap = follower.current().loaded.snapshot
    assert snap.vectors[0].tolist() == [1.0] * DIM and snap.vectors[1].tolist() == [2.0] * DIM


def test_a_missing_delta_means_a_full_reload_once_a_newer_snapshot_exists(
    store: VectorStore,
    writer: StoreWriter,
) -> None:
    base, deltas, full = evolve(100, 6)
    log = DeltaLog(store.redis, store.key)
    writer.put_item_snapshot(base)
    follower = IndexFollower(store)
    follower.refresh()
    for d in deltas:
        log.put(d)
    store.redis.unlink(log.key(3))  # a gap: retention, or Redis lost it
    assert not follower.refresh() and follower.version == 1  # nothing newer to load yet
    assert not follower.refresh()
    newer = ItemSnapshot(full.version + 1, full.item_ids, full.vectors, bias=full.bias)
    writer.put_item_snapshot(newer)  # the publisher's next full snapshot
    assert follower.refresh()
    same(follower, newer)
    assert follower.full_loads == 2


@pytest.mark.parametrize("bad", ["corrupt", "wrong base"])
def test_a_bad_delta_is_waited_out_then_a_newer_full_snapshot_is_loaded(
    store: VectorStore, writer: StoreWriter, bad: str
) -> None:
    base, deltas, full = evolve(100, 6)
    log = DeltaLog(store.redis, store.key)
    writer.put_item_snapshot(base)
    follower = IndexFollower(store)
    assert follower.refresh()
    for d in deltas:
        log.put(d)
    if bad == "corrupt":
        store.redis.set(log.key(3), b"FMDELTA1 not a delta")
    else:  # well formed, but for a base of another size: it cannot apply to v2
        n = len(base.item_ids)
        store.redis.set(log.key(3), encode_delta(ItemDelta(
            3, [], np.zeros((0, DIM), np.float32), rows=np.zeros(0, np.int64), base_n=n + 7)))
    # no exception, no reload loop: the follower serves what it has
    for _ in range(3):
        assert not follower.refresh()
    assert follower.version == 1 and follower.full_loads == 1
    late = IndexFollower(store)  # a new worker: the full snapshot and the deltas before the bad one
    assert late.refresh() and late.version == (1 if bad == "corrupt" else 2)
    assert not late.refresh() and late.full_loads == 1
    newer = ItemSnapshot(full.version + 1, full.item_ids, full.vectors, bias=full.bias)
    writer.put_item_snapshot(newer)  # the publisher's next full snapshot
    for f in (follower, late):
        assert f.refresh()
        same(f, newer)
        assert f.full_loads == 2


def test_store_lost_then_republished_and_version_going_back(
    store: VectorStore, writer: StoreWriter
) -> None:
    base, deltas, full = evolve(100, 3)
    writer.put_item_snapshot(base)
    follower = IndexFollower(store)
    follower.refresh()
    store.redis.flushall()
    assert not follower.refresh() and follower.store_lost and follower.version == 1
    assert follower.current() is not None  # still serving what it has
    writer.put_item_snapshot(full)  # the publisher republished everything
    assert follower.refresh() and not follower.store_lost
    same(follower, full)
    # a store whose version went back (a trainer restarted without its version): follow it
    store.redis.flushall()
    older = ItemSnapshot(2, base.item_ids, base.vectors, bias=9.0)
    writer.put_item_snapshot(older)
    assert follower.refresh() and follower.version == 2
    assert follower.current().loaded.snapshot.bias == 9.0


def test_a_pinned_batch_never_sees_two_versions(store: VectorStore, writer: StoreWriter) -> None:
    """Readers pin states while deltas keep arriving; every row of version v holds the value v
    and the index has exactly 100 + v rows: a mixed state would show another value or size."""
    n0, versions = 100, 40
    log = DeltaLog(store.redis, store.key)
    writer.put_item_snapshot(
        ItemSnapshot(1, [f"i{j}" for j in range(n0 + 1)], np.ones((n0 + 1, DIM), np.float32))
    )
    follower = IndexFollower(store)
    follower.refresh()
    stop = threading.Event()
    bad: list[str] = []
    seen: set[int] = set()
    q = np.ones((4, DIM), np.float32)

    def reader() -> None:
        while not stop.is_set():
            with follower.pinned() as state:
                assert state is not None
                v = state.version
                seen.add(v)
                snap = state.loaded.snapshot
                first = snap.vectors.copy()
                scores, rows = state.loaded.search(q, 8)
                if snap.n != n0 + v or not (first == v).all() or len(snap.row_of) != n0 + v:
                    bad.append(f"v{v}: n={snap.n} values={np.unique(first)}")
                if not np.allclose(scores, v * DIM):
                    bad.append(f"v{v}: scores {np.unique(scores)}")
                if not (snap.vectors == first).all():
                    bad.append(f"v{v}: vectors changed while pinned")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for v in range(2, versions + 1):
            ids = [f"i{j}" for j in range(n0 + v)]  # every row changes, one item is new
            log.put(ItemDelta(v, ids, np.full((len(ids), DIM), v, np.float32)))
            assert follower.refresh()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not bad, bad[:5]
    assert follower.version == versions and len(seen) > 5


def test_an_apply_slice_waits_while_a_batch_is_answered(
    store: VectorStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import serving.follow as follow

    monkeypatch.setattr(follow, "PAUSE_MAX_S", 60.0)  # the bound is not what is tested here
    follower = IndexFollower(store)
    assert not follower.answering
    follower.pause()  # nobody answering: goes straight on
    assert follower.pauses_waited == 0
    resumed = threading.Event()

    def slice_boundary() -> None:
        follower.pause()
        resumed.set()

    with follower.pinned():
        with follower.pinned():  # batches may overlap: answering until the last one ends
            assert follower.answering
        assert follower.answering
        apply = threading.Thread(target=slice_boundary)
        apply.start()
        while follower.pauses_waited == 0:  # the slice is waiting for this batch
            assert apply.is_alive()
            threading.Event().wait(0.01)
        assert not resumed.is_set()
    apply.join(timeout=60)
    assert resumed.is_set() and not follower.answering and follower.pauses_waited == 1


def test_a_pause_is_bounded_so_versions_never_starve(
    store: VectorStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import serving.follow as follow

    monkeypatch.setattr(follow, "PAUSE_MAX_S", 0.0)
    follower = IndexFollower(store)
    with follower.pinned():
        follower.pause()  # returns although the batch still holds the state
        assert follower.answering and follower.pauses_waited == 1
