"""The per-update CPU paths give the same bits as the plain forms they replace.

Each test holds one shortcut of the training step to the computation it stands for, exactly
(``assert_array_equal`` on the bytes where NaN payloads or signed zeros could differ).
"""

from __future__ import annotations

import numpy as np
import pytest

from model import FeatureSchema, OnlineFM, TrainConfig
from model.optim import RowTable, einsum, set_rows
from model.step import _scatter


def test_fresh_rows_reset_by_slices_equal_reset_by_index() -> None:
    a = RowTable(8, 0.1, np.random.default_rng(5), capacity=64)
    b = RowTable(8, 0.1, np.random.default_rng(5), capacity=64)
    for n in (1, 3, 7):
        got = a.alloc(n)  # the fresh-rows path: _reset_range
        lo = b.n_rows
        b.n_rows += n
        want = np.arange(lo, lo + n, dtype=np.int64)
        b.reset(want)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int64
    np.testing.assert_array_equal(a.params.view(np.uint32), b.params.view(np.uint32))
    np.testing.assert_array_equal(a.acc, b.acc)
    np.testing.assert_array_equal(a.dirty, b.dirty)
    assert a.rng.bit_generator.state == b.rng.bit_generator.state


def test_set_rows_copies_the_bytes_of_four_and_eight_byte_rows() -> None:
    rng = np.random.default_rng(2)
    for width in (1, 2):  # uint32 / uint64 rows
        table = rng.normal(size=(40, width)).astype(np.float32)
        want = table.copy()
        rows = rng.choice(40, 11, replace=False)
        vals = rng.normal(size=(11, width)).astype(np.float32)
        vals.view(np.uint32)[0, 0] = 0x7FC00123  # a NaN with a payload
        vals[1, 0] = -0.0
        set_rows(table, rows, vals)
        want[rows] = vals
        np.testing.assert_array_equal(table.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (37, 33), (500, 32)])
def test_einsum_alias_equals_numpy_einsum(shape) -> None:
    rng = np.random.default_rng(shape[0])
    v = rng.normal(size=shape).astype(np.float32)
    w = rng.normal(size=shape).astype(np.float32)[:, ::-1]  # a strided operand too
    for a, b in ((v, v), (v, w), (v[:, 1:], v[:, 1:])):
        got = einsum("ij,ij->i", a, b)
        want = np.einsum("ij,ij->i", a, b)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("n_fixed", [1, 2, 3])
def test_scatter_of_one_source_row_to_several_entities_equals_repeated_rows(n_fixed) -> None:
    rng = np.random.default_rng(n_fixed)
    m, d, n_u, n_ev = 40, 6, 9, 13
    ctp = rng.normal(size=(n_u, d)).astype(np.float32)
    P = rng.normal(size=(n_ev, d)).astype(np.float32)
    dP = rng.normal(size=(n_ev, d)).astype(np.float32)
    us = np.sort(rng.choice(m, n_u, replace=False))
    ev_item = rng.integers(0, m, n_ev)
    ev_fixed = rng.integers(0, m, (n_ev, n_fixed))
    dst = np.concatenate([us, ev_item, ev_fixed.ravel()])
    w = np.ones(dst.size, dtype=np.float32)
    w[n_u : n_u + n_ev] = rng.normal(size=n_ev).astype(np.float32)
    base = rng.normal(size=(m, d)).astype(np.float32)
    # the former form: dP copied once per fixed entity, one destination per source row
    want = _scatter(np.arange(dst.size + 1), dst, w,
                    np.concatenate([ctp, P, dP.repeat(n_fixed, axis=0)]), base.copy())
    ptr = np.concatenate([np.arange(n_u + n_ev), np.arange(n_u + n_ev, dst.size + 1, n_fixed)])
    got = _scatter(ptr, dst, w, np.concatenate([ctp, P, dP]), base.copy())
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_observe_sightings_by_position_equal_the_full_array() -> None:
    schema = FeatureSchema.from_dict(
        {"user": {"user_id": {"min_count": 3}, "city": {"min_count": 2}}, "item": {}}
    )
    spaces = []
    for _ in range(2):
        fm = OnlineFM(schema, TrainConfig(seed=1))
        fm.upsert_users([f"u{j}" for j in range(6)], [{"city": f"c{j % 3}"} for j in range(6)])
        spaces.append((fm, fm._space))
    keys = np.concatenate(
        [spaces[0][0]._users.keys_of(np.arange(6))[0].ravel(), np.zeros(3, dtype=np.int64)]
    )
    mult = np.arange(keys.size, dtype=np.int64) % 3
    calls = []

    def by_position(at: np.ndarray) -> np.ndarray:
        calls.append(at.size)
        return mult.take(at)

    for t in (1.0, 2.0, 3.0):
        got = spaces[0][1].observe(keys, t, by_position)
        want = spaces[1][1].observe(keys, t, mult)
        assert got == want
        np.testing.assert_array_equal(spaces[0][1].key_count, spaces[1][1].key_count)
        np.testing.assert_array_equal(spaces[0][1].key_row, spaces[1][1].key_row)
    assert calls and max(calls) < keys.size  # only the waiting keys' positions were asked


def test_learning_admits_by_the_same_sightings_as_one_key_per_event() -> None:
    # users seen several times in one step count each event; items of the step too; keys
    # admitted after 3 sightings: the counts equal one observe per event
    schema = FeatureSchema.from_dict(
        {
            "user": {"user_id": {"min_count": 3}, "city": {"min_count": 4}},
            "item": {"item_id": {"min_count": 3}, "tags": {"kind": "multi", "min_count": 5}},
            "context": {"hour": {"min_count": 2}},
        }
    )
    fm = OnlineFM(schema, TrainConfig(seed=3, negatives=4))
    users = [f"u{j % 4}" for j in range(12)]
    items = [f"i{j % 5}" for j in range(12)]
    fm.upsert_users(sorted(set(users)), [{"city": "x"}] * 4)
    fm.upsert_items(sorted(set(items)), [{"tags": ["a", "b"]}] * 5)
    labels = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0], dtype=np.float32)
    fm.learn_many(users, items, labels, contexts=[{"hour": str(j % 2)} for j in range(12)],
                  ts=1.0)
    sp = fm._space

    def count(side_keys: np.ndarray) -> int:
        return int(sp.key_count[int(side_keys)])

    u_keys, _ = fm._users.keys_of(np.arange(4))
    i_keys, _ = fm._items.keys_of(np.arange(5))
    # user ids: 3 events each (admitted at 3: the count stops mattering once admitted)
    for e in range(4):
        assert count(u_keys[e, 0]) == 3
    city = u_keys[0, 1]
    assert count(city) == 12  # one sighting per event of every user reading it
    for e in range(5):
        assert count(i_keys[e, 0]) in (2, 3)  # i0, i1 3 events; the others 2
