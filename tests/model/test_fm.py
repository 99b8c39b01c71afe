"""FM math in torch: the O(k·n) pairwise term, side / entity terms, gradients, losses."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import fm

# hypothesis settings of this module (not a global profile: other packages keep theirs)
PROPERTY = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def padded_features(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = draw(st.integers(1, 6))
    length = draw(st.integers(1, 7))
    d = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, length, generator=g, dtype=torch.float64)
    v = torch.randn(n, length, d, generator=g, dtype=torch.float64)
    x = torch.rand(n, length, generator=g, dtype=torch.float64)
    x[torch.rand(n, length, generator=g) < 0.3] = 0.0  # padding
    return w, v, x


@PROPERTY
@given(padded_features())
def test_pairwise_equals_naive_double_sum(data: tuple[torch.Tensor, ...]) -> None:
    _, v, x = data
    assert torch.allclose(fm.pairwise(v, x), fm.pairwise_naive(v, x), rtol=1e-10, atol=1e-10)


@PROPERTY
@given(padded_features())
def test_fm_logit_is_bias_linear_and_pairwise(data: tuple[torch.Tensor, ...]) -> None:
    w, v, x = data
    naive = 0.3 + (w * x).sum(1) + fm.pairwise_naive(v, x)
    assert torch.allclose(fm.fm_logit(0.3, w, v, x), naive, atol=1e-10)


def _table_and_index(seed: int, u: int, n: int, length: int, d: int):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(u, d + 1, generator=g)
    idx = torch.randint(0, u, (n, length), generator=g)
    x = torch.rand(n, length, generator=g)
    x[:, -1] = 0.0
    return table, idx, x


@PROPERTY
@given(
    st.integers(0, 10_000),
    st.integers(1, 30),
    st.integers(1, 12),
    st.integers(1, 6),
    st.integers(1, 8),
)
def test_side_terms_match_reference_values_and_gradients(seed, u, n, length, d) -> None:
    table, idx, x = _table_and_index(seed, u, n, length, d)
    t1 = table.clone().requires_grad_(True)
    t2 = table.clone().requires_grad_(True)
    lin1, vec1 = fm.side_terms(t1, idx, x)
    lin2, vec2 = fm.side_terms_reference(t2, idx, x)
    assert torch.allclose(lin1, lin2, atol=1e-4)
    assert torch.allclose(vec1, vec2, atol=1e-5)
    g = torch.Generator().manual_seed(seed + 1)
    a, b = torch.randn(n, generator=g), torch.randn(n, d, generator=g)
    ((lin1 * a).sum() + (vec1 * b).sum()).backward()
    ((lin2 * a).sum() + (vec2 * b).sum()).backward()
    assert torch.allclose(t1.grad, t2.grad, atol=1e-4)


@PROPERTY
@given(st.integers(0, 10_000), st.integers(2, 30), st.integers(1, 8), st.booleans())
def test_entity_level_fm_equals_fm_over_all_features(seed, u, d, with_ctx) -> None:
    """y = w0 + Σ q_s + ½|Σ V_s|² over entities == fm_logit over the union of their rows."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(u, d + 1, generator=g, dtype=torch.float64)
    n = 5
    sides = [torch.randint(0, u, (n, k), generator=g) for k in ((2, 3, 2) if with_ctx else (3, 4))]
    xs = [torch.rand(ix.shape, generator=g, dtype=torch.float64) for ix in sides]
    idx = torch.zeros(n * len(sides), 4, dtype=torch.long)
    x = torch.zeros(n * len(sides), 4, dtype=torch.float64)
    for s, (ix, xx) in enumerate(zip(sides, xs, strict=True)):
        idx[s * n : (s + 1) * n, : ix.shape[1]] = ix
        x[s * n : (s + 1) * n, : ix.shape[1]] = xx
    ent = fm.entity_terms(table, idx, x)
    members = torch.stack([torch.arange(n) + s * n for s in range(len(sides))], dim=1)
    got = fm.example_logits(torch.tensor(0.7, dtype=torch.float64), ent, members)
    all_idx = torch.cat(sides, dim=1)
    all_x = torch.cat(xs, dim=1)
    rows = table[all_idx]
    want = fm.fm_logit(0.7, rows[..., 0], rows[..., 1:], all_x)
    assert torch.allclose(got, want, atol=1e-9)


def test_losses() -> None:
    logits = torch.tensor([0.0, 2.0])
    labels = torch.tensor([1.0, 0.0])
    want = float(np.log(2) + np.log1p(np.exp(2.0)))
    assert abs(float(fm.logistic_loss(logits, labels)) - want) < 1e-5
    diff = torch.tensor([0.0, 3.0])
    assert abs(float(fm.bpr_loss(diff)) - float(np.log(2) + np.log1p(np.exp(-3.0)))) < 1e-5
    assert float(fm.hinge_loss(diff, 1.0)) == 1.0
