"""Item deltas in the parts form (serving/item_parts.py): own parts + shared item rows shipped,
items recomposed where they are served. Unit tests (no I/O): wire format, bad input, apply."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from model import FeatureSchema
from model.online import OnlineFM, TrainConfig
from serving.deltas import DELTA_MAGIC, ItemDelta, decode_delta, encode_delta
from serving.errors import IndexInputError, SnapshotCorrupt, SnapshotError
from serving.follow import ItemCopy
from serving.graph import GraphKeeper
from serving.index import FlatIndex, ItemSnapshot
from serving.item_parts import (
    ITEM_KEYS,
    ITEM_ROWS,
    MAX_KEYS,
    ItemParts,
    decode_item_keys,
    decode_item_parts,
    encode_item_keys,
    encode_item_parts,
)
from serving.users import SharedRows, encode_rows

D = 6  # latent dim; vectors are D + 2 wide


def parts_delta(version: int, rows: list[int], base_n: int, new_ids: list[str], *,
                shared_keys: list[int] = (), seed: int = 0, n_keys: int = 2) -> ItemDelta:
    rng = np.random.default_rng(seed)
    own = rng.standard_normal((len(rows), D + 2)).astype(np.float32)
    keys = rng.integers(1, 5, (len(rows), n_keys)).astype(np.int64)
    weights = rng.random((len(rows), n_keys)).astype(np.float32)
    extra = {ITEM_KEYS: encode_item_keys(keys, weights)}
    if shared_keys:
        params = rng.standard_normal((len(shared_keys), D + 1)).astype(np.float32)
        extra[ITEM_ROWS] = encode_rows(np.array(shared_keys, np.int64), params)
    return ItemDelta(version, new_ids, own, 0.5, extra, 1.0, rows=np.array(rows, np.int64),
                     base_n=base_n, parts=True)


def test_parts_delta_round_trip() -> None:
    d = parts_delta(3, [0, 2, 4, 5], 5, ["new-é"], shared_keys=[1, 3])
    back = decode_delta(encode_delta(d), 3)
    assert back.parts and back.base_n == 5 and back.item_ids == ["new-é"]
    np.testing.assert_array_equal(back.rows, d.rows)
    np.testing.assert_array_equal(back.vectors, d.vectors)
    assert back.extra == d.extra
    k, w = decode_item_keys(back.extra[ITEM_KEYS], 4)
    k0, w0 = decode_item_keys(d.extra[ITEM_KEYS], 4)
    np.testing.assert_array_equal(k, k0)
    np.testing.assert_array_equal(w, w0)


def test_item_blobs_round_trip() -> None:
    rng = np.random.default_rng(1)
    own = rng.standard_normal((7, D + 2)).astype(np.float32)
    keys = rng.integers(0, 9, (7, 3)).astype(np.int64)
    w = rng.random((7, 3)).astype(np.float32)
    o2, k2, w2 = decode_item_parts(encode_item_parts(own, keys, w), 7)
    np.testing.assert_array_equal(o2, own)
    np.testing.assert_array_equal(k2, keys)
    np.testing.assert_array_equal(w2, w)


def test_malformed_and_oversized_item_blobs_are_clear_errors() -> None:
    keys = np.ones((2, 2), np.int64)
    blob = encode_item_keys(keys, np.ones((2, 2), np.float32))
    with pytest.raises(SnapshotCorrupt, match="truncated"):
        decode_item_keys(blob[:5], 2)
    with pytest.raises(SnapshotCorrupt, match="expected 3 rows"):
        decode_item_keys(blob, 3)
    with pytest.raises(SnapshotCorrupt):
        decode_item_keys(blob[:-1], 2)
    huge = struct.pack("<II", 2, MAX_KEYS + 1) + b"\0" * (12 * 2 * (MAX_KEYS + 1))
    with pytest.raises(SnapshotCorrupt, match="at most"):
        decode_item_keys(huge, 2)
    # a header promising 2**31 rows is refused on its sizes, nothing allocated
    with pytest.raises(SnapshotCorrupt):
        decode_item_parts(struct.pack("<III", 2**31, 8, 2) + b"\0" * 64, 2**31)
    with pytest.raises(SnapshotCorrupt, match="truncated"):
        decode_item_parts(b"\0" * 4, 1)


def test_a_parts_delta_needs_its_keys_and_positional_rows() -> None:
    own = np.zeros((2, D + 2), np.float32)
    with pytest.raises(IndexInputError, match="item_keys"):
        ItemDelta(2, [], own, rows=np.array([0, 1]), base_n=2, parts=True)
    with pytest.raises(IndexInputError, match="positional"):
        ItemDelta(2, ["a", "b"], own, extra={ITEM_KEYS: encode_item_keys(
            np.ones((2, 1), np.int64), np.ones((2, 1), np.float32))}, parts=True)
    with pytest.raises(IndexInputError, match="expected 2 rows"):
        ItemDelta(2, [], own, extra={ITEM_KEYS: encode_item_keys(
            np.ones((3, 1), np.int64), np.ones((3, 1), np.float32))},
            rows=np.array([0, 1]), base_n=2, parts=True)


def test_decode_rejects_a_tampered_parts_delta() -> None:
    raw = encode_delta(parts_delta(3, [0, 1], 4, [], shared_keys=[2]))
    # flip one byte of the keys blob: the checksum catches it
    bad = bytearray(raw)
    bad[-3] ^= 0xFF
    with pytest.raises(SnapshotCorrupt, match="sha256"):
        decode_delta(bytes(bad), 3)
    # a header with an unknown kind or negative sizes is refused, not crashed on
    (hlen,) = struct.unpack_from("<I", raw, len(DELTA_MAGIC))
    start = len(DELTA_MAGIC) + 4
    head = json.loads(raw[start : start + hlen])
    for change in ({"kind": "weird"}, {"n": -2, "vector_bytes": 2 * 8 * 4}, {"extra": [1]}):
        h = json.dumps({**head, **change}).encode()
        forged = DELTA_MAGIC + struct.pack("<I", len(h)) + h + raw[start + hlen :]
        with pytest.raises(SnapshotCorrupt):
            decode_delta(forged, 3)


def model_parts_snapshot(model: OnlineFM, version: int) -> ItemSnapshot:
    """A full snapshot in the parts form, made from the model as the publisher makes it."""
    ents = np.arange(model.n_items)
    own, keys, weights, _ = model.item_parts_at(ents)
    shared_keys = model.item_shared_keys_from(0)[0]
    w, v = model.shared_params(shared_keys)
    parts = ItemParts(own, keys, weights,
                      SharedRows(shared_keys, np.concatenate([w[:, None], v], 1)))
    vectors, missing = parts.compose(ents)
    assert missing == 0
    return ItemSnapshot(version, model.known_items(), vectors, float(model.bias),
                        parts.to_blobs(), 0.0)


def trained_model() -> OnlineFM:
    schema = FeatureSchema.from_dict({"user": {"segment": {}}, "item": {"category": {}}})
    model = OnlineFM(schema, TrainConfig(dim=D, seed=2))
    model.upsert_items([f"i{j}" for j in range(80)], [{"category": f"c{j % 4}"} for j in range(80)])
    rng = np.random.default_rng(3)
    model.learn_many([f"u{k}" for k in rng.integers(0, 30, 300)],
                     [f"i{k}" for k in rng.integers(0, 80, 300)])
    return model


def delta_from_model(model: OnlineFM, version: int, base_n: int, ents: np.ndarray) -> ItemDelta:
    """Parts of the items at ``ents`` (plus the new ones) and every shared item row."""
    ents = np.concatenate([ents, np.arange(base_n, model.n_items)])
    own, keys, weights, _ = model.item_parts_at(ents)
    shared_keys = model.item_shared_keys_from(0)[0]
    w, v = model.shared_params(shared_keys)
    extra = {ITEM_KEYS: encode_item_keys(keys, weights),
             ITEM_ROWS: encode_rows(shared_keys, np.concatenate([w[:, None], v], 1))}
    new_ids = model.item_ids_of(np.arange(base_n, model.n_items))
    return ItemDelta(version, new_ids, own, float(model.bias), extra, 0.0, rows=ents,
                     base_n=base_n, parts=True)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_applied_parts_equal_a_full_snapshot_composed_from_the_model(kind: str) -> None:
    model = trained_model()
    base = model_parts_snapshot(model, 1)
    graphs = GraphKeeper(m=8, ef_search=64) if kind == "hnsw" else None
    copy = ItemCopy(base, kind, graphs)
    assert copy.parts is not None
    rng = np.random.default_rng(4)
    for v in range(2, 6):
        model.drain_changed_rows()
        # users click a few items and two new ones: own rows and every category row move
        model.learn_many([f"u{k}" for k in rng.integers(0, 30, 40)],
                         [f"i{k}" for k in rng.integers(0, 80 + 2 * v, 40)])
        changed = model.drain_changed_rows()
        base_n = copy.n
        own_rows = model.item_own_rows(np.arange(base_n))
        ents = np.flatnonzero((own_rows >= 0) & changed[np.maximum(own_rows, 0)])
        assert ents.size < base_n  # only the clicked items' own parts ship
        copy.apply(delta_from_model(model, v, base_n, ents))
        full = model_parts_snapshot(model, v)
        got = copy.loaded().snapshot
        assert got.item_ids == full.item_ids and got.version == v
        np.testing.assert_array_equal(got.vectors, full.vectors)  # same parts, same bits
        _, exact = model.item_vectors()
        np.testing.assert_allclose(got.vectors, exact, rtol=1e-5, atol=1e-6)
    queries = rng.standard_normal((10, D + 2)).astype(np.float32)
    s, r = copy.loaded().search(queries, 5)
    true_s, true_r = FlatIndex(full.vectors).search(queries, 5)
    if kind == "flat":
        np.testing.assert_array_equal(r, true_r)
    np.testing.assert_allclose(s, np.einsum("nd,nkd->nk", queries, full.vectors[r]),
                               rtol=1e-5, atol=1e-5)


def test_a_lazy_copy_recomposes_on_read_and_matches_an_eager_one() -> None:
    model = trained_model()
    base = model_parts_snapshot(model, 1)
    eager, lazy = ItemCopy(base, "flat", None), ItemCopy(base, "flat", None, lazy=True)
    model.learn_many(["u1", "u2"], ["i3", "i90"])
    delta = delta_from_model(model, 2, 80, np.array([3]))
    eager.apply(delta)
    lazy.apply(delta)
    assert lazy._stale is not None and lazy._stale.sum() == lazy.n  # every category row moved
    np.testing.assert_array_equal(lazy.vectors(), eager.vectors())
    assert lazy._stale is None


def test_parts_delta_on_the_wrong_base_or_a_vectors_copy_means_a_full_reload() -> None:
    model = trained_model()
    base = model_parts_snapshot(model, 1)
    copy = ItemCopy(base, "flat", None)
    with pytest.raises(SnapshotError, match="holds v1"):
        copy.apply(delta_from_model(model, 3, 80, np.array([1])))
    with pytest.raises(SnapshotError, match="reload"):  # base size differs
        copy.apply(delta_from_model(model, 2, 79, np.array([1])))
    plain = ItemCopy(ItemSnapshot(1, base.item_ids, base.vectors, 0.0, {}, 0.0), "flat", None)
    with pytest.raises(SnapshotError, match="vectors only"):
        plain.apply(delta_from_model(model, 2, 80, np.array([1])))
    wide = parts_delta(2, [0], 80, [])
    wide_own = np.zeros((1, D + 4), np.float32)
    bad = ItemDelta(2, [], wide_own, 0.0, wide.extra, 0.0, rows=np.array([0]), base_n=80,
                    parts=True)
    with pytest.raises(SnapshotError, match="width"):
        copy.apply(bad)
    assert copy.version == 1


def _deltas_from(model: OnlineFM, versions: range, base_n: int) -> list[ItemDelta]:
    """Parts deltas of ``model`` for ``versions`` (clicks, new items, every category moving)."""
    rng = np.random.default_rng(11)
    out = []
    for v in versions:
        model.drain_changed_rows()
        model.learn_many([f"u{k}" for k in rng.integers(0, 30, 40)],
                         [f"i{k}" for k in rng.integers(0, base_n + 2, 40)])
        changed = model.drain_changed_rows()
        own_rows = model.item_own_rows(np.arange(base_n))
        ents = np.flatnonzero((own_rows >= 0) & changed[np.maximum(own_rows, 0)])
        out.append(delta_from_model(model, v, base_n, ents))
        base_n = model.n_items
    return out


def test_copies_sharing_parts_compose_each_version_once_and_hold_the_same_bits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = trained_model()
    base = model_parts_snapshot(model, 1)
    alone = ItemCopy(base, "flat", None)
    first = ItemCopy(base, "flat", None)
    second = ItemCopy(base, "flat", None, parts=first.parts)  # the follower's two copies
    assert second.parts is first.parts and first.parts.version == 1
    deltas = _deltas_from(model, range(2, 6), 80)
    composed = []
    real = ItemParts._compose
    monkeypatch.setattr(ItemParts, "_compose",
                        lambda self, at: composed.append(at.size) or real(self, at))
    for d in deltas[:2]:  # the held copy moves first, the standby catches up later
        first.apply(d)
    assert len(composed) == 2 and first.parts.version == 3
    for d in deltas[:2]:
        second.apply(d)  # the rows the first copy composed, taken from the deltas
    assert len(composed) == 2
    for d in deltas[2:]:
        second.apply(d)
        first.apply(d)
    assert len(composed) == 4 and first.parts.version == 5
    monkeypatch.undo()
    for d in _deltas_from_copy(deltas):
        alone.apply(d)
    full = model_parts_snapshot(model, 5)
    for copy in (first, second, alone):
        got = copy.loaded().snapshot
        assert got.version == 5 and got.item_ids == full.item_ids
        np.testing.assert_array_equal(got.vectors, full.vectors)


def _deltas_from_copy(deltas: list[ItemDelta]) -> list[ItemDelta]:
    """The same deltas as fresh objects (no composed rows left on them by another copy)."""
    return [decode_delta(encode_delta(d), d.version) for d in deltas]


def test_a_copy_whose_shared_parts_are_ahead_needs_the_composed_rows_or_a_reload() -> None:
    model = trained_model()
    base = model_parts_snapshot(model, 1)
    first = ItemCopy(base, "flat", None)
    second = ItemCopy(base, "flat", None, parts=first.parts)
    delta = _deltas_from(model, range(2, 3), 80)[0]
    first.apply(delta)
    with pytest.raises(SnapshotError, match="no composed rows"):
        second.apply(_deltas_from_copy([delta])[0])  # another object: nothing cached on it
    assert second.version == 1
    with pytest.raises(SnapshotError, match="shared item parts"):
        ItemCopy(model_parts_snapshot(model, 9), "flat", None, parts=first.parts)


def test_a_sliced_apply_pauses_between_slices_and_writes_the_same_bits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import serving.follow as follow
    import serving.item_parts as item_parts

    model = trained_model()
    base = model_parts_snapshot(model, 1)
    whole, sliced = ItemCopy(base, "flat", None), ItemCopy(base, "flat", None)
    pauses = []
    sliced.pause = lambda: pauses.append(sliced.version)
    monkeypatch.setattr(item_parts, "COMPOSE_CHUNK", 7)
    monkeypatch.setattr(follow, "WRITE_CHUNK", 5)
    deltas = _deltas_from(model, range(2, 5), 80)
    for d, again in zip(deltas, _deltas_from_copy(deltas), strict=True):
        whole.apply(d)
        sliced.apply(again)
    assert len(pauses) >= 3 * (80 // 7 + 80 // 5)  # every category moved: all items, sliced
    np.testing.assert_array_equal(sliced.loaded().snapshot.vectors,
                                  whole.loaded().snapshot.vectors)
