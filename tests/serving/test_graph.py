"""The reused HNSW graph: exact scores on the newest vectors, items added since are found,
recall stays high under drift, and a stale graph is rebuilt in the background."""

from __future__ import annotations

import numpy as np

from serving.graph import FreshGraphIndex, GraphKeeper
from serving.index import FlatIndex, recall_at_k


def _vectors(n: int, d: int = 18, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, d)).astype(np.float32)
    v = centers[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    v *= rng.lognormal(0, 0.3, size=(n, 1)).astype(np.float32)
    return np.ascontiguousarray(v, dtype=np.float32)


def test_reused_graph_scores_exactly_on_new_vectors_and_finds_new_items() -> None:
    old = _vectors(3000)
    keeper = GraphKeeper(m=16, ef_search=64, rebuild_after_s=1e9)
    ids = [f"i{j}" for j in range(3000)]
    keeper.index_for(ids, old)
    rng = np.random.default_rng(1)
    drifted = old + 0.05 * rng.normal(size=old.shape).astype(np.float32)
    # 200 brand-new items (larger norms, so many of them belong in the top 10)
    new = np.vstack([drifted, 1.5 * _vectors(200, seed=2)])
    queries = _vectors(50, seed=3)
    index = keeper.index_for(ids + [f"n{j}" for j in range(200)], new)
    assert isinstance(index, FreshGraphIndex)
    scores, rows = index.search(queries, 10)
    np.testing.assert_allclose(scores, np.einsum("nd,nkd->nk", queries, new[rows]), rtol=1e-4)
    exact_scores, exact_rows = FlatIndex(new).search(queries, 10)
    new_in_exact = {(q, r) for q, rs in enumerate(exact_rows) for r in rs if r >= 3000}
    assert new_in_exact, "the test needs new items in the exact top 10"
    assert new_in_exact <= {(q, r) for q, rs in enumerate(rows) for r in rs}
    assert recall_at_k(rows, exact_rows, scores, exact_scores) >= 0.9


def test_reordered_items_build_a_new_graph_and_stale_graphs_rebuild() -> None:
    v = _vectors(500)
    keeper = GraphKeeper(m=8, ef_search=32, rebuild_after_s=0.0)
    keeper.index_for([f"i{j}" for j in range(500)], v)
    assert keeper.rebuilds == 1
    keeper.index_for([f"x{j}" for j in range(500)], v)  # not a prefix: rebuilt now
    assert keeper.rebuilds == 2
    keeper.index_for([f"x{j}" for j in range(500)], v)  # stale: rebuilt in the background
    keeper.wait_idle(30)
    assert keeper.rebuilds == 3


def test_worker_with_hnsw_reuses_its_graph_across_swaps(settings, redis_client) -> None:
    from fmstream.app import new_worker
    from serving.index import ItemSnapshot
    from serving.store import VectorStore
    from train.store_writer import StoreWriter

    settings = settings.model_copy(update={"index_kind": "hnsw", "hnsw_m": 8})
    store = VectorStore(redis_client, settings.redis_keys())
    writer = StoreWriter(redis_client, settings.redis_keys())
    worker = new_worker(settings, store)
    v = _vectors(1000)
    ids = [f"i{j}" for j in range(1000)]
    writer.put_item_snapshot(ItemSnapshot(1, ids, v))
    assert worker.refresh()
    writer.put_item_snapshot(ItemSnapshot(2, ids + ["new"], np.vstack([v * 1.01, v[:1] * 9])))
    assert worker.refresh()
    loaded = worker.state.loaded
    assert loaded.version == 2 and isinstance(loaded.index, FreshGraphIndex)
    (hits,) = loaded.search_excluding(v[:1], 5, [set()])
    assert hits[0][0] == 1000  # the new item, not in the graph, found and scored exactly
    assert abs(hits[0][1] - float(v[0] @ (v[0] * 9))) < 1e-3 * abs(hits[0][1])
