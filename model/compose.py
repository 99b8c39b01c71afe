"""Fold the FM into inner-product vectors (pure numpy; no torch needed to use it).

With per-side aggregates ``W = Σ x_j w_j``, ``cross = ½(|Σ x_j v_j|² − Σ x_j²|v_j|²)`` and
``V = Σ x_j v_j``::

    E_user = [1, W_u + cross_u, V_u]
    E_item = [W_i + cross_i, 1, V_i]            <E_user, E_item> = FM logit − w0
    q      = [1, W_u + cross_u + W_c + cross_c + <V_u, V_c>, V_u + V_c]
                                                <q, E_item>      = full FM logit − w0

so exact maximum-inner-product search over ``E_item`` returns the FM top-K, with or without
request context. Vectors are float32 ``(n, d + 2)``; aggregates are computed in float64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.codec import CodecError, pack, seal, unpack, unseal
from model.errors import FeatureError, SchemaError, SnapshotError
from model.features import tokenize_column
from model.schema import FieldSpec

_CTX_MAGIC = b"FMCTXTB\0"
_CTX_VERSION = 1


def aggregate(
    w: np.ndarray, v: np.ndarray, x: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Side aggregates in float64: ``(W (n,), cross (n,), V (n, d))``.

    Args:
        w: ``(n, L)`` first-order weights of the active features.
        v: ``(n, L, d)`` their latent vectors.
        x: ``(n, L)`` feature values (0 on padding).
    """
    x64 = np.asarray(x, dtype=np.float64)
    xv = np.asarray(v, dtype=np.float64) * x64[..., None]
    vec = xv.sum(axis=1)
    cross = 0.5 * (np.einsum("nd,nd->n", vec, vec) - np.einsum("nld,nld->n", xv, xv))
    lin = np.einsum("nl,nl->n", np.asarray(w, dtype=np.float64), x64)
    return lin, cross, vec


def compose_user(lin: np.ndarray, cross: np.ndarray, vec: np.ndarray) -> np.ndarray:
    """``E_user = [1, W_u + cross_u, V_u]`` as float32 ``(n, d + 2)``."""
    vec = np.asarray(vec)
    n, d = vec.shape
    out = np.empty((n, d + 2), dtype=np.float32)
    out[:, 0] = 1.0
    out[:, 1] = np.asarray(lin, dtype=np.float64) + np.asarray(cross, dtype=np.float64)
    out[:, 2:] = vec
    return out


def compose_item(lin: np.ndarray, cross: np.ndarray, vec: np.ndarray) -> np.ndarray:
    """``E_item = [W_i + cross_i, 1, V_i]`` as float32 ``(n, d + 2)``."""
    vec = np.asarray(vec)
    n, d = vec.shape
    out = np.empty((n, d + 2), dtype=np.float32)
    out[:, 0] = np.asarray(lin, dtype=np.float64) + np.asarray(cross, dtype=np.float64)
    out[:, 1] = 1.0
    out[:, 2:] = vec
    return out


def split_user(w: np.ndarray, v: np.ndarray, x: np.ndarray, own: np.ndarray) -> np.ndarray:
    """The part of ``E_user`` that only the user's own rows make: ``[W_o, S_o, V_o]`` float32.

    ``W_o = Σ x_j w_j``, ``S_o = Σ x_j² |v_j|²``, ``V_o = Σ x_j v_j`` over the features where
    ``own`` is True (the user's own id row); :func:`compose_user_parts` adds the shared rows.

    Args:
        w, v, x: as in :func:`aggregate` (``(n, L)``, ``(n, L, d)``, ``(n, L)``).
        own: bool ``(n, L)``.
    """
    xo = np.where(own, np.asarray(x, dtype=np.float64), 0.0)
    xv = np.asarray(v, dtype=np.float64) * xo[..., None]
    n, d = xv.shape[0], xv.shape[2]
    out = np.empty((n, d + 2), dtype=np.float32)
    out[:, 0] = np.einsum("nl,nl->n", np.asarray(w, dtype=np.float64), xo)
    out[:, 1] = np.einsum("nld,nld->n", xv, xv)
    out[:, 2:] = xv.sum(axis=1)
    return out


def _terms_from_parts(
    own: np.ndarray, w: np.ndarray, v: np.ndarray, x: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(W, ½(|V|² − S), V)`` in float64 from an own part ``[W_o, S_o, V_o]`` and shared rows
    (shapes as in :func:`compose_user_parts`): what both entity sides compose from parts."""
    o = np.asarray(own, dtype=np.float64)
    x64 = np.asarray(x, dtype=np.float64)
    xv = np.asarray(v, dtype=np.float64) * x64[..., None]
    vec = o[:, 2:] + xv.sum(axis=1)
    sq = o[:, 1] + np.einsum("nld,nld->n", xv, xv)
    lin = o[:, 0] + np.einsum("nl,nl->n", np.asarray(w, dtype=np.float64), x64)
    cross = 0.5 * (np.einsum("nd,nd->n", vec, vec) - sq)
    return lin, cross, vec


def compose_user_parts(own: np.ndarray, w: np.ndarray, v: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``E_user`` from the user's own part (:func:`split_user`) and its shared feature rows.

    With ``W = W_o + Σ x_s w_s``, ``V = V_o + Σ x_s v_s``, ``S = S_o + Σ x_s² |v_s|²``:
    ``E_user = [1, W + ½(|V|² − S), V]``, the same vector :func:`compose_user` makes from all
    rows at once (to float32 rounding of the stored own part).

    Args:
        own: float32 ``(n, d + 2)`` = ``[W_o, S_o, V_o]``.
        w, v, x: the shared rows of each user, ``(n, L)``, ``(n, L, d)``, ``(n, L)`` (x = 0 pads).
    """
    return compose_user(*_terms_from_parts(own, w, v, x))


def split_item(w: np.ndarray, v: np.ndarray, x: np.ndarray, own: np.ndarray) -> np.ndarray:
    """The part of ``E_item`` that only the item's own rows make: ``[W_o, S_o, V_o]`` float32
    (the same split as :func:`split_user`; :func:`compose_item_parts` adds the shared rows)."""
    return split_user(w, v, x, own)


def compose_item_parts(own: np.ndarray, w: np.ndarray, v: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``E_item`` from the item's own part (:func:`split_item`) and its shared feature rows.

    ``E_item = [W + ½(|V|² − S), 1, V]`` with ``W``, ``V``, ``S`` as in
    :func:`compose_user_parts`: the vector :func:`compose_item` makes from all rows at once (to
    float32 rounding of the stored own part). Row ``i`` of the result depends only on row ``i``
    of the inputs (a server recomposing a subset of items gets the same bits).

    Args:
        own: float32 ``(n, d + 2)`` = ``[W_o, S_o, V_o]``.
        w, v, x: the shared rows of each item, ``(n, L)``, ``(n, L, d)``, ``(n, L)`` (x = 0 pads).
    """
    return compose_item(*_terms_from_parts(own, w, v, x))


def context_query(e_user: np.ndarray, ctx_lin: np.ndarray, ctx_vec: np.ndarray) -> np.ndarray:
    """Query ``q = [1, a_u + ctx_lin + <V_u, V_c>, V_u + V_c]`` from ``E_user = [1, a_u, V_u]``.

    Args:
        e_user: ``(n, d + 2)`` user vectors (or ``(d + 2,)`` for one).
        ctx_lin: ``(n,)`` ``W_c + cross_c`` from :meth:`ContextTable.encode`.
        ctx_vec: ``(n, d)`` ``V_c``.
    """
    e = np.asarray(e_user)
    single = e.ndim == 1
    e = np.atleast_2d(e)
    cl = np.atleast_1d(np.asarray(ctx_lin, dtype=np.float64))
    cv = np.atleast_2d(np.asarray(ctx_vec, dtype=np.float64))
    vu = e[:, 2:].astype(np.float64)
    q = np.empty(e.shape, dtype=np.float32)
    q[:, 0] = 1.0
    q[:, 1] = e[:, 1].astype(np.float64) + cl + np.einsum("nd,nd->n", vu, cv)
    q[:, 2:] = vu + cv
    return q[0] if single else q


@dataclass
class ContextTable:
    """Snapshot of the context fields' rows: folds request context into the query vector.

    ``encode`` maps unseen values to their field's learned fallback row (values not yet admitted
    too), ignores missing fields and returns zeros for ``{}`` or a schema with no context field.
    Local row 0 is padding (zeros).
    """

    fields: tuple[FieldSpec, ...] = ()
    dim: int = 0
    vocabs: list[dict[str, int] | None] = field(default_factory=list)
    fallback: list[int] = field(default_factory=list)
    base: list[int] = field(default_factory=list)
    w: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.float32))
    v: np.ndarray = field(default_factory=lambda: np.zeros((1, 0), dtype=np.float32))

    def _rows(self, i: int, tokens: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        spec = self.fields[i]
        vocab = self.vocabs[i]
        n = len(tokens)
        width = 1
        if spec.kind == "multi":
            width = max((len(t) for t in tokens if t is not None), default=0)
        idx = np.zeros((n, width), dtype=np.int64)
        x = np.zeros((n, width), dtype=np.float64)
        for j, t in enumerate(tokens):
            if t is None:
                continue
            ts = t if spec.kind == "multi" else [t]
            for c, tok in enumerate(ts):
                if vocab is None:
                    idx[j, c] = self.base[i] + tok
                else:
                    idx[j, c] = vocab.get(tok, self.fallback[i])
            x[j, : len(ts)] = 1.0 / len(ts)
        return idx, x

    def encode(self, contexts: Sequence[Mapping[str, Any] | None]) -> tuple[np.ndarray, np.ndarray]:
        """``(ctx_lin (n,), ctx_vec (n, d))`` float32 for request contexts.

        Raises:
            FeatureError: a context is not a mapping or a value has the wrong type.
        """
        n = len(contexts)
        if not self.fields or n == 0:
            return np.zeros(n, dtype=np.float32), np.zeros((n, self.dim), dtype=np.float32)
        for j, c in enumerate(contexts):
            if c is not None and not isinstance(c, Mapping):
                raise FeatureError(
                    f"context #{j}: expected a mapping of field -> value, got {type(c).__name__}"
                )
        parts_i, parts_x = [], []
        for i, spec in enumerate(self.fields):
            toks = tokenize_column(
                spec, [None if c is None else c.get(spec.name) for c in contexts]
            )
            idx, x = self._rows(i, toks)
            parts_i.append(idx)
            parts_x.append(x)
        idx = np.concatenate(parts_i, axis=1)
        x = np.concatenate(parts_x, axis=1)
        lin, cross, vec = aggregate(self.w[idx], self.v[idx], x)
        return (lin + cross).astype(np.float32), vec.astype(np.float32)

    def to_bytes(self) -> bytes:
        """Pickle-free bytes (JSON header + raw arrays, sha256-sealed)."""
        header = {
            "dim": self.dim,
            "fields": [f.to_dict() for f in self.fields],
            "vocabs": [None if vb is None else list(vb.items()) for vb in self.vocabs],
            "fallback": list(self.fallback),
            "base": list(self.base),
        }
        payload = pack(header, {"w": self.w.astype(np.float32), "v": self.v.astype(np.float32)})
        return seal(_CTX_MAGIC, _CTX_VERSION, payload)

    @classmethod
    def from_bytes(cls, b: bytes) -> ContextTable:
        """Inverse of :meth:`to_bytes`.

        Raises:
            SnapshotError: the bytes are corrupt, truncated or not a context table.
        """
        try:
            header, arrays = unpack(unseal(_CTX_MAGIC, (_CTX_VERSION,), b))
            fields = tuple(
                FieldSpec(**{**f, "boundaries": tuple(f["boundaries"])}) for f in header["fields"]
            )
            vocabs = [
                None if vb is None else {str(k): int(r) for k, r in vb} for vb in header["vocabs"]
            ]
            table = cls(
                fields=fields,
                dim=int(header["dim"]),
                vocabs=vocabs,
                fallback=[int(x) for x in header["fallback"]],
                base=[int(x) for x in header["base"]],
                w=arrays["w"],
                v=arrays["v"],
            )
        except (CodecError, SchemaError, KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"cannot read a ContextTable from {len(b)} bytes: {exc}") from exc
        if table.v.shape != (table.w.shape[0], table.dim) or len(table.vocabs) != len(fields):
            raise SnapshotError("ContextTable arrays do not match its header")
        return table
