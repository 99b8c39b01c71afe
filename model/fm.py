"""The Factorization Machine in torch: O(k·n) pairwise term, side aggregates, losses.

With active features ``j`` (row ``[w_j | v_j]``, value ``x_j``) the FM logit is::

    y = w0 + Σ_j x_j w_j + Σ_{i<j} <v_i, v_j> x_i x_j
      = w0 + Σ_j x_j w_j + ½ (|Σ_j x_j v_j|² − Σ_j x_j² |v_j|²)          (O(k·n))

Splitting the features into user (u), item (i) and context (c) sides with, per side,
``lin = Σ x w + ½(|V|² − Σ x²|v|²)`` and ``V = Σ x v`` gives exactly::

    y = w0 + lin_u + lin_i + lin_c + <V_u, V_i> + <V_u, V_c> + <V_i, V_c>

which is what training computes (aggregates once per unique entity, then per example only
dot products) and what :mod:`model.compose` folds into inner-product vectors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def pairwise(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """O(k·n) pairwise term ``½ Σ_f [(Σ_j x_j v_jf)² − Σ_j x_j² v_jf²]``.

    Args:
        v: ``(n, L, d)`` latent vectors of the active features (padding rows arbitrary).
        x: ``(n, L)`` feature values (0 on padding).
    """
    xv = v * x.unsqueeze(-1)
    s = xv.sum(dim=1)
    return 0.5 * ((s * s).sum(dim=1) - (xv * xv).sum(dim=(1, 2)))


def pairwise_naive(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The O(k·n²) double sum ``Σ_{i<j} <v_i, v_j> x_i x_j`` (reference for tests)."""
    n, length, _ = v.shape
    out = torch.zeros(n, dtype=v.dtype)
    for i in range(length):
        for j in range(i + 1, length):
            out = out + (v[:, i] * v[:, j]).sum(dim=1) * x[:, i] * x[:, j]
    return out


def fm_logit(
    w0: torch.Tensor | float, w: torch.Tensor, v: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """Full FM logit of padded feature lists: ``w0 + Σ x w + pairwise``.

    Args:
        w: ``(n, L)`` first-order weights, v: ``(n, L, d)``, x: ``(n, L)`` values.
    """
    return w0 + (w * x).sum(dim=1) + pairwise(v, x)


class WeightedBag(torch.autograd.Function):
    """``out[n] = Σ_l x[n, l] · table[idx[n, l]]`` with a scatter-add backward.

    Forward is ``embedding_bag`` (no ``(n, L, d)`` intermediate); the backward only computes
    the table gradient (``index_add_`` of ``x · grad``), which on CPU is several times faster
    than autograd through gather + broadcast multiply (and than embedding_bag's own backward,
    which also differentiates the weights).
    """

    @staticmethod
    def forward(ctx: Any, table: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx, x)
        ctx.n_rows = table.shape[0]
        return F.embedding_bag(idx, table, per_sample_weights=x, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        idx, x = ctx.saved_tensors
        n, length = idx.shape
        contrib = (grad.unsqueeze(1) * x.unsqueeze(-1)).reshape(n * length, grad.shape[1])
        out = torch.zeros(ctx.n_rows, grad.shape[1], dtype=grad.dtype)
        out.index_add_(0, idx.reshape(-1), contrib)
        return out, None, None


def side_terms(
    table: torch.Tensor, idx: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lin, V)`` of one side: ``lin = Σ x w + internal pairwise``, ``V = Σ x v``.

    Args:
        table: ``(u, d + 1)`` gathered rows ``[w | v]``.
        idx: ``(n, L)`` int64 indices into ``table``.
        x: ``(n, L)`` feature values (0 on padding).
    """
    if idx.shape[1] == 0:
        n = idx.shape[0]
        return table.new_zeros(n), table.new_zeros(n, table.shape[1] - 1)
    agg = WeightedBag.apply(table, idx, x)  # [Σ x w | Σ x v]
    v = table[:, 1:]
    sq = (v * v).sum(dim=1, keepdim=True)  # |v_r|² per row
    s2 = WeightedBag.apply(sq, idx, x * x)[:, 0]  # Σ x² |v|²
    vec = agg[:, 1:]
    return agg[:, 0] + 0.5 * ((vec * vec).sum(dim=1) - s2), vec


def entity_terms(table: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-entity FM terms ``[W − ½ Σ x²|v|², V]`` as ``(n, d + 1)``.

    With these, the FM over any set of entities ``s`` (user, item, context) is
    ``y = w0 + Σ_s q_s + ½ |Σ_s V_s|²`` (see :func:`example_logits`), which equals the full
    O(k·n) formula over the union of their features.
    """
    agg = WeightedBag.apply(table, idx, x)  # [Σ x w | Σ x v]
    v = table[:, 1:]
    sq = (v * v).sum(dim=1, keepdim=True)
    s2 = WeightedBag.apply(sq, idx, x * x)  # Σ x² |v|², (n, 1)
    return torch.cat([agg[:, :1] - 0.5 * s2, agg[:, 1:]], dim=1)


def example_logits(w0: torch.Tensor, ent: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """FM logits of examples made of entities: ``w0 + Σ q + ½ |Σ V|²``.

    Args:
        ent: ``(m, d + 1)`` from :func:`entity_terms`.
        members: ``(n, s)`` int64 rows of ``ent`` forming each example (user, item, context).
    """
    ones = torch.ones(members.shape, dtype=ent.dtype)
    agg = WeightedBag.apply(ent, members, ones)
    vec = agg[:, 1:]
    return w0 + agg[:, 0] + 0.5 * (vec * vec).sum(dim=1)


def side_terms_reference(
    table: torch.Tensor, idx: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-autograd version of :func:`side_terms` (gather, scale, sum), for tests."""
    g = table[idx] * x.unsqueeze(-1)
    xv = g[..., 1:]
    vec = xv.sum(dim=1)
    cross = 0.5 * ((vec * vec).sum(dim=1) - (xv * xv).sum(dim=(1, 2)))
    return g[..., 0].sum(dim=1) + cross, vec


def combine(
    w0: torch.Tensor,
    lin_u: torch.Tensor,
    vec_u: torch.Tensor,
    lin_i: torch.Tensor,
    vec_i: torch.Tensor,
    lin_c: torch.Tensor | None = None,
    vec_c: torch.Tensor | None = None,
) -> torch.Tensor:
    """FM logits from per-example side aggregates (all ``(n,)`` / ``(n, d)``)."""
    y = w0 + lin_u + lin_i + (vec_u * vec_i).sum(dim=1)
    if lin_c is not None and vec_c is not None:
        y = y + lin_c + ((vec_u + vec_i) * vec_c).sum(dim=1)
    return y


def logistic_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed binary cross-entropy on logits."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")


def bpr_loss(diff: torch.Tensor) -> torch.Tensor:
    """Summed BPR loss ``−log σ(s⁺ − s⁻)`` of score differences."""
    return F.softplus(-diff).sum()


def hinge_loss(diff: torch.Tensor, margin: float) -> torch.Tensor:
    """Summed pairwise hinge ``max(0, margin − (s⁺ − s⁻))``."""
    return torch.clamp(margin - diff, min=0.0).sum()
