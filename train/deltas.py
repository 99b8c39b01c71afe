"""Publishing whose cost grows with what changed: item deltas, user records, incremental i2i.

:class:`VersionedPublisher` is the content side of the publisher (the caller owns cadences and
threads). Each :meth:`~VersionedPublisher.publish_items` makes ONE new version ``v``. In the
default *parts* form (:class:`DeltaConfig` ``form``; :mod:`serving.item_parts`) it ships the own
parts and keys of the items whose own id row was written, which are new or whose keys changed,
and the shared item rows written (one row each, however many items read it); workers recompose
the items touched. In the *vectors* form:

- the items whose vector reads a parameter row written since the previous version
  (:meth:`model.online.OnlineFM.item_entities_reading`: a gather over the catalogue's keys, no
  vector composed) and those held back earlier are the candidates; their rows are copied under
  the trainer's lock (one wait per version) and composed after it; the ship policy
  (:class:`DeltaConfig` ``tolerance`` / ``max_age_s``; default: every change) picks the rows
  that go out as delta ``v``, by catalogue position (a positional :class:`ItemDelta`); the
  publisher's mirror of the index holds what was shipped;
- the shared user rows that changed travel in the same delta (blob ``user_rows``), the context
  table when it changed (blob ``context``), and the bias;
- a full snapshot of ``v`` is written too at the start, after Redis lost our keys, on demand
  (:meth:`~VersionedPublisher.request_full`), every ``full_every_s`` and when the delta bytes
  written since the last one reach ``full_after_bytes`` times that snapshot's bytes (or the rows
  ``full_after_rows`` times the catalogue), so a new worker never replays more than about
  ``full_after_bytes`` snapshots' worth of deltas, and fulls never outweigh the deltas; and
  once the deltas since the last one number ``FULL_AT_DELTAS`` x ``keep_deltas`` (so trimming
  to ``keep_deltas`` never leaves a kept full snapshot without its deltas). Deltas older than
  the oldest kept full snapshot are dropped (bounded retention).

Between item versions, :meth:`~VersionedPublisher.publish_shared` makes versions of the changed
shared user rows only (the inactive users' freshness; ``train.publisher`` runs it every
``publish_shared_s``). The version contract: every version has an ``item_version``, the item
version whose items it serves (itself for an item version; for a shared-rows version the last
item version, named in its delta); an item version always follows a shared-rows version, so a
client that needs everything learned before an event waits for ``item_version`` >= the stamp
of the event's user record. Each version made current is announced on ``items:notice``
(workers wake at once; their poll stays the fallback).

User records (:mod:`serving.users`) are written only for users whose own data changed; workers
compose every user's vector with the shared rows of the version they serve.

Versions only increase: the first version is above the store's, above any version a live worker
reports, and above ``version_floor`` (the caller passes the version stored in the trainer's
checkpoint), so a restart or a Redis loss never sends versions back.

Offline i2i is refreshed incrementally: the neighbours of items that changed (then, round-robin,
of all the others) are recomputed against a mirror of the published index, ``i2i_per_tick``
items per call at most, and written into the current table in place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from model.compose import aggregate, compose_item
from model.online import OnlineFM
from serving.deltas import DeltaLog, ItemDelta
from serving.follow import ItemCopy
from serving.index import ItemSnapshot
from serving.item_parts import ITEM_KEYS, ITEM_ROWS, ItemParts, encode_item_keys
from serving.queries import item_queries
from serving.users import USER_ROWS, SharedRows, encode_rows

log = logging.getLogger(__name__)

_USER_BATCH = 8192
_GATHER_MAX = 262_144
"""Most candidate items whose rows a version copies under the trainer's lock to compose after
it (bounds that copy's memory; a bigger version is composed under the lock, in chunks)."""
RESTART_GAP = 1000
"""Versions skipped when restarting from a checkpoint into an empty Redis (more than a trainer
publishes between two checkpoints: 10 s / ``publish_items_s`` plus the shared-rows versions,
at most 10 s / ``publish_shared_s`` more: 120 at the defaults)."""
FULL_AT_DELTAS = 0.9
"""A full snapshot once the deltas since the last one reach this share of ``keep_deltas``:
trimming to ``keep_deltas`` must never drop a delta a worker loading the oldest kept full
snapshot needs (with shared-rows versions a quiet catalogue makes ~12 versions a second)."""
POPULAR_K = 1000


@dataclass(frozen=True)
class DeltaConfig:
    """How versions are published.

    Attributes:
        full_every_s: a full snapshot at least this often (besides start, loss, on demand).
        full_after_rows: ...or once the delta rows since the last one reach this many times the
            number of items;
        full_after_bytes: ...or once the delta bytes since the last one reach this many times
            the last full snapshot's bytes. A full snapshot writes every item (own part, keys,
            composed vector): counting delta bytes, not rows, keeps fulls from outweighing the
            deltas they bound (with rows: at 100k items, 5,000 events/s, a full every ~4.5 s,
            62% of the publisher's Redis bytes; bench/RESULTS.md 'Redis AOF bytes by kind').
        keep_deltas: most deltas kept in Redis (older than the oldest full are dropped anyway).
        i2i_k: offline neighbours per item.
        i2i_per_tick: most items whose offline neighbours one :meth:`refresh_i2i` recomputes.
        tolerance: an item row whose vector moved by more than this fraction of its last
            shipped norm (``|new - shipped| > tolerance * |shipped|``) ships in the next version;
            a smaller change waits (0: every change ships at once, bit-exact).
        max_age_s: ...but no change waits longer than this: a row changed and not shipped
            since ``t`` ships in the first version at or after ``t + max_age_s * s``, with
            ``s`` in [0.5, 1] fixed per item (so rows that changed together do not all come
            due in one version). New items always ship at once.
        form: ``"parts"`` (default): a version ships the changed items' own parts and the
            changed shared item rows; workers recompose the items they touch
            (:mod:`serving.item_parts`); ``tolerance`` / ``max_age_s`` do not apply (every
            change ships, exact). ``"vectors"``: composed vectors of every item whose vector
            changed (a shared row moving re-ships every item reading it).
    """

    full_every_s: float = 600.0
    full_after_rows: float = 10.0
    full_after_bytes: float = 2.0
    keep_deltas: int = 600
    i2i_k: int = 20
    i2i_per_tick: int = 256
    tolerance: float = 0.0
    max_age_s: float = 5.0
    form: str = "parts"

    def __post_init__(self) -> None:
        if self.form not in ("parts", "vectors"):
            raise ValueError(f"item delta form must be 'parts' or 'vectors', got {self.form!r}")
        if not (self.full_after_rows > 0 and self.full_after_bytes > 0):
            raise ValueError(
                f"full snapshot policy: full_after_rows and full_after_bytes must be > 0, got "
                f"{self.full_after_rows} and {self.full_after_bytes}"
            )
        if not (self.tolerance >= 0.0 and self.max_age_s >= 0.0):
            raise ValueError(
                f"item ship policy: tolerance and max_age_s must be >= 0, got "
                f"{self.tolerance} and {self.max_age_s}"
            )


@dataclass
class PublishedVersion:
    """What one :meth:`VersionedPublisher.publish_items` did (for logs, metrics and benches)."""

    version: int
    rows: int  # item rows shipped in the delta
    shared_rows: int  # shared user rows shipped
    full: bool
    delta_bytes: int
    seconds: float
    candidates: int = 0  # item rows composed and compared
    held: int = 0  # changed item rows not shipped yet (under tolerance, not due)


def spread(ents: np.ndarray) -> np.ndarray:
    """A fixed factor in [0.5, 1) per catalogue position (golden-ratio sequence): scales an
    item's max age so that rows held back together do not all come due in one version."""
    return 0.5 + 0.5 * np.modf(np.asarray(ents, dtype=np.float64) * 0.6180339887498949)[0]


def _key_fn(store) -> Callable[..., str]:
    """The store's key builder (``store.key`` or ``store.keys.key``)."""
    fn = getattr(store, "key", None)
    return fn if callable(fn) else store.keys.key


class VersionedPublisher:
    """Items as versioned deltas, user records of changed users, incremental offline i2i.

    Args:
        store: the Redis writer (``put_item_snapshot``, ``put_popular``, ``put_offline_i2i``,
            ``current_item_version``, ``item_versions``, ``worker_versions``, ``redis``).
        model: the trainer's model (read between updates: the caller serialises access).
        config: see :class:`DeltaConfig`.
        version_floor: versions published from here on are above it (the checkpoint's).
    """

    def __init__(
        self,
        store,
        model: OnlineFM,
        config: DeltaConfig | None = None,
        *,
        version_floor: int = 0,
        model_lock: AbstractContextManager[Any] | None = None,
    ) -> None:
        self.store = store
        self.model = model
        self._lock: AbstractContextManager[Any] = (
            model_lock if model_lock is not None else nullcontext()
        )
        self.config = config or DeltaConfig()
        self.key = _key_fn(store)
        self.log = DeltaLog(store.redis, self.key, keep=self.config.keep_deltas)
        self.version = self._start_version(version_floor)
        # the newest item version (its items are what every version since serves); a
        # shared-rows version after it owes the next item version (a client waiting for
        # item_version >= a record's stamp must see one come, even if no item changed)
        self.item_version = self.version
        self._items_owed = False
        self._owed = False  # records were stamped with the next version: it must come
        self._notices = True  # announce versions on items:notice (off once Redis denies it)
        self._notice_channel = store.keys.items_notice()
        self._need_full = True
        self._no_base = True  # nothing of ours in Redis yet: the first version is full only
        self._full_at = 0.0
        self._rows_since_full = 0
        self._deltas_since_full = 0
        self._bytes_since_full = 0  # delta bytes written since the last full snapshot
        self._full_bytes = 0  # bytes of the last full snapshot
        self._shared_keys = np.zeros(0, dtype=np.int64)
        self._keys_end = 0  # keys numbered below this were looked at (user_shared_keys_from)
        self._shared_rows = np.zeros(0, dtype=np.int64)
        # rows a shared-rows version (publish_shared) drained and shipped only the user side
        # of: the next item version still looks at them for the items reading them
        self._held_changed = np.zeros(0, dtype=bool)
        self._context: bytes | None = None
        self._bias: float | None = None
        self._mirror: ItemCopy | None = None  # the published index: what workers hold
        # parts form: what was shipped per item (own row, raw keys, weights) and the shared
        # item keys / the rows they read
        self._item_own = np.zeros(0, dtype=np.int64)
        self._item_keys = np.zeros((0, 0), dtype=np.int64)
        self._item_w = np.zeros((0, 0), dtype=np.float32)
        self._ikeys = np.zeros(0, dtype=np.int64)
        self._ikeys_end = 0
        self._irows = np.zeros(0, dtype=np.int64)
        # per catalogue position: when a change held back (under tolerance) was first seen
        self._pending = np.full(1024, np.inf)
        self._i2i_version: int | None = None
        # per catalogue position (= mirror row): shipped since its neighbours were computed
        self._i2i_dirty = np.zeros(0, dtype=bool)
        self._i2i_scan = 0  # where the next look for changed items starts (rotates)
        self._i2i_cursor = 0  # round-robin over all items when no changed one is left
        self.last: PublishedVersion | None = None

    # --- versions --------------------------------------------------------------------------

    def _start_version(self, floor: int) -> int:
        head = self.store.current_item_version() or 0
        r = self.store.redis
        ids = [m.decode() for m in r.smembers(self.key("workers"))]
        served = r.mget([self.key("worker", w) for w in ids]) if ids else []
        workers = max((int(v) for v in served if v is not None), default=0)
        fulls = self.store.item_versions()
        if not head and floor:
            # Redis lost our versions and we restart from a checkpoint: versions published after
            # that checkpoint are known only to workers (if they re-registered already). Jump
            # past any such version so none is ever reused with other content.
            floor = int(floor) + RESTART_GAP
        start = max(int(floor), head, workers, fulls[-1] if fulls else 0)
        if start > head:
            log.info(
                "versions continue above v%d (store at v%d, workers at v%d, floor v%d)",
                start,
                head,
                workers,
                floor,
            )
        return start

    @property
    def owes(self) -> bool:
        """Whether a version is owed: records were stamped with the next version, or a
        shared-rows version came since the last item version (the next item version must
        come, even if nothing changed: clients wait for ``item_version``)."""
        return self._owed or self._items_owed

    def request_full(self) -> None:
        """The next :meth:`publish_items` also writes a full snapshot."""
        self._need_full = True

    def store_lost(self) -> bool:
        """True when Redis no longer holds the version we published (flushed, replaced)."""
        if self.last is None:
            return False
        head = self.store.current_item_version()
        return head is None or head < self.version

    # --- items (and the shared user rows, context, bias) -----------------------------------

    def publish_items(
        self, now: float | None = None, *, force: bool = False
    ) -> PublishedVersion | None:
        """Publish one new version if anything changed (or ``force``); None when nothing did.

        The candidates are the items reading a row written since the last call plus those held
        back earlier (under ``tolerance``, not yet ``max_age_s`` old); only they are composed.
        Of those, the new items, the ones over the tolerance and the ones come due ship, as a
        positional delta; a full snapshot version ships every change (so delta ``v`` applied to
        ``v - 1`` gives exactly the full snapshot ``v``).
        """
        now = time.time() if now is None else now
        if self.config.form == "parts":
            return self._publish_parts(now, force)
        started = time.perf_counter()
        m = self.model
        mirror = None if self._no_base else self._mirror
        base_n = 0 if mirror is None else mirror.n
        # Every read of the model in one critical section (the trainer's lock, held while it
        # changes the model): the rows the candidates read are gathered (copied) here, the
        # float64 composition runs after the lock is released.
        with self._lock:
            fresh, changed = self._drain()
            n_items = int(m.n_items)
            if n_items == 0:
                return None
            full = self._full_due(now, n_items)
            if self._pending.size < n_items:
                grown = np.full(max(n_items, 2 * self._pending.size), np.inf)
                grown[: self._pending.size] = self._pending
                self._pending = grown
            cand = np.zeros(0, dtype=np.int64)
            if base_n:
                mask = np.isfinite(self._pending[:base_n])  # held back earlier
                reading = m.item_entities_reading(changed)
                mask[reading[reading < base_n]] = True
                cand = np.flatnonzero(mask)
            new_items = np.arange(base_n, n_items, dtype=np.int64)
            cand = np.concatenate([cand, new_items])
            if cand.size <= _GATHER_MAX:
                parts = m.item_rows_at(cand)
            else:  # a huge version (a start): composed here in bounded chunks
                parts, vectors = None, m.item_vectors_at(cand)
            new_ids = m.item_ids_of(new_items)
            shared = self._shared_changes(fresh, full)
            snapshot_rows = m.shared_params(self._shared_keys) if full else None
            context = m.context_table().to_bytes()
            bias = float(m.bias)
        if parts is not None:
            vectors = compose_item(*aggregate(*parts))
        ship = self._ship_mask(cand, vectors, base_n, now, every_change=full)
        rows = cand[ship]
        extra: dict[str, bytes] = {}
        if context != self._context:
            extra["context"] = context
        if shared is not None:
            extra[USER_ROWS] = shared[0]
        if not (full or force or self.owes or rows.size or extra or bias != self._bias):
            return None
        v = self.version + 1
        delta = ItemDelta(
            v, new_ids, np.ascontiguousarray(vectors[ship], dtype=np.float32), bias, extra, now,
            rows=rows, base_n=base_n,
        )
        delta_bytes = 0
        if mirror is not None:
            # followers at v - 1 step forward even when a full snapshot of v is written too
            delta_bytes = self.log.put(delta, move_pointer=not full, trim=False)
            mirror.apply(delta)
        else:  # nothing of ours to build on: every item is new, the version is a full one
            mirror = self._mirror = ItemCopy(
                ItemSnapshot(v, new_ids, delta.vectors, bias, {}, now), "flat", None
            )
        if full:  # the full snapshot is what the delta path makes: v - 1 + delta v, bit for bit
            self._pending[:] = np.inf
        return self._finish(
            v, delta, shared, full, delta_bytes, started, mirror, context, bias, now,
            snapshot_rows, {}, cand, mark=rows, held=int(np.isfinite(self._pending).sum()),
            what="item rows",
        )

    def _full_due(self, now: float, n_items: int) -> bool:
        """A full snapshot with this version: at start / on demand, every ``full_every_s``,
        or once the deltas since the last one reach ``full_after_rows`` x the catalogue in rows
        or ``full_after_bytes`` x the last full snapshot in bytes (a new worker replays at most
        about that much after loading it; a full costs every item's bytes, so not sooner)."""
        c = self.config
        return (
            self._need_full
            or now - self._full_at >= c.full_every_s
            or self._rows_since_full >= c.full_after_rows * max(n_items, 1)
            or self._deltas_since_full >= max(1, int(FULL_AT_DELTAS * c.keep_deltas))
            or (self._full_bytes > 0
                and self._bytes_since_full >= c.full_after_bytes * self._full_bytes)
        )

    def _publish_parts(self, now: float, force: bool) -> PublishedVersion | None:
        """:meth:`publish_items` in the parts form (see :mod:`serving.item_parts`): the items
        whose own id row was written, which are new, or whose keys changed ship their own part
        and keys; the shared item rows written ship once; nothing is composed here (the mirror
        recomposes lazily, when i2i or a full snapshot reads it)."""
        started = time.perf_counter()
        m = self.model
        mirror = None if self._no_base else self._mirror
        base_n = 0 if mirror is None else mirror.n
        with self._lock:  # every read of the model in one critical section
            fresh, changed = self._drain()
            n_items = int(m.n_items)
            if n_items == 0:
                return None
            full = self._full_due(now, n_items)
            ents = np.arange(n_items, dtype=np.int64)
            own_row = m.item_own_rows(ents)
            raw_k, raw_w = m.item_keys_at(ents)
            cand = np.zeros(0, dtype=np.int64)
            if base_n:
                o = own_row[:base_n]
                mask = (o >= 0) & changed[np.maximum(o, 0)]
                mask |= o != self._item_own[:base_n]
                if raw_k.shape[1] != self._item_keys.shape[1]:
                    mask[:] = True
                else:
                    mask |= (raw_k[:base_n] != self._item_keys[:base_n]).any(axis=1)
                    mask |= (raw_w[:base_n] != self._item_w[:base_n]).any(axis=1)
                cand = np.flatnonzero(mask)
            new_items = np.arange(base_n, n_items, dtype=np.int64)
            cand = np.concatenate([cand, new_items])
            own, skeys, sweights, _ = m.item_parts_at(cand)
            new_ids = m.item_ids_of(new_items)
            item_rows = self._item_shared_changes(changed, full or mirror is None)
            shared = self._shared_changes(fresh, full)
            snapshot_rows = m.shared_params(self._shared_keys) if full else None
            context = m.context_table().to_bytes()
            bias = float(m.bias)
        self._item_own, self._item_keys, self._item_w = own_row, raw_k, raw_w
        extra: dict[str, bytes] = {}
        if context != self._context:
            extra["context"] = context
        if shared is not None:
            extra[USER_ROWS] = shared[0]
        if item_rows is not None:
            extra[ITEM_ROWS] = encode_rows(*item_rows)
        if not (full or force or self.owes or cand.size or extra or bias != self._bias):
            return None
        extra[ITEM_KEYS] = encode_item_keys(skeys, sweights)
        v = self.version + 1
        delta = ItemDelta(
            v, new_ids, np.ascontiguousarray(own, dtype=np.float32), bias, extra, now,
            rows=cand, base_n=base_n, parts=True,
        )
        delta_bytes = 0
        if mirror is not None:
            delta_bytes = self.log.put(delta, move_pointer=not full, trim=False)
            mirror.apply(delta)
        else:  # nothing of ours to build on: every item is new, the version is a full one
            assert item_rows is not None or not skeys.any()
            shared_items = SharedRows(*item_rows) if item_rows is not None else SharedRows()
            parts = ItemParts(own, skeys, sweights, shared_items)
            vectors, _ = parts.compose(np.arange(parts.n))
            mirror = self._mirror = ItemCopy(
                ItemSnapshot(v, new_ids, vectors, bias, parts.to_blobs(), now), "flat", None,
                lazy=True,
            )
            full = True
        assert mirror.parts is not None
        return self._finish(
            v, delta, shared, full, delta_bytes, started, mirror, context, bias, now,
            snapshot_rows, mirror.parts.to_blobs() if full else {}, cand, mark=cand, held=0,
            what="item parts",
        )

    def _drain(self) -> tuple[np.ndarray, np.ndarray]:
        """``(fresh, changed)`` masks over parameter rows: written since the last version of
        any kind (the shared user rows to ship), and that plus what shared-rows versions
        drained since the last item version (the item side to ship). Call with the lock held."""
        fresh = self.model.drain_changed_rows()
        held, self._held_changed = self._held_changed, np.zeros(0, dtype=bool)
        if not held.size:
            return fresh, fresh
        changed = fresh.copy()
        changed[: held.size] |= held[: changed.size]
        return fresh, changed

    def publish_shared(self, now: float | None = None) -> PublishedVersion | None:
        """One new version carrying only the shared user rows written since the last version
        (new keys, rows written, keys now reading another row) — or nothing but the version,
        when user records were stamped with it (``publish_users(ahead=True)``).

        No item row, context or bias change, never a full snapshot: built without looking at
        the catalogue (a mask over the changed rows and the shared user keys) and applied by
        a worker without recomposing any item. Between two item versions it lets the vectors
        of users who did nothing (composed from the shared rows of the version served) follow
        the shared rows at a faster cadence. The item side of the rows drained here is kept
        for the next :meth:`publish_items`.

        Returns:
            The version, or None when nothing is to ship, nothing of ours is in Redis yet or a
            full snapshot is due (the next item version writes it).
        """
        now = time.time() if now is None else now
        mirror = None if self._no_base else self._mirror
        if mirror is None or self._bias is None or self._full_due(now, mirror.n):
            return None
        started = time.perf_counter()
        with self._lock:
            fresh = self.model.drain_changed_rows()
            held = self._held_changed
            if held.size:
                fresh_all = fresh.copy()
                fresh_all[: held.size] |= held[: fresh.size]
                self._held_changed = fresh_all
            else:
                self._held_changed = fresh
            shared = self._shared_changes(fresh, False)
        if shared is None and not self._owed:
            return None
        v = self.version + 1
        parts = self.config.form == "parts"
        extra: dict[str, bytes] = {} if shared is None else {USER_ROWS: shared[0]}
        if parts:
            extra[ITEM_KEYS] = encode_item_keys(np.zeros((0, 0), np.int64),
                                                np.zeros((0, 0), np.float32))
        # no rows, of the width the reader holds (own parts, or composed vectors)
        width = mirror.parts.own.shape[1] if parts and mirror.parts is not None else (
            mirror.vectors().shape[1])
        delta = ItemDelta(
            v, [], np.zeros((0, width), dtype=np.float32), self._bias, extra, now,
            rows=np.zeros(0, dtype=np.int64), base_n=mirror.n, parts=parts,
            item_version=self.item_version,  # its items are the last item version's
        )
        delta_bytes = self.log.put(delta, trim=False)  # trimmed after the notice
        mirror.apply(delta)
        self._bytes_since_full += delta_bytes
        self._deltas_since_full += 1
        self.version = v
        self._owed = False
        self._items_owed = True  # the item side drained here ships with the next item version
        self._notify(v)
        self.log.trim()  # after the notice: it only drops older deltas (2-3 round trips)
        self.store.put_status(model_version=v, shared_published_at=now)
        self.last = PublishedVersion(
            v, 0, 0 if shared is None else shared[1], False, delta_bytes,
            time.perf_counter() - started,
        )
        log.debug("published v%d: %d shared user rows only", v, self.last.shared_rows)
        return self.last

    def _finish(
        self, v: int, delta: Any, shared: tuple[bytes, int] | None, full: bool,
        delta_bytes: int, started: float, mirror: ItemCopy, context: Any, bias: float,
        now: float, snapshot_rows: tuple[np.ndarray, np.ndarray] | None,
        snapshot_blobs: dict[str, bytes], cand: np.ndarray, *, mark: np.ndarray, held: int,
        what: str,
    ) -> PublishedVersion:
        """The end of either version form: the full snapshot when due, the bookkeeping of
        what shipped, the status and the published version."""
        if full:
            snapshot_extra = {"context": context}
            keys = self._shared_keys
            if keys.size and snapshot_rows is not None:
                w, vv = snapshot_rows
                snapshot_extra[USER_ROWS] = encode_rows(keys, np.concatenate([w[:, None], vv], 1))
            vectors = mirror.vectors().copy()  # settles a lazy mirror
            snapshot_extra.update(snapshot_blobs)
            snapshot = ItemSnapshot(v, list(mirror.ids), vectors, bias, snapshot_extra, now)
            if not self.store.put_item_snapshot(snapshot):
                log.warning("full snapshot v%d not taken (Redis has a newer version?)", v)
            self._need_full = self._no_base = False
            self._full_at = now
            self._rows_since_full = self._bytes_since_full = self._deltas_since_full = 0
            self._full_bytes = vectors.nbytes + sum(len(b) for b in snapshot_extra.values())
            self._i2i_dirty = np.ones(mirror.n, dtype=bool)
        else:
            self._rows_since_full += delta.n
            self._deltas_since_full += 1
            self._bytes_since_full += delta_bytes
            self._mark_i2i(mark, mirror.n)
        self._context, self._bias = context, bias
        self.version = self.item_version = v
        self._owed = self._items_owed = False
        self._notify(v)
        # after the notice (v's data is all written): trimming only drops older deltas, and a
        # full snapshot's trim (deltas not newer than the oldest kept full) waits for it too
        self.log.trim()
        self._publish_popular()
        self.store.put_status(model_version=v, item_version=v, items_published_at=now)
        self.last = PublishedVersion(
            v, delta.n, 0 if shared is None else shared[1], full, delta_bytes,
            time.perf_counter() - started, candidates=int(cand.size), held=held,
        )
        log.debug("published v%d: %d %s, %s", v, delta.n, what, "full" if full else "delta")
        return self.last

    def _item_shared_changes(
        self, changed: np.ndarray, everything: bool
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The shared item rows to ship as ``(keys, [w | v])``: new keys, rows written, keys
        now reading another row (all of them when ``everything``). Call with the lock held."""
        m = self.model
        added, self._ikeys_end = m.item_shared_keys_from(self._ikeys_end)
        keys = np.concatenate([self._ikeys, added]) if added.size else self._ikeys
        if keys.size == 0:
            return None
        rows = m.key_rows(keys)
        known = 0 if everything else self._irows.size
        ship = np.ones(keys.size, dtype=bool)
        if known:
            mask = np.zeros(max(int(rows.max()) + 1, changed.size), dtype=bool)
            mask[: changed.size] = changed
            ship[:known] = mask[rows[:known]] | (rows[:known] != self._irows)
        self._ikeys, self._irows = keys, rows
        if not ship.any():
            return None
        w, v = m.shared_params(keys[ship])
        return keys[ship], np.concatenate([w[:, None], v], axis=1).astype(np.float32)

    def _ship_mask(
        self, cand: np.ndarray, vectors: np.ndarray, base_n: int, now: float, *,
        every_change: bool,
    ) -> np.ndarray:
        """Which candidates ship now (see :class:`DeltaConfig` ``tolerance`` / ``max_age_s``);
        updates the held-back times. ``cand`` ascending, new items (``>= base_n``) last."""
        ship = cand >= base_n
        old_at = np.flatnonzero(~ship)
        if old_at.size == 0:
            return ship
        assert self._mirror is not None
        ents = cand[old_at]
        shipped = self._mirror.vectors()[ents]
        diff = vectors[old_at] - shipped
        moved = (diff != 0).any(axis=1)
        cfg = self.config
        if every_change or cfg.tolerance == 0:
            go = moved
        else:
            dist = np.sqrt(np.einsum("nd,nd->n", diff, diff))
            ref = np.sqrt(np.einsum("nd,nd->n", shipped, shipped))
            since = self._pending[ents]
            due = since + cfg.max_age_s * spread(ents) <= now
            go = moved & ((dist > cfg.tolerance * ref) | due)
            wait = moved & ~go & ~np.isfinite(since)
            self._pending[ents[wait]] = now
        self._pending[ents[go | ~moved]] = np.inf
        ship[old_at] = go
        return ship

    def _notify(self, v: int) -> None:
        """Announce version ``v`` (now current) on ``items:notice``: wakes the workers'
        followers at once instead of at their next poll (a lost notice costs one poll). A
        Redis user not allowed the channel (an ACL without ``&{prefix}*``) stops the notices,
        with one warning: workers then find versions by their poll."""
        if not self._notices:
            return
        try:
            self.store.redis.publish(self._notice_channel, str(v))
        except redis.ResponseError as exc:  # NOPERM: denied by an ACL (not a lost connection)
            self._notices = False
            log.warning("version notices off (%s): workers find versions by their poll; grant "
                        "the Redis user the channel %s (README 'Security')", exc,
                        self._notice_channel)

    def _shared_changes(self, changed: np.ndarray, full: bool) -> tuple[bytes, int] | None:
        """The shared user rows to ship: new keys, rows written, keys now reading another row.
        (Reads the model: call with the lock held.)"""
        m = self.model
        added, self._keys_end = m.user_shared_keys_from(self._keys_end)
        keys = np.concatenate([self._shared_keys, added]) if added.size else self._shared_keys
        if keys.size == 0:
            return None
        rows = m.key_rows(keys)
        known = self._shared_rows.size
        ship = np.ones(keys.size, dtype=bool)
        if not full:
            mask = np.zeros(max(int(rows.max()) + 1, changed.size), dtype=bool)
            mask[: changed.size] = changed
            ship[:known] = mask[rows[:known]] | (rows[:known] != self._shared_rows)
        self._shared_keys, self._shared_rows = keys, rows
        if not ship.any():
            return None
        w, v = m.shared_params(keys[ship])
        return encode_rows(keys[ship], np.concatenate([w[:, None], v], axis=1)), int(ship.sum())

    def _publish_popular(self) -> None:
        with self._lock:
            ids, counts = self.model.item_counts()
        if not ids:
            return
        k = min(POPULAR_K, len(ids))
        top = np.argpartition(-counts, k - 1)[:k] if k < len(ids) else np.arange(len(ids))
        top = top[np.argsort(-counts[top], kind="stable")]
        self.store.put_popular([(ids[j], float(counts[j])) for j in top])

    # --- users -----------------------------------------------------------------------------

    def publish_users(
        self, user_ids: Sequence[str], now: float | None = None, *, ahead: bool = False,
        known_only: bool = False,
    ) -> list[str]:
        """Write the records (own part + shared keys) of ``user_ids``.

        A record is stamped with the first version that carries every shared row it reads as
        of now: the current version, or (``ahead=True``: written before the next
        :meth:`publish_items`) the next one. With ``ahead`` or ``known_only`` (stamped with the
        current version, written right after it), users reading a shared key no version has
        shipped yet are not written but returned (write them after the next version), so a
        worker never lacks a row a record names.

        Returns:
            The users left for later (always empty without ``ahead`` or ``known_only``).
        """
        now = time.time() if now is None else now
        users = list(user_ids)
        later: list[str] = []
        stamp = self.version + 1 if ahead else self.version
        for start in range(0, len(users), _USER_BATCH):
            part = users[start : start + _USER_BATCH]
            with self._lock:
                own, keys, weights = self.model.user_parts(part)
            if ahead or known_only:
                known = (keys == 0) | np.isin(keys, self._shared_keys)
                ok = known.all(axis=1)
                later += [u for u, good in zip(part, ok.tolist(), strict=True) if not good]
                if not ok.all():
                    part = [u for u, good in zip(part, ok.tolist(), strict=True) if good]
                    own, keys, weights = own[ok], keys[ok], weights[ok]
            if not part:
                continue
            if ahead:  # stamped with the next version: publish_items owes one even if
                self._owed = True  # nothing else changed (a worker must reach the stamp)
            self.store.put_user_records(part, stamp, now, own, keys, weights)
        return later

    # --- offline i2i -----------------------------------------------------------------------

    def refresh_i2i(self, budget: int | None = None) -> int:
        """Recompute the offline neighbours of at most ``budget`` items (changed ones first).

        Searches the mirror of the published index (exact), writes the rows into the current
        table in place. Returns the number of items refreshed.
        """
        mirror = self._mirror
        if mirror is None or mirror.n < 2:
            return 0
        budget = self.config.i2i_per_tick if budget is None else int(budget)
        n = mirror.n
        self._mark_i2i(np.zeros(0, dtype=np.int64), n)
        changed = np.flatnonzero(self._i2i_dirty[:n])
        cut = int(np.searchsorted(changed, self._i2i_scan))
        rows = np.concatenate([changed[cut:], changed[:cut]])[:budget]
        if rows.size:
            self._i2i_scan = int(rows[-1]) + 1
        if rows.size < min(budget, n):  # round-robin over the rest
            extra = (self._i2i_cursor + np.arange(min(budget, n))) % n
            extra = extra[~np.isin(extra, rows)][: min(budget, n) - rows.size]
            self._i2i_cursor = int(extra[-1]) + 1 if extra.size else self._i2i_cursor
            rows = np.concatenate([rows, extra])
        self._i2i_dirty[rows] = False
        take = mirror.ids
        take = [take[r] for r in rows.tolist()]
        loaded = mirror.loaded()
        hits = loaded.search_excluding(
            item_queries(loaded.snapshot.vectors[rows]),
            self.config.i2i_k,
            [{int(r)} for r in rows],
        )
        ids = mirror.ids
        table = {i: [(ids[j], s) for j, s in found] for i, found in zip(take, hits, strict=True)}
        if self._i2i_version is None or self._i2i_lost():
            self._i2i_version = self.version
            self.store.put_offline_i2i(self.version, table)
        else:
            from orjson import dumps

            self.store.redis.hset(
                self.key("i2i", self._i2i_version),
                mapping={i: dumps([[j, float(s)] for j, s in nb]) for i, nb in table.items()},
            )
        return len(table)

    def _mark_i2i(self, rows: np.ndarray, n: int) -> None:
        """Items at ``rows`` get their offline neighbours recomputed first (``n``: items now)."""
        if self._i2i_dirty.size < n:
            grown = np.ones(max(n, 2 * self._i2i_dirty.size), dtype=bool)  # new items: dirty
            grown[: self._i2i_dirty.size] = self._i2i_dirty
            self._i2i_dirty = grown
        self._i2i_dirty[rows] = True

    def _i2i_lost(self) -> bool:
        raw = self.store.redis.get(self.key("i2i", "current"))
        return raw is None or int(raw) != self._i2i_version

    # --- recovery --------------------------------------------------------------------------

    def republish(self, user_ids: Sequence[str], now: float | None = None) -> PublishedVersion:
        """Everything again at once (Redis lost it): a full snapshot, every user, i2i restart."""
        now = time.time() if now is None else now
        self._need_full = self._no_base = True
        self._shared_rows = np.zeros(0, dtype=np.int64)
        self._irows = np.zeros(0, dtype=np.int64)
        self._held_changed = np.zeros(0, dtype=bool)
        self._context = None
        self._i2i_version = None
        published = self.publish_items(now, force=True)
        assert published is not None or not self.model.n_items
        self.publish_users(user_ids, now)
        return published  # type: ignore[return-value]


__all__ = ["DeltaConfig", "PublishedVersion", "VersionedPublisher"]
