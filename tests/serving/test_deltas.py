"""Delta logic without I/O: encoding, planning, in-place apply == a full build of that version."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest

from serving.deltas import (
    DELTA_MAGIC,
    ItemDelta,
    decode_delta,
    delta_rows,
    encode_delta,
    plan_delta,
)
from serving.errors import IndexInputError, SnapshotCorrupt, SnapshotError
from serving.follow import ItemCopy
from serving.graph import GraphKeeper
from serving.index import FlatIndex, ItemSnapshot

DIM = 6


def delta(version: int, ids: list[str], seed: int = 0, **kw) -> ItemDelta:
    rng = np.random.default_rng(seed)
    return ItemDelta(version, ids, rng.standard_normal((len(ids), DIM)).astype(np.float32), **kw)


def test_encode_decode_round_trip() -> None:
    d = delta(
        7, ["a", "b-é", "c"], bias=0.5, extra={"context": b"\x00ctx", "z": b""}, created_at=123.25
    )
    back = decode_delta(encode_delta(d), 7)
    assert back.version == 7 and back.base == 6 and back.item_ids == ["a", "b-é", "c"]
    np.testing.assert_array_equal(back.vectors, d.vectors)
    assert back.bias == 0.5 and back.extra == {"context": b"\x00ctx", "z": b""}
    assert back.created_at == 123.25
    empty = decode_delta(encode_delta(ItemDelta(3, [], np.zeros((0, DIM), np.float32))), 3)
    assert empty.n == 0


def test_decode_rejects_corrupt_truncated_and_wrong_version() -> None:
    raw = encode_delta(delta(2, ["a", "b"]))
    with pytest.raises(SnapshotCorrupt, match="expected version 3"):
        decode_delta(raw, 3)
    with pytest.raises(SnapshotCorrupt, match="do not match"):
        decode_delta(raw[:-1], 2)
    flipped = bytearray(raw)
    flipped[-1] ^= 1
    with pytest.raises(SnapshotCorrupt, match="sha256"):
        decode_delta(bytes(flipped), 2)
    with pytest.raises(SnapshotCorrupt, match="not an fmstream delta"):
        decode_delta(b"junk", 2)


def test_a_delta_names_its_item_version_itself_unless_a_shared_rows_version_says_older() -> None:
    """The version contract on the wire: an item version's header has no ``item_version`` (it
    is the version itself; deltas written before the field decode so); a shared-rows version
    names the older item version whose items it serves; the field is checked."""
    item = delta(5, ["a"])
    assert item.item_version == 5
    raw = encode_delta(item)
    assert b"item_version" not in raw and decode_delta(raw, 5).item_version == 5
    shared = decode_delta(encode_delta(delta(9, [], item_version=6)), 9)
    assert shared.version == 9 and shared.item_version == 6
    for bad in (10, -1):
        with pytest.raises(IndexInputError, match="item_version must be in 0..9"):
            delta(9, [], item_version=bad)
    for value, says in (("6", "must be an integer"), (99, "must be in 0..9")):
        with pytest.raises(SnapshotCorrupt, match=f"item_version {says}"):
            decode_delta(with_header(encode_delta(delta(9, [], item_version=6)),
                                     item_version=value), 9)


def with_header(raw: bytes, **fields) -> bytes:
    """``raw`` (an encoded delta) with header fields replaced (not covered by the checksum)."""
    start = len(DELTA_MAGIC) + 4
    (n,) = struct.unpack_from("<I", raw, len(DELTA_MAGIC))
    head = orjson.loads(raw[start : start + n]) | fields
    header = orjson.dumps(head)
    return DELTA_MAGIC + struct.pack("<I", len(header)) + header + raw[start + n :]


def test_delta_validates_shapes() -> None:
    with pytest.raises(IndexInputError, match="2 ids for 1 vectors"):
        ItemDelta(1, ["a", "b"], np.zeros((1, DIM), np.float32))
    with pytest.raises(IndexInputError, match="float32"):
        ItemDelta(1, ["a"], np.zeros((1, DIM), np.float64))


def test_plan_delta_updates_known_rows_and_appends_new_ones_in_order() -> None:
    row_of = {"a": 0, "b": 1, "c": 2}
    rows, changed, new, new_ids = plan_delta(row_of, ["c", "x", "a", "y"], 3)
    assert rows.tolist() == [2, 3, 0, 4]
    assert changed.tolist() == [0, 2] and new.tolist() == [1, 3] and new_ids == ["x", "y"]
    with pytest.raises(IndexInputError, match="twice"):
        plan_delta(row_of, ["x", "x"], 3)
    with pytest.raises(IndexInputError, match="twice"):
        plan_delta(row_of, ["a", "a"], 3)


def test_delta_rows_finds_exactly_the_changed_and_new_ids() -> None:
    last = {"a": 0, "b": 1, "c": 2}
    last_vectors = np.arange(3 * DIM, dtype=np.float32).reshape(3, DIM)
    now = last_vectors[[2, 0, 1]].copy()  # same vectors, another order
    now[1, 3] += 1e-7 * now[1, 3] + 1e-6  # "a" moved by a tiny amount: still a change
    ids = ["c", "a", "b", "new"]
    vectors = np.vstack([now, np.ones((1, DIM), np.float32)])
    assert delta_rows(ids, vectors, last, last_vectors).tolist() == [1, 3]


def random_snapshot(version: int, n: int, seed: int) -> ItemSnapshot:
    rng = np.random.default_rng(seed)
    return ItemSnapshot(
        version,
        [f"i{j}" for j in range(n)],
        rng.standard_normal((n, DIM)).astype(np.float32),
        bias=float(version),
        extra={"blob": b"v%d" % version},
    )


def evolve(
    n0: int, steps: int, seed: int = 1
) -> tuple[ItemSnapshot, list[ItemDelta], ItemSnapshot]:
    """A base snapshot, ``steps`` deltas (changed + new items), and the full snapshot they make."""
    rng = np.random.default_rng(seed)
    base = random_snapshot(1, n0, seed)
    ids = list(base.item_ids)
    vectors = base.vectors.copy()
    deltas = []
    for v in range(2, 2 + steps):
        changed = sorted(rng.choice(len(ids), size=max(1, len(ids) // 5), replace=False).tolist())
        new = [f"n{v}-{j}" for j in range(int(rng.integers(0, 4)))]
        d_ids = [ids[r] for r in changed] + new
        d_vec = rng.standard_normal((len(d_ids), DIM)).astype(np.float32)
        vectors[changed] = d_vec[: len(changed)]
        vectors = np.vstack([vectors, d_vec[len(changed) :]])
        ids += new
        extra = {"blob": b"v%d" % v} if v % 2 else {}
        deltas.append(ItemDelta(v, d_ids, d_vec, bias=float(v), extra=extra))
    last = 1 + steps
    full = ItemSnapshot(
        last,
        ids,
        vectors,
        bias=float(last),
        extra={"blob": b"v%d" % (last if last % 2 else last - 1)},
    )
    return base, deltas, full


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_in_place_apply_equals_a_full_build_of_the_same_version(kind: str) -> None:
    base, deltas, full = evolve(300, 12)
    copy = ItemCopy(base, kind, GraphKeeper(m=8, ef_search=64) if kind == "hnsw" else None)
    for d in deltas:
        copy.apply(d)
    got = copy.loaded()
    assert got.version == full.version and got.snapshot.item_ids == full.item_ids
    np.testing.assert_array_equal(got.snapshot.vectors, full.vectors)
    assert got.snapshot.bias == full.bias and got.snapshot.extra == full.extra
    assert got.snapshot.row_of == {i: r for r, i in enumerate(full.item_ids)}
    queries = np.random.default_rng(5).standard_normal((20, DIM)).astype(np.float32)
    exact_s, exact_r = FlatIndex(full.vectors).search(queries, 10)
    s, r = got.search(queries, 10)
    if kind == "flat":
        np.testing.assert_array_equal(r, exact_r)
        np.testing.assert_allclose(s, exact_s, rtol=1e-5)
    else:  # exact re-scoring on the newest vectors: every returned score is the true one
        true = np.einsum("nd,nkd->nk", queries, full.vectors[r])
        np.testing.assert_allclose(s, true, rtol=1e-5, atol=1e-5)
        assert (r >= 0).all()


def test_apply_refuses_a_delta_for_another_base() -> None:
    base, deltas, _ = evolve(50, 3)
    copy = ItemCopy(base, "flat", None)
    with pytest.raises(SnapshotError, match="applies to v2"):
        copy.apply(deltas[1])
    wide = ItemDelta(2, ["i0"], np.zeros((1, DIM + 1), np.float32))
    with pytest.raises(SnapshotError, match="width"):
        copy.apply(wide)
    assert copy.version == 1


def positional(version: int, rows: list[int], base_n: int, new_ids: list[str], seed: int = 0,
               **kw) -> ItemDelta:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((len(rows), DIM)).astype(np.float32)
    return ItemDelta(version, new_ids, vectors, rows=np.array(rows, np.int64), base_n=base_n, **kw)


def test_positional_delta_round_trip_names_rows_and_only_the_new_ids() -> None:
    d = positional(4, [1, 3, 5, 6], 5, ["new-a", "new-é"], bias=1.5, extra={"context": b"c"})
    back = decode_delta(encode_delta(d), 4)
    assert back.rows.tolist() == [1, 3, 5, 6] and back.base_n == 5
    assert back.item_ids == ["new-a", "new-é"] and back.extra == {"context": b"c"}
    np.testing.assert_array_equal(back.vectors, d.vectors)
    by_id = decode_delta(encode_delta(delta(2, ["a"])), 2)  # the id form still decodes
    assert by_id.rows is None and by_id.item_ids == ["a"]


def test_positional_delta_validates_its_rows() -> None:
    with pytest.raises(IndexInputError, match="ascend"):
        positional(2, [3, 1], 5, [])
    with pytest.raises(IndexInputError, match="ascend"):  # appended rows must follow base_n
        positional(2, [1, 6], 5, ["x"])
    with pytest.raises(IndexInputError, match="ascend"):  # one id per appended row
        positional(2, [1, 5], 5, [])
    with pytest.raises(IndexInputError, match="float32"):
        ItemDelta(2, [], np.zeros((2, DIM), np.float32), rows=np.array([1]), base_n=3)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_positional_apply_equals_the_id_form_and_checks_the_base_size(kind: str) -> None:
    base, deltas, full = evolve(200, 6)
    copy = ItemCopy(base, kind, GraphKeeper(m=8, ef_search=64) if kind == "hnsw" else None)
    n = base.n
    for d in deltas:  # the same deltas, written by position
        rows, changed, new, new_ids = plan_delta(copy.row_of, d.item_ids, n)
        order = np.argsort(rows, kind="stable")
        copy.apply(ItemDelta(d.version, new_ids, d.vectors[order], bias=d.bias, extra=d.extra,
                             rows=rows[order], base_n=n))
        n += len(new_ids)
    got = copy.loaded()
    assert got.version == full.version and got.snapshot.item_ids == full.item_ids
    np.testing.assert_array_equal(got.snapshot.vectors, full.vectors)
    assert got.snapshot.row_of == {i: r for r, i in enumerate(full.item_ids)}
    wrong_base = ItemDelta(full.version + 1, [], np.zeros((1, DIM), np.float32),
                           rows=np.array([0]), base_n=n - 1)
    with pytest.raises(SnapshotError, match="reload the full snapshot"):
        copy.apply(wrong_base)
    assert copy.version == full.version


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_positional_delta_of_a_block_of_rows_is_written_in_place(kind: str) -> None:
    base, _, _ = evolve(40, 0)
    copy = ItemCopy(base, kind, GraphKeeper(m=8, ef_search=64) if kind == "hnsw" else None)
    d = positional(base.version + 1, list(range(10, base.n + 2)), base.n, ["n1", "n2"], seed=3)
    copy.apply(d)  # rows 10 .. n-1 are one block, then two new items
    want = np.vstack([base.vectors[:10], d.vectors])
    np.testing.assert_array_equal(copy.vectors(), want)
    assert copy.ids == [*base.item_ids, "n1", "n2"] and copy.row_of["n2"] == base.n + 1


def test_flat_set_rows_takes_a_block_within_bounds() -> None:
    index = FlatIndex(np.zeros((5, DIM), np.float32))
    index.set_rows(slice(1, 3), np.ones((2, DIM), np.float32))
    assert index.vectors().sum(axis=1).tolist() == [0, DIM, DIM, 0, 0]
    with pytest.raises(IndexInputError, match="block"):
        index.set_rows(slice(4, 7), np.ones((3, DIM), np.float32))
