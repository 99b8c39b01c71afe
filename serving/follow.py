"""Following the published item versions: full snapshot once, then deltas applied in place.

:class:`IndexFollower` owns what a worker answers from. It loads the newest full snapshot, then
applies deltas ``v+1, v+2, ...`` in order. Each delta is applied in place (changed rows
overwritten, new items appended) to one of two copies of the index, the *standby* one, which
no request is using; then the two swap roles with one reference assignment and the delta is
applied to the other copy the next time. So a delta costs O(changed rows) twice, never a rebuild,
and a batch that pinned a state (:meth:`IndexFollower.pinned`) sees one version throughout. A
delta in the parts form (:mod:`serving.item_parts`) is recomposed once (the items it names and
those reading a shared row it changed) and the result written to both copies.

Falls back to a full reload when a delta is missing (retention, Redis lost it), when the store's
version went backwards (a trainer restarted without its version), or a delta does not check out
(corrupt, or not applicable to the version held) and a newer full snapshot exists; until one
does, it serves the last good version (no reload loop).
When Redis holds no version at all (``FLUSHALL``), it keeps serving what it has and reloads as
soon as the publisher republishes (:attr:`IndexFollower.store_lost` says so meanwhile).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import redis

from model.compose import ContextTable
from model.errors import SnapshotError as ModelSnapshotError
from serving.deltas import DeltaLog, ItemDelta, plan_delta, plan_positional
from serving.errors import SnapshotCorrupt, SnapshotError
from serving.graph import GraphKeeper
from serving.index import FlatIndex, IndexKind, ItemIndex, ItemSnapshot, LoadedIndex
from serving.item_parts import (
    ITEM_KEYS,
    ITEM_PARTS,
    ITEM_ROWS,
    ItemParts,
    decode_item_keys,
    decode_item_parts,
)
from serving.timing import ApplyTimes, PathLog
from serving.users import USER_ROWS, SharedRows, decode_rows

log = logging.getLogger(__name__)

WRITE_CHUNK = 32_768
"""Rows written into an index copy between two pauses of a sliced apply."""
PAUSE_MAX_S = 0.02
"""Longest a slice of an apply waits for the batch being answered (then it goes on anyway:
versions never starve under a steady request load; a 100k-item apply has ~10 slices)."""


NOTICE_RETRY_S = 1.0
"""Longest a wait sleeps after its subscription failed, before the caller's next refresh and
a new subscription (shorter when the poll interval is)."""


class VersionNotices:
    """Wakes a follower when the publisher announces a version (Redis pub/sub on
    ``items:notice``), instead of it finding the version at its next poll.

    :meth:`wait` blocks up to the poll interval on its own connection (off the request path; no
    round trip per request) and returns early on a notice. A notice is only a hint: a lost one
    (published while this connection was down, a Redis restart, a publisher that does not
    announce) costs at most one poll interval, since the caller refreshes after every wait
    anyway. A broken subscription is dropped and made again at the next wait; meanwhile the
    wait is a plain sleep (of the interval, at most :data:`NOTICE_RETRY_S`: never a busy loop).
    """

    def __init__(self, client, channel: str) -> None:
        self.client = client
        self.channel = channel
        self._pubsub = None
        self.received = 0
        """Notices that woke a wait."""
        self.failures = 0
        """Waits whose subscription failed (then slept the interval)."""
        self.denied = False
        """Redis refused the subscription (an ACL without the channel): polling only."""
        self._failing = False

    def wait(self, stop: threading.Event, timeout: float) -> bool:
        """Until a notice, ``stop`` or ``timeout`` seconds. True when a notice came."""
        deadline = time.monotonic() + timeout
        if self.denied:
            stop.wait(timeout)
            return False
        try:
            pubsub = self._pubsub
            if pubsub is None:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                self._pubsub = pubsub
                pubsub.subscribe(self.channel)
            while not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                # blocks in a socket read (the GIL released); a subscribe confirmation
                # returns None early: wait again for what is left
                msg = pubsub.get_message(timeout=min(left, 0.5))
                if msg is not None and msg.get("type") == "message":
                    while pubsub.get_message(timeout=0) is not None:  # the queued ones too
                        pass
                    self.received += 1
                    self._failing = False
                    return True
            return False
        except redis.ResponseError as exc:  # NOPERM: not a broken connection, never retried
            self.denied = True
            self.close()
            log.warning("version notices refused by Redis (%s): polling every %.2f s; grant "
                        "the Redis user the channel %s (README 'Security')", exc, timeout,
                        self.channel)
            stop.wait(max(0.0, deadline - time.monotonic()))
            return False
        except Exception as exc:  # noqa: BLE001 - a notice is a hint: fall back to the poll
            self.failures += 1
            if not self._failing:
                log.warning("version notices unavailable (%s: %s); polling every %.2f s until "
                            "they are back", type(exc).__name__, exc, timeout)
                self._failing = True
            self.close()
            stop.wait(min(NOTICE_RETRY_S, max(0.0, deadline - time.monotonic())))
            return False

    def close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # noqa: BLE001 - already broken
                pass


@dataclass(frozen=True)
class ServingState:
    """What one batch of requests is answered from: swapped as a single reference."""

    loaded: LoadedIndex
    context: ContextTable | None
    users: SharedRows | None = None
    """Shared user rows of this version: composes user vectors (see serving/users.py)."""
    item_version: int | None = None
    """The item version whose items this state serves (None given: :attr:`version`). Below
    :attr:`version` when the newest version is a shared-rows one (its user side is newer)."""

    def __post_init__(self) -> None:
        if self.item_version is None:
            object.__setattr__(self, "item_version", self.loaded.snapshot.version)

    @property
    def version(self) -> int:
        return self.loaded.snapshot.version


class ItemCopy:
    """One mutable copy of the item side: ids, id -> row, vectors and their index.

    Mutated only while no reader holds it (the follower guarantees that).
    """

    def __init__(
        self, snapshot: ItemSnapshot, kind: IndexKind, graphs: GraphKeeper | None, *,
        lazy: bool = False, parts: ItemParts | None = None,
    ) -> None:
        self.kind = kind
        self.graphs = graphs
        self.ids: list[str] = list(snapshot.item_ids)
        self.row_of: dict[str, int] = dict(snapshot.row_of)
        self.version = snapshot.version
        self.item_version = snapshot.version  # a full snapshot is always an item version
        self.bias = float(snapshot.bias)
        self.extra = dict(snapshot.extra)
        blob = self.extra.pop(USER_ROWS, None)
        self.users = SharedRows(*decode_rows(blob)) if blob else SharedRows()
        # the parts form (serving/item_parts.py): own parts, keys and shared item rows held
        # beside the vectors; parts deltas recompose the items they touch
        parts_blob = self.extra.pop(ITEM_PARTS, None)
        rows_blob = self.extra.pop(ITEM_ROWS, None)
        self.parts: ItemParts | None = None
        if parts_blob is not None and parts is not None:
            # shared with another copy of the same snapshot (see _apply_parts), which may
            # have moved them on already: decoded once
            if parts.version is None or parts.version < snapshot.version or (
                parts.n < len(snapshot.item_ids)
            ):
                raise SnapshotError(
                    f"shared item parts at v{parts.version} ({parts.n} items) for snapshot "
                    f"v{snapshot.version} ({len(snapshot.item_ids)} items)"
                )
            self.parts = parts
        elif parts_blob is not None:
            own, keys, weights = decode_item_parts(parts_blob, len(snapshot.item_ids))
            shared = SharedRows(*decode_rows(rows_blob)) if rows_blob else SharedRows()
            self.parts = ItemParts(own, keys, weights, shared)
            self.parts.version = snapshot.version
        # lazy (the publisher's mirror): recompose on the next read of the vectors, not on apply
        self.lazy = lazy
        self._stale: np.ndarray | None = None
        self.created_at = snapshot.created_at
        self.readers = 0
        self.pause: Callable[[], None] | None = None
        """Called between slices of a big apply (the follower: let a batch be answered)."""
        self._flat: FlatIndex | None = None
        self._buf: np.ndarray | None = None
        if kind == "flat":
            self._flat = FlatIndex(snapshot.vectors)
        else:
            self._buf = np.array(snapshot.vectors, dtype=np.float32, copy=True)
        self._index = self._make_index(appended_only=False)

    @property
    def n(self) -> int:
        return len(self.ids)

    def vectors(self) -> np.ndarray:
        self.settle()
        return self._raw_vectors()

    def _raw_vectors(self) -> np.ndarray:
        if self._flat is not None:
            return self._flat.vectors()
        assert self._buf is not None
        return self._buf[: self.n]

    def _make_index(self, *, appended_only: bool) -> ItemIndex:
        if self._flat is not None:
            return self._flat
        assert self.graphs is not None
        return self.graphs.fresh_for(self.ids, self.vectors(), appended_only=appended_only)

    def settle(self) -> None:
        """Recompose the items a lazy apply left stale (no-op when none are)."""
        stale = self._stale
        if stale is None:
            return
        self._stale = None
        at = np.flatnonzero(stale)
        if at.size and self.parts is not None:
            vectors, _ = self.parts.compose(at)
            self._write(at, vectors)

    def _write(self, at: np.ndarray | slice, vectors: np.ndarray) -> None:
        pause = self.pause
        if pause is not None and isinstance(at, np.ndarray) and at.size > WRITE_CHUNK:
            for lo in range(0, at.size, WRITE_CHUNK):  # slices, requests answered between
                if lo:
                    pause()
                self._write_rows(at[lo : lo + WRITE_CHUNK], vectors[lo : lo + WRITE_CHUNK])
            return
        self._write_rows(at, vectors)

    def _write_rows(self, at: np.ndarray | slice, vectors: np.ndarray) -> None:
        if isinstance(at, np.ndarray) and at.size and int(at[-1]) - int(at[0]) == at.size - 1:
            at = slice(int(at[0]), int(at[-1]) + 1)  # ascending and dense: one block copy
        if self._flat is not None:
            self._flat.set_rows(at, vectors)
        else:
            assert self._buf is not None
            self._buf[at] = vectors

    def _grow(self, added: np.ndarray) -> None:
        """Append rows ``added`` to the vectors (the ids follow in :meth:`apply`)."""
        if self._flat is not None:
            if added.shape[0]:
                self._flat.append(added)
            return
        assert self._buf is not None
        need = self.n + added.shape[0]
        if need > self._buf.shape[0]:
            grown = np.empty(
                (max(need, self._buf.shape[0] * 2), self._buf.shape[1]), dtype=np.float32
            )
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n : need] = added

    def _apply_parts(self, delta: ItemDelta) -> tuple[list[str], int]:
        """Apply a parts delta: new parts and shared rows, then the touched items recomposed
        (now, or on the next read when lazy). Returns the appended ids and their count.

        The parts may be shared by two copies (the follower's held and standby copies): the
        first copy to apply a delta moves the parts to its version and leaves the composed
        rows on the delta; the other copy, applying the same delta later, only writes them
        (one decode, one key scan and one composition per version, not one per copy).
        """
        parts = self.parts
        if parts is None:
            raise SnapshotError(
                f"delta v{delta.version} carries item parts, this copy holds vectors only; "
                "reload the full snapshot"
            )
        if parts.version is not None and parts.version >= delta.version:
            return self._apply_composed(delta, parts.version)
        if parts.version is not None and parts.version != delta.base:
            raise SnapshotError(
                f"delta v{delta.version} applies to v{delta.base}, the item parts are at "
                f"v{parts.version}; reload the full snapshot"
            )
        rows, _, new, new_ids = plan_positional(delta, self.n)
        keys, weights = decode_item_keys(delta.extra[ITEM_KEYS], delta.n)
        blob = delta.extra.get(ITEM_ROWS)
        skeys, sparams = decode_rows(blob) if blob else (np.zeros(0, np.int64), None)
        if skeys.size and parts.shared.params.size and (
            sparams.shape[1] != parts.shared.params.shape[1]
        ):
            raise SnapshotError(
                f"delta v{delta.version}: shared item rows of width {sparams.shape[1]}, held "
                f"{parts.shared.params.shape[1]}; reload the full snapshot"
            )
        try:
            touched = parts.apply(rows, delta.vectors, keys, weights, skeys,
                                  sparams if sparams is not None else np.zeros((0, 0)))
        except SnapshotCorrupt as exc:
            raise SnapshotError(
                f"delta v{delta.version}: {exc}; reload the full snapshot"
            ) from None
        if parts.version is not None:
            parts.version = delta.version
        width = delta.vectors.shape[1] if delta.n else self._raw_vectors().shape[1]
        self._grow(np.zeros((new.size, width), dtype=np.float32))
        if self.lazy:
            stale = np.zeros(parts.n, dtype=bool)
            if self._stale is not None:
                stale[: self._stale.size] = self._stale
            stale[touched] = True
            self._stale = stale
        else:
            vectors, missing = parts.compose(touched, pause=self.pause)
            if missing:
                log.warning("delta v%d: %d shared item keys not held (composed as 0)",
                            delta.version, missing)
            delta.composed.update(touched=touched, vectors=vectors)
            self._write(touched, vectors)
        return new_ids, int(new.size)

    def _apply_composed(self, delta: ItemDelta, parts_at: int) -> tuple[list[str], int]:
        """Write the rows another copy composed for ``delta`` (the shared parts are past it)."""
        if not delta.composed or self.lazy:
            raise SnapshotError(
                f"delta v{delta.version}: the shared item parts are already at v{parts_at} and "
                "the delta holds no composed rows; reload the full snapshot"
            )
        touched, vectors = delta.composed["touched"], delta.composed["vectors"]
        _, _, new, new_ids = plan_positional(delta, self.n)
        width = vectors.shape[1] if vectors.shape[0] else self._raw_vectors().shape[1]
        self._grow(np.zeros((new.size, width), dtype=np.float32))
        self._write(touched, vectors)
        return new_ids, int(new.size)

    def apply(self, delta: ItemDelta) -> None:
        """Apply ``delta`` (base == this copy's version) in place."""
        if delta.base != self.version:
            raise SnapshotError(
                f"delta v{delta.version} applies to v{delta.base}, this copy holds "
                f"v{self.version}; reload the full snapshot"
            )
        if delta.parts:
            new_ids, _ = self._apply_parts(delta)
            self._finish(delta, new_ids)
            return
        self.parts = None  # composed vectors from here on: the parts held no longer match
        self._stale = None
        if delta.n and delta.vectors.shape[1] != self.vectors().shape[1]:
            raise SnapshotError(
                f"delta v{delta.version}: width {delta.vectors.shape[1]}, index width "
                f"{self.vectors().shape[1]}; reload the full snapshot"
            )
        if delta.rows is not None:  # positional: rows named by catalogue position
            rows, changed, new, new_ids = plan_positional(delta, self.n)
            # ascending: the changed rows come first, the appended ones last (slices, no copy)
            split = changed.size
            at, put, added = rows[:split], delta.vectors[:split], delta.vectors[split:]
        else:
            rows, changed, new, new_ids = plan_delta(self.row_of, delta.item_ids, self.n)
            at, put, added = rows[changed], delta.vectors[changed], delta.vectors[new]
        self._write_rows(at, put)
        self._grow(added)
        self._finish(delta, new_ids)

    def _finish(self, delta: ItemDelta, new_ids: list[str]) -> None:
        start = self.n
        self.ids.extend(new_ids)
        self.row_of.update(zip(new_ids, range(start, start + len(new_ids)), strict=True))
        self.version = delta.version
        self.item_version = int(delta.item_version)  # type: ignore[arg-type]
        self.bias = float(delta.bias)
        extra = dict(delta.extra)
        blob = extra.pop(USER_ROWS, None)
        if blob:
            self.users.update(*decode_rows(blob))
        for name in (ITEM_KEYS, ITEM_ROWS, ITEM_PARTS):  # held in self.parts
            extra.pop(name, None)
        self.extra.update(extra)
        self.created_at = delta.created_at
        self._index = self._make_index(appended_only=True)

    def loaded(self) -> LoadedIndex:
        """A frozen view of this copy's current version (shares its arrays: read while held)."""
        self.settle()
        snapshot = ItemSnapshot(
            version=self.version,
            item_ids=self.ids,
            vectors=self.vectors(),
            bias=self.bias,
            extra=self.extra,
            created_at=self.created_at,
        )
        snapshot.__dict__["row_of"] = self.row_of  # cached_property: the live map, no rebuild
        return LoadedIndex(snapshot, self._index)


@dataclass
class _Held:
    copy: ItemCopy
    state: ServingState


class IndexFollower:
    """Keeps the newest published item version, applying deltas in place.

    The worker uses three things: :meth:`pinned` around answering a batch, :meth:`current` for
    reporting, and :meth:`run` on a background thread (or :meth:`refresh` from tests).

    Args:
        store: the :class:`serving.store.VectorStore` to read.
        kind: ``"flat"`` (exact) or ``"hnsw"`` (graph candidates, exact re-scoring).
        graphs: the HNSW graph keeper (required for ``"hnsw"``).
        poll_s: how often :meth:`run` looks for a new version (at the latest: a version
            notice wakes it at once, see :class:`VersionNotices`).
        notices: wait on the publisher's version notices between polls (:meth:`wait`).
    """

    def __init__(
        self,
        store,
        *,
        kind: IndexKind = "flat",
        graphs: GraphKeeper | None = None,
        poll_s: float = 0.2,
        on_change=None,
        notices: bool = True,
    ) -> None:
        if kind == "hnsw" and graphs is None:
            graphs = GraphKeeper()
        self.store = store
        self.kind = kind
        self.graphs = graphs
        self.poll_s = poll_s
        self.log = DeltaLog(store.redis, store.key)
        self.notices = (
            VersionNotices(store.redis, store.keys.items_notice()) if notices else None
        )
        self.on_change = on_change
        self._cond = threading.Condition()
        self._refresh_lock = threading.Lock()
        self._held: _Held | None = None
        self._standby: ItemCopy | None = None
        self._behind: list[ItemDelta] = []  # applied to the held copy, not to the standby
        self._context_blob: bytes | None = None
        self._context: ContextTable | None = None
        self.deltas_applied = 0
        self.full_loads = 0
        self.last_apply_s = 0.0
        self.store_lost = False
        self._gap_logged: int | None = None
        self.timings: PathLog | None = None  # set by the worker: per-version apply costs
        self._fetch_s = 0.0
        self._wait_s = 0.0
        self._answering = 0
        self.pauses_waited = 0
        """Slices of an apply that waited for a batch being answered."""
        self._idle = threading.Event()
        self._idle.set()

    # --- what readers see ------------------------------------------------------------------

    def current(self) -> ServingState | None:
        """The newest state (for reporting; answer a batch inside :meth:`pinned`)."""
        held = self._held
        return None if held is None else held.state

    @property
    def version(self) -> int | None:
        held = self._held
        return None if held is None else held.state.version

    @contextmanager
    def pinned(self) -> Iterator[ServingState | None]:
        """The newest state, guaranteed unchanged until the block ends (None before any).

        The block counts as :meth:`busy` (an apply in progress waits at its next slice).
        """
        with self.busy():
            with self._cond:
                held = self._held
                if held is not None:
                    held.copy.readers += 1
            try:
                yield None if held is None else held.state
            finally:
                if held is not None:
                    with self._cond:
                        held.copy.readers -= 1
                        if held.copy.readers == 0:
                            self._cond.notify_all()

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Mark a batch being answered (the worker: answering and sending its replies): while
        a block runs, an apply in progress on the follow thread waits at its next slice
        (:meth:`pause`), so the batch does not share the GIL and the cores with it."""
        with self._cond:
            self._answering += 1
            self._idle.clear()
        try:
            yield
        finally:
            with self._cond:
                self._answering -= 1
                if self._answering == 0:
                    self._idle.set()

    @property
    def answering(self) -> bool:
        """Whether a batch is being answered (inside :meth:`pinned`) right now."""
        return not self._idle.is_set()

    def pause(self) -> None:
        """Between two slices of an apply: wait (at most :data:`PAUSE_MAX_S`) while a batch
        is being answered, then hand the GIL over once (a request that just arrived gets it
        before the next slice)."""
        if not self._idle.is_set():
            self.pauses_waited += 1
            self._idle.wait(PAUSE_MAX_S)
        time.sleep(0)

    # --- following -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Refresh on every version notice, at least every ``poll_s``, until ``stop``; errors
        are logged, never raised. The notice subscription is closed on the way out."""
        try:
            while not stop.is_set():
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001 - keep serving the held version, retry next
                    log.exception("item index refresh failed; still serving v%s", self.version)
                self.wait(stop, self.poll_s)
        finally:
            self.close()

    def wait(self, stop: threading.Event, timeout: float) -> bool:
        """Between two refreshes: until a version notice, ``stop`` or ``timeout`` (the poll).
        True when a notice ended it."""
        if self.notices is None:
            stop.wait(timeout)
            return False
        return self.notices.wait(stop, timeout)

    def close(self) -> None:
        """Drop the notice subscription (its connection)."""
        if self.notices is not None:
            self.notices.close()

    def refresh(self) -> bool:
        """Move to the store's newest version if it differs. Returns True when it moved."""
        with self._refresh_lock:
            head = self.store.current_item_version()
            held = self._held
            if head is None:
                if held is not None and not self.store_lost:
                    log.warning(
                        "Redis holds no item version (flushed?); serving v%d until the "
                        "publisher republishes",
                        held.state.version,
                    )
                self.store_lost = True
                return False
            self.store_lost = False
            have = None if held is None else held.state.version
            if have == head:
                return False
            started, cpu0 = time.perf_counter(), time.thread_time()
            if have is not None and head > have:
                self._fetch_s = self._wait_s = 0.0
                deltas = self._deltas(have + 1, head)
                if deltas is not None:
                    try:
                        self._advance(deltas)
                    except SnapshotError as exc:
                        log.warning("delta apply failed (%s); reloading the full snapshot", exc)
                    else:
                        self.last_apply_s = time.perf_counter() - started
                        if self.timings is not None:
                            self.timings.applied(ApplyTimes(
                                len(deltas), self.last_apply_s, time.thread_time() - cpu0,
                                self._fetch_s, self._wait_s))
                        self._changed()
                        return True
                if max((v for v in self.store.item_versions() if v <= head), default=-1) <= have:
                    # a gap (or a delta that does not apply), and no full snapshot newer than
                    # what we hold: wait for one (reloading the same one would loop)
                    if self._gap_logged != head:
                        log.warning(
                            "deltas v%d..v%d are not all in Redis and no newer full "
                            "snapshot exists; serving v%d meanwhile",
                            have + 1,
                            head,
                            have,
                        )
                        self._gap_logged = head
                    return False
            elif have is not None:
                log.warning(
                    "the store's item version went back from v%d to v%d (trainer restarted "
                    "without its version?); reloading",
                    have,
                    head,
                )
            moved = self._reload(head)
            self.last_apply_s = time.perf_counter() - started
            if moved:
                self._changed()
            return moved

    def _deltas(self, first: int, last: int) -> list[ItemDelta] | None:
        """Deltas ``first .. last`` from Redis; None when one is missing or does not decode
        (a corrupt delta is treated as a gap: wait for a newer full snapshot, then reload)."""
        started = time.perf_counter()
        try:
            return self.log.get(first, last)
        except SnapshotError as exc:
            if self._gap_logged != last:
                log.warning("item deltas v%d..v%d unusable (%s); treating as a gap", first, last,
                            exc)
            return None
        finally:
            self._fetch_s += time.perf_counter() - started

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.current())

    def _reload(self, head: int) -> bool:
        """Load the newest full snapshot and the deltas after it (up to ``head``)."""
        fulls = self.store.item_versions()
        candidates = [v for v in reversed(fulls) if v <= head] or list(reversed(fulls))
        snapshot = None
        for v in candidates:
            try:
                snapshot = self.store.load_item_snapshot(v)
                break
            except SnapshotError as exc:
                log.warning("full snapshot v%d unusable (%s); trying an older one", v, exc)
        if snapshot is None:
            log.warning("no usable full item snapshot in Redis for v%d yet; retrying", head)
            return False
        held, standby = self._copy_of(snapshot), None
        # a corrupt delta after the snapshot: serve the snapshot's version meanwhile
        deltas = self._deltas(snapshot.version + 1, head) if head > snapshot.version else []
        good: list[ItemDelta] = []
        for delta in deltas or []:
            try:
                held.apply(delta)
            except SnapshotError as exc:  # serve the last good version until a newer full one
                log.warning("delta v%d does not apply to full snapshot v%d + %d delta(s) (%s); "
                            "serving v%d until a newer full snapshot", delta.version,
                            snapshot.version, len(good), exc, delta.version - 1)
                held = self._copy_of(snapshot)  # no half-applied delta
                for ok in good:
                    held.apply(ok)
                break
            good.append(delta)
            self.deltas_applied += 1
        deltas = good
        # the standby copy: built from the same snapshot (+ deltas) so both hold one version
        standby = self._copy_of(snapshot, held)
        for delta in deltas:
            standby.apply(delta)
        with self._cond:
            self._held = _Held(held, self._state_of(held))
            self._standby = standby
            self._behind = []
        self.full_loads += 1
        log.info(
            "loaded full item snapshot v%d (%d items) and %d delta(s): serving v%d",
            snapshot.version,
            held.n,
            len(deltas),
            held.version,
        )
        return True

    def _copy_of(self, snapshot: ItemSnapshot, other: ItemCopy | None = None) -> ItemCopy:
        """A copy of ``snapshot``; with ``other`` (built from the same snapshot), one sharing
        its item parts (each version's parts are applied and composed once, for both)."""
        parts = other.parts if other is not None else None
        # ``other`` may have applied deltas since the snapshot: the new copy then takes those
        # deltas' composed rows from the deltas (ItemCopy._apply_composed)
        copy = ItemCopy(snapshot, self.kind, self.graphs, parts=parts)
        copy.pause = self.pause
        return copy

    def _advance(self, deltas: list[ItemDelta]) -> None:
        """Apply ``deltas`` to the standby copy (waiting for its readers), then swap."""
        standby = self._standby
        held = self._held
        assert standby is not None and held is not None
        blob = next((d.extra["context"] for d in reversed(deltas) if "context" in d.extra), None)
        if blob is not None:
            self._parse_context(blob)  # before anything changes: a bad blob changes nothing
        waited = time.perf_counter()
        with self._cond:
            while not self._cond.wait_for(lambda: standby.readers == 0, timeout=5.0):
                log.warning(
                    "a batch has held v%d for over 5 s; waiting to update it", standby.version
                )
        self._wait_s += time.perf_counter() - waited
        for delta in (*self._behind, *deltas):
            if delta.version > standby.version:
                standby.apply(delta)
        state = self._state_of(standby)
        with self._cond:
            self._held = _Held(standby, state)  # the swap: one reference
            self._standby = held.copy
            self._behind = list(deltas)
        self.deltas_applied += len(deltas)

    def _parse_context(self, blob: bytes | None) -> ContextTable | None:
        """The context table of ``blob`` (parsed once per distinct blob).

        Raises:
            SnapshotError: the blob is not a context table.
        """
        if blob is None or blob == b"":
            return None
        if blob is not self._context_blob and blob != self._context_blob:
            try:
                self._context = ContextTable.from_bytes(blob)
            except ModelSnapshotError as exc:
                raise SnapshotError(f"context table: {exc}") from None
        self._context_blob = blob
        return self._context

    def _state_of(self, copy: ItemCopy) -> ServingState:
        return ServingState(
            copy.loaded(), self._parse_context(copy.extra.get("context")), copy.users,
            copy.item_version,
        )


__all__ = ["IndexFollower", "ItemCopy", "ServingState", "VersionNotices"]
