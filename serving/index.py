"""Inner-product item indexes over published item vectors, and the snapshot a worker swaps.

Array contract (as in Faiss ``contrib``): queries are float32 ``(n, d)``; a search returns
``(scores, rows)``, both ``(n, k)``, scores float32 and rows int64, best first, with row ``-1`` and
score ``-inf`` where fewer than ``k`` items exist. Rows index :attr:`ItemSnapshot.item_ids`.

Two implementations behind :class:`ItemIndex`:

* :class:`FlatIndex` — exact (``faiss.IndexFlatIP``), the default.
* :class:`HnswIndex` — approximate (``faiss.IndexHNSWFlat`` with inner product); candidates are
  re-scored exactly against the stored vectors, so every returned score is an exact inner product
  and only *which* items come back is approximate. Measure its recall (``bench/index.py``).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import faiss
import numpy as np

from serving.errors import IndexInputError

logger = logging.getLogger(__name__)

IndexKind = Literal["flat", "hnsw"]

DEFAULT_BLAS_THRESHOLD = 20
"""Batch x dim above which faiss uses BLAS for flat search (faiss' own default is 128000)."""


# --- configuration -------------------------------------------------------------------------


def configure_faiss(threads: int, *, blas_threshold: int = DEFAULT_BLAS_THRESHOLD) -> None:
    """Set faiss' OpenMP threads and its BLAS threshold for batched flat search.

    One thread per process is the safe default on small machines (two threads collapse when the
    other core is busy). ``OPENBLAS_CORETYPE`` is deliberately left as the environment sets it.

    Args:
        threads: OpenMP threads faiss may use in this process (>= 1).
        blas_threshold: ``faiss.cvar.distance_compute_blas_threshold``; batches with
            ``n_queries * dim`` at or above it use BLAS (much faster for batches of ~64).
    """
    if threads < 1:
        raise IndexInputError(f"faiss threads must be >= 1, got {threads}; use 1 per process")
    faiss.omp_set_num_threads(int(threads))
    faiss.cvar.distance_compute_blas_threshold = int(blas_threshold)
    logger.debug("faiss: %d thread(s), BLAS threshold %d", threads, blas_threshold)


# --- array checks --------------------------------------------------------------------------


def as_matrix(vectors: np.ndarray, *, name: str = "vectors", dim: int | None = None) -> np.ndarray:
    """``vectors`` as a C-contiguous float32 ``(n, d)`` matrix (a 1-D vector becomes one row).

    Raises:
        IndexInputError: not 1- or 2-D, wrong width, or non-finite values.
    """
    arr = np.asarray(vectors)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise IndexInputError(f"{name}: expected a (n, d) float32 array, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise IndexInputError(
            f"{name}: expected width {dim} (the index dimension), got {arr.shape[1]}; "
            "query and item vectors must come from the same model version"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.size and not np.isfinite(arr).all():
        raise IndexInputError(f"{name}: contains NaN or infinite values")
    return arr


def _check_k(k: int) -> int:
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise IndexInputError(f"k must be a non-negative integer, got {k!r}")
    return int(k)


def _empty_result(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)


def _pad(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalise faiss' "missing" markers (-1, -FLT_MAX) to (-1, -inf) and pad to width k."""
    n, got = rows.shape
    if got == k:  # the common case: no copy
        missing = rows < 0
        if missing.any():
            scores = scores.copy()
            scores[missing] = -np.inf
        return scores, rows
    out_scores, out_rows = _empty_result(n, k)
    width = min(got, k)
    out_rows[:, :width] = rows[:, :width]
    out_scores[:, :width] = scores[:, :width]
    out_scores[out_rows < 0] = -np.inf
    return out_scores, out_rows


# --- indexes -------------------------------------------------------------------------------


class ItemIndex(ABC):
    """Maximum-inner-product search over a fixed set of item vectors (rows ``0..ntotal-1``)."""

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Number of indexed vectors."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Vector width."""

    @property
    def exact(self) -> bool:
        """True when :meth:`search` returns the exact top-k."""
        return False

    @abstractmethod
    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search checked queries for ``0 < k <= ntotal``; may mark missing rows with -1."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows by inner product for each query.

        Args:
            queries: float32 ``(n, d)`` (a single ``(d,)`` vector is one query).
            k: results per query; more than :attr:`ntotal` is padded.

        Returns:
            ``(scores, rows)``: float32 and int64 ``(n, k)``, best first; ``-inf`` / ``-1`` pad.
        """
        q = as_matrix(queries, name="queries", dim=self.dim)
        k = _check_k(k)
        n = q.shape[0]
        kk = min(k, self.ntotal)
        if n == 0 or kk == 0:
            return _empty_result(n, k)
        scores, rows = self._search(q, kk)
        return _pad(scores, rows.astype(np.int64, copy=False), k)


class FlatIndex(ItemIndex):
    """Exact inner-product search (``faiss.IndexFlatIP``): memory-bound scan of every vector."""

    def __init__(self, vectors: np.ndarray) -> None:
        xb = as_matrix(vectors, name="item vectors")
        self._index = faiss.IndexFlatIP(xb.shape[1])
        if xb.shape[0]:
            self._index.add(xb)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def exact(self) -> bool:
        return True

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._index.search(queries, k)

    def vectors(self) -> np.ndarray:
        """The stored vectors as a float32 ``(ntotal, d)`` view of faiss' own memory (no copy).

        The view stays valid until the next :meth:`append` (which may move the storage).
        """
        n, d = self.ntotal, self.dim
        if n == 0:
            return np.zeros((0, d), dtype=np.float32)
        return faiss.rev_swig_ptr(self._index.get_xb(), n * d).reshape(n, d)

    def set_rows(self, rows: np.ndarray | slice, vectors: np.ndarray) -> None:
        """Overwrite rows in place (O(changed rows)); ``rows`` an index array or a slice (a
        block of rows: one copy). Not safe while another thread searches."""
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.ntotal)
            if step != 1 or rows.start is None or rows.stop != stop or rows.start != start:
                raise IndexInputError(f"set_rows: a block must lie in [0, {self.ntotal})")
            if stop > start:
                self.vectors()[start:stop] = as_matrix(vectors, name="row vectors", dim=self.dim)
            return
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        if rows.min() < 0 or rows.max() >= self.ntotal:
            raise IndexInputError(f"set_rows: rows must lie in [0, {self.ntotal})")
        self.vectors()[rows] = as_matrix(vectors, name="row vectors", dim=self.dim)

    def append(self, vectors: np.ndarray) -> None:
        """Add rows at the end (rows ``ntotal ..``). Not safe while another thread searches."""
        xb = as_matrix(vectors, name="new vectors", dim=self.dim)
        if xb.shape[0]:
            self._index.add(xb)


class HnswIndex(ItemIndex):
    """Approximate inner-product search (``faiss.IndexHNSWFlat``, ``METRIC_INNER_PRODUCT``).

    Each search asks the graph for ``ceil(k * overfetch)`` candidates (``efSearch`` is raised to at
    least that) and re-scores them exactly against the stored vectors, so scores are exact inner
    products. ``overfetch > 1`` only widens the candidate pool when ``k * overfetch`` exceeds
    ``ef_search``; recall is governed mainly by ``ef_search`` and the embedding geometry.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        *,
        m: int = 32,
        ef_search: int = 128,
        ef_construction: int = 40,
        overfetch: float = 1.0,
    ) -> None:
        if m < 2 or ef_search < 1 or ef_construction < 1 or not overfetch >= 1.0:
            raise IndexInputError(
                "HNSW parameters: expected m >= 2, ef_search >= 1, ef_construction >= 1, "
                f"overfetch >= 1; got m={m}, ef_search={ef_search}, "
                f"ef_construction={ef_construction}, overfetch={overfetch}"
            )
        xb = as_matrix(vectors, name="item vectors")
        self._vectors = xb
        self.m = int(m)
        self.ef_search = int(ef_search)
        self.ef_construction = int(ef_construction)
        self.overfetch = float(overfetch)
        self._param_cache: dict[int, faiss.SearchParametersHNSW] = {}
        self._index = faiss.IndexHNSWFlat(xb.shape[1], self.m, faiss.METRIC_INNER_PRODUCT)
        self._index.hnsw.efConstruction = self.ef_construction
        started = time.perf_counter()
        if xb.shape[0]:
            self._index.add(xb)
        self.build_seconds = time.perf_counter() - started
        logger.info(
            "built HNSW index: %d x %d, M=%d, efConstruction=%d in %.2fs",
            xb.shape[0], xb.shape[1], self.m, self.ef_construction, self.build_seconds,
        )

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def _params(self, ef: int) -> faiss.SearchParametersHNSW:
        """Per-call search parameters (cached by efSearch): no shared mutable ``efSearch``
        on the index, so concurrent searches with different widths are safe."""
        params = self._param_cache.get(ef)
        if params is None:
            params = faiss.SearchParametersHNSW(efSearch=ef)
            if len(self._param_cache) < 64:
                self._param_cache[ef] = params
        return params

    def raw_candidates(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """The graph's ``fetch`` best candidates (approximate scores, rows; -1 for none)."""
        params = self._params(max(self.ef_search, fetch))
        scores, cand = self._index.search(queries, fetch, params=params)
        return scores, cand.astype(np.int64, copy=False)

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        fetch = min(self.ntotal, max(k, int(np.ceil(k * self.overfetch))))
        _, cand = self.raw_candidates(queries, fetch)
        return rescore(queries, self._vectors, cand, k)


def rescore(
    queries: np.ndarray, vectors: np.ndarray, candidates: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query with its candidate rows; the best ``k``, best first.

    Ties are broken by the lower row, so results are deterministic. ``-1`` candidates are missing.
    """
    valid = candidates >= 0
    all_valid = bool(valid.all())
    safe = candidates if all_valid else np.where(valid, candidates, 0)
    scores = np.einsum("nd,nkd->nk", queries, vectors[safe]).astype(np.float32, copy=False)
    tie = safe
    if not all_valid:
        scores[~valid] = -np.inf
        tie = np.where(valid, safe, np.iinfo(np.int64).max)
    # lexsort: the last key is primary -> by score descending, then by row ascending.
    order = np.lexsort((tie, -scores), axis=1)[:, :k]
    at = np.arange(len(order))[:, None]
    rows = candidates[at, order] if all_valid else np.where(valid, candidates, -1)[at, order]
    return scores[at, order], rows


def build_index(
    kind: IndexKind,
    vectors: np.ndarray,
    *,
    hnsw_m: int = 32,
    ef_search: int = 128,
    ef_construction: int = 40,
    overfetch: float = 1.0,
) -> ItemIndex:
    """Build an exact (``"flat"``) or approximate (``"hnsw"``) index over ``vectors``."""
    if kind == "flat":
        return FlatIndex(vectors)
    if kind == "hnsw":
        return HnswIndex(
            vectors, m=hnsw_m, ef_search=ef_search, ef_construction=ef_construction,
            overfetch=overfetch,
        )
    raise IndexInputError(f"index kind: expected 'flat' or 'hnsw', got {kind!r}")


# --- snapshots -----------------------------------------------------------------------------


def rows_for_ids(what: str, item_ids: Sequence[str], vectors: np.ndarray) -> np.ndarray:
    """``vectors`` as a float32 ``(n, d)`` array with one row per id of ``item_ids``.

    Shared by full snapshots and deltas. Raises:
        IndexInputError: another dtype or shape, or a count of ids that differs from the rows.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.dtype != np.float32:
        raise IndexInputError(
            f"{what}: expected float32 (n, d) vectors, got {vectors.dtype} {vectors.shape}"
        )
    if len(item_ids) != vectors.shape[0]:
        raise IndexInputError(
            f"{what}: {len(item_ids)} ids for {vectors.shape[0]} vectors; "
            "expected one id per row"
        )
    return vectors


@dataclass(frozen=True, eq=False)
class ItemSnapshot:
    """One published version of the item side: ids, vectors (row i = item_ids[i]) and blobs.

    Attributes:
        version: monotonically increasing snapshot version (the model version it came from).
        item_ids: item id of each row.
        vectors: float32 ``(n, d)`` item vectors (E_item).
        bias: the FM's global bias (add to an inner product for the full logit).
        extra: opaque blobs shipped alongside (e.g. ``"context"``: the serialized context table).
        created_at: publisher wall-clock time, seconds since epoch.
    """

    version: int
    item_ids: list[str]
    vectors: np.ndarray
    bias: float = 0.0
    extra: dict[str, bytes] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "vectors", rows_for_ids(f"snapshot v{self.version}", self.item_ids, self.vectors)
        )

    @property
    def n(self) -> int:
        """Number of items."""
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        """Vector width."""
        return int(self.vectors.shape[1])

    @cached_property
    def row_of(self) -> dict[str, int]:
        """Row of each item id (built on first use, then cached).

        Raises:
            IndexInputError: the snapshot has duplicate item ids.
        """
        rows = {item_id: i for i, item_id in enumerate(self.item_ids)}
        if len(rows) != len(self.item_ids):
            raise IndexInputError(
                f"snapshot v{self.version}: {len(self.item_ids) - len(rows)} duplicate item ids; "
                "expected each item once"
            )
        return rows


@dataclass(frozen=True, eq=False)
class LoadedIndex:
    """A snapshot and the index built over it: what a worker swaps as ONE reference."""

    snapshot: ItemSnapshot
    index: ItemIndex

    @classmethod
    def build(
        cls,
        snapshot: ItemSnapshot,
        kind: IndexKind = "flat",
        *,
        hnsw_m: int = 32,
        ef_search: int = 128,
    ) -> LoadedIndex:
        """Build the index for ``snapshot`` (off the request path) and bundle them."""
        index = build_index(kind, snapshot.vectors, hnsw_m=hnsw_m, ef_search=ef_search)
        _ = snapshot.row_of  # build the id map now, not on the first request
        return cls(snapshot, index)

    @property
    def version(self) -> int:
        """The snapshot version."""
        return self.snapshot.version

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Plain top-k search (see :meth:`ItemIndex.search`)."""
        return self.index.search(queries, k)

    def search_excluding(
        self, queries: np.ndarray, k: int, exclude: Sequence[set[int]]
    ) -> list[list[tuple[int, float]]]:
        """Top-``k`` ``(row, score)`` per query, never returning a row in that query's exclusions.

        Over-fetches ``k + len(exclude[i])`` and, when exclusions still leave fewer than ``k``,
        widens (doubling) until ``k`` results are found or the index is exhausted. Queries needing
        similar widths are searched together in one batched call.

        Args:
            queries: float32 ``(n, d)``.
            k: results wanted per query.
            exclude: one set of rows per query (rows outside the index are ignored).
        """
        q = as_matrix(queries, name="queries", dim=self.index.dim)
        k = _check_k(k)
        if len(exclude) != q.shape[0]:
            raise IndexInputError(
                f"exclude: expected one set per query ({q.shape[0]}), got {len(exclude)}"
            )
        ntotal = self.index.ntotal
        results: list[list[tuple[int, float]]] = [[] for _ in range(q.shape[0])]
        if k == 0 or ntotal == 0:
            return results
        excluded = [
            np.fromiter(ex, dtype=np.int64, count=len(ex)) if ex else None for ex in exclude
        ]
        fetch = {i: min(ntotal, k + len(exclude[i])) for i in range(q.shape[0])}
        while fetch:
            # Bucket by the next power of two so one huge exclusion list doesn't widen them all.
            buckets: dict[int, list[int]] = {}
            for i, width in fetch.items():
                buckets.setdefault(min(ntotal, 1 << (width - 1).bit_length()), []).append(i)
            next_fetch: dict[int, int] = {}
            for width, members in buckets.items():
                scores, rows = self.index.search(q[members], width)
                for j, i in enumerate(members):
                    r, s = rows[j], scores[j]
                    keep = r >= 0
                    if excluded[i] is not None:
                        keep &= ~np.isin(r, excluded[i])
                    idx = np.flatnonzero(keep)
                    if len(idx) >= k or width >= ntotal:
                        idx = idx[:k]
                        results[i] = list(zip(r[idx].tolist(), s[idx].tolist(), strict=True))
                    else:
                        next_fetch[i] = min(ntotal, width * 2)
            fetch = next_fetch
        return results

    def rows_of(self, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``item_ids`` (int64, -1 where unknown) and the found mask."""
        row_of = self.snapshot.row_of
        rows = np.fromiter((row_of.get(i, -1) for i in item_ids), dtype=np.int64,
                           count=len(item_ids))
        return rows, rows >= 0

    def vectors_of(self, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors of ``item_ids`` (float32 ``(n, d)``, zeros where unknown) and the found mask."""
        rows, found = self.rows_of(item_ids)
        out = np.zeros((len(item_ids), self.snapshot.dim), dtype=np.float32)
        out[found] = self.snapshot.vectors[rows[found]]
        return out, found


# --- evaluation ----------------------------------------------------------------------------


def recall_at_k(
    approx_ids: np.ndarray,
    exact_ids: np.ndarray,
    approx_scores: np.ndarray | None = None,
    exact_scores: np.ndarray | None = None,
    *,
    tol: float = 1e-5,
) -> float:
    """Fraction of the exact top-k found by an approximate search, tolerating ties.

    An approximate id is a hit when it is in the exact top-k of its query or, given scores, when
    its exact score reaches the k-th exact score (within ``tol`` relative): several items tying at
    the boundary are equally correct, as in faiss ``contrib.evaluation``. ``approx_scores`` must be
    exact inner products (true for :class:`HnswIndex`, which re-scores). Missing ids (-1) are never
    hits; the denominator counts the valid exact ids.

    Args:
        approx_ids: int ``(n, k)`` rows from the approximate search.
        exact_ids: int ``(n, k)`` rows from an exact search.
        approx_scores: exact scores of ``approx_ids`` (optional, enables tie tolerance).
        exact_scores: scores of ``exact_ids`` (optional, enables tie tolerance).
        tol: relative tolerance of the tie comparison.
    """
    approx = np.asarray(approx_ids)
    exact = np.asarray(exact_ids)
    if approx.ndim != 2 or exact.ndim != 2 or approx.shape[0] != exact.shape[0]:
        raise IndexInputError(
            f"recall_at_k: expected (n, k) id arrays with the same n, got {approx.shape} and "
            f"{exact.shape}"
        )
    k = exact.shape[1]
    approx = approx[:, :k]
    total = int((exact >= 0).sum())
    if total == 0:
        return 1.0
    # membership of each approximate id in its row's exact set (broadcast compare; k is small)
    in_exact = (approx[:, :, None] == exact[:, None, :]).any(axis=2) & (approx >= 0)
    hits = in_exact
    if approx_scores is not None and exact_scores is not None:
        a_s = np.asarray(approx_scores, dtype=np.float64)[:, :k]
        e_s = np.asarray(exact_scores, dtype=np.float64)
        valid_e = np.where(exact >= 0, e_s, np.inf)
        kth = valid_e.min(axis=1, keepdims=True)
        margin = tol * np.maximum(np.abs(kth), 1.0)
        hits = hits | ((approx >= 0) & (a_s >= kth - margin))
    per_row = np.minimum(hits.sum(axis=1), (exact >= 0).sum(axis=1))
    return float(per_row.sum() / total)


__all__ = [
    "FlatIndex",
    "HnswIndex",
    "IndexKind",
    "ItemIndex",
    "ItemSnapshot",
    "LoadedIndex",
    "as_matrix",
    "build_index",
    "configure_faiss",
    "recall_at_k",
    "rescore",
]
