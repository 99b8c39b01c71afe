"""The online FM: profiles, mini-batch training with sampled negatives, scoring, vectors.

Typical use (the trainer)::

    fm = OnlineFM(FeatureSchema.load("config/movielens.toml"), TrainConfig())
    fm.upsert_users(["196"], [{"gender": "M", "age": 49, "occupation": "writer"}])
    fm.upsert_items(["242"], [{"genres": ["Comedy"], "year": 1997}])
    loss = fm.learn_many(["196"], ["242"], ts=np.array([881250949.0]))
    ids, E_item = fm.item_vectors()           # -> Faiss
    E_user = fm.user_vectors(["196"])         # -> Redis

Not thread-safe: call it from one thread (or under one lock). Torch runs on the calling thread's
intra-op pool; set ``torch.set_num_threads(1)`` at the entry point on small shared machines
(see ``bench/train_throughput.py`` for the measured 1-vs-2 thread numbers).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from model import checks
from model.compose import ContextTable, aggregate, compose_item, compose_user, split_user
from model.errors import ConfigError, FeatureError, InputError
from model.features import (
    PAD,
    Catalog,
    FeatureSpace,
    IdIndex,
    canon,
    ring_newest_first,
    tokenize_column,
)
from model.optim import EPS, RowTable, scratch_unique
from model.sampler import NegativeSampler
from model.schema import FeatureSchema, FieldSpec
from model.step import (
    EntityTerms,
    StepBatch,
    entity_terms,
    gather_sum,
    softmax_step_gradients,
    step_gradients,
)

_CHUNK = 32768  # entities per chunk when composing all item vectors


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the online FM.

    Defaults are chosen on the *validation* period of ``bench/quality.py`` (ml-100k, positives
    60-80%, refreshes every 2,000 positives and every day, schema ``config/movielens.toml``)
    and on the drift scenario of ``bench/drift.py``: a sampled softmax over 512 items drawn per
    step by popularity (``neg_alpha`` 1) with the log-Q correction, steps of 128 events
    (:class:`model.learner.LearnPolicy`) — warm HR@10 on validation 1.29x -> 1.42x popularity
    at 2,000 events, 1.22x -> 1.31x daily, ids only 1.04x -> 1.13x / 1.01x -> 1.16x, one seed,
    against BPR with hard negatives (16 uniform, each the best of 3 candidates, steps of 256),
    at less CPU per event; plain Adagrad for item-side rows (``acc_decay`` 1) and a decay of
    0.98 for user-side rows (drifted users follow their new taste: bench/drift.py).

    Attributes:
        dim: latent factors per feature row.
        lr: row-wise Adagrad learning rate.
        l2: L2 strength, applied once per batch to each row the batch touches.
        loss: ``logistic`` (explicit 0/1 labels + sampled negatives as 0), ``bpr`` or ``hinge``
            (pairwise: each positive against its sampled negatives; label-0 events are skipped),
            or ``softmax``: sampled softmax of each positive against ``negatives`` items drawn
            once per step and shared by all its positives, logits corrected by ``−log q`` (the
            draw probability; :func:`model.step.softmax_step_gradients`); label-0 events are
            skipped and ``neg_candidates`` / ``neg_pool`` do not apply.
        negatives: sampled negatives per positive event (``softmax``: per step, shared).
        neg_sampling: ``uniform`` over known items or ``popularity`` ((count+1)^neg_alpha).
        neg_alpha: popularity exponent (0 = uniform, 1 = proportional).
        seed: seeds row initialisation and negative sampling (training is reproducible on a
            fixed thread count).
        init_std: standard deviation of new latent vectors (first-order weights start at 0).
        hinge_margin: margin of the hinge loss.
        neg_pool: when a batch needs more than this many negatives, it draws a shared pool of
            ``neg_pool`` items (from the same distribution) and picks every negative from it:
            each negative keeps its distribution but a batch touches far fewer distinct items
            (measured +40% events/s at batch 1024, no quality change on MovieLens).
            0 = independent draws.
        step_scaling: ``count`` grows a row's Adagrad accumulator by ``|g|²/n`` for the ``n``
            events behind its summed gradient (a burst moves it ``√n`` further). Measured on
            ml-100k (bench/quality.py validation): helps ids-only at steps of 2,048, hurts the
            MovieLens schema (shared profile rows take huge steps); off by default. Steps of
            a fixed size (:class:`model.learner.LearnPolicy`) are the default remedy.
        acc_decay: each update multiplies a row's Adagrad accumulator by this first
            (RMSprop-like, lazy), so steps stop shrinking towards zero and rows can follow a
            change of taste; 1 = Adagrad. For all rows, < 1 costs ml-100k (0.95: -14%, with
            hard negatives), so it is 1 and user rows get ``user_acc_decay``.
        recent_items: keep each user's last ``recent_items`` positive items in the model (and
            so in its checkpoints) for :meth:`OnlineFM.recent_items`; the trainer uses it to
            rebuild serving's user histories after Redis lost them. 4 bytes per item per user;
            0 (the default) keeps none. Does not change learning.
        neg_candidates: each negative is the highest-scoring of this many sampled candidates
            for the positive's user (dynamic negative sampling, WARP-like hard negatives);
            1 = plain sampling.
        user_acc_decay: ``acc_decay`` for the rows of user-side fields (id, profile, history);
            None = ``acc_decay``. Tastes are what drifts: user rows must keep moving, while
            item rows learn best as plain Adagrad.
        neg_updates: ``softmax`` only: of a step's distinct shared negatives, only this many
            get their item-side gradient (users still learn against all of them), weighted
            ``1 / p`` so the gradient stays unbiased (:func:`model.step.update_subset`); the
            other negatives' rows are not updated by the step at all (less Adagrad work and
            fewer changed item rows per published version). 0 = every negative.
        neg_update_by: how ``neg_updates`` picks: ``mass`` (the default: threshold sampling
            by each negative's softmax mass in the step: the negatives the users confused with
            their positives are always kept) or
            ``uniform`` (k of the distinct negatives; -10% HR at k 64 on ml-100k validation).
    """

    dim: int = 32
    lr: float = 0.05
    l2: float = 1e-5
    loss: Literal["logistic", "bpr", "hinge", "softmax"] = "softmax"
    negatives: int = 512
    neg_sampling: Literal["uniform", "popularity"] = "popularity"
    neg_alpha: float = 1.0
    seed: int = 0
    init_std: float = 0.01
    hinge_margin: float = 1.0
    neg_pool: int = 512
    step_scaling: Literal["none", "count"] = "none"
    acc_decay: float = 1.0
    recent_items: int = 0
    neg_candidates: int = 3
    user_acc_decay: float | None = 0.98
    neg_updates: int = 0
    neg_update_by: Literal["uniform", "mass"] = "mass"

    def __post_init__(self) -> None:
        me = "TrainConfig"
        checks.integer(me, "dim", self.dim, 1)
        checks.finite(me, "lr", self.lr, above=0)
        checks.finite(me, "l2", self.l2, minimum=0)
        checks.choice(me, "loss", self.loss, ("logistic", "bpr", "hinge", "softmax"))
        checks.integer(me, "negatives", self.negatives, 0)
        if self.loss != "logistic" and self.negatives < 1:
            raise ConfigError(f"TrainConfig.negatives must be >= 1 for the loss {self.loss!r}, "
                              f"got {self.negatives!r}")
        checks.choice(me, "neg_sampling", self.neg_sampling, ("uniform", "popularity"))
        checks.finite(me, "neg_alpha", self.neg_alpha, minimum=0)
        checks.integer(me, "seed", self.seed, 0)
        checks.finite(me, "init_std", self.init_std, minimum=0)
        checks.integer(me, "neg_pool", self.neg_pool, 0)
        checks.fraction(me, "acc_decay", self.acc_decay)
        checks.integer(me, "recent_items", self.recent_items, 0)
        checks.integer(me, "neg_candidates", self.neg_candidates, 1)
        checks.fraction(me, "user_acc_decay", self.user_acc_decay, optional=True)
        checks.integer(me, "neg_updates", self.neg_updates, 0)
        if self.neg_updates and self.loss != "softmax":
            raise ConfigError("TrainConfig.neg_updates applies to loss 'softmax' only (0 "
                              f"otherwise), got {self.neg_updates!r}")
        checks.choice(me, "neg_update_by", self.neg_update_by, ("uniform", "mass"))
        checks.choice(me, "step_scaling", self.step_scaling, ("none", "count"))
        checks.finite(me, "hinge_margin", self.hinge_margin, above=0)


@dataclass(frozen=True)
class EventBatch:
    """A validated batch of events from :meth:`OnlineFM.prepare_events`; slice it into steps.

    Attributes:
        user_ids, item_ids: the events' ids as given.
        labels: float32 labels, ts: float64 event times.
        users, items: entity indices known when prepared (-1: unknown then).
        context: token columns of the context fields (None: no context).
        context_keys: their keys as known when prepared (-1: created by the step;
            :meth:`model.features.FeatureSpace.known_keys`), None: encoded by the step.
    """

    user_ids: Sequence[Any]
    item_ids: Sequence[Any]
    labels: np.ndarray
    ts: np.ndarray
    users: np.ndarray
    items: np.ndarray
    context: list[list[Any]] | None
    context_keys: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.size)

    def __getitem__(self, sl: slice) -> EventBatch:
        if not isinstance(sl, slice):
            raise TypeError("EventBatch takes slices only (batch[lo:hi])")
        return EventBatch(
            self.user_ids[sl],
            self.item_ids[sl],
            self.labels[sl],
            self.ts[sl],
            self.users[sl],
            self.items[sl],
            None if self.context is None else [col[sl] for col in self.context],
            None if self.context_keys is None else self.context_keys[sl],
        )


@dataclass(frozen=True)
class RecentSnapshot:
    """Users' recent positive items at one instant (see :meth:`OnlineFM.recent_snapshot`)."""

    user_ids: list[str]
    item_ids: list[str]
    ring: np.ndarray  # (users, recent_items) item entity indices
    count: np.ndarray  # (users,) positives appended per user
    n_positives: int  # positives learned by the model up to this instant

    def histories(self, lo: int, hi: int) -> list[list[str]]:
        """Users ``lo..hi`` (entity order): their recent item ids, newest first."""
        if self.ring.shape[1] == 0:
            return [[] for _ in range(lo, hi)]
        items, m = ring_newest_first(self.ring[lo:hi], self.count[lo:hi])
        ids = self.item_ids
        return [[ids[i] for i in row[:k].tolist()] for row, k in zip(items, m.tolist(),
                                                                       strict=True)]


@dataclass(frozen=True)
class MemoryUse:
    """What the model's arrays hold (see :meth:`OnlineFM.memory_use`); bytes are of capacity."""

    ids: int  # users + items known
    rows_live: int  # parameter rows in use
    rows_capacity: int  # parameter rows allocated
    params_bytes: int  # (w, v) float32 and the row-wise Adagrad state
    scratch_bytes: int  # the row table's dedupe scratch (int32 per row)
    keys_bytes: int  # the feature space's per-key arrays (row, count, field)
    catalog_bytes: int  # the user and item catalogues' arrays (id key, counts, profiles)

    @property
    def arrays_bytes(self) -> int:
        """Every array above together."""
        return self.params_bytes + self.scratch_bytes + self.keys_bytes + self.catalog_bytes


class OnlineFM:
    """One Factorization Machine trained online from mini-batches of events.

    Users and items become *known* when they appear in an event or a profile upsert. Feature
    values get rows as described in :mod:`model.features` (fallback, admission, expiry).
    """

    def __init__(
        self, schema: FeatureSchema | None = None, config: TrainConfig | None = None
    ) -> None:
        self.schema: FeatureSchema = FeatureSchema.ids_only() if schema is None else schema
        self.config: TrainConfig = TrainConfig() if config is None else config
        if not isinstance(self.schema, FeatureSchema):
            raise ConfigError(f"schema must be a FeatureSchema, got {type(schema).__name__}")
        if not isinstance(self.config, TrainConfig):
            raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
        seeds = np.random.SeedSequence(self.config.seed).spawn(2)
        self._table = RowTable(
            self.config.dim, self.config.init_std, np.random.default_rng(seeds[0])
        )
        self._space = FeatureSpace(self.schema, self._table)
        self._users = Catalog("user", self._space)
        self._items = Catalog("item", self._space)
        if self.config.recent_items:
            self._users.keep_recent(self.config.recent_items)
        self._sampler = NegativeSampler(
            self.config.neg_sampling, self.config.neg_alpha, np.random.default_rng(seeds[1])
        )
        self._w0 = 0.0
        self._w0_acc = 0.0
        self.n_updates = 0
        self.n_positives = 0  # positive events learned (replays excluded), checkpointed
        self._side_fields = {
            side: [f.name for f in self.schema.fields_of(side) if f.from_profile]
            for side in ("user", "item", "context")
        }
        self._has_context = bool(self._side_fields["context"])
        self._scratch = np.zeros(1024, dtype=np.int32)  # for _unique
        # the step's gradient function; tests swap in model.step.step_gradients_reference
        self._gradients = step_gradients
        # hard negatives picked inside the step from its entity terms (False: by _negatives,
        # composed separately; the tests compare the two)
        self.fused_pick = True

    # ------------------------------------------------------------------------ profiles
    def upsert_users(
        self, user_ids: Sequence[str], features: Sequence[Mapping[str, Any]], merge: bool = False
    ) -> None:
        """Set user profiles (replace; ``merge=True`` updates only the given fields).

        Fields that are not user fields of the schema are ignored; ``None`` removes a field.
        The whole batch is validated before anything changes.

        Raises:
            FeatureError: a profile value of the wrong type (nothing is changed).
        """
        self._upsert(self._users, "user", user_ids, features, merge)

    def upsert_items(
        self, item_ids: Sequence[str], features: Sequence[Mapping[str, Any]], merge: bool = False
    ) -> None:
        """Set item profiles; same rules as :meth:`upsert_users`."""
        self._upsert(self._items, "item", item_ids, features, merge)

    def clear_user_profiles(self, user_ids: Sequence[str]) -> list[str]:
        """Remove the profile of each known user of ``user_ids`` (a tombstone on the compacted
        profile topic: e.g. an erasure). Each keeps its id row and history and from now on
        scores as a user without a profile; unknown ids are ignored (nothing is created).

        Returns the known ids whose profile was removed, in first-seen order.
        """
        return self._clear(self._users, user_ids)

    def clear_item_profiles(self, item_ids: Sequence[str]) -> list[str]:
        """Remove the profiles of known items; same rules as :meth:`clear_user_profiles`."""
        return self._clear(self._items, item_ids)

    def _clear(self, catalog: Catalog, ids: Sequence[str]) -> list[str]:
        uids = list(dict.fromkeys(u if type(u) is str else canon(u) for u in ids))
        known = [u for u in uids if u in catalog.index]
        if known:
            ents = np.fromiter(map(catalog.index.__getitem__, known), dtype=np.int64,
                               count=len(known))
            self._set_profiles(catalog, ents, np.zeros((len(known), 0), dtype=np.int32),
                               np.zeros((len(known), 0), dtype=np.float32), [{} for _ in known],
                               catalog.n)
        return known

    def _set_profiles(self, catalog: Catalog, ents: np.ndarray, keys: np.ndarray,
                      weights: np.ndarray, raws: list[dict[str, Any]], known: int) -> None:
        """``catalog.set_profiles``; on the item side, an item whose keys or weights changed
        marks the row of its id key written (:meth:`drain_changed_rows`), as expiry marks the
        fallback rows: no parameter moved, but its vector did, and the publisher finds the
        items whose vector changed through the rows they read. Only those items (a repeated
        identical profile marks nothing; items from ``known`` on are new: they ship anyway,
        nothing is marked for them); an item whose id reads a shared row (not admitted
        yet, hashed ids) marks that row, which makes its readers candidates of the next
        version (composed and compared: only those that moved ship)."""
        if catalog is not self._items or not len(ents):
            catalog.set_profiles(ents, keys, weights, raws)
            return
        old = ents < known
        old_k, old_w = catalog.prof_keys[ents[old]], catalog.prof_w[ents[old]]  # copies
        catalog.set_profiles(ents, keys, weights, raws)
        at = ents[old]
        new_k, new_w = catalog.prof_keys[at], catalog.prof_w[at]
        w = old_k.shape[1]  # profiles only widen (0 keys / weights pad them)
        moved = (old_k != new_k[:, :w]).any(axis=1) | (old_w != new_w[:, :w]).any(axis=1)
        moved |= (new_w[:, w:] != 0).any(axis=1)
        if moved.any():
            self._table.mark_dirty(self._space.key_row[catalog.ent_key[at[moved]]])

    def _upsert(
        self,
        catalog: Catalog,
        side: str,
        ids: Sequence[str],
        features: Sequence[Mapping[str, Any]],
        merge: bool,
    ) -> None:
        if len(ids) != len(features):
            raise InputError(f"upsert_{side}s: {len(ids)} ids but {len(features)} feature dicts")
        names = self._side_fields[side]
        final: dict[str, dict[str, Any]] = {}
        for j, (u, feats) in enumerate(zip(ids, features, strict=True)):
            if feats is None:
                feats = {}
            if not isinstance(feats, Mapping):
                raise FeatureError(
                    f"{side} {u!r} (#{j}): expected a mapping of field -> value, got "
                    f"{type(feats).__name__}"
                )
            uid = u if type(u) is str else canon(u)
            given = {k: _plain(feats[k]) for k in names if k in feats}
            if merge:
                base = final.get(uid)
                if base is None:
                    e = catalog.index.get(uid)
                    base = dict(catalog.profiles[e]) if e is not None else {}
                base.update(given)
                given = base
            final[uid] = {k: v for k, v in given.items() if v is not None}
        uids = list(final)
        raws = list(final.values())
        keys, weights = self._space.encode(side, raws, create=True)  # validates first
        known = catalog.n
        ents = catalog.ensure(uids)
        self._set_profiles(catalog, ents, keys.astype(np.int32), weights, raws, known)

    # ------------------------------------------------------------------------ training
    def learn_many(
        self,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        labels: np.ndarray | None = None,
        contexts: Sequence[Mapping[str, Any] | None] | None = None,
        ts: np.ndarray | float | None = None,
    ) -> float:
        """Apply one mini-batch of events; returns the mean loss of the batch.

        Args:
            user_ids, item_ids: the events' ids (unknown ids become known, empty profile).
            labels: 1 = positive, 0 = explicit negative (default all 1). Each positive gets
                ``config.negatives`` sampled negative items.
            contexts: per-event context feature dicts (or None).
            ts: event times in seconds (array or one number; default ``time.time()``);
                they drive admission-free expiry clocks.

        Raises:
            InputError: lengths differ, labels outside [0, 1], non-finite ts.
            FeatureError: a context value of the wrong type (nothing is changed).
        """
        return self.learn_prepared(self.prepare_events(user_ids, item_ids, labels, contexts, ts))

    def prepare_events(
        self,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        labels: np.ndarray | None = None,
        contexts: Sequence[Mapping[str, Any] | None] | None = None,
        ts: np.ndarray | float | None = None,
    ) -> EventBatch:
        """Validate a batch (arguments as :meth:`learn_many`) and resolve what it can now.

        Changes nothing. The result (sliceable: ``batch[lo:hi]``) goes to
        :meth:`learn_prepared`, possibly in several steps: ids are looked up and context values
        tokenised once per batch, not once per step.

        Raises:
            InputError, FeatureError: as :meth:`learn_many` (before anything changes).
        """
        b = len(user_ids)
        if len(item_ids) != b:
            raise InputError(f"learn_many: {b} user ids but {len(item_ids)} item ids")
        if labels is None:
            y = np.ones(b, dtype=np.float32)
        else:
            y = np.asarray(labels, dtype=np.float32).reshape(-1)
            if y.size != b:
                raise InputError(f"learn_many: {b} events but {y.size} labels")
            if not np.all((y >= 0.0) & (y <= 1.0)):
                raise InputError("learn_many: labels must lie in [0, 1] (1 = positive)")
        if ts is None:
            t = np.full(b, time.time(), dtype=np.float64)
        else:
            t = np.broadcast_to(np.asarray(ts, dtype=np.float64), (b,))
            if b and not np.all(np.isfinite(t)):
                raise InputError("learn_many: ts must be finite seconds since the epoch")
        if contexts is not None and len(contexts) != b:
            raise InputError(f"learn_many: {b} events but {len(contexts)} contexts")
        tokens = ckeys = None
        if self._has_context and contexts is not None and b:
            tokens = self._space.tokenize("context", contexts)
            ckeys = self._space.known_keys("context", tokens, b)
        users = self._users.lookup(user_ids)
        items = self._items.lookup(item_ids)
        for cat, ids, ents in ((self._users, user_ids, users), (self._items, item_ids, items)):
            if (ents < 0).any():
                cat.prepare(ids, ents)  # raises FeatureError for a value that is not an id
        return EventBatch(user_ids, item_ids, y, t, users, items, tokens, ckeys)

    def learn_prepared(self, batch: EventBatch) -> float:
        """One optimiser step on a batch from :meth:`prepare_events` (or a slice of one).

        Returns the mean loss. Slices of one prepared batch must be learned in order, each
        once (what :class:`model.learner.Learner` does).
        """
        b = len(batch)
        if b == 0:
            return 0.0
        y, t = batch.labels, batch.ts
        space = self._space
        if batch.context_keys is not None and batch.context is not None:
            ck, cw = space.resolve_keys("context", batch.context_keys, batch.context)
        elif batch.context is not None:
            ck, cw = space.encode_tokens("context", batch.context, True, b)
        else:
            ck, cw = np.zeros((b, 0), dtype=np.int64), np.zeros((b, 0), dtype=np.float32)
        ue, new_users = self._users.prepare(batch.user_ids, batch.users)
        ie, new_items = self._items.prepare(batch.item_ids, batch.items)
        self._users.commit(new_users)
        self._items.commit(new_items)
        uu, u_inv = self._unique(ue)
        ukeys, uw = self._users.keys_of(uu)
        pos = (y >= 0.5).nonzero()[0]
        ipos, upos = ie.take(pos), ue.take(pos)  # the positives' items and users
        np.add.at(self._items.counts, ipos, 1)
        np.add.at(self._users.counts, upos, 1)
        k = self.config.negatives
        if self.config.loss == "softmax":
            neg, valid = self._shared_negatives(k, pos.size)
            pick = 1
        else:
            neg, valid, pick = self._negatives_or_candidates(ukeys, uw, u_inv[pos], ipos, k)
        ii, i_inv = self._unique(np.concatenate([ie, neg.ravel()]))
        ikeys, iw = self._items.keys_of(ii)
        # sightings: every key of every event (entity keys weighted by occurrences); the
        # sampled negatives are not sightings
        i_cnt = np.bincount(i_inv[:b], minlength=ii.size)
        seen = i_cnt.nonzero()[0]

        n_uk, n_ik = ukeys.size, seen.size * ikeys.shape[1]

        def sightings(at: np.ndarray) -> np.ndarray:
            """Sightings of the keys at positions ``at`` below (only needed while some wait):
            a user's keys count its events, an item's its events, a context key 1."""
            got = np.ones(at.size, dtype=np.int64)
            j = (at < n_uk).nonzero()[0]
            if j.size:
                u_cnt = np.bincount(u_inv, minlength=uu.size)
                got[j] = u_cnt.take(at.take(j) // ukeys.shape[1])
            j = ((at >= n_uk) & (at < n_uk + n_ik)).nonzero()[0]
            if j.size:
                got[j] = i_cnt.take(seen.take((at.take(j) - n_uk) // ikeys.shape[1]))
            return got

        space.row_log = [] if pick > 1 else None  # rows the candidates had when drawn
        try:
            now = float(np.maximum.reduce(t))  # = t.max()
            space.observe(
                np.concatenate([ukeys.ravel(), ikeys.take(seen, axis=0).ravel(),
                                ck.ravel()]),
                now,
                sightings,
            )
            space.maybe_expire()
        finally:
            before, space.row_log = space.row_log, None
        if self.config.loss == "softmax":
            loss = self._softmax_step(
                ukeys, uw, u_inv, ikeys, iw, i_inv, y, ck, cw, pos, ipos, valid
            )
        else:
            loss = self._step(ukeys, uw, u_inv, ikeys, iw, i_inv, y, ck, cw, pos, neg, valid,
                              pick=pick, rows_before=before)
        if self._users.hist_fields and pos.size:
            # after the step, so an event never sees its own item in the user's history
            appended = []
            for f in self._users.hist_fields:
                hk = self._items.history_keys(f, ipos)
                self._users.append_history(f, upos, hk)
                appended.append(hk)
            # a click is a sighting
            space.observe(appended[0] if len(appended) == 1 else np.concatenate(appended), now)
        if pos.size:
            self._users.append_recent(upos, ipos)
        self.n_positives += int(pos.size)
        self.n_updates += b
        return loss

    def replay_many(
        self,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        contexts: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> float:
        """One optimiser step on *past* positives (replay); returns the mean loss.

        Unlike :meth:`learn_many` nothing but parameters changes: no positive counts, no
        histories, no sightings or expiry, no new context values (unknown ones use their
        fallback rows). Ids not known yet become known (they normally are).
        """
        b = len(user_ids)
        if len(item_ids) != b:
            raise InputError(f"replay_many: {b} user ids but {len(item_ids)} item ids")
        if contexts is not None and len(contexts) != b:
            raise InputError(f"replay_many: {b} events but {len(contexts)} contexts")
        if b == 0:
            return 0.0
        if self._has_context and contexts is not None:
            ck, cw = self._space.encode("context", contexts, create=False)
        else:
            ck, cw = np.zeros((b, 0), dtype=np.int64), np.zeros((b, 0), dtype=np.float32)
        ue, new_users = self._users.prepare(user_ids)
        ie, new_items = self._items.prepare(item_ids)
        self._users.commit(new_users)
        self._items.commit(new_items)
        uu, u_inv = self._unique(ue)
        ukeys, uw = self._users.keys_of(uu)
        pos = np.arange(b)
        if self.config.loss == "softmax":
            neg, valid = self._shared_negatives(self.config.negatives, b)
            pick = 1
        else:
            neg, valid, pick = self._negatives_or_candidates(ukeys, uw, u_inv, ie,
                                                             self.config.negatives)
        ii, i_inv = self._unique(np.concatenate([ie, neg.ravel()]))
        ikeys, iw = self._items.keys_of(ii)
        y = np.ones(b, dtype=np.float32)
        if self.config.loss == "softmax":
            return self._softmax_step(ukeys, uw, u_inv, ikeys, iw, i_inv, y, ck, cw, pos, ie, valid)
        return self._step(ukeys, uw, u_inv, ikeys, iw, i_inv, y, ck, cw, pos, neg, valid,
                          pick=pick)

    def _negatives_or_candidates(
        self, ukeys: np.ndarray, uw: np.ndarray, owner: np.ndarray, positives: np.ndarray,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """What a step's negatives come from: ``(neg, valid, pick)``.

        Hard negatives (``neg_candidates = m > 1``) with :attr:`fused_pick` on: the sampler's
        ``k·m`` candidates per positive and ``pick = m``; :meth:`_step` keeps the best of
        each ``m`` using the entity terms it computes anyway (nothing composed twice). Otherwise
        :meth:`_negatives` (``pick = 1``).
        """
        m = self.config.neg_candidates
        if m > 1 and self.fused_pick:
            neg, valid = self._sampler.sample(
                self._items.counts, self._items.n, positives, k * m, self.config.neg_pool
            )
            return neg, valid, m
        neg, valid = self._negatives(ukeys, uw, owner, positives, k)
        return neg, valid, 1

    def _negatives(
        self,
        ukeys: np.ndarray,
        uw: np.ndarray,
        owner: np.ndarray,
        positives: np.ndarray,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``k`` negatives per positive (``owner``: each positive's row in ``ukeys``).

        With ``config.neg_candidates = m > 1`` it draws ``k·m`` candidates from the sampler
        and keeps, of each group of ``m``, the one the current model scores highest for the
        positive's user (``<E_user, E_item>``, context left out): dynamic negative sampling,
        a cheap WARP-like hard negative.
        """
        m = self.config.neg_candidates
        counts, n = self._items.counts, self._items.n
        neg, valid = self._sampler.sample(counts, n, positives, k * m, self.config.neg_pool)
        if m == 1 or neg.size == 0:
            return neg, valid
        b = positives.size
        # <E_user, E_item> = (W_u + cross_u) + a_i + <V_u, V_i>: the user's own term is the same
        # for all of a positive's candidates, so the argmax needs only a_i + <V_u, V_i>
        # (float32, composed once per unique user / candidate, scored per candidate only)
        cand, c_inv = self._unique(neg)
        a_c, v_c = self._terms32(*self._items.keys_of(cand), with_a=True)
        _, v_u = self._terms32(ukeys, uw, with_a=False)
        c_inv = c_inv.reshape(b, k * m)
        gathered = v_c.take(c_inv, axis=0)  # (b, k·m, d)
        scores = np.matmul(gathered, v_u.take(owner, axis=0)[:, :, None])[..., 0]
        scores += a_c.take(c_inv)
        best = np.argmax(scores.reshape(b, k, m), axis=2).ravel()
        sel = np.arange(b * k, dtype=np.int64) * m + best
        neg = neg.take(sel).reshape(b, k)
        valid = valid.take(sel).reshape(b, k)
        return neg, valid

    def _shared_negatives(self, m: int, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
        """``(1, m)`` item entities drawn once for a step's ``n_pos`` positives (the sampled
        softmax's shared set) and their log draw probabilities ``(1, m)`` (float32)."""
        if n_pos == 0 or self._items.n < 2:
            return np.zeros((1, 0), dtype=np.int64), np.zeros((1, 0), dtype=np.float32)
        items, logq = self._sampler.draw_shared(self._items.counts, self._items.n, m, n_pos)
        return items.reshape(1, -1), logq.reshape(1, -1)

    def _softmax_step(
        self,
        ukeys: np.ndarray,
        uw: np.ndarray,
        u_inv: np.ndarray,
        ikeys: np.ndarray,
        iw: np.ndarray,
        i_inv: np.ndarray,
        y: np.ndarray,
        ck: np.ndarray,
        cw: np.ndarray,
        pos: np.ndarray,
        pos_items: np.ndarray,
        logq: np.ndarray,
    ) -> float:
        """One optimiser step of the sampled softmax (``config.loss == "softmax"``): the step's
        positives (catalogue entities ``pos_items``) against the shared items that follow the
        events' items in ``i_inv``, with log draw probabilities ``logq`` ``(1, M)`` (arguments
        otherwise as :meth:`_step`)."""
        cfg = self.config
        b = y.size
        if pos.size == 0:
            return 0.0
        nu, ni, nc, m, keys, x, live, indptr, uniq, cols, vals = self._slots(
            ukeys, uw, ikeys, iw, ck, cw, b
        )
        ev_fixed = np.empty((pos.size, 2 if nc else 1), dtype=np.int64)
        ev_fixed[:, 0] = u_inv.take(pos)
        if nc:
            ev_fixed[:, 1] = pos
            ev_fixed[:, 1] += nu + ni
        empty = np.zeros((0, 0), dtype=np.int64)
        batch = StepBatch(
            indptr=indptr,
            cols=cols,
            x=x,
            ev_fixed=ev_fixed,
            ev_item=i_inv.take(pos) + nu,
            labels=y.take(pos),
            neg_owner=np.zeros(0, dtype=np.int64),
            neg_item=empty,
            neg_valid=empty.astype(bool),
        )
        shared = nu + i_inv[b:]
        subset = {} if not cfg.neg_updates else {
            "neg_updates": cfg.neg_updates, "neg_update_by": cfg.neg_update_by,
            "rng": self._sampler.rng, "keep": i_inv[:b] + nu,  # every event's item
        }
        res = softmax_step_gradients(
            vals, batch, shared, logq.ravel(), self._sampler.log_prob(pos_items, self._items.n),
            check=False,  # indices made here from the step's own unique rows and entities
            **subset,
        )
        if res.count == 0:
            return 0.0
        decay: float | np.ndarray = cfg.acc_decay
        if cfg.user_acc_decay is not None and cfg.user_acc_decay != cfg.acc_decay:
            decay = np.empty(uniq.size, dtype=np.float32)
            decay.fill(cfg.acc_decay)
            decay[cols[: int(indptr[nu])]] = cfg.user_acc_decay  # the users' slots come first
        grad = res.grad
        if res.rows is not None:
            # rows read only by negatives left out of the update: not updated at all (no L2,
            # no accumulator decay, not changed for the publisher), as if never sampled
            keep = res.rows
            uniq, vals, grad = uniq.take(keep), vals.take(keep, axis=0), grad.take(keep, axis=0)
            if np.ndim(decay):
                decay = decay.take(keep)
        self._table.adagrad_step(uniq, vals, grad, cfg.lr, cfg.l2, None, decay)
        return res.loss / res.count

    def _terms32(
        self, keys: np.ndarray, weights: np.ndarray, with_a: bool
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """Float32 ``(a, V)`` of entities from their ``(n, L)`` keys and weights.

        ``V = Σ x v`` ``(n, d)`` and, when ``with_a``, ``a = W + ½(|V|² − Σ x²|v|²)`` ``(n,)``
        (``E_item = [a, 1, V]``); the same sums as :func:`model.compose.aggregate`, in float32
        over the live slots only (one compiled CSR gather).
        """
        n = keys.shape[0]
        live = keys != PAD
        rows = self._space.key_row.take(keys[live])
        x = weights[live].astype(np.float32, copy=False)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.count_nonzero(live, axis=1), out=indptr[1:])
        params = self._table.params
        agg = gather_sum(indptr, rows, x, params)  # [Σ x w | Σ x v]
        vec = agg[:, 1:]
        if not with_a:
            return None, vec
        v = params.take(rows, axis=0)[:, 1:]
        sq = np.einsum("rd,rd->r", v, v) * (x * x)
        ent_of = np.repeat(np.arange(n), np.diff(indptr))
        s2 = np.bincount(ent_of, weights=sq, minlength=n).astype(np.float32)
        a = agg[:, 0] + np.float32(0.5) * (np.einsum("nd,nd->n", vec, vec) - s2)
        return a, vec

    def _step(
        self,
        ukeys: np.ndarray,
        uw: np.ndarray,
        u_inv: np.ndarray,
        ikeys: np.ndarray,
        iw: np.ndarray,
        i_inv: np.ndarray,
        y: np.ndarray,
        ck: np.ndarray,
        cw: np.ndarray,
        pos: np.ndarray,
        neg: np.ndarray,
        valid: np.ndarray,
        *,
        pick: int = 1,
        rows_before: list[tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> float:
        """One optimiser step on the events and their sampled negatives.

        Two levels, both O(k·n): per unique entity (and per event context) ``[W − ½Σx²|v|², V]``
        from its feature rows, then per example the FM over its 2-3 entity terms:
        ``y = w0 + Σ_s q_s + ½|Σ_s V_s|²``; gradients in closed form (:mod:`model.step`).

        ``pick = m > 1``: ``neg`` holds ``k·m`` candidates per positive (``i_inv`` numbers them
        among the items); each group of ``m`` keeps the one with the highest
        ``<E_user, E_item>`` (context left out, as :meth:`_negatives`), scored from this step's
        entity terms. Rows that only unpicked candidates read are not updated (no L2, no
        Adagrad state change): the step equals one on the picked negatives alone.
        ``rows_before``: ``(keys, rows)`` of keys whose row changed since the candidates were
        drawn (admission, expiry: :attr:`FeatureSpace.row_log`); entities reading them are
        scored with those rows, as :meth:`_negatives` would have scored them then.
        """
        cfg = self.config
        b = y.size
        k = neg.shape[1] // pick
        nu, ni, nc, m, keys, x, live, indptr, uniq, cols, vals = self._slots(
            ukeys, uw, ikeys, iw, ck, cw, b
        )

        # examples: logistic = every event (+ negatives of the positives); pairwise = positives
        ctx_ent = nu + ni + np.arange(b) if nc else None
        ev = np.arange(b) if cfg.loss == "logistic" else pos
        fixed = [u_inv[ev]] + ([ctx_ent[ev]] if nc else [])
        neg_item = nu + i_inv[b:].reshape(pos.size, k * pick)
        terms = None
        if pick > 1:
            terms = entity_terms(vals, indptr, cols, x)
            scored = terms
            if rows_before:
                scored = self._terms_before(terms, keys[live], indptr, x, uniq[cols],
                                            rows_before)
            neg_item, valid = _pick_best(scored, u_inv[pos], neg_item, valid, k, pick)
        batch = StepBatch(
            indptr=indptr,
            cols=cols,
            x=x,
            ev_fixed=np.stack(fixed, axis=1),
            ev_item=nu + i_inv[:b][ev],
            labels=y[ev],
            neg_owner=pos if cfg.loss == "logistic" else np.arange(pos.size),
            neg_item=neg_item,
            neg_valid=valid,
        )
        res = self._gradients(vals, self._w0, batch, cfg.loss, cfg.hinge_margin, terms=terms)
        if res.count == 0:
            return 0.0
        grad = res.grad
        counts = None
        if cfg.step_scaling == "count":
            # events behind each row: an entity counts its events (a sampled negative 1/k)
            ent_n = np.bincount(batch.ev_fixed.ravel(), minlength=m).astype(np.float64)
            ent_n += np.bincount(batch.ev_item, minlength=m)
            ent_n += np.bincount(batch.neg_item[valid], minlength=m) / max(k, 1)
            slot_n = np.repeat(ent_n, np.diff(indptr)) * (x != 0)
            counts = np.bincount(cols, weights=slot_n, minlength=uniq.size)
        decay: float | np.ndarray = cfg.acc_decay
        if cfg.user_acc_decay is not None and cfg.user_acc_decay != cfg.acc_decay:
            decay = np.full(uniq.size, cfg.acc_decay, dtype=np.float32)
            decay[cols[: int(np.count_nonzero(live[: ukeys.size]))]] = cfg.user_acc_decay
        if terms is not None:  # rows of unpicked candidates only: not part of this step
            used = np.ones(m, dtype=bool)
            used[nu : nu + ni] = False
            used[nu + i_inv[:b]] = True
            used[batch.neg_item.ravel()] = True
            row_used = np.zeros(uniq.size, dtype=bool)
            row_used[cols[used[terms.ent_of]]] = True
            if not row_used.all():
                keep = np.flatnonzero(row_used)
                uniq, vals, grad = uniq[keep], vals[keep], grad[keep]
                if counts is not None:
                    counts = counts[keep]
                if np.ndim(decay):
                    decay = np.asarray(decay)[keep]
        self._table.adagrad_step(uniq, vals, grad, cfg.lr, cfg.l2, counts, decay)
        g0 = res.g0
        self._w0_acc += g0 * g0
        self._w0 -= cfg.lr * g0 / (math.sqrt(self._w0_acc) + EPS)
        return res.loss / res.count

    def _terms_before(
        self,
        terms: EntityTerms,
        slot_keys: np.ndarray,
        indptr: np.ndarray,
        x: np.ndarray,
        slot_rows: np.ndarray,
        rows_before: list[tuple[np.ndarray, np.ndarray]],
    ) -> EntityTerms:
        """``terms`` with the entities that read a key of ``rows_before`` recomposed from the
        rows those keys had before (the first logged row of each key)."""
        if len(rows_before) == 1:  # one admission or one sweep: keys unique and ascending
            changed, old = rows_before[0]
        else:
            changed = np.concatenate([k for k, _ in rows_before]).astype(np.int64)
            old = np.concatenate([r for _, r in rows_before])
            changed, first = np.unique(changed, return_index=True)  # the earliest log wins
            old = old[first]
        mark = np.zeros(self._space.n_keys, dtype=bool)  # O(slots + keys), no sort
        mark[changed] = True
        hit = mark.take(slot_keys)
        if not hit.any():
            return terms
        ents = np.unique(terms.ent_of[hit])
        lo, hi = indptr[ents], indptr[ents + 1]
        n_slots = hi - lo
        sub_ptr = np.zeros(ents.size + 1, dtype=np.int64)
        np.cumsum(n_slots, out=sub_ptr[1:])
        slots = np.repeat(lo - sub_ptr[:-1], n_slots) + np.arange(sub_ptr[-1])
        rows = slot_rows[slots].astype(np.int64)
        was = hit[slots]
        rows[was] = old[np.searchsorted(changed, slot_keys[slots][was])]
        sub = entity_terms(self._table.params.take(rows, axis=0), sub_ptr,
                           np.arange(rows.size), x[slots])
        V, a = terms.V.copy(), terms.a.copy()
        V[ents] = sub.V
        a[ents] = sub.a
        return EntityTerms(terms.ent_of, terms.q, V, a)

    def _slots(
        self, ukeys: np.ndarray, uw: np.ndarray, ikeys: np.ndarray, iw: np.ndarray,
        ck: np.ndarray, cw: np.ndarray, b: int,
    ) -> tuple:
        """A step's entities (users, items, per-event contexts) as one sparse slot matrix:
        ``(nu, ni, nc, m, keys, x, live, indptr, uniq, cols, vals)``, rows gathered once."""
        nu, ni, nc = ukeys.shape[0], ikeys.shape[0], (b if ck.shape[1] else 0)
        m = nu + ni + nc
        parts_k = [ukeys, ikeys] + ([ck] if nc else [])
        parts_w = [uw, iw] + ([cw] if nc else [])
        keys = np.concatenate([p.ravel() for p in parts_k])
        x = np.concatenate([p.ravel() for p in parts_w])
        live = keys != PAD
        # indptr[e + 1] = live slots up to the end of entity e: the running count of live
        # slots read at each entity's last slot (entities are consecutive rows of the parts)
        ends = np.empty(m, dtype=np.int64)
        lo = at = 0
        for p in parts_k:
            n_ent, width = p.shape
            ends[at : at + n_ent] = np.arange(lo + width - 1, lo + n_ent * width, width)
            lo += n_ent * width
            at += n_ent
        indptr = np.empty(m + 1, dtype=np.int64)
        indptr[0] = 0
        live_run = live.cumsum(dtype=np.int64)
        live_run.take(ends, out=indptr[1:])
        at = live.nonzero()[0]
        uniq, cols = self._table.unique(self._space.key_row.take(keys.take(at)))
        x = x.take(at)
        vals = self._table.params.take(uniq, axis=0)  # (2-4x faster than params[uniq])
        return nu, ni, nc, m, keys, x, live, indptr, uniq, cols, vals

    def _unique(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(uniq, inverse)`` of user or item entity indices, O(n) (:func:`scratch_unique`)."""
        need = max(self._users.n, self._items.n)
        if self._scratch.size < need:
            self._scratch = np.zeros(max(need, 2 * self._scratch.size), dtype=np.int32)
        return scratch_unique(values, self._scratch)

    def expire(self, now: float | None = None) -> int:
        """Sweep expired values now (``learn_many`` also sweeps on its own); rows freed."""
        return self._space.expire(self._space.watermark if now is None else float(now))

    # ------------------------------------------------------------------------ scoring
    def _rows_params(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = self._space.key_row[keys]
        p = self._table.params[rows]
        return p[..., 0], p[..., 1:]

    def _side(
        self, keys: np.ndarray, weights: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w, v = self._rows_params(keys)
        return aggregate(w, v, weights)

    def _context_terms(
        self, contexts: Sequence[Mapping[str, Any] | None] | None, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        d = self.config.dim
        if not self._has_context or contexts is None:
            return np.zeros(n), np.zeros((n, d))
        if len(contexts) != n:
            raise InputError(f"{n} pairs but {len(contexts)} contexts")
        ck, cw = self._space.encode("context", contexts, create=False)
        if ck.shape[1] == 0:
            return np.zeros(n), np.zeros((n, d))
        lin, cross, vec = self._side(ck, cw)
        return lin + cross, vec

    def score(
        self,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        contexts: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> np.ndarray:
        """Full FM logits (with ``w0`` and context) of ``(user_ids[j], item_ids[j])`` pairs.

        Never mutates the model: unknown ids and values use their fallback rows.
        """
        n = len(user_ids)
        if len(item_ids) != n:
            raise InputError(f"score: {n} user ids but {len(item_ids)} item ids")
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        uk, uw = self._users.keys_of_ids(user_ids)
        ik, iw = self._items.keys_of_ids(item_ids)
        lu, cu, vu = self._side(uk, uw)
        li, ci, vi = self._side(ik, iw)
        lc, vc = self._context_terms(contexts, n)
        y = (
            self._w0
            + lu
            + cu
            + li
            + ci
            + lc
            + np.einsum("nd,nd->n", vu, vi)
            + np.einsum("nd,nd->n", vu + vi, vc)
        )
        return y.astype(np.float32)

    def user_vectors(self, user_ids: Sequence[str]) -> np.ndarray:
        """``E_user = [1, W_u + cross_u, V_u]`` float32 ``(n, dim + 2)``.

        An unknown id gets the id fallback row (or its hash bucket) and no profile; a user
        known only from a profile gets the fallback id row plus its profile rows (cold start).
        """
        if len(user_ids) == 0:
            return np.zeros((0, self.config.dim + 2), dtype=np.float32)
        keys, weights = self._users.keys_of_ids(user_ids)
        return compose_user(*self._side(keys, weights))

    def user_parts(
        self, user_ids: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each user's vector split into what only it owns and the shared rows it reads.

        Returns ``(own, keys, weights)``: ``own`` float32 ``(n, dim + 2)`` from the user's own
        id row (see :func:`model.compose.split_user`; zeros when the id has no row of its own:
        not admitted, hashed or unknown); ``keys`` int64 ``(n, L)`` the shared keys (profile
        values, history items, the id's fallback or hash bucket; 0 pads) and ``weights``
        float32 ``(n, L)``. ``compose_user_parts(own, *shared_params(keys), weights)`` equals
        :meth:`user_vectors`: a server holding the shared rows composes any user's exact vector,
        so a shared row that changes needs no user rewritten.
        """
        d = self.config.dim
        if len(user_ids) == 0:
            return (np.zeros((0, d + 2), np.float32), np.zeros((0, 0), np.int64),
                    np.zeros((0, 0), np.float32))
        keys, weights = self._users.keys_of_ids(user_ids)
        own_part, shared_k, shared_w, _ = self._split_parts(self._users, keys, weights)
        return own_part, shared_k, shared_w

    def _split_parts(
        self, catalog: Catalog, keys: np.ndarray, weights: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(own, shared_keys, shared_weights, own_row)`` of entities of ``catalog`` reading
        ``keys`` / ``weights`` (see :meth:`user_parts`); ``own_row`` int64: the parameter row
        of the entity's own id row, -1 when it has none."""
        space = self._space
        id_field = catalog.id_field
        rows = space.key_row[keys]
        own = np.zeros(keys.shape, dtype=bool)
        own_row = np.full(keys.shape[0], -1, dtype=np.int64)
        if not space.specs[id_field].hash_buckets and keys.shape[0]:
            first = keys[:, 0]
            own[:, 0] = (first >= space.first_dynamic_key) & (
                rows[:, 0] >= space.first_dynamic_row
            ) & (space.key_field[first] == id_field)
            # an id without a row of its own reads its field's fallback row: share that key
            fb = int(space.fallback_key[id_field])
            keys[:, 0] = np.where(own[:, 0] | (first == PAD), first, fb)
            own_row = np.where(own[:, 0], rows[:, 0], -1).astype(np.int64)
        p = self._table.params[rows]
        own_part = split_user(p[..., 0], p[..., 1:], weights, own)
        shared_w = np.where(own, 0.0, weights).astype(np.float32)
        shared_k = np.where(own, PAD, keys)
        return own_part, shared_k, shared_w, own_row

    def item_parts_at(
        self, ents: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`user_parts` for the items at catalogue positions ``ents``, plus their own row.

        Returns ``(own, keys, weights, own_row)``: ``own`` float32 ``(n, dim + 2)`` from the
        item's own id row (:func:`model.compose.split_item`), ``keys`` / ``weights`` the shared
        keys it reads (``(n, L)``, 0 pads), ``own_row`` int64 the parameter row of its own id
        row (-1: none). ``compose_item_parts(own, *shared_params(keys), weights)`` equals
        :meth:`item_vectors_at` to float32 rounding.
        """
        ents = np.asarray(ents, dtype=np.int64)
        keys, weights = self._items.keys_of(ents)
        return self._split_parts(self._items, keys, weights)

    def item_own_rows(self, ents: np.ndarray) -> np.ndarray:
        """The parameter row of each item's own id row (int64, -1: none) — the cheap part of
        :meth:`item_parts_at` (finds the items whose own row a step wrote)."""
        space = self._space
        items = self._items
        ents = np.asarray(ents, dtype=np.int64)
        key = items.ent_key[ents].astype(np.int64)
        if space.specs[items.id_field].hash_buckets:
            return np.full(ents.size, -1, dtype=np.int64)
        rows = space.key_row[key].astype(np.int64)
        own = (key >= space.first_dynamic_key) & (rows >= space.first_dynamic_row) & (
            space.key_field[key] == items.id_field
        )
        return np.where(own, rows, -1)

    def item_keys_at(self, ents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(keys, weights)`` every item at catalogue positions ``ents`` reads (its id key
        first, then its profile; int64 / float32 ``(n, L)``): a reader compares them with what
        it last shipped to find items whose features changed."""
        return self._items.keys_of(np.asarray(ents, dtype=np.int64))

    def item_shared_keys_from(self, start: int) -> tuple[np.ndarray, int]:
        """:meth:`user_shared_keys_from` for the item side: every key an item vector may read
        besides items' own id keys (profile values, the id fallback or hash buckets)."""
        return self._shared_keys_from("item", self._items, start)

    def user_shared_keys(self) -> np.ndarray:
        """Every key a user vector may read besides users' own id keys (ascending, int64).

        Profile and history values of the user side, the id fallback (or the id hash buckets).
        Keys only ever get added, with higher numbers: a later call extends an earlier one.
        """
        return self.user_shared_keys_from(0)[0]

    def user_shared_keys_from(self, start: int) -> tuple[np.ndarray, int]:
        """The :meth:`user_shared_keys` numbered ``start`` or above, and the key count now
        (pass it as the next ``start``: keys only get added, so a caller extends what it has
        with work proportional to the new keys)."""
        return self._shared_keys_from("user", self._users, start)

    def _shared_keys_from(
        self, side: str, catalog: Catalog, start: int
    ) -> tuple[np.ndarray, int]:
        space = self._space
        n = space.n_keys
        start = max(int(start), 0)
        if start >= n:
            return np.zeros(0, dtype=np.int64), n
        fields = [i for i, f in enumerate(space.specs) if f.side == side]
        keys = np.arange(start, n, dtype=np.int64)
        kf = space.key_field[start:n]
        mask = np.isin(kf, fields) & (keys != PAD)
        id_field = catalog.id_field
        if not space.specs[id_field].hash_buckets:
            mask &= ~((kf == id_field) & (keys >= space.first_dynamic_key))
        return keys[mask], n

    def shared_params(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(w, v)`` of the rows ``keys`` read now: float32 ``keys.shape`` and ``(..., dim)``."""
        keys = np.asarray(keys, dtype=np.int64)
        p = self._table.params[self._space.key_row[keys]]
        return p[..., 0], p[..., 1:]

    def key_rows(self, keys: np.ndarray) -> np.ndarray:
        """The parameter row each key reads now (int64)."""
        return self._space.key_row[np.asarray(keys, dtype=np.int64)].astype(np.int64)

    def drain_changed_rows(self) -> np.ndarray:
        """Bool mask over parameter rows: True where a row was written since the last call.

        One consumer (the publisher) drains it; whatever reads a True row changed.
        """
        table = self._table
        mask = np.zeros(table.n_rows, dtype=bool)
        mask[table.drain_dirty()] = True
        return mask

    def drain_expired_users(self) -> list[str]:
        """Users whose own id row expired since the last call (their vector now reads the id
        fallback row: a published record of theirs is stale). One consumer drains it."""
        space = self._space
        if not space.expired_user_keys:
            return []
        dead = np.unique(np.concatenate(space.expired_user_keys))
        space.expired_user_keys = []
        us = self._users
        ents = np.flatnonzero(np.isin(us.ent_key[: us.n], dead))
        return [us.ids[e] for e in ents.tolist()]

    def items_reading(self, changed_rows: np.ndarray) -> list[str]:
        """Ids of the known items whose vector reads any row marked in ``changed_rows``.

        Vectorised over the catalogue's key matrix (a gather and an any per item, no vector
        composed), so finding the changed items of a tick costs far less than composing them.
        """
        return self.item_ids_of(self.item_entities_reading(changed_rows))

    def item_entities_reading(self, changed_rows: np.ndarray) -> np.ndarray:
        """Catalogue positions (int64, ascending) of the items reading a row in ``changed_rows``.

        Positions are stable: an item keeps its position for the model's life (the catalogue
        only grows), so they name rows of any index built in catalogue order.
        """
        n = self._items.n
        if n == 0 or not changed_rows.any():
            return np.zeros(0, dtype=np.int64)
        if changed_rows.size < self._table.n_rows:  # rows added since the mask was drained
            grown = np.ones(self._table.n_rows, dtype=bool)
            grown[: changed_rows.size] = changed_rows
            changed_rows = grown
        hits = []
        for lo in range(0, n, _CHUNK):
            ents = np.arange(lo, min(n, lo + _CHUNK))
            keys, weights = self._items.keys_of(ents)
            rows = self._space.key_row[keys]
            hit = (changed_rows[rows] & (weights != 0)).any(axis=1)
            hits.append(ents[hit])
        return np.concatenate(hits).astype(np.int64, copy=False)

    def item_ids_of(self, ents: np.ndarray) -> list[str]:
        """Ids of the items at catalogue positions ``ents``."""
        ids = self._items.ids
        return [ids[e] for e in np.asarray(ents, dtype=np.int64).tolist()]

    def item_rows_at(self, ents: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(w, v, x)`` of the items at catalogue positions ``ents``: copies of the rows they
        read, ``(n, L)``, ``(n, L, dim)``, ``(n, L)``. ``compose_item(*aggregate(w, v, x))`` is
        :meth:`item_vectors_at`; a reader gathers under a lock and composes after it."""
        keys, weights = self._items.keys_of(np.asarray(ents, dtype=np.int64))
        w, v = self._rows_params(keys)
        return w, v, weights

    def item_vectors_at(self, ents: np.ndarray) -> np.ndarray:
        """``E_item`` float32 ``(len(ents), dim + 2)`` of the items at catalogue positions
        ``ents`` (the same vectors :meth:`item_vectors` composes, without id lookups)."""
        ents = np.asarray(ents, dtype=np.int64)
        out = np.empty((ents.size, self.config.dim + 2), dtype=np.float32)
        for lo in range(0, ents.size, _CHUNK):
            part = ents[lo : lo + _CHUNK]
            keys, weights = self._items.keys_of(part)
            out[lo : lo + part.size] = compose_item(*self._side(keys, weights))
        return out

    def item_vectors(self, item_ids: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
        """``(ids, E_item)`` for the given ids, or for every known item (catalog order)."""
        d2 = self.config.dim + 2
        if item_ids is not None:
            ids = [u if type(u) is str else canon(u) for u in item_ids]
            if not ids:
                return ids, np.zeros((0, d2), dtype=np.float32)
            keys, weights = self._items.keys_of_ids(ids)
            return ids, compose_item(*self._side(keys, weights))
        n = self._items.n
        out = np.empty((n, d2), dtype=np.float32)
        for lo in range(0, n, _CHUNK):
            ents = np.arange(lo, min(n, lo + _CHUNK))
            keys, weights = self._items.keys_of(ents)
            out[lo : lo + ents.size] = compose_item(*self._side(keys, weights))
        return list(self._items.ids), out

    def context_table(self) -> ContextTable:
        """Snapshot of the context fields (rows copied) for serving workers."""
        space = self._space
        ctx = [(i, f) for i, f in enumerate(space.specs) if f.side == "context"]
        rows: list[int] = [PAD]
        vocabs: list[dict[str, int] | None] = []
        fallback: list[int] = []
        base: list[int] = []
        for i, spec in ctx:
            if spec.has_fixed_rows:
                base.append(len(rows))
                fallback.append(-1)
                vocabs.append(None)
                first = int(space.base_key[i])
                rows.extend(space.key_row[first : first + spec.n_fixed_rows].tolist())
            else:
                base.append(-1)
                fallback.append(len(rows))
                rows.append(int(space.key_row[space.fallback_key[i]]))
                vocab = space.vocab[i] or {}
                local: dict[str, int] = {}
                for value, key in vocab.items():
                    local[value] = len(rows)
                    rows.append(int(space.key_row[key]))
                vocabs.append(local)
        p = self._table.params[np.asarray(rows, dtype=np.int64)]
        return ContextTable(
            fields=tuple(f for _, f in ctx),
            dim=self.config.dim,
            vocabs=vocabs,
            fallback=fallback,
            base=base,
            w=p[:, 0].copy(),
            v=p[:, 1:].copy(),
        )

    def id_rows_at(self, side: Literal["user", "item"], ents: np.ndarray) -> np.ndarray:
        """The parameter row each user (or item) at catalogue positions ``ents`` reads for its
        id key now (int64): its own row, or the fallback / hash-bucket row it shares."""
        catalog = self._users if side == "user" else self._items
        keys = catalog.ent_key[np.asarray(ents, dtype=np.int64)]
        return self._space.key_row[keys].astype(np.int64)

    def memory_use(self) -> MemoryUse:
        """Ids known, parameter rows used and allocated, and the bytes each array family holds."""
        table = self._table
        params = int(table.params.nbytes + table.acc.nbytes)
        return MemoryUse(
            ids=self._users.n + self._items.n, rows_live=table.n_live,
            rows_capacity=table.capacity, params_bytes=params,
            scratch_bytes=table.nbytes() - params, keys_bytes=int(self._space.nbytes()),
            catalog_bytes=int(self._users.nbytes() + self._items.nbytes()),
        )

    @property
    def params(self) -> np.ndarray:
        """The parameter table, float32 ``(capacity, dim + 1)`` (``w`` then ``v`` per row), as a
        read-only view: rows change only through learning. A later growth of the table makes a
        new array; read the property again after learning."""
        view = self._table.params.view()
        view.flags.writeable = False
        return view

    @property
    def n_rows(self) -> int:
        """Parameter rows handed out so far: ``params[:n_rows]`` holds every row in use (rows
        freed by expiry inside it are handed out again first); the rest is spare capacity."""
        return self._table.n_rows

    def _field(self, field: str) -> tuple[int, FieldSpec]:
        i = self._space.index_of.get(field)
        if i is None:
            raise FeatureError(f"no field {field!r} in the schema (fields: "
                               f"{', '.join(s.name for s in self._space.specs)})")
        return i, self._space.specs[i]

    def fallback_row(self, field: str) -> int:
        """The row of :attr:`params` that every value of a vocabulary field (an id field, or a
        categorical field without hashing) reads until it is admitted to a row of its own.

        Raises:
            FeatureError: no such field, or a field of fixed rows (hashed, numeric): no fallback.
        """
        i, spec = self._field(field)
        if self._space.fallback_key[i] < 0:
            raise FeatureError(f"field {field!r} has fixed rows ({spec.kind}, hash buckets "
                               f"{spec.hash_buckets}): no fallback row")
        return int(self._space.fallback_row[i])

    def feature_row(self, field: str, value: Any) -> int:
        """The row of :attr:`params` that one value of a categorical or numeric profile or
        context field reads now: its own row once admitted, else the field's fallback row
        (hashed and numeric fields: the value's fixed row). Like scoring, creates nothing.

        Raises:
            FeatureError: no such field, an id, multi-valued or history field, or a value of
                the wrong type for the field.
        """
        i, spec = self._field(field)
        if spec.is_id or spec.kind not in ("categorical", "numeric") or value is None:
            got = ("no value" if value is None else "an id field" if spec.is_id
                   else f"a {spec.kind} field")
            raise FeatureError(f"feature_row reads one value of a categorical or numeric "
                               f"field; got {got} ({field!r})")
        keys, _ = self._space.map_tokens(i, tokenize_column(spec, [value]), create=False)
        return int(self._space.key_row[keys[0, 0]])

    # ------------------------------------------------------------------------ catalog
    @property
    def bias(self) -> float:
        """The global bias ``w0`` (left out of the composed vectors)."""
        return float(self._w0)

    def known_users(self) -> list[str]:
        return list(self._users.ids)

    def known_items(self) -> list[str]:
        return list(self._items.ids)

    def has_user(self, user_id: str) -> bool:
        return (user_id if type(user_id) is str else canon(user_id)) in self._users.index

    def has_item(self, item_id: str) -> bool:
        return (item_id if type(item_id) is str else canon(item_id)) in self._items.index

    @property
    def n_items(self) -> int:
        """Number of known items."""
        return self._items.n

    def user_positives(self, user_ids: Sequence[str]) -> np.ndarray:
        """Positive events learned so far per user (int64; 0 for unknown users)."""
        out = np.zeros(len(user_ids), dtype=np.int64)
        index = self._users.index
        for j, u in enumerate(user_ids):
            e = index.get(u if type(u) is str else canon(u))
            if e is not None:
                out[j] = self._users.counts[e]
        return out

    def item_counts(self) -> tuple[list[str], np.ndarray]:
        """``(ids, positive counts int64)`` of every known item (popularity fallback)."""
        return list(self._items.ids), self._items.counts[: self._items.n].copy()

    def user_profile(self, user_id: str) -> dict[str, Any] | None:
        """The stored profile of a known user (a copy), None if unknown."""
        e = self._users.index.get(user_id)
        return None if e is None else dict(self._users.profiles[e])

    def user_history(self, user_id: str) -> dict[str, list[str]]:
        """Item keys' values kept by each history field for a user, oldest first (a copy)."""
        e = self._users.index.get(user_id)
        out: dict[str, list[str]] = {}
        for f in self._users.hist_fields:
            spec = self._space.specs[f]
            if e is None:
                out[spec.name] = []
                continue
            newest, m = ring_newest_first(
                self._users.hist_keys[f][e : e + 1], self._users.hist_n[f][e : e + 1]
            )
            keys = newest[0, : m[0]][::-1].tolist()  # oldest first
            if spec.hash_buckets:
                base = int(self._space.base_key[f])
                out[spec.name] = [f"#{k - base}" for k in keys]
            else:
                names = {k: v for v, k in (self._space.vocab[f] or {}).items()}
                out[spec.name] = [names.get(k, "?") for k in keys]
        return out

    def recent_items(self, user_ids: Sequence[str]) -> list[list[str]]:
        """Each user's last positive item ids, newest first (``config.recent_items`` at most;
        empty for unknown users or when none are kept). Repeats are kept, as they happened."""
        ents = self._users.lookup(user_ids)
        out: list[list[str]] = [[] for _ in range(len(user_ids))]
        known = np.flatnonzero(ents >= 0)
        if known.size == 0 or self.config.recent_items == 0:
            return out
        ids = self._items.ids
        for j, items in zip(known.tolist(), self._users.recent_of(ents[known]), strict=True):
            out[j] = [ids[i] for i in items.tolist()]
        return out

    def recent_snapshot(self) -> RecentSnapshot:
        """Every user's recent items at one instant (copies): with ``n_positives`` counted at
        the same instant, so a reader knows which later positives the snapshot already holds."""
        us = self._users
        return RecentSnapshot(list(us.ids), list(self._items.ids), us.recent[: us.n].copy(),
                              us.recent_n[: us.n].copy() if us.recent.shape[1] else
                              np.zeros(us.n, dtype=np.int64), self.n_positives)

    def item_profile(self, item_id: str) -> dict[str, Any] | None:
        e = self._items.index.get(item_id)
        return None if e is None else dict(self._items.profiles[e])

    def stats(self) -> dict[str, float]:
        """Sizes and counters for metrics: entities, keys, rows, admissions, expiries, bytes."""
        return {
            "users": self._users.n,
            "items": self._items.n,
            "keys": self._space.n_keys,
            "rows_live": self._table.n_live,
            "rows_capacity": self._table.capacity,
            "admitted": self._space.n_admitted,
            "expired": self._space.n_expired,
            "updates": self.n_updates,
            "array_bytes": self._table.nbytes()
            + self._space.nbytes()
            + self._users.nbytes()
            + self._items.nbytes(),
        }

    # ------------------------------------------------------------------------ state
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Everything needed to rebuild this model: JSON-able header and named arrays."""
        t, sp, us, it = self._table, self._space, self._users, self._items
        header: dict[str, Any] = {
            "schema": [f.to_dict() for f in self.schema.fields],
            "config": asdict(self.config),
            "w0": self._w0,
            "w0_acc": self._w0_acc,
            "n_updates": self.n_updates,
            "n_positives": self.n_positives,
            "table": {"n_rows": t.n_rows, "rng": t.rng.bit_generator.state},
            "space": {
                "n_keys": sp.n_keys,
                "vocab": [None if v is None else list(v.items()) for v in sp.vocab],
                "watermark": _finite_or_none(sp.watermark),
                "last_sweep": _finite_or_none(sp.last_sweep),
                "n_expired": sp.n_expired,
                "n_admitted": sp.n_admitted,
            },
            "users": {"ids": us.ids, "profiles": us.profiles},
            "items": {"ids": it.ids, "profiles": it.profiles},
            "sampler": {
                "since_rebuild": self._sampler.since_rebuild,
                "rng": self._sampler.rng.bit_generator.state,
            },
        }
        arrays: dict[str, np.ndarray] = {
            "params": t.params[: t.n_rows],
            "acc": t.acc[: t.n_rows],
            "free": np.asarray(t.free, dtype=np.int64),
            "key_row": sp.key_row[: sp.n_keys],
            "key_count": sp.key_count[: sp.n_keys],
            "key_field": sp.key_field[: sp.n_keys],
            "sampler_cdf": self._sampler.cdf,
        }
        if sp.key_last is not None:
            arrays["key_last"] = sp.key_last[: sp.n_keys]
        for name, cat in (("user", us), ("item", it)):
            arrays[f"{name}_ent_key"] = cat.ent_key[: cat.n]
            arrays[f"{name}_counts"] = cat.counts[: cat.n]
            arrays[f"{name}_prof_keys"] = cat.prof_keys[: cat.n]
            arrays[f"{name}_prof_w"] = cat.prof_w[: cat.n]
            if name == "user" and cat.recent.shape[1]:
                arrays["user_recent"] = cat.recent[: cat.n]
                arrays["user_recent_n"] = cat.recent_n[: cat.n]
            for f in cat.hist_fields:
                fname = sp.specs[f].name
                if name == "user":
                    arrays[f"user_hist_keys.{fname}"] = cat.hist_keys[f][: cat.n]
                    arrays[f"user_hist_n.{fname}"] = cat.hist_n[f][: cat.n]
                else:
                    arrays[f"item_hist_key.{fname}"] = cat.hist_key_of_item[f][: cat.n]
        return header, arrays

    @classmethod
    def from_state(cls, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> OnlineFM:
        """Inverse of :meth:`state` (raises KeyError/ValueError/ModelError on bad input)."""
        schema = FeatureSchema(
            tuple(
                FieldSpec(**{**f, "boundaries": tuple(f["boundaries"])}) for f in header["schema"]
            )
        )
        model = cls(schema, TrainConfig(**header["config"]))
        t, sp = model._table, model._space
        n_rows = int(header["table"]["n_rows"])
        params, acc = arrays["params"], arrays["acc"]
        if params.shape != (n_rows, model.config.dim + 1) or acc.shape != (n_rows, 2):
            raise ValueError(f"parameter table shape {params.shape} does not match header")
        if n_rows < sp.first_dynamic_row:
            raise ValueError("parameter table is smaller than the schema's fixed rows")
        t.n_rows = 0
        t._grow(max(n_rows, 16))
        t.params[:n_rows] = params
        t.acc[:n_rows] = acc
        t.n_rows = n_rows
        t.free = [int(r) for r in arrays["free"]]
        t.rng.bit_generator.state = header["table"]["rng"]
        hs = header["space"]
        n_keys = int(hs["n_keys"])
        if n_keys < sp.first_dynamic_key or arrays["key_row"].shape != (n_keys,):
            raise ValueError("key arrays do not match the schema")
        if n_keys > sp.n_keys:
            sp._new_keys(-1, n_keys - sp.n_keys)
        sp.key_row[:n_keys] = arrays["key_row"]
        sp.key_count[:n_keys] = arrays["key_count"]
        sp.key_field[:n_keys] = arrays["key_field"]
        if sp.key_last is not None:
            sp.key_last[:n_keys] = arrays["key_last"]
        if np.any(sp.key_row[:n_keys] >= n_rows) or np.any(sp.key_row[:n_keys] < 0):
            raise ValueError("a key points outside the parameter table")
        sp.vocab = [None if v is None else {str(a): int(b) for a, b in v} for v in hs["vocab"]]
        if len(sp.vocab) != len(sp.specs):
            raise ValueError("vocabularies do not match the schema's fields")
        sp.watermark = -math.inf if hs["watermark"] is None else float(hs["watermark"])
        sp.last_sweep = -math.inf if hs["last_sweep"] is None else float(hs["last_sweep"])
        sp.n_expired = int(hs["n_expired"])
        sp.n_admitted = int(hs["n_admitted"])
        for name, cat in (("user", model._users), ("item", model._items)):
            ids = [str(x) for x in header[f"{name}s"]["ids"]]
            profiles = [dict(p) for p in header[f"{name}s"]["profiles"]]
            n = len(ids)
            if len(profiles) != n or arrays[f"{name}_ent_key"].shape != (n,):
                raise ValueError(f"{name} catalog arrays do not match its ids")
            pk = arrays[f"{name}_prof_keys"]
            cat._reserve(max(n, 16), pk.shape[1])
            cat.ent_key[:n] = arrays[f"{name}_ent_key"]
            cat.counts[:n] = arrays[f"{name}_counts"]
            cat.prof_keys[:n, : pk.shape[1]] = pk
            cat.prof_w[:n, : pk.shape[1]] = arrays[f"{name}_prof_w"]
            cat.ids = ids
            cat.profiles = profiles
            cat.index = IdIndex((u, j) for j, u in enumerate(ids))
            cat.n = n
            if name == "user" and cat.recent.shape[1]:
                recent = arrays["user_recent"]
                if recent.shape != (n, cat.recent.shape[1]):
                    raise ValueError("recent items do not match the users and recent_items")
                cat.recent[:n] = recent
                cat.recent_n[:n] = arrays["user_recent_n"]
            for f in cat.hist_fields:
                fname = sp.specs[f].name
                if name == "user":
                    cat.hist_keys[f][:n] = arrays[f"user_hist_keys.{fname}"]
                    cat.hist_n[f][:n] = arrays[f"user_hist_n.{fname}"]
                    if np.any(cat.hist_keys[f][:n] >= n_keys):
                        raise ValueError(f"history {fname!r} points at unknown keys")
                else:
                    cat.hist_key_of_item[f][:n] = arrays[f"item_hist_key.{fname}"]
            if np.any(cat.ent_key[:n] >= n_keys) or np.any(pk >= n_keys):
                raise ValueError(f"{name} catalog points at unknown keys")
        model._sampler.cdf = np.asarray(arrays["sampler_cdf"], dtype=np.float64)
        model._sampler.since_rebuild = int(header["sampler"]["since_rebuild"])
        model._sampler.rng.bit_generator.state = header["sampler"]["rng"]
        model._w0 = float(header["w0"])
        model._w0_acc = float(header["w0_acc"])
        model.n_updates = int(header["n_updates"])
        model.n_positives = int(header.get("n_positives", 0))
        return model


def _pick_best(
    terms: EntityTerms, users: np.ndarray, cand: np.ndarray, valid: np.ndarray, k: int, m: int
) -> tuple[np.ndarray, np.ndarray]:
    """Of each group of ``m`` candidate entities (``cand`` ``(P, k·m)``), the one scoring
    highest for its row's user entity (``users`` ``(P,)``): ``a_i + <V_u, V_i>`` (the user's
    own term is the same for the whole group). Returns ``(picked (P, k), valid (P, k))``."""
    n = users.size
    gathered = terms.V.take(cand, axis=0)  # (P, k·m, d)
    scores = np.matmul(gathered, terms.V.take(users, axis=0)[:, :, None])[..., 0]
    scores += terms.a.take(cand)
    best = np.argmax(scores.reshape(n, k, m), axis=2).ravel()
    sel = np.arange(n * k, dtype=np.int64) * m + best
    return cand.take(sel).reshape(n, k), valid.take(sel).reshape(n, k)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _plain(v: Any) -> Any:
    """JSON-safe copy of a profile value (numpy scalars -> Python, tuples/sets -> lists)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, set | frozenset):  # sets have no stable order: sort for determinism
        return sorted((_plain(x) for x in v), key=lambda x: (type(x).__name__, str(x)))
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v
