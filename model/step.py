"""One training step's loss gradients in closed form (numpy + scipy.sparse, no autograd).

The FM of :mod:`model.fm` is evaluated in two levels. Each *entity* ``e`` (a user, an item, an
event's context) reads feature slots ``(row r, value x)`` and has the terms::

    q_e = Σ x w_r − ½ Σ x² |v_r|²        V_e = Σ x v_r

An *example* is a set of entities ``s``, with logit ``y = w0 + Σ_s q_s + ½ |Σ_s V_s|²``. Here every
example is an event's fixed part (user and context: ``P = V_u + V_c``) plus one item ``i`` (the
event's own item or a sampled negative), so::

    y = w0 + q_u + q_c + ½|P|²  +  a_i + <P, V_i>        with  a_i = q_i + ½|V_i|²

The second half is all that differs between an event and its negatives. With ``c`` the loss
derivative by each logit and ``G`` an event's total ``Σ c`` over its examples, the gradients are::

    dq_u = dq_c = G            dV_u = dV_c = G P + Σ_i c_i V_i
    dq_i = Σ c                 dV_i = dq_i V_i + Σ c P        (sums over the examples naming i)
    dw_r = Σ_slots x dq_e      dv_r = Σ_slots x dV_e − (Σ_slots x² dq_e) v_r          dw0 = Σ G

For the pairwise losses (BPR, hinge) ``G = 0`` exactly (user, context and ``w0`` cancel in
``y⁺ − y⁻``); autograd only ever produced their float rounding there.

Gathers and scatters run as sparse products of the (entities x rows) slot matrix in scipy's
compiled CSR/CSC kernels (:func:`gather_sum`, :func:`scatter_sum`), so one step costs O(nnz·d)
in compiled loops and a few dozen numpy calls. :func:`step_gradients_reference` computes the same
with torch autograd over :mod:`model.fm` (the tests compare the two).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from model import fm as fmath
from model.optim import einsum

try:  # scipy's compiled CSR/CSC products, called without the sparse-matrix objects' checks
    from scipy.sparse import _sparsetools as _kernels
except ImportError:  # pragma: no cover - scipy moved them; the public path below still works
    _kernels = None


@dataclass(frozen=True)
class StepBatch:
    """Inputs of one step, as indices into a batch-local table of unique rows.

    Attributes:
        indptr, cols, x: CSR of the slot matrix, one row per entity (``m`` entities), ``cols``
            the batch-local row of each slot (int), ``x`` its value (float32, non-zero).
        ev_fixed: ``(E, s)`` entities of each event's fixed part (user, and context if any).
        ev_item: ``(E,)`` entity of each event's item.
        labels: ``(E,)`` float32 labels (logistic loss only; pairwise events are positives).
        neg_owner: ``(P,)`` which events own sampled negatives (indices into ``E``, increasing).
        neg_item: ``(P, k)`` entities of the sampled negatives.
        neg_valid: ``(P, k)`` bool, False for negatives that do not exist.
    """

    indptr: np.ndarray
    cols: np.ndarray
    x: np.ndarray
    ev_fixed: np.ndarray
    ev_item: np.ndarray
    labels: np.ndarray
    neg_owner: np.ndarray
    neg_item: np.ndarray
    neg_valid: np.ndarray

    @property
    def n_entities(self) -> int:
        return int(self.indptr.size - 1)


@dataclass(frozen=True)
class StepGrads:
    """Summed loss, number of loss terms, row gradients ``(R, d + 1)`` and the ``w0`` gradient.

    ``skipped``: entities whose gradient as a sampled negative was left out of ``grad`` (the
    softmax kernel's ``neg_updates``; None = none left out). ``rows``: then the rows the step
    updates (ascending; those read by an entity not skipped); None = every row.
    """

    loss: float
    count: int
    grad: np.ndarray
    g0: float
    skipped: np.ndarray | None = None
    rows: np.ndarray | None = None


def update_subset(
    mass: np.ndarray, k: int, by: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Which of ``n`` negatives get their item-side gradient, and the weight that keeps the
    sum unbiased: ``(kept, weight)``, ``kept`` ascending column indices, ``weight`` ``1 / p``.

    ``by="uniform"``: ``k`` of the ``n`` columns without replacement (``p = k / n``).
    ``by="mass"``: threshold sampling (Duffield, Lund, Thorup 2007, "Priority sampling"'s
    Poisson form): column ``j`` is kept with ``p_j = min(1, mass_j / τ)``, ``τ`` chosen so that
    ``Σ p = k`` — the columns with most softmax mass (the negatives the step's users actually
    confused with their positives) are always kept, the long tail of near-zero gradients is
    sampled. Both are unbiased: ``E[Σ_kept weight_j g_j] = Σ_j g_j``.
    """
    n = mass.size
    if k >= n:
        return np.arange(n), np.ones(n, dtype=np.float32)
    if by == "uniform":
        kept = np.sort(rng.choice(n, size=k, replace=False))
        return kept, np.full(k, n / k, dtype=np.float32)
    w = np.maximum(np.asarray(mass, dtype=np.float64), 0.0)
    # τ: the fixed point of τ = (Σ w of the columns below τ) / (k − #columns at or above τ),
    # reached from above in a few passes (each pass only adds columns at p = 1)
    total = float(w.sum())
    t = total / k
    n_big = 0
    while t > 0.0:
        big = w >= t
        nb = int(np.count_nonzero(big))
        if nb == n_big:
            break
        if nb >= k:  # cannot happen at the fixed point; numerically: keep the k largest
            t = float(np.partition(w, n - k)[n - k])
            break
        n_big = nb
        t = (total - float(w[big].sum())) / (k - nb)
    if not t > 0.0:  # no mass at all: nothing to update
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    p = np.minimum(w / t, 1.0)
    kept = (rng.random(n) < p).nonzero()[0]
    return kept, (1.0 / p[kept]).astype(np.float32)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function without overflow warnings (``tanh`` form)."""
    return np.float32(0.5) * (np.tanh(np.float32(0.5) * z) + np.float32(1.0))


def _softplus(z: np.ndarray) -> np.ndarray:
    """``log(1 + e^z)`` computed stably."""
    return np.maximum(z, np.float32(0.0)) + np.log1p(np.exp(-np.abs(z)))


def _check(indptr: np.ndarray, idx: np.ndarray, n_rows: int, n_cols: int) -> None:
    """Index bounds of a CSR structure (the compiled kernels do not check them)."""
    if indptr.size != n_rows + 1 or indptr[0] != 0 or indptr[-1] != idx.size:
        raise ValueError("malformed sparse structure (indptr)")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n_cols):
        raise ValueError("sparse index out of range")


def gather_sum(
    indptr: np.ndarray, idx: np.ndarray, w: np.ndarray, table: np.ndarray, check: bool = True
) -> np.ndarray:
    """``out[e] = Σ_j w_j · table[idx_j]`` over ``j`` in ``indptr[e] : indptr[e + 1]``.

    The CSR product ``A @ table`` with ``A[e, idx_j] += w_j`` (float32 ``(len(indptr) - 1, D)``).
    ``check=False`` skips the bounds check (callers that checked the same structure already).
    """
    m = indptr.size - 1
    n, dcols = table.shape
    if check:
        _check(indptr, idx, m, n)
    if _kernels is None:
        return np.asarray(sp.csr_array((w, idx, indptr), shape=(m, n)) @ table, dtype=np.float32)
    out = np.zeros((m, dcols), dtype=np.float32)
    _kernels.csr_matvecs(
        m,
        n,
        dcols,
        indptr.astype(np.int64, copy=False),
        idx.astype(np.int64, copy=False),
        w.astype(np.float32, copy=False),
        np.ascontiguousarray(table, dtype=np.float32).reshape(-1),
        out.reshape(-1),
    )
    return out


def scatter_sum(
    indptr: np.ndarray,
    idx: np.ndarray,
    w: np.ndarray,
    src: np.ndarray,
    n_out: int,
    check: bool = True,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``out[idx_j] += w_j · src[e]`` for ``j`` in ``indptr[e] : indptr[e + 1]``.

    The transpose of :func:`gather_sum`: ``Aᵀ @ src`` (float32 ``(n_out, D)``). ``out``: a
    C-contiguous float32 ``(n_out, D)`` array to add into (returned); ``check`` as
    :func:`gather_sum`.
    """
    m = indptr.size - 1
    dcols = src.shape[1]
    if check:
        _check(indptr, idx, m, n_out)
    if out is not None and (
        out.shape != (n_out, dcols) or out.dtype != np.float32 or not out.flags.c_contiguous
    ):
        raise ValueError(f"scatter_sum: out must be C-contiguous float32 {(n_out, dcols)}")
    if _kernels is None:
        a_t = sp.csc_array((w, idx, indptr), shape=(n_out, m))
        got = np.asarray(a_t @ src, dtype=np.float32)
        if out is None:
            return got
        out += got
        return out
    if out is None:
        out = np.zeros((n_out, dcols), dtype=np.float32)
    _kernels.csc_matvecs(
        n_out,
        m,
        dcols,
        indptr.astype(np.int64, copy=False),
        idx.astype(np.int64, copy=False),
        w.astype(np.float32, copy=False),
        np.ascontiguousarray(src, dtype=np.float32).reshape(-1),
        out.reshape(-1),
    )
    return out


def _gather(indptr: np.ndarray, idx: np.ndarray, w: np.ndarray, table: np.ndarray,
            out: np.ndarray) -> np.ndarray:
    """:func:`gather_sum` into ``out`` (zeros) for arrays already int64 / float32 and
    C-contiguous, unchecked: the softmax kernel's inner calls."""
    if _kernels is None:
        out += gather_sum(indptr, idx, w, table, check=False)
        return out
    _kernels.csr_matvecs(indptr.size - 1, table.shape[0], table.shape[1], indptr, idx, w,
                         table.reshape(-1), out.reshape(-1))
    return out


def _scatter(indptr: np.ndarray, idx: np.ndarray, w: np.ndarray, src: np.ndarray,
             out: np.ndarray) -> np.ndarray:
    """:func:`scatter_sum` adding into ``out`` under :func:`_gather`'s conditions."""
    if _kernels is None:
        return scatter_sum(indptr, idx, w, src, out.shape[0], check=False, out=out)
    _kernels.csc_matvecs(out.shape[0], indptr.size - 1, src.shape[1], indptr, idx, w,
                         np.ascontiguousarray(src).reshape(-1), out.reshape(-1))
    return out


@dataclass(frozen=True)
class EntityTerms:
    """Per-entity FM terms of a step's slot matrix (:func:`entity_terms`), float32.

    Attributes:
        ent_of: ``(nnz,)`` entity of each slot.
        q: ``(m,)`` ``Σ x w − ½ Σ x² |v|²``.
        V: ``(m, d)`` ``Σ x v`` (contiguous).
        a: ``(m,)`` ``q + ½ |V|²`` (an item's part of every logit; ``E_item = [a, 1, V]``).
    """

    ent_of: np.ndarray
    q: np.ndarray
    V: np.ndarray
    a: np.ndarray


def entity_terms(vals: np.ndarray, indptr: np.ndarray, cols: np.ndarray,
                 x: np.ndarray) -> EntityTerms:
    """The entity terms ``q, V, a`` of the CSR slot matrix ``(indptr, cols, x)`` over ``vals``.

    Computed once per step: :func:`step_gradients` takes them (``terms=``) when the caller
    already needed them, e.g. to pick hard negatives by score.
    """
    m = indptr.size - 1
    f32 = np.float32
    ent_of = np.repeat(np.arange(m), np.diff(indptr))  # entity of each slot
    v = vals[:, 1:]
    sq = np.einsum("rd,rd->r", v, v)
    agg = gather_sum(indptr, cols, x, vals)  # [Σ x w | Σ x v]
    V = np.ascontiguousarray(agg[:, 1:])  # row gathers below: np.take (2-4x fancy indexing)
    s2 = np.bincount(ent_of, weights=(x * x) * sq[cols], minlength=m).astype(np.float32)
    q = agg[:, 0] - f32(0.5) * s2  # float32 throughout (bincount sums in float64)
    a = q + f32(0.5) * np.einsum("md,md->m", V, V)
    return EntityTerms(ent_of, q, V, a)


def step_gradients(
    vals: np.ndarray,
    w0: float,
    batch: StepBatch,
    loss: str,
    margin: float = 1.0,
    terms: EntityTerms | None = None,
) -> StepGrads:
    """Loss and gradients of one step in closed form (see the module docstring).

    Args:
        vals: ``(R, d + 1)`` float32 current rows ``[w | v]`` the batch reads.
        w0: the global bias.
        batch: the step's entities and examples.
        loss: ``logistic``, ``bpr`` or ``hinge`` (summed over examples / pairs).
        margin: hinge margin.
        terms: :func:`entity_terms` of ``vals`` and the batch's slot matrix, if computed
            already (None: computed here).
    """
    n_rows, d1 = vals.shape
    m = batch.n_entities
    f32 = np.float32
    x, cols, indptr = batch.x, batch.cols, batch.indptr
    if terms is None:
        terms = entity_terms(vals, indptr, cols, x)
    ent_of, q, V, a = terms.ent_of, terms.q, terms.V, terms.a
    x2 = x * x
    v = vals[:, 1:]

    ev_fixed, ev_item = batch.ev_fixed, batch.ev_item
    n_ev = ev_item.size
    k = batch.neg_item.shape[1]
    # each event row: its own item, then its negatives (events without negatives: masked)
    idx = np.empty((n_ev, 1 + k), dtype=np.int64)
    idx[:, 0] = ev_item
    every = batch.neg_owner.size == n_ev  # pairwise: every event owns its negatives, in order
    if every:
        idx[:, 1:] = batch.neg_item
    else:
        idx[:, 1:] = ev_item[:, None]
        idx[batch.neg_owner, 1:] = batch.neg_item
    mask: np.ndarray | None = None  # None = every example exists (the usual case)
    if not (every and batch.neg_valid.all()):
        mask = np.zeros((n_ev, 1 + k), dtype=bool)
        mask[:, 0] = True
        mask[batch.neg_owner, 1:] = batch.neg_valid
    P = V.take(ev_fixed[:, 0], axis=0)
    for j in range(1, ev_fixed.shape[1]):
        P += V.take(ev_fixed[:, j], axis=0)
    VX = V.take(idx, axis=0)  # (E, 1 + k, d)
    s = a.take(idx) + np.matmul(VX, P[:, :, None])[..., 0]  # the logits' item part
    pairwise = loss != "logistic"
    if not pairwise:
        qf = q[ev_fixed].sum(axis=1)
        base = f32(w0) + qf + f32(0.5) * np.einsum("ed,ed->e", P, P)
        z = base[:, None] + s
        lab = np.zeros_like(z)
        lab[:, 0] = batch.labels
        terms = np.maximum(z, f32(0.0)) - z * lab + np.log1p(np.exp(-np.abs(z)))
        c = _sigmoid(z) - lab
        if mask is None:
            count, total = c.size, float(terms.sum(dtype=np.float64))
        else:
            c = np.where(mask, c, f32(0.0))
            count, total = int(mask.sum()), float(terms[mask].sum(dtype=np.float64))
        G = c.sum(axis=1)
    else:
        diff = s[:, :1] - s[:, 1:]
        if loss == "bpr":
            terms = _softplus(-diff)
            cneg = _sigmoid(-diff)
        else:
            gap = f32(margin) - diff
            terms = np.maximum(gap, f32(0.0))
            cneg = (gap > 0).astype(np.float32)  # as torch.clamp: no gradient at the kink
        if mask is None:
            count, total = cneg.size, float(terms.sum(dtype=np.float64))
        else:
            nmask = mask[:, 1:]
            cneg = np.where(nmask, cneg, f32(0.0))
            count, total = int(nmask.sum()), float(terms[nmask].sum(dtype=np.float64))
        c = np.empty_like(s)
        c[:, 1:] = cneg
        c[:, 0] = -cneg.sum(axis=1)
        G = None
    grad = np.zeros((n_rows, d1), dtype=np.float32)
    if count == 0:
        return StepGrads(0.0, 0, grad, 0.0)

    # entity gradients Gent = [dq | dV]
    dP = np.matmul(c[:, None, :], VX)[:, 0]
    if G is not None:
        dP += G[:, None] * P
    gent = np.zeros((m, d1), dtype=np.float32)
    flat = idx.ravel()
    dq_items = np.bincount(flat, weights=c.ravel(), minlength=m).astype(np.float32)
    gent[:, 0] = dq_items
    gent[:, 1:] = dq_items[:, None] * V
    gent[:, 1:] += scatter_sum(np.arange(0, flat.size + 1, 1 + k), flat, c.ravel(), P, m)
    n_fixed = ev_fixed.shape[1]
    ones = np.ones(ev_fixed.size, dtype=np.float32)
    fixed_ptr = np.arange(0, ev_fixed.size + 1, n_fixed)
    if G is not None:
        gd = np.concatenate([G[:, None], dP], axis=1)
        gent += scatter_sum(fixed_ptr, ev_fixed.ravel(), ones, gd, m)
    else:
        gent[:, 1:] += scatter_sum(fixed_ptr, ev_fixed.ravel(), ones, dP, m)

    # row gradients
    grad = scatter_sum(indptr, cols, x, gent, n_rows)
    c2 = np.bincount(cols, weights=x2 * gent[ent_of, 0], minlength=n_rows).astype(np.float32)
    grad[:, 1:] -= c2[:, None] * v
    g0 = float(G.sum(dtype=np.float64)) if G is not None else 0.0
    return StepGrads(total, count, np.ascontiguousarray(grad, dtype=np.float32), g0)


def step_gradients_reference(
    vals: np.ndarray,
    w0: float,
    batch: StepBatch,
    loss: str,
    margin: float = 1.0,
    terms: EntityTerms | None = None,
) -> StepGrads:
    """:func:`step_gradients` by torch autograd over :mod:`model.fm` (the former kernel).

    Kept as the reference the tests compare the closed form against (``terms`` is ignored:
    autograd recomputes everything). Note that for pairwise losses its ``w0`` and user/context
    ``w`` gradients are float rounding of an exact zero.
    """
    m = batch.n_entities
    counts = np.diff(batch.indptr)
    width = int(counts.max(initial=0))
    # padded (m, width) slot matrices; padding reads row 0 with x = 0
    inv = np.zeros((m, max(width, 1)), dtype=np.int64)
    x = np.zeros((m, max(width, 1)), dtype=np.float32)
    ent_of = np.repeat(np.arange(m), counts)
    pos_in = np.arange(batch.cols.size) - np.repeat(batch.indptr[:-1], counts)
    inv[ent_of, pos_in] = batch.cols
    x[ent_of, pos_in] = batch.x
    s = torch.from_numpy(vals.copy()).requires_grad_(True)
    w0t = torch.tensor(w0, dtype=torch.float32, requires_grad=True)
    ent = fmath.entity_terms(s, torch.from_numpy(inv), torch.from_numpy(x))
    n_ev = batch.ev_item.size
    k = batch.neg_item.shape[1]
    vmask = batch.neg_valid.ravel()
    fixed_neg = np.repeat(batch.ev_fixed[batch.neg_owner], k, axis=0)[vmask]
    items_neg = batch.neg_item.ravel()[vmask]
    members = np.concatenate(
        [
            np.concatenate([batch.ev_fixed, batch.ev_item[:, None]], axis=1),
            np.concatenate([fixed_neg, items_neg[:, None]], axis=1),
        ]
    )
    logits = fmath.example_logits(w0t, ent, torch.from_numpy(members))
    if loss == "logistic":
        labels = np.concatenate([batch.labels, np.zeros(items_neg.size, dtype=np.float32)])
        total = fmath.logistic_loss(logits, torch.from_numpy(labels))
        count = logits.shape[0]
    else:
        owner = torch.from_numpy(np.repeat(batch.neg_owner, k)[vmask])
        diff = torch.index_select(logits[:n_ev], 0, owner) - logits[n_ev:]
        total = fmath.bpr_loss(diff) if loss == "bpr" else fmath.hinge_loss(diff, margin)
        count = diff.shape[0]
    if count == 0:
        return StepGrads(0.0, 0, np.zeros_like(vals), 0.0)
    total.backward()
    grad = s.grad.numpy() if s.grad is not None else np.zeros_like(vals)
    g0 = float(w0t.grad) if w0t.grad is not None else 0.0
    return StepGrads(float(total.detach()), int(count), grad, g0)


def softmax_step_gradients(
    vals: np.ndarray,
    batch: StepBatch,
    shared: np.ndarray,
    logq_shared: np.ndarray,
    logq_pos: np.ndarray,
    check: bool = True,
    neg_updates: int = 0,
    neg_update_by: str = "mass",
    rng: np.random.Generator | None = None,
    keep: np.ndarray | None = None,
) -> StepGrads:
    """Sampled softmax with a log-Q correction over negatives *shared* by the whole step.

    Each event of ``batch`` (``ev_fixed`` / ``ev_item``; its ``neg_*`` fields are ignored) is a
    positive. Its candidates are its own item and the ``M`` entities ``shared`` (drawn once for
    the step with probabilities ``q``); each candidate's logit is corrected by ``−log q``
    (``logq_pos`` for the positive's own item, ``logq_shared`` for the shared ones), and a
    shared candidate equal to the event's own item is left out (an accidental hit). The loss
    is ``Σ_events logsumexp(z) − z_pos``, so ``c = softmax(z) − onehot(pos)``; ``Σ c = 0`` per
    event, hence the user/context first-order terms and ``w0`` get exactly 0. ``w0`` cancels
    (not an input).

    Draws of the same entity are merged first (popularity sampling with replacement repeats
    items): ``Σ_copies exp(s − log q_j) = exp(s + log Σ_copies 1/q_j)``, so the ``U`` distinct
    shared entities with that bias give the same loss and gradients as the ``M`` draws, and
    every ``(E, ·)`` pass (logits, softmax, the two products back) is over ``U`` columns. The
    logits of all events against them, less each event's positive logit (the softmax's
    stabiliser; the bias and it ride along as two extra columns), are one ``(E, U)`` product;
    accidental hits are found per event through an entity -> column index (O(E)); exp, sum and
    scaling run in place. Float32 throughout, as the former plain form (the tests hold both to
    autograd and to each other).

    ``check=False`` skips the index bounds checks (for callers that built the indices from
    their own tables, e.g. :meth:`model.online.OnlineFM._softmax_step`).

    ``neg_updates = k > 0``: the item side of only ``k`` of the ``U`` distinct shared negatives
    is kept (:func:`update_subset` with ``neg_update_by`` and ``rng``, weighted ``1 / p`` so the
    gradient stays unbiased); the others' gradient *as negatives* is left out (listed in
    :attr:`StepGrads.skipped`). Users and contexts still learn against all ``U``. 0 = all.
    :attr:`StepGrads.rows` then lists the rows read by any other entity (and by ``keep``,
    entities whose rows the caller updates anyway, e.g. its label-0 events' items).
    """
    n_rows, d1 = vals.shape
    d = d1 - 1
    m = batch.n_entities
    f32 = np.float32
    x, cols, indptr = batch.x, batch.cols, batch.indptr
    n_ev = batch.ev_item.size
    if n_ev == 0:
        return StepGrads(0.0, 0, np.zeros((n_rows, d1), dtype=np.float32), 0.0)
    shared = np.asarray(shared, dtype=np.int64).reshape(-1)
    ev_fixed, ev_item = batch.ev_fixed, batch.ev_item
    if check:  # once: the products below reuse the structure
        _check(indptr, cols, m, n_rows)
        for ents in (ev_item, ev_fixed, shared):
            if ents.size and (int(ents.min()) < 0 or int(ents.max()) >= m):
                raise ValueError("entity index out of range")
    x = np.ascontiguousarray(x, dtype=np.float32)  # the compiled calls below take them as is
    x2 = x * x
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    cols = np.ascontiguousarray(cols, dtype=np.int64)
    vals = np.ascontiguousarray(vals, dtype=np.float32)
    # entity terms: V = Σ x v, a = Σ x w − ½ Σ x² |v|² + ½ |V|² (two compiled gathers)
    agg = _gather(indptr, cols, x, vals, np.zeros((m, d1), dtype=np.float32))  # [Σ x w | Σ x v]
    v = vals[:, 1:]
    sq = einsum("rd,rd->r", v, v)
    s2 = _gather(indptr, cols, x2, sq[:, None], np.zeros((m, 1), dtype=np.float32))[:, 0]
    # V contiguous: ndarray.take of a strided view copies the whole array first (4 takes)
    V = np.ascontiguousarray(agg[:, 1:])
    a = agg[:, 0] + f32(0.5) * (einsum("md,md->m", V, V) - s2)

    # distinct shared entities (ascending) and their merged log-Q bias
    inv_q = np.bincount(
        shared,
        weights=np.exp(-np.asarray(logq_shared, dtype=np.float64).reshape(-1)),
        minlength=m,
    )
    us = inv_q.nonzero()[0]
    n_u = us.size

    P = V.take(ev_fixed[:, 0], axis=0)
    for j in range(1, ev_fixed.shape[1]):
        P += V.take(ev_fixed[:, j], axis=0)
    VP = V.take(ev_item, axis=0)  # (E, d) the positives' item vectors
    z_pos = a.take(ev_item) + einsum("ed,ed->e", P, VP)
    z_pos -= np.asarray(logq_pos, dtype=np.float32).reshape(-1)
    # z − z_pos of every (event, shared entity) in one product: [P | 1 | −z_pos] · [V | b | 1]
    # (each row stabilised by its positive's logit: exp(z − z_pos) <= 1 unless a negative
    # outscores the positive; rows whose sum overflows are redone with their true maximum)
    pa = np.empty((n_ev, d + 2), dtype=np.float32)
    pa[:, :d] = P
    pa[:, d] = 1.0
    pa[:, d + 1] = -z_pos
    VS = V.take(us, axis=0)  # (U, d)
    sa = np.empty((d + 2, n_u), dtype=np.float32)  # transposed: BLAS reads it faster
    sa[:d] = VS.T
    sa[d] = a.take(us) + np.log(inv_q.take(us))
    sa[d + 1] = 1.0
    c = pa @ sa  # (E, U)
    hit_ev = inv_q.take(ev_item).nonzero()[0]  # accidental hits: not negatives of
    hit_col = us.searchsorted(ev_item.take(hit_ev))  # that event (us ascending)
    with np.errstate(over="ignore"):  # overflow: the rows redone below
        np.exp(c, out=c)
        c[hit_ev, hit_col] = 0.0
        norm = np.add.reduce(c, axis=1)  # = c.sum(axis=1), without the method's wrapper
    norm += f32(1.0)  # the positive: exp(z_pos − z_pos)
    bad = (~np.isfinite(norm)).nonzero()[0]
    top = None  # the stabiliser relative to z_pos, where not 0
    if bad.size:  # a negative outscores its positive by ~88+: the max-stabilised softmax
        zb = pa[bad] @ sa
        inb = np.isin(hit_ev, bad)
        zb[np.searchsorted(bad, hit_ev[inb]), hit_col[inb]] = -np.inf
        tb = np.maximum(zb.max(axis=1, initial=-np.inf), f32(0.0))
        top = np.zeros(n_ev, dtype=np.float32)
        zb -= tb[:, None]
        np.exp(zb, out=zb)
        c[bad] = zb
        top[bad] = tb
        norm[bad] = zb.sum(axis=1) + np.exp(-tb)
    logn = np.log(norm)
    if top is not None:
        logn += top
    total = float(np.add.reduce(logn, dtype=np.float64))
    inv_norm = f32(1.0) / norm
    c *= inv_norm[:, None]  # c_neg
    # c_pos = exp(−top) / norm − 1 (top = 0: exactly 1 / norm − 1)
    c_pos = inv_norm - f32(1.0) if top is None else np.exp(-top) * inv_norm - f32(1.0)

    # entity gradients [dq | dV]
    dP = c @ VS  # (E, d)
    dP += c_pos[:, None] * VP
    dq = np.bincount(ev_item, weights=c_pos, minlength=m).astype(np.float32)
    mass = np.add.reduce(c, axis=0)  # each shared entity's Σ c: its dq as a negative
    ctp = c.T @ P  # (U, d): its Σ c P
    us_item = us
    skipped = None
    if 0 < neg_updates < n_u:  # the item side of a subset of the negatives (unbiased)
        if rng is None:
            raise ValueError("softmax_step_gradients: neg_updates needs an rng")
        kept, kw = update_subset(mass, neg_updates, neg_update_by, rng)
        drop = np.ones(n_u, dtype=bool)
        drop[kept] = False
        skipped = us[drop]
        us_item = us.take(kept)
        mass = mass.take(kept) * kw
        ctp = ctp.take(kept, axis=0)
        ctp *= kw[:, None]
    n_ui = us_item.size
    dq[us_item] += mass
    gent = np.empty((m, d1), dtype=np.float32)
    gent[:, 0] = dq
    dV = dq[:, None] * V  # (m, d) contiguous: the scatter below adds into it
    # one scatter, in this order: shared entities (c.T P), positives (c_pos P), each event's
    # users and contexts (dP: one source row each event, added to its ev_fixed.shape[1] fixed
    # entities in turn: the same additions in the same order as one copy per entity)
    n_fix = ev_fixed.size
    src = np.concatenate([ctp, P, dP])
    dst = np.concatenate([us_item, ev_item, ev_fixed.ravel()])
    ptr = np.concatenate(
        [np.arange(n_ui + n_ev), np.arange(n_ui + n_ev, dst.size + 1, ev_fixed.shape[1])]
    )
    w = np.empty(n_ui + n_ev + n_fix, dtype=np.float32)
    w.fill(1.0)
    w[n_ui : n_ui + n_ev] = c_pos
    _scatter(ptr, dst, w, src, dV)
    gent[:, 1:] = dV

    grad = _scatter(indptr, cols, x, gent, np.zeros((n_rows, d1), dtype=np.float32))
    rows = None
    if skipped is None:
        c2 = _scatter(indptr, cols, x2, dq[:, None], np.zeros((n_rows, 1), dtype=np.float32))
    else:  # second column: Σ x² over the slots of entities not skipped (> 0: row updated)
        src2 = np.ones((m, 2), dtype=np.float32)
        src2[:, 0] = dq
        src2[skipped, 1] = 0.0
        src2[ev_item, 1] = 1.0
        if keep is not None:
            src2[keep, 1] = 1.0
        c2 = _scatter(indptr, cols, x2, src2, np.zeros((n_rows, 2), dtype=np.float32))
        rows = c2[:, 1].nonzero()[0]
        c2 = c2[:, :1]
    # grad[:, 1:] -= c2 v, as one contiguous pass over full rows (the strided form costs ~2x):
    # the w column subtracts an exact 0
    cv = vals * c2
    cv[:, 0] = 0.0
    grad -= cv
    return StepGrads(total, n_ev, grad, 0.0, skipped, rows)


def softmax_step_gradients_reference(
    vals: np.ndarray,
    w0: float,
    batch: StepBatch,
    shared: np.ndarray,
    logq_shared: np.ndarray,
    logq_pos: np.ndarray,
) -> StepGrads:
    """:func:`softmax_step_gradients` by torch autograd over the full FM logits of
    :mod:`model.fm` (user, context and ``w0`` included: they cancel in the softmax)."""
    m = batch.n_entities
    counts = np.diff(batch.indptr)
    width = max(int(counts.max(initial=0)), 1)
    inv = np.zeros((m, width), dtype=np.int64)
    x = np.zeros((m, width), dtype=np.float32)
    ent_of = np.repeat(np.arange(m), counts)
    pos_in = np.arange(batch.cols.size) - np.repeat(batch.indptr[:-1], counts)
    inv[ent_of, pos_in] = batch.cols
    x[ent_of, pos_in] = batch.x
    n_ev, n_sh = batch.ev_item.size, int(np.size(shared))
    if n_ev == 0:
        return StepGrads(0.0, 0, np.zeros_like(vals), 0.0)
    s = torch.from_numpy(vals.copy()).requires_grad_(True)
    w0t = torch.tensor(w0, dtype=torch.float32, requires_grad=True)
    ent = fmath.entity_terms(s, torch.from_numpy(inv), torch.from_numpy(x))
    cand = np.concatenate(
        [batch.ev_item[:, None], np.broadcast_to(np.asarray(shared), (n_ev, n_sh))], axis=1
    )  # (E, 1 + M)
    fixed = np.repeat(batch.ev_fixed, 1 + n_sh, axis=0)
    members = np.concatenate([fixed, cand.reshape(-1, 1)], axis=1)
    logits = fmath.example_logits(w0t, ent, torch.from_numpy(members)).reshape(n_ev, 1 + n_sh)
    logq = np.concatenate(
        [np.asarray(logq_pos)[:, None], np.broadcast_to(np.asarray(logq_shared), (n_ev, n_sh))],
        axis=1,
    ).astype(np.float32)
    z = logits - torch.from_numpy(logq)
    hit = np.zeros((n_ev, 1 + n_sh), dtype=bool)
    hit[:, 1:] = cand[:, 1:] == batch.ev_item[:, None]
    z = z.masked_fill(torch.from_numpy(hit), float("-inf"))
    total = (torch.logsumexp(z, dim=1) - z[:, 0]).sum()
    total.backward()
    grad = s.grad.numpy() if s.grad is not None else np.zeros_like(vals)
    g0 = float(w0t.grad) if w0t.grad is not None else 0.0
    return StepGrads(float(total.detach()), n_ev, grad, g0)
