"""Approximate search that stays fresh: an HNSW graph reused across snapshots.

Building an inner-product HNSW over 1M x 66 takes minutes here, while the trainer publishes a
new snapshot every second and shared item features move many items at once. So the graph only
proposes candidates: each search asks the (possibly older) graph for candidates, adds the best
items appended since the graph was built (brute force over that tail), and re-scores all of them
exactly against the NEWEST vectors. Returned scores are always exact for the current snapshot;
only recall depends on how far vectors drifted since the build. A background thread rebuilds
the graph once it is older than ``rebuild_after_s``; searches never wait for a build.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import numpy as np

from serving.index import HnswIndex, ItemIndex, as_matrix, rescore

log = logging.getLogger(__name__)


class FreshGraphIndex(ItemIndex):
    """Candidates from ``graph`` (built on older vectors) + the unindexed tail, re-scored on
    ``vectors`` (the newest snapshot, whose first ``graph.ntotal`` rows are the same items)."""

    def __init__(self, graph: HnswIndex, vectors: np.ndarray, *, overfetch: float = 2.0):
        self.graph = graph
        self._vectors = as_matrix(vectors, name="item vectors", dim=graph.dim)
        self.overfetch = overfetch

    @property
    def ntotal(self) -> int:
        return int(self._vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self._vectors.shape[1])

    @property
    def exact(self) -> bool:
        return False

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n_graph = self.graph.ntotal
        fetch = min(n_graph, max(k, int(np.ceil(k * self.overfetch))))
        parts = []
        if fetch:
            _, cand = self.graph.raw_candidates(queries, fetch)
            parts.append(cand)
        tail = self._vectors[n_graph:]
        if len(tail):
            kt = min(k, len(tail))
            scores = queries @ tail.T
            top = np.argpartition(-scores, kt - 1, axis=1)[:, :kt] if kt < len(tail) else \
                np.broadcast_to(np.arange(len(tail)), (len(queries), len(tail)))
            parts.append(top.astype(np.int64) + n_graph)
        candidates = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        return rescore(queries, self._vectors, candidates, min(k, candidates.shape[1]))


def _is_prefix(prefix: Sequence[str], items: Sequence[str]) -> bool:
    return len(prefix) <= len(items) and list(items[: len(prefix)]) == list(prefix)


class GraphKeeper:
    """Hands out an approximate index for each new snapshot, reusing and refreshing one graph."""

    def __init__(self, *, m: int = 32, ef_search: int = 64, rebuild_after_s: float = 300.0):
        self.m = m
        self.ef_search = ef_search
        self.rebuild_after_s = rebuild_after_s
        self._lock = threading.Lock()
        self._graph: HnswIndex | None = None
        self._graph_ids: list[str] = []
        self._built_at = 0.0
        self._building: threading.Thread | None = None
        self.rebuilds = 0

    def index_for(self, item_ids: Sequence[str], vectors: np.ndarray) -> ItemIndex:
        """An index over ``vectors``; builds synchronously only when no graph fits the items."""
        with self._lock:
            graph, graph_ids, built_at = self._graph, self._graph_ids, self._built_at
        if graph is None or not _is_prefix(graph_ids, item_ids):
            # First snapshot, or items were reordered/removed: nothing to reuse.
            graph = self._build(list(item_ids), vectors)
            return graph
        if time.monotonic() - built_at > self.rebuild_after_s:
            self._rebuild_in_background(list(item_ids), np.array(vectors, copy=True))
        return FreshGraphIndex(graph, vectors)

    def fresh_for(
        self, item_ids: Sequence[str], vectors: np.ndarray, *, appended_only: bool = False
    ) -> FreshGraphIndex:
        """Like :meth:`index_for`, but always an index that re-scores on ``vectors`` itself,
        so the caller may later overwrite rows of ``vectors`` in place (delta apply).

        ``appended_only``: the caller guarantees ``item_ids`` only grew at the end since the
        ids of the current graph were checked, so the O(n) prefix check is skipped.
        """
        with self._lock:
            graph, graph_ids, built_at = self._graph, self._graph_ids, self._built_at
        fits = graph is not None and len(graph_ids) <= len(item_ids) and (
            appended_only or _is_prefix(graph_ids, item_ids)
        )
        if not fits:
            graph = self._build(list(item_ids), np.array(vectors, copy=True))
        elif time.monotonic() - built_at > self.rebuild_after_s:
            self._rebuild_in_background(list(item_ids), np.array(vectors, copy=True))
        assert graph is not None
        return FreshGraphIndex(graph, vectors)

    def _build(self, item_ids: list[str], vectors: np.ndarray) -> HnswIndex:
        graph = HnswIndex(vectors, m=self.m, ef_search=self.ef_search)
        with self._lock:
            self._graph, self._graph_ids, self._built_at = graph, item_ids, time.monotonic()
            self.rebuilds += 1
        return graph

    def _rebuild_in_background(self, item_ids: list[str], vectors: np.ndarray) -> None:
        with self._lock:
            if self._building is not None and self._building.is_alive():
                return
            self._building = threading.Thread(
                target=self._build, args=(item_ids, vectors), daemon=True, name="fmstream-hnsw"
            )
            self._building.start()
        log.info("rebuilding the HNSW graph over %d items in the background", len(item_ids))

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait for a background rebuild (tests, shutdown)."""
        building = self._building
        if building is not None:
            building.join(timeout)
