"""A seeded synthetic click stream with planted user/item clusters (for tests, demos and scale).

User ``u{n}`` belongs to cluster ``n % clusters`` and item ``i{m}`` to cluster ``m % clusters``.
A user clicks an item of its own cluster with probability ``affinity``, else any item, so a
model that learned anything ranks same-cluster items first; chance is ``1 / clusters``.
Profiles carry the cluster as a feature (``segment`` for users, ``category`` for items).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SyntheticStream:
    """Parameters of the planted-cluster stream; iterate :meth:`events` for any number of events."""

    users: int = 1000
    items: int = 500
    clusters: int = 10
    affinity: float = 0.9
    seed: int = 0
    start_ts: float | None = None  # event time of the first event; None: the last one is now
    events_per_s: float = 100.0

    def user_cluster(self, user_id: str) -> int:
        """Planted cluster of a user id ``u{n}``."""
        return int(user_id[1:]) % self.clusters

    def item_cluster(self, item_id: str) -> int:
        """Planted cluster of an item id ``i{m}``."""
        return int(item_id[1:]) % self.clusters

    def user_profiles(self) -> Iterator[dict]:
        """``fm.users`` messages for every user."""
        for n in range(self.users):
            yield {"user_id": f"u{n}", "features": {"segment": f"s{n % self.clusters}"}}

    def item_profiles(self) -> Iterator[dict]:
        """``fm.items`` messages for every item."""
        for m in range(self.items):
            yield {"item_id": f"i{m}", "features": {"category": f"c{m % self.clusters}"}}

    def events(self, n: int, *, chunk: int = 4096) -> Iterator[dict]:
        """``n`` ``fm.events`` messages, generated in vectorised chunks."""
        rng = np.random.default_rng(self.seed)
        # default: the stream ends now, so event-time freshness reads sensibly after a replay
        start = time.time() - n / self.events_per_s if self.start_ts is None else self.start_ts
        c = self.clusters
        per_cluster = -(-self.items // c)
        done = 0
        while done < n:
            size = min(chunk, n - done)
            users = rng.integers(0, self.users, size)
            in_cluster = rng.random(size) < self.affinity
            # An item of the user's own cluster: cluster + c * j for j < items in that cluster.
            own = (users % c) + c * rng.integers(0, per_cluster, size)
            own = np.where(own < self.items, own, users % c)
            items = np.where(in_cluster, own, rng.integers(0, self.items, size))
            hours = rng.integers(0, 24, size)
            for j in range(size):
                yield {
                    "user_id": f"u{users[j]}",
                    "item_id": f"i{items[j]}",
                    "label": 1,
                    "ts": start + (done + j) / self.events_per_s,
                    "context": {"hour": str(hours[j])},
                }
            done += size
