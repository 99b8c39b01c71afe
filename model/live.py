"""Live quality: test-then-train hit rate on a sample of the incoming positives.

Before a batch is learned, a sample of its positives is scored against the current model: the
event is a hit when its item is in the user's top-``k`` of every known item (the user's
composed vector against the item vectors, as serving does, without context). Warm = the user
had a positive before the event, cold = not (profile or fallback rows only). Rates are over
the last ``window`` sampled events of each cohort.

Cheap by construction: at most ``max_per_batch`` positives per batch (spread evenly over its
positives, at most every ``sample_every``-th), one matrix product for all of them, and the item
vectors are recomposed only after ``item_refresh_events`` learned events (items new to the
catalogue are composed as they appear), so ranks are against item vectors at most that stale.
Items the user already consumed are not excluded (the model keeps no full history), which makes
the live rate a lower bound of the bench's HR@k.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from model.online import OnlineFM

COHORTS = ("warm", "cold")


class LiveHitRate:
    """Rolling test-then-train HR@k, warm and cold apart (see the module docstring)."""

    def __init__(
        self,
        k: int = 10,
        sample_every: int = 1,
        max_per_batch: int = 64,
        window: int = 2000,
        item_refresh_events: int = 20_000,
    ) -> None:
        if k < 1 or sample_every < 1 or max_per_batch < 1 or window < 1:
            raise ValueError("k, sample_every, max_per_batch and window must be >= 1")
        self.k = int(k)
        self.sample_every = int(sample_every)
        self.max_per_batch = int(max_per_batch)
        self.item_refresh_events = int(item_refresh_events)
        self._hits = {c: deque(maxlen=window) for c in COHORTS}
        self._seen = 0  # positives offered so far (sampling phase)
        self.sampled = 0
        """Positives sampled so far, in all (the windows hold only the newest)."""
        self._items: tuple[list[str], np.ndarray] | None = None
        self._items_at = 0  # model.n_updates when the item vectors were composed
        self._index: dict[str, int] = {}  # item id -> row of the composed item vectors
        self._items_of: OnlineFM | None = None  # the model they were composed from
        self._buf = np.zeros((0, 0), dtype=np.float32)  # item vectors, with room to grow
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # sampled, unscored

    def observe(
        self,
        model: OnlineFM,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        labels: np.ndarray | None = None,
    ) -> int:
        """Score the sampled positives of a batch BEFORE it is learned; returns how many."""
        n = self.sample(model, user_ids, item_ids, labels)
        self.score()
        return n

    def sample(
        self,
        model: OnlineFM,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        labels: np.ndarray | None = None,
        limit: int | None = None,
    ) -> int:
        """Take the sampled positives of a batch BEFORE it is learned (their users' vectors as
        of now; at most ``max_per_batch``, or ``limit`` when smaller); :meth:`score` ranks them.

        The sample is a fixed number of the batch's positives, not a share of them: the
        batch's fixed cost (the users' vectors, the item vectors' upkeep, one product) is paid
        once for up to ``max_per_batch`` samples, so a CPU budget buys samples, not batches
        (the trainer's polls under a paced stream hold tens of positives: one in 16 of them gave
        three samples for the same fixed cost). They are spread evenly over the positives, at
        most every ``sample_every``-th positive of the stream.

        Sampling the steps of a poll one by one and scoring once after the poll gives each
        step's events the model just before that step, for one pass over the item vectors.
        """
        n = len(user_ids)
        pos = np.arange(n) if labels is None else np.flatnonzero(np.asarray(labels) >= 0.5)
        if pos.size == 0:
            return 0
        cap = self.max_per_batch if limit is None else min(limit, self.max_per_batch)
        if cap <= 0:
            self._seen += pos.size
            return 0
        offset = (-self._seen) % self.sample_every  # every sample_every-th of the stream
        self._seen += pos.size
        pick = pos[offset :: self.sample_every]
        if pick.size > cap:  # cap of them, evenly spread over the batch
            pick = pick[(np.arange(cap) * pick.size) // cap]
        if pick.size == 0:
            return 0
        self.sampled += int(pick.size)
        ids, _ = self._item_vectors(model)
        if not ids:  # nothing known yet: nothing can be recommended, every sample misses
            self._hits["cold"].extend([False] * int(pick.size))
            return int(pick.size)
        index = self._index
        users = [user_ids[j] for j in pick]
        target = np.array([index.get(item_ids[j], -1) for j in pick])
        warm = model.user_positives(users) > 0
        self._pending.append((model.user_vectors(users), target, warm))
        return int(pick.size)

    def score(self) -> None:
        """Rank the samples taken since the last call against the item vectors; record hits."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        assert self._items is not None
        e_items = self._items[1]
        uvec = np.concatenate([p[0] for p in pending])
        target = np.concatenate([p[1] for p in pending])
        warm = np.concatenate([p[2] for p in pending])
        scores = uvec @ e_items.T
        known = target >= 0
        t_score = np.where(known, scores[np.arange(target.size), np.maximum(target, 0)], np.inf)
        rank = (scores > t_score[:, None]).sum(axis=1)  # items strictly better than the target
        hit = known & (rank < self.k)
        for c, m in (("warm", warm), ("cold", ~warm)):
            self._hits[c].extend(hit[m].tolist())

    def _item_vectors(self, model: OnlineFM) -> tuple[list[str], np.ndarray]:
        n_known = model.n_items
        stale = (
            self._items is None
            or self._items_of is not model
            or model.n_updates - self._items_at >= self.item_refresh_events
            or len(self._items[0]) > n_known
        )
        if stale:
            self.score()  # samples taken so far index the vectors being replaced
            ids, vectors = model.item_vectors()
            self._buf = vectors
            self._items = (ids, vectors)
            self._items_at = model.n_updates
            self._items_of = model
            self._index = {x: j for j, x in enumerate(ids)}  # built once per refresh
        elif len(self._items[0]) < n_known:  # type: ignore[index]
            # the catalogue grew (ids only ever append): compose the new items only, into a
            # buffer that doubles (amortised O(new items), not a copy of all of them)
            ids, _ = self._items  # type: ignore[misc]
            n = len(ids)
            new_ids, new_vectors = model.item_vectors(model.known_items()[n:])
            m = n + len(new_ids)
            if m > self._buf.shape[0]:
                grown = np.empty((max(m, 2 * self._buf.shape[0]), self._buf.shape[1]),
                                 dtype=self._buf.dtype)
                grown[:n] = self._buf[:n]
                self._buf = grown
            self._buf[n:m] = new_vectors
            self._index.update((x, n + j) for j, x in enumerate(new_ids))
            ids.extend(new_ids)  # our own list (from model.item_vectors)
            self._items = (ids, self._buf[:m])
        assert self._items is not None
        return self._items

    def rates(self) -> dict[str, float]:
        """Hit rate of each cohort over its window (NaN while it has no sample)."""
        return {c: (float(np.mean(h)) if h else float("nan")) for c, h in self._hits.items()}

    def counts(self) -> dict[str, int]:
        """Sampled events in each cohort's window."""
        return {c: len(h) for c, h in self._hits.items()}
