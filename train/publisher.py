"""The publisher: re-exports what the trainer learned so serving workers can use it.

Runs beside the trainer (it reads the in-memory model between batches) and writes to Redis, with
work that grows with what changed (see :mod:`train.deltas` for the content):
- item versions every ``publish_items_s`` when the model changed: a delta of the changed item
  rows plus the changed shared user rows, the context table and the bias; a full snapshot at the
  start, after Redis lost our keys, every ``full_snapshot_s`` and once the deltas since the
  last one weigh ``full_after_bytes`` times it (or ``full_after_rows``);
- between them, every ``publish_shared_s`` (default 0.1 s; 0: never), a version of the changed
  shared user rows only (:meth:`train.deltas.VersionedPublisher.publish_shared`): cheap to
  build and to apply, it is what moves the vectors of users who did nothing themselves. It
  names the item version it descends from (``item_version``: its items are that version's),
  and the next item version always follows it (README "Versions");
- the records (own part + shared keys) of users active since the last cycle, every
  ``publish_active_s``: workers compose every user's exact vector with the shared rows;
- the offline i2i table refreshed incrementally: every ``offline_i2i_s`` the neighbours of at
  most ``offline_i2i_per_tick`` items (changed items first, then round-robin) are recomputed,
  :data:`I2I_SLICE` items per tick of the publisher thread (after the tick's versions);
- popular items (the fallback for users with neither vector nor profile) and a status hash.

When Redis no longer holds our version (``FLUSHALL``, a new empty Redis) everything is
republished at once, without waiting for events. Versions only increase, across restarts too
(``version_floor`` comes from the trainer's checkpoint).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.online import OnlineFM
from stream.schemas import Event, EventColumns
from train.config import PublishConfig
from train.deltas import DeltaConfig, VersionedPublisher
from train.publish_thread import LockedModel
from train.store_writer import StoreWriter

log = logging.getLogger(__name__)

REPORT_S = 10.0
"""How often the publisher logs where its time went."""
SPENT = ("items", "shared", "users", "i2i", "history")
I2I_SLICE = 32
"""Most items whose offline neighbours one tick recomputes: an ``offline_i2i_s`` cadence's
budget (``offline_i2i_per_tick``, 128) is spread over the next ticks, so a version due
meanwhile waits for a slice (~1/4 of the search), not for the whole budget: at 100k items a
whole budget took the publisher thread 240-350 ms of wall a second on the loaded e2e
(bench/RESULTS.md 'tail', 12-01)."""


@dataclass(frozen=True)
class PublishStats:
    """What the publisher has published (for metrics)."""

    version: int  # the item version last published
    times: PublishTimes  # wall-clock seconds of the last publish of each kind (0 = never)


@dataclass
class PublishTimes:
    """Wall-clock seconds of the last publish of each kind (0 = never)."""

    users: float = 0.0
    sweep: float = 0.0
    items: float = 0.0
    i2i: float = 0.0
    lost_check: float = 0.0
    shared: float = 0.0


class Publisher:
    """Writes item versions, user records, offline i2i and popularity to the store on cadences."""

    def __init__(
        self,
        config: PublishConfig,
        store: StoreWriter,
        model: OnlineFM,
        *,
        version_floor: int = 0,
        model_lock: AbstractContextManager[Any] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        # With ``model_lock`` (the trainer's) this publisher may run in its own thread: every
        # read of the model is then made under the lock the trainer holds while it changes it.
        self.model = model if model_lock is None else LockedModel(model, model_lock)
        self.times = PublishTimes()
        self._active: set[str] = set()
        self._items_dirty = True
        self.versions = VersionedPublisher(
            store,
            model,
            DeltaConfig(
                full_every_s=config.full_snapshot_s,
                full_after_rows=config.full_after_rows,
                full_after_bytes=config.full_after_bytes,
                keep_deltas=config.keep_deltas,
                i2i_k=config.offline_i2i_k,
                i2i_per_tick=config.offline_i2i_per_tick,
                tolerance=config.item_tolerance,
                max_age_s=config.item_max_age_s,
                form=config.item_delta_form,
            ),
            version_floor=version_floor,
            # the raw model: VersionedPublisher takes the lock once per version around all its
            # reads (one wait for the trainer per version, not one per call)
            model_lock=model_lock,
        )
        self.republished = 0
        self._i2i_left = 0  # items of this i2i cadence's budget not refreshed yet
        # positives handed to applied() so far, and how many of the next ones a history
        # republish already wrote (the model had learned them; their hand-over was in flight)
        # (positives the model learned before this publisher existed are never handed over)
        self._positives_seen = int(getattr(model, "n_positives", 0))
        self._history_skip = 0
        self._spent = dict.fromkeys(SPENT, 0.0)
        self._reported_at = 0.0
        self._reported_version = 0
        self._shared_versions = 0  # shared-rows versions since the last report
        self._starting = True
        self.last: dict[str, float] = {}

    def stats(self) -> PublishStats:
        """The version and publish times now (a copy, safe to read from another thread)."""
        t = self.times
        return PublishStats(
            self.version,
            PublishTimes(t.users, t.sweep, t.items, t.i2i, t.lost_check, t.shared),
        )

    @property
    def version(self) -> int:
        """The newest version published (or, before any, the one versions continue from)."""
        return self.versions.version

    # --- fed by the trainer ----------------------------------------------------------------

    def applied(self, events: EventColumns | Sequence[Event]) -> None:
        """Remember who was active and record their recent positive items as history.

        All or nothing for the history counts: when the history write raises (Redis away), the
        caller hands the same events over again later (``GuardedSink``), so they are counted as
        seen (and taken off a republish's skip) only once the write succeeded.
        """
        t0 = time.perf_counter()
        if isinstance(events, EventColumns):
            users, items, labels = events.user_ids, events.item_ids, events.labels
        else:  # anything with user_id, item_id and label
            users, items = [e.user_id for e in events], [e.item_id for e in events]
            labels = np.array([e.label for e in events])
        self._active.update(users)
        self._items_dirty = True
        positives = np.flatnonzero(labels == 1).tolist()
        seen = len(positives)
        # the first ones may be in the republished histories already
        skip = min(self._history_skip, seen)
        positives = positives[skip:]
        if positives:
            if len(positives) == len(users):
                pos_users, pos_items = users, items
            else:
                pos_users, pos_items = [users[j] for j in positives], [items[j] for j in positives]
            self.store.push_history(pos_users, pos_items, self.config.history_len)
        self._positives_seen += seen
        self._history_skip -= skip
        self._spent["history"] += time.perf_counter() - t0

    def profiles_changed(self, user_ids: Sequence[str]) -> None:
        """Profiled users (maybe never seen in events) get records from their features."""
        self._active.update(user_ids)
        self._items_dirty = True

    def items_changed(self, item_ids: Sequence[str]) -> None:
        """Item profiles changed (upserts, tombstones): an item version is due even with no
        event. The items whose vector moved are found as an event's are: the model marked the
        rows they read changed (:meth:`model.online.OnlineFM.drain_changed_rows`), and the parts
        form compares every item's keys with what it shipped."""
        if item_ids:
            self._items_dirty = True

    def checkpointed(self, progress) -> None:
        self.store.put_status(
            checkpoint_at=time.time(),
            events_applied=progress.events_applied,
            trainer_event_time=progress.newest_event_ts or 0.0,
            dead_letters=progress.dead_letters,
            **{
                f"live_hit_rate_{cohort}": rate
                for cohort, rate in getattr(progress, "live_hit_rate", {}).items()
                if rate == rate  # NaN (no sample yet) is not written
            },
            **{
                f"live_samples_{cohort}": n
                for cohort, n in getattr(progress, "live_samples", {}).items()
            },
        )

    def report(self, fields: Mapping[str, str | int | float]) -> None:
        """Set status fields for ``fmstream lag`` (e.g. the dead-letter topic's ``dlq_*``)."""
        self.store.put_status(**fields)

    # --- cadences --------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Publish whatever is due at ``now``. Cheap when nothing is."""
        now = time.time() if now is None else now
        s = self.config
        if self._starting:
            self._starting = False
            if self.store.current_item_version() is None and self.model.known_items():
                # a restart (from a checkpoint) into an empty Redis: no event needed to refill it
                log.warning("Redis holds no version: publishing everything the model knows")
                self.republish(now)
                return
        if now - self.times.lost_check >= s.lost_check_s:
            self.times.lost_check = now
            if self.versions.store_lost():
                log.warning("Redis no longer holds v%d (flushed?): republishing everything",
                            self.version)
                self.republish(now)
                return
        # users whose own id row expired now read the fallback row: their records change
        self._active.update(self.model.drain_expired_users())
        users_due = self._active and now - self.times.users >= s.publish_active_s
        # a version is owed: records are (or will be) stamped with it, or a shared-rows version
        # came since the last item version (clients wait for item_version >= a record's stamp)
        dirty = self._items_dirty or bool(self._active) or self.versions.owes
        items_due = dirty and now - self.times.items >= s.publish_items_s
        t0 = time.perf_counter()
        if (not items_due and s.publish_shared_s > 0 and dirty
                and now - self.times.shared >= s.publish_shared_s):
            # A shared-rows version first (no catalogue scan: ~2 ms), then the records, stamped
            # with it: the rows moving inactive users' vectors do not wait for the records'
            # writes (bench/RESULTS.md 'tail', 12-01), and an active user's record is served
            # as soon as it is written (stamped with a version already current).
            self.times.shared = now
            made = self.versions.publish_shared(now)
            if made is None and users_due:  # nothing but the records to ship: stamped ahead,
                self.publish_active_users(now, ahead=True)  # then the version they are owed
                made = self.versions.publish_shared(now)
            t1 = time.perf_counter()
            self._spent["shared"] += t1 - t0
            if made is not None:
                self._shared_versions += 1
                if self._active:  # those naming a key no version carries yet: the next tick
                    self.publish_active_users(now, known_only=True)
            self._spent["users"] += time.perf_counter() - t1
            self._after_versions(now)
            return
        # Users first (freshness: a click is not held up by a big item version), except those
        # naming a shared key no version carries yet: they go right after the next version.
        if users_due:
            self.publish_active_users(now, ahead=True)
        t1 = time.perf_counter()
        dirty = self._items_dirty or bool(self._active) or self.versions.owes
        if dirty and now - self.times.items >= s.publish_items_s:
            self.publish_items(now)
            t2 = time.perf_counter()
            if self._active:
                self.publish_active_users(now)
            self._spent["items"] += t2 - t1
            self.times.shared = now  # an item version carries the shared rows too
            t1 = time.perf_counter()
        self._spent["users"] += t1 - t0
        self._after_versions(now)

    def _after_versions(self, now: float) -> None:
        """The end of a tick: a slice of the offline i2i (see :data:`I2I_SLICE`), the
        wall-time report."""
        s = self.config
        t1 = time.perf_counter()
        if now - self.times.i2i >= s.offline_i2i_s:
            self.times.i2i = now
            self._i2i_left = s.offline_i2i_per_tick
        if self._i2i_left > 0:
            part = min(I2I_SLICE, self._i2i_left)
            self._i2i_left -= part
            if self.versions.refresh_i2i(part):
                self.store.put_status(i2i_published_at=now)
            self._spent["i2i"] += time.perf_counter() - t1
        self._report(now)

    def _report(self, now: float) -> None:
        """Every ``REPORT_S``: where the publisher's wall time went (one INFO line)."""
        if now - self._reported_at < REPORT_S:
            return
        if self._reported_at:
            t = self._spent
            log.info(
                "publisher, last %.0f s: items %.2f s (%d versions), shared rows %.2f s (%d "
                "versions), user records %.2f s, i2i %.2f s, history %.2f s",
                now - self._reported_at, t["items"],
                self.version - self._reported_version - self._shared_versions, t["shared"],
                self._shared_versions, t["users"], t["i2i"], t["history"],
            )
        self._spent = dict.fromkeys(SPENT, 0.0)
        self._reported_at, self._reported_version = now, self.version
        self._shared_versions = 0

    def publish_all(self) -> None:
        """Publish everything now (used at shutdown and by tests)."""
        now = time.time()
        self.publish_items(now, force=True)
        self._active.update(self.model.known_users())
        self.publish_active_users(now)
        self.publish_offline_i2i(now, budget=len(self.model.known_items()))

    def republish(self, now: float | None = None) -> None:
        """Everything again (Redis lost it): full snapshot, every known user, i2i from scratch."""
        now = time.time() if now is None else now
        self.versions.republish(self.model.known_users(), now)
        self.republish_histories()
        self._active.clear()
        self._items_dirty = False
        self.times.items = self.times.users = now
        self.republished += 1
        self.store.put_status(model_version=self.version, republished_at=now,
                              users_published_at=now)
        self.publish_offline_i2i(now)

    def republish_histories(self, chunk: int = 10_000) -> int:
        """Users' recent items again, from what the model keeps (``TrainConfig.recent_items``;
        it is in every checkpoint). Returns the number of histories written.

        One snapshot of the model's rings (a copy under the model lock), written in chunks. The
        snapshot holds every positive the model had learned, including those whose hand-over to
        :meth:`applied` is still on its way: hand-overs come in learning order, so exactly the
        next ``n_positives - seen`` positives handed over are not pushed again. (Events whose
        hand-over was dropped because the publisher fell 200k events behind are not counted as
        seen: a republish after that leaves out as many newer pushes; their users' histories
        were already short of those events.)
        """
        snap = self.model.recent_snapshot()
        written = 0
        for start in range(0, len(snap.user_ids), chunk):
            stop = min(start + chunk, len(snap.user_ids))
            written += self.store.put_histories(
                snap.user_ids[start:stop], snap.histories(start, stop), self.config.history_len
            )
        self._history_skip = max(0, snap.n_positives - self._positives_seen)
        return written

    def publish_active_users(
        self, now: float, *, ahead: bool = False, known_only: bool = False
    ) -> int:
        """Records of users active since the last cycle (see ``VersionedPublisher.publish_users``;
        with ``ahead`` or ``known_only`` those naming a not yet shipped shared key stay for
        after the next version).
        """
        users = sorted(self._active)
        self._active = set(
            self.versions.publish_users(users, now, ahead=ahead, known_only=known_only))
        self.times.users = now
        self.store.put_status(users_published_at=now)
        return len(users) - len(self._active)

    def publish_items(self, now: float, *, force: bool = False) -> int:
        """One new version (delta, plus a full snapshot when due) if anything changed."""
        published = self.versions.publish_items(now, force=force)
        self._items_dirty = False
        self.times.items = now
        if published is not None:
            log.info("published v%d: %d item rows (of %d composed, %d held back), %d shared "
                     "user rows%s in %.3f s", published.version, published.rows,
                     published.candidates, published.held, published.shared_rows,
                     " + full snapshot" if published.full else "", published.seconds)
        return self.version

    def publish_offline_i2i(self, now: float, budget: int | None = None) -> int:
        """Refresh the offline neighbours of a bounded number of items (changed ones first)."""
        n = self.versions.refresh_i2i(budget)
        self.times.i2i = now
        if n:
            self.store.put_status(i2i_published_at=now)
        return n
