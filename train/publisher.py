"""The publisher: re-exports what the trainer learned so serving workers can use it.

Runs beside the trainer (it reads the in-memory model between batches) and writes to Redis:
- user vectors (E_user) of users active since the last cycle, every ``publish_active_s``, and a
  rolling sweep so that every known user is refreshed within ``publish_all_s``;
- item index snapshots (E_item of every known item, the bias and the context table), versioned,
  pointer moved last and only forward, every ``publish_items_s`` when the model changed;
- the offline i2i table (top-K neighbours of every item) every ``offline_i2i_s``;
- popular items (the fallback for users with neither vector nor profile) and a status hash.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.online import OnlineFM
from serving.index import FlatIndex, ItemSnapshot, LoadedIndex
from serving.queries import item_queries
from train.config import PublishConfig
from train.store_writer import StoreWriter

log = logging.getLogger(__name__)

POPULAR_K = 1000


@dataclass(frozen=True)
class PublishStats:
    """What the publisher has published (for metrics)."""

    version: int  # the item snapshot version last published
    times: PublishTimes  # wall-clock seconds of the last publish of each kind (0 = never)


@dataclass
class PublishTimes:
    """Wall-clock seconds of the last publish of each kind (0 = never)."""

    users: float = 0.0
    sweep: float = 0.0
    items: float = 0.0
    i2i: float = 0.0


class Publisher:
    """Writes user vectors, item snapshots, offline i2i and popularity to the store on cadences."""

    def __init__(self, config: PublishConfig, store: StoreWriter, model: OnlineFM) -> None:
        self.config = config
        self.store = store
        self.model = model
        self.times = PublishTimes()
        self._active: set[str] = set()
        self._sweep_pos = 0
        self._items_dirty = True
        self._i2i_dirty = True
        self.version = (store.current_item_version() or 0)
        self.last: dict[str, float] = {}

    def stats(self) -> PublishStats:
        """The version and publish times now (a copy, safe to read from another thread)."""
        t = self.times
        return PublishStats(self.version, PublishTimes(t.users, t.sweep, t.items, t.i2i))

    # --- fed by the trainer ----------------------------------------------------------------

    def applied(self, events: Sequence) -> None:
        """Remember who was active and record their recent positive items as history."""
        self._active.update(e.user_id for e in events)
        positives = [e for e in events if e.label == 1]
        if positives:
            self.store.push_history(
                [e.user_id for e in positives], [e.item_id for e in positives],
                self.config.history_len,
            )
        self._items_dirty = self._i2i_dirty = True

    def profiles_changed(self, user_ids: Sequence[str]) -> None:
        """Profiled users (maybe never seen in events) get vectors from their features."""
        self._active.update(user_ids)
        self._items_dirty = self._i2i_dirty = True

    def checkpointed(self, progress) -> None:
        self.store.put_status(
            checkpoint_at=time.time(),
            events_applied=progress.events_applied,
            trainer_event_time=progress.newest_event_ts or 0.0,
            dead_letters=progress.dead_letters,
        )

    # --- cadences --------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Publish whatever is due at ``now``. Cheap when nothing is."""
        now = time.time() if now is None else now
        s = self.config
        if self._items_dirty and now - self.times.items >= s.publish_items_s:
            self.publish_items(now)
        if self._active and now - self.times.users >= s.publish_active_s:
            self.publish_active_users(now)
        if now - self.times.sweep >= s.publish_active_s:
            self.sweep_users(now)
        if self._i2i_dirty and now - self.times.i2i >= s.offline_i2i_s:
            self.publish_offline_i2i(now)

    def publish_all(self) -> None:
        """Publish everything now (used at shutdown and by tests)."""
        now = time.time()
        self.publish_items(now)
        self._active.update(self.model.known_users())
        self.publish_active_users(now)
        self.publish_offline_i2i(now)

    def publish_active_users(self, now: float) -> int:
        """Vectors of users active since the last cycle."""
        users = sorted(self._active)
        self._active.clear()
        self._put_users(users)
        self.times.users = now
        self.store.put_status(users_published_at=now)
        return len(users)

    def sweep_users(self, now: float) -> int:
        """A slice of all users sized so the whole population is refreshed within publish_all_s."""
        users = self.model.known_users()
        if not users:
            return 0
        cycles = max(1.0, self.config.publish_all_s / self.config.publish_active_s)
        size = int(np.ceil(len(users) / cycles))
        start = self._sweep_pos % len(users)
        chunk = users[start:start + size]
        self._sweep_pos = start + size
        self._put_users(chunk)
        self.times.sweep = now
        if self._sweep_pos >= len(users):
            self.store.put_status(all_users_refreshed_at=now)
        return len(chunk)

    def _put_users(self, users: list[str], batch: int = 8192) -> None:
        for i in range(0, len(users), batch):
            part = users[i:i + batch]
            self.store.put_user_vectors(part, self.model.user_vectors(part), self.version)

    def publish_items(self, now: float) -> int:
        """A new item snapshot version (vectors, bias, context table) and popular items."""
        ids, vectors = self.model.item_vectors()
        if not ids:
            return self.version
        self.version += 1
        snapshot = ItemSnapshot(
            version=self.version,
            item_ids=list(ids),
            vectors=np.ascontiguousarray(vectors, dtype=np.float32),
            bias=float(self.model.bias),
            extra={"context": self.model.context_table().to_bytes()},
            created_at=now,
        )
        self.store.put_item_snapshot(snapshot)
        counts_ids, counts = self.model.item_counts()
        order = np.argsort(-counts, kind="stable")[:POPULAR_K]
        self.store.put_popular([(counts_ids[j], float(counts[j])) for j in order])
        self._items_dirty = False
        self.times.items = now
        self.store.put_status(model_version=self.version, items_published_at=now)
        log.info("published item snapshot v%d (%d items)", self.version, len(ids))
        return self.version

    def publish_offline_i2i(self, now: float) -> int:
        """Top-K neighbours of every item (never itself), by the online i2i score."""
        ids, vectors = self.model.item_vectors()
        if not ids:
            return 0
        snapshot = ItemSnapshot(self.version, list(ids), vectors.astype(np.float32),
                                float(self.model.bias), {}, now)
        loaded = LoadedIndex(snapshot, FlatIndex(snapshot.vectors))
        k = self.config.offline_i2i_k
        table: dict[str, list[tuple[str, float]]] = {}
        step = 4096
        for start in range(0, len(ids), step):
            rows = np.arange(start, min(start + step, len(ids)))
            hits = loaded.search_excluding(item_queries(snapshot.vectors[rows]), k,
                                           [{int(r)} for r in rows])
            for r, found in zip(rows, hits, strict=True):
                table[ids[r]] = [(ids[j], s) for j, s in found]
        self.store.put_offline_i2i(self.version, table)
        self._i2i_dirty = False
        self.times.i2i = now
        self.store.put_status(i2i_published_at=now)
        return len(table)
