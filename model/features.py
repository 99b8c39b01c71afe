"""Feature encoding and vocabularies that grow online.

Three layers:

* **tokens** — a raw value becomes a token per field kind: categorical values are stringified
  (:func:`canon`), numeric values become a bucket index, hashed values a bucket index
  (:func:`stable_hash`), multi-valued lists a de-duplicated list of tokens, each weighted ``1/n``.
* **keys** — :class:`FeatureSpace` gives every (field, token) a permanent integer *key*. Key 0
  is padding. Each vocabulary field has a *fallback key* (unseen / not-yet-admitted values);
  hashed and numeric fields have one key per bucket. Keys are cheap (~14 bytes of arrays plus the
  dict entry) and never change meaning, so cached encodings (profiles) stay valid forever.
* **rows** — ``key_row[key]`` is the parameter row a key currently uses: the field's learned
  fallback row until the value has been seen ``min_count`` times in training events, then a row
  of its own; when a value expires (``expire_after_s`` of event time without a sighting) its row
  is reset and reused by another value and the key points at the fallback again.

:class:`Catalog` holds the known users or items: id -> entity index, the id's key, and the
entity's encoded profile (keys and weights, padded with key 0 / weight 0).

A field missing from a profile (absent, ``None``, empty list) contributes nothing: no row, the
usual FM convention (``x = 0``). Unknown field names in a profile are ignored.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from operator import itemgetter, methodcaller
from typing import Any

import numpy as np

from model.errors import FeatureError
from model.optim import RowTable
from model.schema import FeatureSchema, FieldSpec

PAD = 0  # padding key and padding row


def canon(value: Any) -> str:
    """The categorical token of a scalar: strings as they are, numbers stringified.

    Integral floats print as ints (``3.0 -> "3"``, like JSON numbers), booleans as
    ``"true"``/``"false"``.
    """
    if type(value) is str:
        return value
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isfinite(v) and v.is_integer():
            return str(int(v))
        return repr(v)
    if isinstance(value, str):
        return str(value)
    raise FeatureError(
        f"expected a string or a number as a categorical value, got {type(value).__name__} "
        f"{value!r}"
    )


def stable_hash(token: str, buckets: int) -> int:
    """Bucket of ``token`` in ``[0, buckets)``: blake2b-64 of its UTF-8 bytes, little endian.

    Stable across processes and machines (unlike Python's ``hash``).
    """
    digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets


def bucketize(boundaries: Sequence[float], values: np.ndarray) -> np.ndarray:
    """Bucket ``i`` holds ``boundaries[i-1] <= x < boundaries[i]`` (``len + 1`` buckets)."""
    return np.searchsorted(np.asarray(boundaries, dtype=np.float64), values, side="right")


def _number(spec: FieldSpec, value: Any) -> float | None:
    if isinstance(value, bool | np.bool_):
        return float(value)
    if isinstance(value, int | float | np.integer | np.floating):
        v = float(value)
    elif isinstance(value, str):
        try:
            v = float(value.strip())
        except ValueError:
            raise FeatureError(
                f"field {spec.name!r}: expected a number, got the string {value!r}"
            ) from None
    else:
        raise FeatureError(
            f"field {spec.name!r}: expected a number, got {type(value).__name__} {value!r}"
        )
    return None if math.isnan(v) else v


def tokenize_column(spec: FieldSpec, values: Sequence[Any]) -> list[Any]:
    """Tokens of one field for many entities.

    Returns one entry per value: ``None`` (missing), a token (``str`` for vocabulary fields,
    ``int`` bucket for hashed/numeric fields), or for multi fields a non-empty list of tokens.

    Raises:
        FeatureError: a value of the wrong type for its field.
    """
    if spec.kind == "numeric":
        xs = [None if v is None else _number(spec, v) for v in values]
        present = [j for j, x in enumerate(xs) if x is not None]
        out: list[Any] = [None] * len(xs)
        if present:
            buckets = bucketize(spec.boundaries, np.array([xs[j] for j in present]))
            for j, b in zip(present, buckets.tolist(), strict=True):
                out[j] = b
        return out
    hb = spec.hash_buckets
    if spec.kind == "categorical":
        kinds = set(map(type, values))  # C-level scan; the usual case is all strings
        if kinds <= {str, type(None)}:
            toks: list[Any] = list(values)
        else:
            toks = []
            for v in values:
                if v is None:
                    toks.append(None)
                elif isinstance(v, list | tuple | set | frozenset | dict | Mapping):
                    raise FeatureError(
                        f"field {spec.name!r} is categorical: expected one value, got "
                        f'{type(v).__name__} {v!r} (declare kind = "multi" for lists)'
                    )
                else:
                    try:
                        toks.append(canon(v))
                    except FeatureError as exc:
                        raise FeatureError(f"field {spec.name!r}: {exc}") from None
        if hb:
            return [None if t is None else stable_hash(t, hb) for t in toks]
        return toks
    # multi
    out = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        if isinstance(v, str) or not isinstance(v, list | tuple | set | frozenset | np.ndarray):
            v = [v]
        seen: dict[Any, None] = {}
        for x in v:
            if x is None:
                continue
            if isinstance(x, list | tuple | dict | set | Mapping):
                raise FeatureError(
                    f"field {spec.name!r}: expected a list of scalars, got a nested {x!r}"
                )
            try:
                t = canon(x)
            except FeatureError as exc:
                raise FeatureError(f"field {spec.name!r}: {exc}") from None
            seen[stable_hash(t, hb) if hb else t] = None
        out.append(list(seen) if seen else None)
    return out


class FeatureSpace:
    """Keys of every (field, value), the rows they use, admission counts and expiry clocks."""

    def __init__(self, schema: FeatureSchema, table: RowTable, capacity: int = 1024) -> None:
        self.schema = schema
        self.table = table
        self.specs: tuple[FieldSpec, ...] = schema.fields
        self.index_of: dict[str, int] = {f.name: i for i, f in enumerate(self.specs)}
        n_fields = len(self.specs)
        cap = max(int(capacity), 16)
        self.key_row = np.zeros(cap, dtype=np.int32)
        self.key_count = np.zeros(cap, dtype=np.int32)
        self.key_field = np.zeros(cap, dtype=np.int16)
        self.has_expiry = any(f.expire_after_s is not None for f in self.specs)
        self.key_last: np.ndarray | None = (
            np.full(cap, -np.inf, dtype=np.float64) if self.has_expiry else None
        )
        self.n_keys = 1  # key 0: padding -> row 0
        self.fallback_key = np.full(n_fields, -1, dtype=np.int64)
        self.base_key = np.full(n_fields, -1, dtype=np.int64)
        self.vocab: list[dict[str, int] | None] = [None] * n_fields
        for i, spec in enumerate(self.specs):
            if spec.has_fixed_rows:
                keys = self._new_keys(i, spec.n_fixed_rows)
                self.key_row[keys] = table.alloc(keys.size)
                self.base_key[i] = keys[0]
            else:
                key = self._new_keys(i, 1)
                self.key_row[key] = table.alloc(1)
                self.fallback_key[i] = key[0]
                if not spec.is_id:  # ids: the catalog's dict is the vocabulary
                    self.vocab[i] = {}
        self.first_dynamic_key = self.n_keys
        self.first_dynamic_row = table.n_rows
        self.min_count = np.array([f.min_count for f in self.specs], dtype=np.int64)
        self.expire_s = np.array(
            [np.inf if f.expire_after_s is None else f.expire_after_s for f in self.specs]
        )
        self.fallback_row = np.zeros(n_fields, dtype=np.int64)
        for i in range(n_fields):
            if self.fallback_key[i] >= 0:
                self.fallback_row[i] = self.key_row[self.fallback_key[i]]
        self.watermark = -math.inf  # newest event time seen
        self.last_sweep = -math.inf
        finite = [f.expire_after_s for f in self.specs if f.expire_after_s is not None]
        self.sweep_every = (min(finite) / 16.0) if finite else math.inf
        self.n_expired = 0
        # user id keys that lost their own row since the last drain (their records changed)
        self.expired_user_keys: list[np.ndarray] = []
        self.n_admitted = 0
        # when a list: (keys, their previous rows) of every key whose row observe/expire change
        # (the trainer scores hard negatives with the rows from before its step's sightings)
        self.row_log: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._side_fidx: dict[str, list[int]] = {}

    # ----------------------------------------------------------------------------- keys
    def _new_keys(self, field_idx: int, n: int) -> np.ndarray:
        start = self.n_keys
        need = start + n
        cap = self.key_row.shape[0]
        if need > cap:
            new_cap = cap
            while new_cap < need:
                new_cap *= 2
            self.key_row = _grown(self.key_row, new_cap, 0)
            self.key_count = _grown(self.key_count, new_cap, 0)
            self.key_field = _grown(self.key_field, new_cap, 0)
            if self.key_last is not None:
                self.key_last = _grown(self.key_last, new_cap, -np.inf)
        keys = np.arange(start, need, dtype=np.int64)
        self.key_field[start:need] = field_idx
        self.key_count[start:need] = 0
        if field_idx >= 0 and self.fallback_key[field_idx] >= 0:
            self.key_row[start:need] = self.key_row[self.fallback_key[field_idx]]
        if self.key_last is not None:
            self.key_last[start:need] = -np.inf
        self.n_keys = need
        return keys

    def new_dynamic_keys(self, field_idx: int, n: int) -> np.ndarray:
        """``n`` new keys of a vocabulary field, pointing at its fallback row (not admitted)."""
        return self._new_keys(field_idx, n)

    def map_tokens(
        self, field_idx: int, tokens: Sequence[Any], create: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keys ``(n, width)`` and weights of a tokenised column (see :func:`tokenize_column`).

        With ``create`` unseen values get new keys (not yet admitted); without, they map to
        the field's fallback key and nothing is mutated.
        """
        spec = self.specs[field_idx]
        n = len(tokens)
        if spec.kind not in ("multi", "history"):
            keys = np.zeros((n, 1), dtype=np.int64)
            if spec.has_fixed_rows:
                base = int(self.base_key[field_idx])
                for j, t in enumerate(tokens):
                    if t is not None:
                        keys[j, 0] = base + t
            else:
                vocab = self.vocab[field_idx]
                assert vocab is not None
                get = vocab.get
                col = np.fromiter(map(get, tokens, repeat(-1, n)), dtype=np.int64, count=n)
                fb = int(self.fallback_key[field_idx])
                for j in np.flatnonzero(col < 0).tolist():  # missing or not in the vocabulary
                    t = tokens[j]
                    if t is None:
                        col[j] = PAD
                    elif create:
                        k = get(t)
                        if k is None:
                            k = int(self._new_keys(field_idx, 1)[0])
                            vocab[t] = k
                        col[j] = k
                    else:
                        col[j] = fb
                keys[:, 0] = col
            weights = (keys != PAD).astype(np.float32)
            return keys, weights
        width = max((len(t) for t in tokens if t is not None), default=0)
        keys = np.zeros((n, width), dtype=np.int64)
        weights = np.zeros((n, width), dtype=np.float32)
        base = int(self.base_key[field_idx])
        vocab = self.vocab[field_idx]
        fb = int(self.fallback_key[field_idx])
        for j, ts in enumerate(tokens):
            if ts is None:
                continue
            for c, t in enumerate(ts):
                if spec.has_fixed_rows:
                    k = base + t
                else:
                    assert vocab is not None
                    k = vocab.get(t)
                    if k is None:
                        if create:
                            k = int(self._new_keys(field_idx, 1)[0])
                            vocab[t] = k
                        else:
                            k = fb
                keys[j, c] = k
            weights[j, : len(ts)] = 1.0 / len(ts)
        return keys, weights

    def encode(
        self, side: str, dicts: Sequence[Mapping[str, Any] | None], create: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keys and weights ``(n, L)`` of one side's non-id fields for many feature dicts.

        Every value is validated before any key is created, so a :class:`FeatureError` leaves
        the vocabularies untouched. Rows are left-packed (padding last), ``L`` the widest row.
        """
        return self.encode_tokens(side, self.tokenize(side, dicts), create, len(dicts))

    def tokenize(
        self, side: str, dicts: Sequence[Mapping[str, Any] | None]
    ) -> list[list[Any]]:
        """Token columns (one per non-id field of ``side``) of many feature dicts; validates.

        The first half of :meth:`encode`: changes nothing, and the columns can be sliced
        (rows = dicts) and encoded later, piece by piece, with :meth:`encode_tokens`.

        Raises:
            FeatureError: a dict that is not a mapping, or a value of the wrong type.
        """
        fidx = self._fields_of(side)
        if not set(map(type, dicts)) <= {dict}:  # C-level scan; the usual case is plain dicts
            for j, d in enumerate(dicts):
                if d is not None and not isinstance(d, Mapping):
                    raise FeatureError(
                        f"{side} features #{j}: expected a mapping of field -> value, got "
                        f"{type(d).__name__} {d!r}"
                    )
            dicts = [_EMPTY if d is None else d for d in dicts]
        if len(dicts) == 0:
            return [[] for _ in fidx]
        columns = []
        for i in fidx:
            getter = methodcaller("get", self.specs[i].name)
            columns.append(tokenize_column(self.specs[i], list(map(getter, dicts))))
        return columns

    def encode_tokens(
        self, side: str, columns: Sequence[Sequence[Any]], create: bool, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keys and weights ``(n, L)`` of :meth:`tokenize`'s columns (see :meth:`encode`)."""
        fidx = self._fields_of(side)
        if not fidx or n == 0:
            return np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0), dtype=np.float32)
        parts_k, parts_w = [], []
        for i, toks in zip(fidx, columns, strict=True):
            k, w = self.map_tokens(i, toks, create)
            parts_k.append(k)
            parts_w.append(w)
        if len(parts_k) == 1:
            keys, weights = parts_k[0], parts_w[0]
        else:
            keys = np.concatenate(parts_k, axis=1)
            weights = np.concatenate(parts_w, axis=1)
        return _left_pack(keys, weights)

    def known_keys(self, side: str, columns: Sequence[Sequence[Any]], n: int) -> np.ndarray | None:
        """Keys ``(n, fields)`` of :meth:`tokenize`'s columns as far as they exist now, ``-1``
        where a vocabulary value has no key yet; changes nothing.

        :meth:`resolve_keys` finishes them (slice by slice) exactly as :meth:`encode_tokens`
        with ``create`` would: the lookups of a batch run once, the key creation per step.
        None when a field of ``side`` is multi-valued (use :meth:`encode_tokens`).
        """
        fidx = self._fields_of(side)
        if any(self.specs[i].kind in ("multi", "history") for i in fidx):
            return None
        keys = np.empty((n, len(fidx)), dtype=np.int64)
        for c, (i, toks) in enumerate(zip(fidx, columns, strict=True)):
            if self.specs[i].has_fixed_rows:
                base = int(self.base_key[i])
                keys[:, c] = [PAD if t is None else base + t for t in toks]
                continue
            vocab = self.vocab[i]
            assert vocab is not None
            col = np.fromiter(map(vocab.get, toks, repeat(-1, n)), dtype=np.int64, count=n)
            for j in np.flatnonzero(col < 0).tolist():
                if toks[j] is None:
                    col[j] = PAD
            keys[:, c] = col
        return keys

    def resolve_keys(
        self, side: str, keys: np.ndarray, columns: Sequence[Sequence[Any]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keys and weights ``(n, L)`` of :meth:`known_keys`' output (or a slice of it, with the
        same slice of the token columns): values still without a key get one now, in the order
        :meth:`encode_tokens` creates them. Same result as ``encode_tokens(..., create=True)``.
        """
        lo = int(np.minimum.reduce(keys, axis=None)) if keys.size else 1  # = keys.min()
        if lo > 0:  # every value has a key, none missing: nothing to create or to pack
            ones = np.empty(keys.shape, dtype=np.float32)
            ones.fill(1.0)
            return keys, ones
        if lo < 0:
            keys = keys.copy()
            for c, i in enumerate(self._fields_of(side)):
                vocab = self.vocab[i]
                for j in np.flatnonzero(keys[:, c] < 0).tolist():
                    t = columns[c][j]
                    k = vocab.get(t)  # type: ignore[union-attr]
                    if k is None:  # created by no earlier step either
                        k = int(self._new_keys(i, 1)[0])
                        vocab[t] = k  # type: ignore[index]
                    keys[j, c] = k
        return _left_pack(keys, (keys != PAD).astype(np.float32))

    def _fields_of(self, side: str) -> list[int]:
        """Indices of the fields of ``side`` read from feature dicts (cached)."""
        got = self._side_fidx.get(side)
        if got is None:
            got = [i for i, f in enumerate(self.specs) if f.side == side and f.from_profile]
            self._side_fidx[side] = got
        return got

    # ------------------------------------------------------------------ admission / expiry
    def rows(self, keys: np.ndarray) -> np.ndarray:
        """Current rows of keys (int64, same shape)."""
        return self.key_row[keys].astype(np.int64)

    def is_admitted(self, keys: np.ndarray) -> np.ndarray:
        """True where a key has a row of its own (fixed-rows keys always, fallbacks never)."""
        keys = np.asarray(keys, dtype=np.int64)
        fixed = (keys < self.first_dynamic_key) & np.isin(keys, self.fallback_key, invert=True)
        own = (keys >= self.first_dynamic_key) & (self.key_row[keys] >= self.first_dynamic_row)
        return (fixed & (keys != PAD)) | own

    def observe(
        self,
        keys: np.ndarray,
        now: float,
        mult: np.ndarray | Callable[[], np.ndarray] | None = None,
    ) -> int:
        """Count sightings of ``keys`` (flat, padding allowed) at event time ``now``.

        ``mult`` gives how many sightings each entry stands for (default 1), or a function
        ``mult(at)`` that returns them for the entries at positions ``at`` only (called only
        when a key is still waiting for admission, with those keys' positions). Values
        reaching their field's ``min_count`` get a fresh row. Returns the number of rows
        admitted.
        """
        if now > self.watermark:
            self.watermark = now
        if keys.size == 0:
            return 0
        dynamic = keys >= self.first_dynamic_key
        if self.key_last is not None:
            self.key_last[keys[dynamic]] = now
        # pending: a dynamic key still on its field's fallback row (fixed keys and padding
        # read rows below first_dynamic_row too, hence the mask)
        pending = self.key_row.take(keys) < self.first_dynamic_row
        pending &= dynamic
        at = pending.nonzero()[0]
        if at.size == 0:
            return 0
        pend = keys.take(at)
        # np.unique(pend, return_inverse=True) by one stable sort (ascending uniq, as it)
        order = pend.argsort(kind="stable")
        srt = pend.take(order)
        first = _run_starts(srt)
        uniq = srt[first]
        run = first.cumsum() - 1
        if mult is None:
            counts = np.bincount(run, minlength=uniq.size)
        else:
            at_mult = mult(at) if callable(mult) else np.asarray(mult).take(at)
            counts = np.bincount(run, weights=np.asarray(at_mult).take(order),
                                 minlength=uniq.size)
        total = np.minimum(
            self.key_count[uniq].astype(np.int64) + counts.astype(np.int64), 2**31 - 1
        )
        self.key_count[uniq] = total
        ok = uniq[total >= self.min_count[self.key_field[uniq]]]
        if ok.size:
            if self.row_log is not None:
                self.row_log.append((ok.copy(), self.key_row[ok].astype(np.int64)))
            self.key_row[ok] = self.table.alloc(ok.size)
            self.n_admitted += int(ok.size)
        return int(ok.size)

    def maybe_expire(self) -> int:
        """Expire when the watermark moved ``min(expire_after_s) / 16`` since the last sweep."""
        if not self.has_expiry or self.watermark - self.last_sweep < self.sweep_every:
            return 0
        return self.expire(self.watermark)

    def expire(self, now: float) -> int:
        """Free the rows of values unseen for longer than their field's ``expire_after_s``.

        Their keys go back to the fallback row with a zero count (they must be admitted again);
        the rows are reset when reused. Returns the number of rows freed.
        """
        self.last_sweep = now
        if self.key_last is None:
            return 0
        lo = self.first_dynamic_key
        k = np.arange(lo, self.n_keys, dtype=np.int64)
        if k.size == 0:
            return 0
        f = self.key_field[lo : self.n_keys]
        dead = (self.key_row[lo : self.n_keys] >= self.first_dynamic_row) & (
            self.key_last[lo : self.n_keys] < now - self.expire_s[f]
        )
        dead_keys = k[dead]
        if dead_keys.size == 0:
            return 0
        if self.row_log is not None:
            self.row_log.append((dead_keys.copy(), self.key_row[dead_keys].astype(np.int64)))
        self.table.release(self.key_row[dead_keys])
        self.key_row[dead_keys] = self.fallback_row[self.key_field[dead_keys]]
        # what used these keys now reads the fallback rows: mark them so publishers resend it
        self.table.mark_dirty(self.key_row[dead_keys])
        self.key_count[dead_keys] = 0
        self.n_expired += int(dead_keys.size)
        users = dead_keys[self.key_field[dead_keys] == self.index_of["user_id"]]
        if users.size:
            self.expired_user_keys.append(users)
            if len(self.expired_user_keys) > 64:  # nobody drains: stay bounded by the keys
                self.expired_user_keys = [np.unique(np.concatenate(self.expired_user_keys))]
        return int(dead_keys.size)

    def id_key_for(self, field_idx: int, entity_id: str) -> int:
        """Key an id without a catalog entry uses: its hash bucket, or the fallback."""
        spec = self.specs[field_idx]
        if spec.hash_buckets:
            return int(self.base_key[field_idx]) + stable_hash(entity_id, spec.hash_buckets)
        return int(self.fallback_key[field_idx])

    def nbytes(self) -> int:
        n = self.key_row.nbytes + self.key_count.nbytes + self.key_field.nbytes
        if self.key_last is not None:
            n += self.key_last.nbytes
        return int(n)


class IdIndex(dict):  # type: ignore[type-arg]
    """``id -> entity index``; a missing id reads -1 (``index[u]``; ``get`` is unchanged).

    So :meth:`Catalog.lookup` can fetch a whole batch with one ``itemgetter`` call.
    """

    __slots__ = ()

    def __missing__(self, key: Any) -> int:
        return -1


class Catalog:
    """Known users or items: id -> entity index, id key, encoded profile, positive counts."""

    def __init__(self, side: str, space: FeatureSpace, capacity: int = 1024) -> None:
        self.side = side
        self.space = space
        self.id_field = space.index_of["user_id" if side == "user" else "item_id"]
        self.index: dict[str, int] = IdIndex()
        self.ids: list[str] = []
        self.profiles: list[dict[str, Any]] = []
        cap = max(int(capacity), 16)
        self.ent_key = np.zeros(cap, dtype=np.int32)
        self.counts = np.zeros(cap, dtype=np.int64)
        self.prof_keys = np.zeros((cap, 0), dtype=np.int32)
        self.prof_w = np.zeros((cap, 0), dtype=np.float32)
        self.n = 0
        # history fields: users keep ring buffers of item keys; items cache their history keys
        self.hist_fields = [i for i, f in enumerate(space.specs) if f.is_history]
        self.hist_keys: dict[int, np.ndarray] = {}
        self.hist_n: dict[int, np.ndarray] = {}
        self.hist_key_of_item: dict[int, np.ndarray] = {}
        for f in self.hist_fields:
            if side == "user":
                self.hist_keys[f] = np.zeros((cap, space.specs[f].history_len), dtype=np.int32)
                self.hist_n[f] = np.zeros(cap, dtype=np.int64)
            else:
                self.hist_key_of_item[f] = np.zeros(cap, dtype=np.int32)
        # recent positive items (item entity indices) per user, for serving's history (off: 0)
        self.recent = np.zeros((cap, 0), dtype=np.int32)
        self.recent_n = np.zeros(0, dtype=np.int64)  # sized only when kept
        self._ring_tables: dict[int, np.ndarray] = {}

    def keep_recent(self, length: int) -> None:
        """Keep each user's last ``length`` positive items (ring of item entity indices)."""
        self.recent = np.zeros((self.ent_key.shape[0], int(length)), dtype=np.int32)
        self.recent_n = np.zeros(self.ent_key.shape[0], dtype=np.int64)

    def __len__(self) -> int:
        return self.n

    def _reserve(self, need: int, width: int) -> None:
        cap = self.ent_key.shape[0]
        new_cap = cap
        while new_cap < need:
            new_cap *= 2
        if new_cap != cap:
            self.ent_key = _grown(self.ent_key, new_cap, 0)
            self.counts = _grown(self.counts, new_cap, 0)
            for d in (self.hist_keys, self.hist_n, self.hist_key_of_item):
                for f in d:
                    d[f] = _grown(d[f], new_cap, 0)
            if self.recent.shape[1]:
                self.recent = _grown(self.recent, new_cap, 0)
                self.recent_n = _grown(self.recent_n, new_cap, 0)
            else:
                self.recent = np.zeros((new_cap, 0), dtype=np.int32)
        if new_cap != cap or width > self.prof_keys.shape[1]:
            w = max(width, self.prof_keys.shape[1])
            pk = np.zeros((new_cap, w), dtype=np.int32)
            pw = np.zeros((new_cap, w), dtype=np.float32)
            pk[: self.n, : self.prof_keys.shape[1]] = self.prof_keys[: self.n]
            pw[: self.n, : self.prof_w.shape[1]] = self.prof_w[: self.n]
            self.prof_keys, self.prof_w = pk, pw

    def lookup(self, ids: Sequence[Any]) -> np.ndarray:
        """Entity indices (int64), -1 for unknown ids. Non-string ids are stringified."""
        get = self.index.get
        n = len(ids)
        try:  # C-level iteration: the per-event cost of a batch is one dict probe
            if n > 1:  # itemgetter: ~2x map(get, ...) on a large dict; misses give -1
                got = itemgetter(*ids)(self.index)
                ents = np.fromiter(got, dtype=np.int64, count=n)
            else:
                ents = np.fromiter(map(get, ids, repeat(-1, n)), dtype=np.int64, count=n)
        except (TypeError, KeyError):  # an unhashable id (or a plain dict as index)
            try:
                ents = np.fromiter(map(get, ids, repeat(-1, n)), dtype=np.int64, count=n)
            except TypeError:
                ents = np.full(n, -1, dtype=np.int64)
        for j in np.flatnonzero(ents < 0).tolist():
            if type(ids[j]) is not str:
                ents[j] = get(_id_str(ids[j]), -1)  # FeatureError for non-ids
        return ents

    def ensure(self, ids: Sequence[Any]) -> np.ndarray:
        """Entity indices, registering unknown ids (empty profile, id not yet admitted)."""
        ents, new = self.prepare(ids)
        self.commit(new)
        return ents

    def prepare(
        self, ids: Sequence[Any], known: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[str]]:
        """Entity indices with unknown ids numbered as if registered; nothing changes yet.

        ``known``: indices from an earlier :meth:`lookup` of the same ids (-1 = unknown then);
        only those -1 are looked up again (entities are never removed, so the rest hold).

        Raises:
            FeatureError: an id that is neither a string nor a number.
        """
        if isinstance(known, np.ndarray) and known.dtype == np.int64:
            missing = (known < 0).nonzero()[0]
            if missing.size == 0:  # all known: nothing to number (``known`` itself, no copy)
                return known, []
        ents = self.lookup(ids) if known is None else np.array(known, dtype=np.int64)
        missing = (ents < 0).nonzero()[0]
        new: dict[str, int] = {}
        for j in missing.tolist():
            u = _id_str(ids[j])
            e = self.index.get(u)
            if e is None:
                e = new.get(u)
                if e is None:
                    e = self.n + len(new)
                    new[u] = e
            ents[j] = e
        return ents, list(new)

    def commit(self, new_ids: list[str]) -> None:
        """Register the ids :meth:`prepare` numbered (in that order)."""
        self._add(new_ids)

    def _add(self, ids: list[str]) -> None:
        m = len(ids)
        if m == 0:
            return
        start = self.n
        self._reserve(start + m, 0)
        spec = self.space.specs[self.id_field]
        if spec.hash_buckets:
            keys = np.array([self.space.id_key_for(self.id_field, u) for u in ids], dtype=np.int64)
        else:
            keys = self.space.new_dynamic_keys(self.id_field, m)
        self.ent_key[start : start + m] = keys
        self.counts[start : start + m] = 0
        self.prof_keys[start : start + m] = 0
        self.prof_w[start : start + m] = 0.0
        for j, u in enumerate(ids):
            self.index[u] = start + j
        self.ids.extend(ids)
        self.profiles.extend([_EMPTY] * m)
        self.n = start + m

    def set_profiles(
        self, ents: np.ndarray, keys: np.ndarray, weights: np.ndarray, raw: list[dict[str, Any]]
    ) -> None:
        """Replace the encoded profiles of entities (last one wins on duplicates)."""
        width = keys.shape[1]
        self._reserve(self.n, width)
        self.prof_keys[ents, :] = 0
        self.prof_w[ents, :] = 0.0
        if width:
            self.prof_keys[ents, :width] = keys
            self.prof_w[ents, :width] = weights
        for e, d in zip(ents.tolist(), raw, strict=True):
            self.profiles[e] = d

    def keys_of(self, ents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(keys, weights)`` of known entities: the id key, the profile, then histories."""
        n = ents.size
        width = self.prof_keys.shape[1]
        hist = sum(a.shape[1] for a in self.hist_keys.values())
        keys = np.empty((n, 1 + width + hist), dtype=np.int64)
        weights = np.empty((n, 1 + width + hist), dtype=np.float32)
        keys[:, 0] = self.ent_key[ents]
        weights[:, 0] = 1.0
        if width:
            keys[:, 1 : 1 + width] = self.prof_keys.take(ents, axis=0)  # take: 2-4x [ents]
            weights[:, 1 : 1 + width] = self.prof_w.take(ents, axis=0)
        col = 1 + width
        for f, ring in self.hist_keys.items():
            h = ring.shape[1]
            keys[:, col : col + h] = ring.take(ents, axis=0)
            # a ring's weights depend only on its fill count (partial rings) or on its
            # rotation (full rings): rows of a per-field table computed by _ring_weights
            n_seen = self.hist_n[f].take(ents)
            row = n_seen % h  # n < h: n itself; else h + n % h (<= n): the smaller of the two
            row += h
            np.minimum(row, n_seen, out=row)
            weights[:, col : col + h] = self._ring_table(f, h).take(row, axis=0)
            col += h
        return keys, weights

    def _ring_table(self, field_idx: int, h: int) -> np.ndarray:
        """Weights ``(2h, h)`` float32 of a history ring by its state: row ``n < h`` for a ring
        with ``n`` appends, row ``h + r`` for a full ring whose next slot is ``r``."""
        table = self._ring_tables.get(field_idx)
        if table is None:
            table = _ring_weights(
                np.concatenate([np.arange(h), h + np.arange(h)]), h,
                self.space.specs[field_idx].history_decay,
            ).astype(np.float32)
            self._ring_tables[field_idx] = table
        return table

    def history_keys(self, field_idx: int, ents: np.ndarray) -> np.ndarray:
        """Keys of items (entity indices of this item catalog) as values of a history field."""
        cache = self.hist_key_of_item[field_idx]
        keys = cache.take(ents).astype(np.int64)
        missing = (keys == PAD).nonzero()[0]
        if missing.size:
            spec = self.space.specs[field_idx]
            vocab = self.space.vocab[field_idx]
            for j in missing.tolist():
                e = int(ents[j])
                if cache[e] == PAD:
                    item_id = self.ids[e]
                    if spec.hash_buckets:
                        k = int(self.space.base_key[field_idx]) + stable_hash(
                            item_id, spec.hash_buckets
                        )
                    else:
                        assert vocab is not None
                        k = vocab.get(item_id)
                        if k is None:
                            k = int(self.space.new_dynamic_keys(field_idx, 1)[0])
                            vocab[item_id] = k
                    cache[e] = k
                keys[j] = cache[e]
        return keys

    def append_history(self, field_idx: int, ents: np.ndarray, keys: np.ndarray) -> None:
        """Append item keys to users' history rings, in event order (oldest drop out)."""
        _ring_append(self.hist_keys[field_idx], self.hist_n[field_idx], ents, keys)

    def append_recent(self, ents: np.ndarray, items: np.ndarray) -> None:
        """Append item entity indices to users' recent rings (see :meth:`keep_recent`)."""
        if self.recent.shape[1] and ents.size:
            _ring_append(self.recent, self.recent_n, ents, items)

    def recent_of(self, ents: np.ndarray) -> list[np.ndarray]:
        """Each entity's recent item entity indices, newest first (at most the ring's length)."""
        if self.recent.shape[1] == 0:
            return [np.zeros(0, dtype=np.int32) for _ in range(len(ents))]
        ents = np.asarray(ents, dtype=np.int64)
        items, m = ring_newest_first(self.recent[ents], self.recent_n[ents])
        return [items[r, : m[r]] for r in range(len(ents))]

    def keys_of_ids(self, ids: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`keys_of` for any ids: unknown ids get the id fallback / hash bucket key."""
        ents = self.lookup(ids)
        keys, weights = self.keys_of(np.maximum(ents, 0)) if len(ids) else self.keys_of(ents)
        unknown = np.flatnonzero(ents < 0)
        for j in unknown.tolist():
            keys[j, :] = PAD
            weights[j, :] = 0.0
            keys[j, 0] = self.space.id_key_for(self.id_field, _id_str(ids[j]))
            weights[j, 0] = 1.0
        return keys, weights

    def nbytes(self) -> int:
        return int(
            self.ent_key.nbytes + self.counts.nbytes + self.prof_keys.nbytes + self.prof_w.nbytes
            + self.recent.nbytes + self.recent_n.nbytes
        )


_EMPTY: dict[str, Any] = {}


def _id_str(u: Any) -> str:
    if type(u) is str:
        return u
    try:
        return canon(u)
    except FeatureError:
        raise FeatureError(
            f"expected an id (string or number), got {type(u).__name__} {u!r}"
        ) from None


def ring_newest_first(ring: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rings ``(n, h)`` with ``count`` appends each, as rows newest first, and each row's
    valid length (``min(count, h)``)."""
    h = ring.shape[1]
    j = np.arange(h)
    slots = (count[:, None] - 1 - j[None, :]) % max(h, 1)  # the j-th newest
    return np.take_along_axis(ring, slots, axis=1), np.minimum(count, h)


def _ring_weights(n_seen: np.ndarray, h: int, decay: float) -> np.ndarray:
    """Weights ``(n, h)`` of history rings with ``n_seen`` appends each (float64): the slot
    written ``a`` clicks before the newest weighs ``decay ** a``, normalised to sum 1; unwritten
    slots 0."""
    filled = np.minimum(n_seen, h)
    valid = np.arange(h)[None, :] < filled[:, None]
    if decay == 1.0:
        inv = (1.0 / np.maximum(filled, 1)).astype(np.float32)
        return np.where(valid, inv[:, None], np.float32(0.0))
    # slot j was written (n - 1 - j) mod h clicks before the newest
    age = (n_seen[:, None] - 1 - np.arange(h)[None, :]) % h
    w = np.where(valid, np.power(decay, age), 0.0)
    w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-30)
    return w


def _run_starts(srt: np.ndarray) -> np.ndarray:
    """Mask of the first element of each run of equal values in the sorted, non-empty
    ``srt`` (what ``np.unique`` finds, without its sort and bookkeeping)."""
    first = np.empty(srt.size, dtype=bool)
    first[0] = True
    np.not_equal(srt[1:], srt[:-1], out=first[1:])
    return first


def _ring_append(ring: np.ndarray, count: np.ndarray, ents: np.ndarray, vals: np.ndarray) -> None:
    """Append ``vals`` to the rings of ``ents`` in event order (oldest drop out)."""
    h = ring.shape[1]
    n = ents.size
    if n == 0:
        return
    order = ents.argsort(kind="stable")
    e = ents.take(order)  # sorted: an entity's events are one run, in event order
    start = _run_starts(e).nonzero()[0]
    if start.size == n:  # one event per entity (no sort order needed)
        slot = count.take(ents) % h
        ring[ents, slot] = vals
        count[ents] += 1
        return
    per = np.empty_like(start)
    per[:-1] = start[1:]
    per[-1] = n
    per -= start
    uniq = e.take(start)
    rank = np.arange(n) - start.repeat(per)  # position among this entity's events
    slot = (count.take(e) + rank) % h
    k = vals.take(order)
    if int(np.maximum.reduce(per)) > h:  # only the newest h of a burst survive
        last = rank >= per.repeat(per) - h
        e, slot, k = e[last], slot[last], k[last]
    ring[e, slot] = k
    count[uniq] += per


def _grown(a: np.ndarray, new_cap: int, fill: Any) -> np.ndarray:
    out = np.full((new_cap, *a.shape[1:]), fill, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


def _left_pack(keys: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move padding (key 0) to the end of each row and drop all-padding columns."""
    if keys.shape[1] == 0:
        return keys, weights
    nz = keys != PAD
    width = int(nz.sum(axis=1).max(initial=0))
    if nz[:, :width].all() or width == 0:
        return keys[:, :width], weights[:, :width]
    order = np.argsort(~nz, axis=1, kind="stable")
    keys = np.take_along_axis(keys, order, axis=1)[:, :width]
    weights = np.take_along_axis(weights, order, axis=1)[:, :width]
    return keys, weights
