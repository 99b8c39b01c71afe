"""Item indexes: exact search against numpy brute force, exclusion, HNSW recall, snapshots."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.errors import IndexInputError
from serving.index import (
    FlatIndex,
    HnswIndex,
    ItemIndex,
    ItemSnapshot,
    LoadedIndex,
    build_index,
    configure_faiss,
    recall_at_k,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> None:
    configure_faiss(1)


def fm_like(n: int, d: int, seed: int, *, query: bool = False) -> np.ndarray:
    """FM-like vectors: clustered low-rank factors with uneven norms, plus the two augmented
    columns (item: bias, 1; query: 1, user bias) as a published model would have them."""
    rng = np.random.default_rng(seed)
    rank = min(8, max(1, d - 2))
    basis = np.random.default_rng(100).standard_normal((rank, max(d - 2, 0))) / np.sqrt(rank)
    centres = np.random.default_rng(200).standard_normal((32, rank))
    z = centres[rng.integers(0, 32, n)] + 0.5 * rng.standard_normal((n, rank))
    factors = (z @ basis + 0.1 * rng.standard_normal((n, max(d - 2, 0))))
    x = np.empty((n, d), dtype=np.float32)
    x[:, 2:] = factors * rng.lognormal(0.0, 0.5, (n, 1))
    if d >= 2:
        x[:, 0] = 1.0 if query else rng.normal(0.0, 1.0, n)
        x[:, 1] = rng.normal(0.0, 0.5, n) if query else 1.0
    else:
        x[:, 0] = rng.normal(0.0, 1.0, n)
    return x


def int_matrix(rows: int, cols: int) -> st.SearchStrategy[np.ndarray]:
    """Small-integer matrices: inner products are exact in float32, and ties are frequent."""
    return st.lists(
        st.lists(st.integers(-3, 3), min_size=cols, max_size=cols), min_size=rows, max_size=rows
    ).map(lambda v: np.array(v, dtype=np.float32).reshape(rows, cols))


@st.composite
def search_case(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    n = draw(st.integers(1, 40))
    d = draw(st.integers(1, 6))
    nq = draw(st.integers(1, 5))
    k = draw(st.integers(1, n + 3))
    return draw(int_matrix(n, d)), draw(int_matrix(nq, d)), k


def check_top_k(scores: np.ndarray, rows: np.ndarray, xb: np.ndarray, xq: np.ndarray,
                k: int, exclude: list[set[int]] | None = None) -> None:
    """Results are a valid top-k of the brute force scores (any order among ties)."""
    brute = xq.astype(np.float64) @ xb.astype(np.float64).T
    for i in range(len(xq)):
        allowed = np.setdiff1d(np.arange(len(xb)), sorted(exclude[i]) if exclude else [])
        want = np.sort(brute[i, allowed])[::-1][:k]
        got_rows = rows[i][rows[i] >= 0]
        assert len(got_rows) == len(want) == min(k, len(allowed))
        assert len(set(got_rows.tolist())) == len(got_rows)
        assert set(got_rows.tolist()) <= set(allowed.tolist())
        np.testing.assert_array_equal(brute[i, got_rows], want)  # exact: integer data
        np.testing.assert_array_equal(scores[i, : len(got_rows)], want)
        assert (rows[i, len(got_rows):] == -1).all()
        assert np.isneginf(scores[i, len(got_rows):]).all()


@settings(max_examples=60, deadline=None)
@given(search_case())
def test_flat_search_equals_brute_force(case: tuple[np.ndarray, np.ndarray, int]) -> None:
    xb, xq, k = case
    scores, rows = FlatIndex(xb).search(xq, k)
    assert scores.shape == rows.shape == (len(xq), k)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    check_top_k(scores, rows, xb, xq, k)


@settings(max_examples=60, deadline=None)
@given(search_case(), st.data())
def test_flat_exclusion_is_exact_and_fills_k(
    case: tuple[np.ndarray, np.ndarray, int], data: st.DataObject
) -> None:
    xb, xq, k = case
    n = len(xb)
    exclude = [
        data.draw(st.sets(st.integers(0, n + 5), max_size=n + 2)) for _ in range(len(xq))
    ]  # rows beyond n (unknown to the index) are allowed and ignored
    loaded = LoadedIndex(ItemSnapshot(1, [str(i) for i in range(n)], xb), FlatIndex(xb))
    hits = loaded.search_excluding(xq, k, exclude)
    scores = np.full((len(xq), k), -np.inf, dtype=np.float32)
    rows = np.full((len(xq), k), -1, dtype=np.int64)
    for i, found in enumerate(hits):
        for j, (row, score) in enumerate(found):
            rows[i, j], scores[i, j] = row, score
    check_top_k(scores, rows, xb, xq, k, [{r for r in ex if r < n} for ex in exclude])


class LossyIndex(ItemIndex):
    """An 'approximate' index that returns only a quarter of what it is asked for."""

    def __init__(self, xb: np.ndarray) -> None:
        self.inner = FlatIndex(xb)
        self.calls: list[int] = []

    @property
    def ntotal(self) -> int:
        return self.inner.ntotal

    @property
    def dim(self) -> int:
        return self.inner.dim

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(k)
        scores, rows = self.inner.search(queries, k)
        if k < self.ntotal:  # keep every 4th result, like an index missing neighbours
            keep = np.arange(k) % 4 == 0
            scores[:, ~keep], rows[:, ~keep] = -np.inf, -1
        return scores, rows


def test_exclusion_widens_until_k_found_or_exhausted() -> None:
    xb = fm_like(300, 8, seed=1)
    xq = fm_like(4, 8, seed=2, query=True)
    index = LossyIndex(xb)
    loaded = LoadedIndex(ItemSnapshot(1, [str(i) for i in range(300)], xb), index)
    exact_rows = FlatIndex(xb).search(xq, 30)[1]
    exclude = [set(exact_rows[i].tolist()) for i in range(4)]
    hits = loaded.search_excluding(xq, 10, exclude)
    assert [len(h) for h in hits] == [10] * 4
    for i, found in enumerate(hits):
        assert not {r for r, _ in found} & exclude[i]
        assert [s for _, s in found] == sorted((s for _, s in found), reverse=True)
    assert len(index.calls) > 1, index.calls  # it had to widen
    everything = loaded.search_excluding(xq[:1], 1000, [set(range(295))])
    assert sorted(r for r, _ in everything[0]) == [295, 296, 297, 298, 299]


def test_fewer_items_than_k_are_padded() -> None:
    xb = fm_like(3, 4, seed=0)
    scores, rows = FlatIndex(xb).search(fm_like(2, 4, seed=1), 5)
    assert (rows[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert (np.sort(rows[:, :3], axis=1) == [0, 1, 2]).all()
    hscores, hrows = HnswIndex(xb, m=4).search(fm_like(2, 4, seed=1), 5)
    assert (hrows[:, 3:] == -1).all() and np.isneginf(hscores[:, 3:]).all()
    empty = FlatIndex(np.zeros((0, 4), dtype=np.float32))
    s, r = empty.search(np.ones((2, 4), dtype=np.float32), 3)
    assert (r == -1).all() and np.isneginf(s).all() and empty.ntotal == 0


def test_hnsw_recall_is_high_and_scores_exact() -> None:
    xb = fm_like(5000, 16, seed=3)
    xq = fm_like(200, 16, seed=4, query=True)
    exact_scores, exact_rows = FlatIndex(xb).search(xq, 10)
    index = build_index("hnsw", xb, hnsw_m=32, ef_search=64)
    scores, rows = index.search(xq, 10)
    recall = recall_at_k(rows, exact_rows, scores, exact_scores)
    assert recall >= 0.95, recall
    brute = np.einsum("nd,nkd->nk", xq.astype(np.float64), xb[rows].astype(np.float64))
    np.testing.assert_allclose(scores, brute, rtol=1e-5, atol=1e-4)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_recall_at_k_tolerates_ties() -> None:
    exact_ids = np.array([[1, 2, 3]])
    exact_scores = np.array([[3.0, 2.0, 1.0]])
    # item 9 ties the 3rd exact score: as correct as item 3
    assert recall_at_k(np.array([[1, 2, 9]]), exact_ids, np.array([[3.0, 2.0, 1.0]]),
                       exact_scores) == 1.0
    assert recall_at_k(np.array([[1, 2, 9]]), exact_ids) == pytest.approx(2 / 3)
    assert recall_at_k(np.array([[1, 9, -1]]), exact_ids, np.array([[3.0, 0.5, -np.inf]]),
                       exact_scores) == pytest.approx(1 / 3)


def test_bad_inputs_raise_clear_errors() -> None:
    index = FlatIndex(fm_like(10, 4, seed=0))
    with pytest.raises(IndexInputError, match="expected width 4"):
        index.search(np.ones((1, 5), dtype=np.float32), 3)
    with pytest.raises(IndexInputError, match="NaN"):
        index.search(np.full((1, 4), np.nan, dtype=np.float32), 3)
    with pytest.raises(IndexInputError, match="non-negative"):
        index.search(np.ones((1, 4), dtype=np.float32), -1)
    with pytest.raises(IndexInputError, match="'flat' or 'hnsw'"):
        build_index("ivf", fm_like(10, 4, seed=0))  # type: ignore[arg-type]
    with pytest.raises(IndexInputError, match="one id per row"):
        ItemSnapshot(1, ["a"], fm_like(2, 4, seed=0))
    with pytest.raises(IndexInputError, match="float32"):
        ItemSnapshot(1, ["a"], np.ones((1, 4)))
    with pytest.raises(IndexInputError, match="duplicate"):
        _ = ItemSnapshot(1, ["a", "a"], fm_like(2, 4, seed=0)).row_of


def test_loaded_index_maps_ids_to_rows_and_vectors() -> None:
    xb = fm_like(5, 3, seed=0)
    loaded = LoadedIndex.build(ItemSnapshot(7, list("abcde"), xb, bias=0.5))
    assert loaded.version == 7 and isinstance(loaded.index, FlatIndex)
    rows, found = loaded.rows_of(["c", "zz", "a"])
    assert rows.tolist() == [2, -1, 0] and found.tolist() == [True, False, True]
    vectors, found = loaded.vectors_of(["c", "zz"])
    np.testing.assert_array_equal(vectors[0], xb[2])
    assert (vectors[1] == 0).all() and found.tolist() == [True, False]
    assert loaded.snapshot.row_of["e"] == 4
