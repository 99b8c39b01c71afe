"""The Redis state, written by StoreWriter and read by VectorStore, against the real Redis of
the test session."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import redis

from fmstream.settings import Settings
from serving.errors import ServingError, SnapshotCorrupt, SnapshotMissing, StoreUnavailable
from serving.index import ItemSnapshot
from serving.store import VectorStore
from stream.connect import redis_client
from train.store_writer import StoreWriter


def snapshot(version: int, n: int = 50, dim: int = 6, seed: int = 0) -> ItemSnapshot:
    rng = np.random.default_rng(seed)
    return ItemSnapshot(
        version=version,
        item_ids=[f"item-{i}-é" for i in range(n)],
        vectors=rng.standard_normal((n, dim)).astype(np.float32),
        bias=0.25,
        extra={"context": rng.bytes(300), "empty": b""},
        created_at=1_700_000_000.5,
    )


def prefixed_keys(client: redis.Redis, settings: Settings, pattern: str = "*") -> set[str]:
    return {k.decode() for k in client.scan_iter(match=settings.redis_prefix + pattern)}


def test_user_vectors_round_trip(store: VectorStore, writer: StoreWriter) -> None:
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    before = time.time()
    writer.put_user_vectors(["u1", "u2", "u:3"], vectors, version=9)
    got = store.get_user_vectors(["u:3", "nobody", "u1"])
    assert got.found.tolist() == [True, False, True]
    np.testing.assert_array_equal(got.vectors, np.stack([vectors[2], np.zeros(4), vectors[0]]))
    assert got.vectors.dtype == np.float32
    assert got.versions.tolist() == [9, -1, 9]
    assert before <= got.published_at[0] <= time.time() and np.isnan(got.published_at[1])
    writer.put_user_vectors(["u1"], vectors[1:2] * 2, version=10)  # overwrite, newer version
    again = store.get_user_vectors(["u1"])
    np.testing.assert_array_equal(again.vectors[0], vectors[1] * 2)
    assert again.versions.tolist() == [10]
    none = store.get_user_vectors(["x", "y"], dim=4)
    assert none.vectors.shape == (2, 4) and not none.found.any()
    with pytest.raises(ServingError, match="one vector per id"):
        writer.put_user_vectors(["a"], vectors, version=1)


def test_history_is_bounded_newest_first_and_deduplicated(
    store: VectorStore, writer: StoreWriter
) -> None:
    writer.push_history(["u", "v", "u", "u"], ["i1", "j1", "i2", "i1"], max_len=5)
    writer.push_history(["u"] * 6, [f"k{i}" for i in range(6)], max_len=5)
    hist = store.get_histories(["u", "v", "nobody"])
    assert hist == [["k5", "k4", "k3", "k2", "k1"], ["j1"], []]
    writer.push_history(["w", "w", "w"], ["a", "b", "a"], max_len=3)
    assert store.get_histories(["w"]) == [["a", "b"]]  # newest occurrence wins, no repeats
    assert store.redis.llen(store.keys.history("u")) == 5


def test_item_snapshot_round_trip_in_many_chunks(store: VectorStore, writer: StoreWriter) -> None:
    assert store.current_item_version() is None
    with pytest.raises(SnapshotMissing, match="no item snapshot published"):
        store.load_item_snapshot()
    snap = snapshot(1, n=200, dim=9)
    assert writer.put_item_snapshot(snap, chunk_bytes=1000)
    manifest = store.item_manifest()
    assert manifest["chunks"] == 8 and manifest["ids_chunks"] > 1
    assert manifest["n"] == 200 and manifest["dim"] == 9
    loaded = store.load_item_snapshot()
    assert loaded.version == 1 and store.current_item_version() == 1
    np.testing.assert_array_equal(loaded.vectors, snap.vectors)
    assert loaded.vectors.dtype == np.float32 and loaded.vectors.flags.writeable
    assert loaded.item_ids == snap.item_ids
    assert loaded.extra == snap.extra and loaded.bias == 0.25
    assert loaded.created_at == snap.created_at
    assert loaded.row_of["item-7-é"] == 7


def test_pointer_only_moves_forward(
    store: VectorStore, writer: StoreWriter, settings: Settings
) -> None:
    assert writer.put_item_snapshot(snapshot(5, seed=5))
    assert not writer.put_item_snapshot(snapshot(3, seed=3))  # stale: not written at all
    assert not writer.put_item_snapshot(snapshot(5, seed=6))  # same version: not rewritten
    assert store.current_item_version() == 5
    np.testing.assert_array_equal(store.load_item_snapshot().vectors, snapshot(5, seed=5).vectors)
    assert not prefixed_keys(store.redis, settings, "items:3:*")
    # The compare-and-set itself, racing a writer that already moved the pointer further:
    cas = writer._cas_forward  # noqa: SLF001 - the script is the atomicity guarantee under test
    assert cas(keys=[store.keys.items_current()], args=[4]) == 0
    assert cas(keys=[store.keys.items_current()], args=[6]) == 1
    assert store.current_item_version() == 6


def test_old_versions_are_cleaned(
    store: VectorStore, settings: Settings, writer: StoreWriter
) -> None:
    keep = settings.keep_versions
    last = keep + 4
    for v in range(1, last + 1):
        writer.put_item_snapshot(snapshot(v, seed=v), chunk_bytes=512)
    kept = list(range(last - keep, last + 1))  # the current and keep_versions before it
    assert store.item_versions() == kept
    for v in range(1, last - keep):
        assert not prefixed_keys(store.redis, settings, f"items:{v}:*"), v
        with pytest.raises(SnapshotMissing):
            store.load_item_snapshot(v)
    for v in kept:
        assert store.load_item_snapshot(v).version == v


def test_corrupt_or_missing_parts_are_detected(store: VectorStore, writer: StoreWriter) -> None:
    writer.put_item_snapshot(snapshot(1), chunk_bytes=256)
    chunk = store.keys.items_chunk(1, 2)
    original = store.redis.get(chunk)
    store.redis.setrange(chunk, 4, b"\x00\x01\x02\x03")  # flip bytes in place
    with pytest.raises(SnapshotCorrupt, match="sha256"):
        store.load_item_snapshot()
    store.redis.set(chunk, original[:-8])  # truncated
    with pytest.raises(SnapshotCorrupt, match="vector bytes"):
        store.load_item_snapshot()
    store.redis.delete(chunk)  # vanished (e.g. deleted by newer publishes)
    with pytest.raises(SnapshotMissing, match="vanished"):
        store.load_item_snapshot()
    store.redis.set(chunk, original)
    assert store.load_item_snapshot().version == 1
    store.redis.set(store.keys.items_manifest(1), b"{not json")
    with pytest.raises(SnapshotCorrupt, match="manifest is not JSON"):
        store.load_item_snapshot()
    with pytest.raises(SnapshotMissing, match="v7 has no manifest"):
        store.load_item_snapshot(7)


def test_offline_i2i_versions(store: VectorStore, settings: Settings, writer: StoreWriter) -> None:
    assert store.get_offline_i2i(["a"]) == (None, [None])
    assert writer.put_offline_i2i(1, {"a": [("b", 1.0)]})
    assert writer.put_offline_i2i(2, {"a": [("c", 2.5), ("b", 0.5)], "b": []})
    assert not writer.put_offline_i2i(1, {"a": [("z", 9.0)]})  # never backwards
    assert writer.put_offline_i2i(3, {"a": [("d", 3.0)], "x": [("y", -1.0)]})
    version, table = store.get_offline_i2i(["a", "b", "x", "nope"])
    assert version == 3
    assert table == [[("d", 3.0)], None, [("y", -1.0)], None]
    # the current and the previous version stay; older hashes are gone
    assert prefixed_keys(store.redis, settings, "i2i:[0-9]*") == {
        settings.redis_key("i2i", 2), settings.redis_key("i2i", 3)
    }


def test_popular_status_and_workers(store: VectorStore, writer: StoreWriter) -> None:
    assert store.get_popular(3) == []
    writer.put_popular([("a", 1.0), ("b", 5.0), ("c", 3.0)])
    assert store.get_popular(2) == [("b", 5.0), ("c", 3.0)]
    writer.put_status(model_version=7, items_published_at=1234.5, note="ok")
    writer.put_status(model_version=8)
    assert store.get_status() == {"model_version": 8, "items_published_at": 1234.5, "note": "ok"}
    store.set_worker_version("w1", 8, ttl_s=0.3)
    store.set_worker_version("w2", 7, ttl_s=30, item_version=5)  # a shared-rows version
    assert store.worker_versions() == {"w1": 8, "w2": 7}
    assert store.worker_item_versions() == {"w1": 8, "w2": 5}  # none given: the version
    time.sleep(0.5)
    assert store.worker_versions() == {"w2": 7}  # w1 stopped refreshing: gone
    assert store.worker_item_versions() == {"w2": 5}
    store.redis.set(store.keys.worker("old"), 4)  # a worker of before the item version
    store.redis.sadd(store.keys.workers(), "old")
    assert store.worker_item_versions() == {"w2": 5}  # unknown: left out, not guessed


def test_rejects_a_decoding_client(settings: Settings) -> None:
    client = redis_client(settings.redis_config(), decode_responses=True)
    with pytest.raises(ServingError, match="decode_responses=False"):
        VectorStore(client, settings.redis_keys())
    client.close()


def test_history_pushes_in_one_call_equal_one_push_per_event(
    store: VectorStore, writer: StoreWriter
) -> None:
    """The history script groups a call's pairs per user: the lists are those that one push
    per event, in order, would leave (interleaved users, a user over max_len in one call, a
    push cut into several script calls, ids with spaces, quotes and non-ASCII text)."""
    rng = np.random.default_rng(3)
    users = ["u 1", 'u"2', "ü3", "u4"]
    pairs = [(users[u], f"i{i}") for u, i in zip(rng.integers(0, 4, 300),
                                                 rng.integers(0, 99, 300), strict=True)]
    writer.push_history([u for u, _ in pairs[:250]], [i for _, i in pairs[:250]], max_len=7)
    writer.push_history([u for u, _ in pairs[250:]], [i for _, i in pairs[250:]], max_len=7)
    expected = {u: [] for u in users}
    for u, i in pairs:
        expected[u] = ([i, *expected[u]])[:7]
    for u in users:
        assert [x.decode() for x in store.redis.lrange(store.keys.history(u), 0, -1)] == expected[u]
    with pytest.raises(ServingError, match="expected pairs"):
        writer.push_history(["u"], [], max_len=3)
    with pytest.raises(ServingError, match="max_len must be >= 1"):
        writer.push_history(["u"], ["i"], max_len=0)
    writer.push_history([], [], max_len=3)  # nothing to write: no call


def test_the_request_reads_say_the_store_is_unavailable_when_redis_is_away(
    settings: Settings,
) -> None:
    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    away = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
    client = redis_client(away.redis_config(), socket_connect_timeout=2.0)
    store = VectorStore(client, settings.redis_keys())
    reads = {
        "vectors": lambda: store.get_user_vectors(["u1"]),
        "histories": lambda: store.get_histories(["u1"]),
        "offline": lambda: store.get_offline_i2i(["i1"]),
        "popular": lambda: store.get_popular(10),
    }
    for what, read in reads.items():
        with pytest.raises(StoreUnavailable, match="did not answer.*retry shortly") as info:
            read()
        assert info.value.code == "internal", what
        assert isinstance(info.value.__cause__, redis.ConnectionError), what
    client.close()
