"""Query vectors for the item index, built from published vectors (pure numpy).

With ``E_item = [W_i + cross_i, 1, V_i]``:
- a user query is ``E_user = [1, W_u + cross_u, V_u]`` (or its context-folded form), so
  ``q . E_item`` is the FM logit minus the bias;
- an item-to-item query is ``[1, 0, V_i]``: the FM score of item j for a pseudo-user whose
  latent vector is item i's, i.e. "what people who like i also like", whose ranking is the same
  as the score of j with item i's features on the user side.
"""

from __future__ import annotations

import numpy as np

from model.compose import ContextTable, context_query


def item_queries(item_vectors: np.ndarray) -> np.ndarray:
    """i2i queries ``[1, 0, V_i]`` from item vectors ``E_item`` (n, d+2)."""
    q = np.array(item_vectors, dtype=np.float32, copy=True)
    q[:, 0] = 1.0
    q[:, 1] = 0.0
    return q


def user_queries(
    user_vectors: np.ndarray, contexts: list[dict] | None, table: ContextTable | None
) -> np.ndarray:
    """u2i/rank queries: ``E_user`` with each request's context folded in when it has one."""
    q = np.asarray(user_vectors, dtype=np.float32)
    if table is None or not contexts or not any(contexts):
        return q
    ctx_lin, ctx_vec = table.encode(contexts)
    return context_query(q, ctx_lin, ctx_vec).astype(np.float32, copy=False)
