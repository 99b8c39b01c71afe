"""Recommendation quality on MovieLens: refresh-interval prequential, online FM vs batch peers.

Protocol (the same for every model, in one run):

* the stream is every rating in time order (ties keep file order); a *positive* is a rating
  >= 4. Low ratings are explicit negatives for the FM (its default loss skips them) and count
  as interactions (excluded from lists, make a user warm);
* all user and item profiles are known up front (compacted profile topics read first);
* **periods**: hyper-parameters of every model (ours included) are chosen on the *validation*
  period (positives 60-80% of the stream, models trained on 0-60%), the figures come from the
  *test* period (positives 80-100%, models trained on 0-80%); the test period is never used
  for any choice;
* **intervals**: the period is cut into refresh intervals: ``1`` (before every positive),
  ``hour`` / ``day`` (of event time), or ``N`` positives (``2000``). At the start of an interval
  every user who has a positive in it gets ONE top-10 list from each model as refreshed at that
  moment (batch peers retrained on everything before it, the online FM having learned every
  event before it), excluding items the user interacted with before the interval and items no
  one interacted with yet. Each positive in the interval is a hit if its item is in its user's
  list. Then the interval's events are learned / added;
* a positive is **warm** if its user interacted before the interval, **cold** otherwise (only
  the profile is known; batch peers fall back to popularity);
* warm HR is also reported apart by the item's age (first event < / >= 120 days before the
  interval) and by the user's positives before the interval (< / >= 50);
* HR@10 = hits / positives; mean ± std over seeds (popularity is deterministic); catalogue
  coverage = distinct items in any list / items in the catalogue (the test period's lists);
* CPU: process CPU seconds per interval spent making each model current (FM: learning the
  interval's events; peers: one retrain), one thread for everyone.

Peers (retrained at every interval on the positives so far): ``implicit`` ALS, BPR, item-kNN
(cosine), and ``cornac`` EASE (Steck 2019, closed-form item-item; a strong batch baseline on
MovieLens). Baselines: popularity (positives so far), popularity of the last 7 days, and for cold
users popularity within the user's segment (gender x age bucket).

Run: ``.venv/bin/python bench/quality.py --movielens ../shared/data/ml-100k [--quick]``
(``--quick``: intervals day and 2000, small grids; the full run adds hour and 1 event).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import print_table, read_movielens, record, summary_line  # noqa: E402
from model import FeatureSchema, OnlineFM, TrainConfig  # noqa: E402
from model.learner import Learner, LearnPolicy  # noqa: E402

warnings.filterwarnings("ignore", module="implicit")
ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = {"movielens": ROOT / "config" / "movielens.toml", "ids": None}
K = 10
DAY = 86400.0
OLD_ITEM_S = 120 * DAY  # warm HR is also reported apart for items older than this
HEAVY_USER = 50  # ... and for users with at least this many positives before the interval
AGE = (18, 25, 35, 45, 50, 56)


# ----------------------------------------------------------------------------- data
@dataclasses.dataclass
class Data:
    """The rating stream as integer indices (users and items in first-appearance order)."""

    u: np.ndarray  # (n,) int user index
    i: np.ndarray  # (n,) int item index
    ts: np.ndarray  # (n,) float seconds
    pos: np.ndarray  # (n,) bool rating >= 4
    user_ids: list[str]
    item_ids: list[str]
    user_profiles: list[dict[str, Any]]
    item_profiles: list[dict[str, Any]]
    segment: np.ndarray  # (n_users,) int gender x age bucket

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


def load(path: str) -> Data:
    ml = read_movielens(path)
    user_ids = (
        sorted(ml.user_profiles, key=int)
        if all(x.isdigit() for x in ml.user_profiles)
        else sorted(ml.user_profiles)
    )
    item_ids = (
        sorted(ml.item_profiles, key=int)
        if all(x.isdigit() for x in ml.item_profiles)
        else sorted(ml.item_profiles)
    )
    uix = {x: j for j, x in enumerate(user_ids)}
    iix = {x: j for j, x in enumerate(item_ids)}
    uprof = [ml.user_profiles[x] for x in user_ids]
    seg = np.array(
        [
            (p.get("gender") == "F") * 16 + int(np.searchsorted(AGE, p.get("age", 0), "right"))
            for p in uprof
        ]
    )
    return Data(
        u=np.array([uix[x] for x in ml.users]),
        i=np.array([iix[x] for x in ml.items]),
        ts=ml.ts,
        pos=ml.ratings >= 4,
        user_ids=user_ids,
        item_ids=item_ids,
        user_profiles=uprof,
        item_profiles=[ml.item_profiles[x] for x in item_ids],
        segment=seg,
    )


def period(d: Data, lo_frac: float, hi_frac: float) -> tuple[int, int]:
    """Stream indices ``[start, end)`` holding positives ``lo_frac..hi_frac`` of all positives."""
    p = np.flatnonzero(d.pos)
    start = int(p[int(p.size * lo_frac)])
    end = d.u.size if hi_frac >= 1.0 else int(p[int(p.size * hi_frac)])
    return start, end


def boundaries(d: Data, start: int, end: int, interval: str) -> list[int]:
    """Interval starts in ``[start, end)`` (plus ``end``)."""
    p = np.flatnonzero(d.pos[start:end]) + start
    if interval == "1":
        cuts = p
    elif interval in ("hour", "day"):
        width = 3600.0 if interval == "hour" else DAY
        b = np.floor(d.ts[start:end] / width)
        cuts = start + np.concatenate([[0], np.flatnonzero(np.diff(b)) + 1])
    else:
        n = int(interval)
        cuts = p[::n]
    cuts = sorted(set([start, *cuts.tolist()]))
    return [*cuts, end]


# ----------------------------------------------------------------------------- models
class Model:
    """A recommender under the protocol: sees events, is refreshed, scores users."""

    name = "?"
    uses_profile = False  # cold users get its own scores (else popularity)
    # learns in observe(), so an interval with no new events before it costs nothing and is
    # not an update: its CPU per interval is averaged over the intervals that brought events
    # (batch peers refit at every interval, the first one included)
    learns_online = False

    def observe(self, d: Data, lo: int, hi: int) -> None:
        """Events ``[lo, hi)`` happened (the online model learns them now)."""

    def refresh(self, d: Data, upto: int) -> None:
        """Make the model current for everything before ``upto`` (batch peers retrain)."""

    def scores(self, users: np.ndarray) -> np.ndarray:
        """``(len(users), n_items)`` scores, higher first."""
        raise NotImplementedError


class Popularity(Model):
    name = "popularity"
    learns_online = True

    def __init__(self, d: Data, window_s: float | None = None) -> None:
        self.counts = np.zeros(d.n_items)
        self.window = window_s
        self.oldest = 0
        if window_s:
            self.name = f"popularity-{window_s / DAY:.0f}d"

    def observe(self, d: Data, lo: int, hi: int) -> None:
        m = d.pos[lo:hi]
        np.add.at(self.counts, d.i[lo:hi][m], 1.0)
        if self.window:
            t = d.ts[hi - 1] - self.window
            old = self.oldest
            while old < hi and d.ts[old] < t:
                old += 1
            m = d.pos[self.oldest : old]
            np.add.at(self.counts, d.i[self.oldest : old][m], -1.0)
            self.oldest = old

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts, (users.size, self.counts.size))


class SegmentPopularity(Model):
    """Popularity within the user's segment (gender x age bucket): a profile-aware baseline."""

    name = "segment-popularity"
    uses_profile = True
    learns_online = True

    def __init__(self, d: Data) -> None:
        self.seg = d.segment
        self.counts = np.zeros((int(d.segment.max()) + 1, d.n_items))
        self.total = np.zeros(d.n_items)

    def observe(self, d: Data, lo: int, hi: int) -> None:
        m = d.pos[lo:hi]
        u, i = d.u[lo:hi][m], d.i[lo:hi][m]
        np.add.at(self.counts, (self.seg[u], i), 1.0)
        np.add.at(self.total, i, 1.0)

    def scores(self, users: np.ndarray) -> np.ndarray:
        return self.counts[self.seg[users]] + 1e-3 * self.total


PEER_NAMES = {"als": "ALS", "bpr": "BPR", "knn": "item-kNN", "ease": "EASE"}


class BatchPeer(Model):
    """A batch model retrained from scratch on all positives before each interval: ``implicit``
    ALS / BPR / item-kNN, or ``cornac`` EASE (its own id maps, translated back here)."""

    def __init__(
        self,
        d: Data,
        kind: str,
        params: dict[str, Any],
        seed: int,
        window_s: float | None = None,
        name: str | None = None,
    ) -> None:
        self.kind, self.params, self.seed = kind, dict(params), seed
        self.name = name or PEER_NAMES[kind]
        self.window = window_s
        self.times: list[np.ndarray] = []
        self.n_users, self.n_items = d.n_users, d.n_items
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.fitted_upto = -1
        self.model: Any = None
        self.ui: Any = None
        self.pop = np.zeros(d.n_items)

    def observe(self, d: Data, lo: int, hi: int) -> None:
        m = d.pos[lo:hi]
        self.rows.append(d.u[lo:hi][m])
        self.cols.append(d.i[lo:hi][m])
        self.times.append(d.ts[lo:hi][m])
        np.add.at(self.pop, d.i[lo:hi][m], 1.0)

    def refresh(self, d: Data, upto: int) -> None:
        if upto == self.fitted_upto:
            return
        import scipy.sparse as sp

        r, c = np.concatenate(self.rows), np.concatenate(self.cols)
        if self.window:  # only the most recent window of positives (before `upto`)
            t = np.concatenate(self.times)
            keep = t >= d.ts[upto - 1] - self.window
            r, c = r[keep], c[keep]
            self.pop = np.bincount(c, minlength=self.n_items).astype(np.float64)
        ui = sp.csr_matrix(
            (np.ones(r.size, dtype=np.float32), (r, c)), shape=(self.n_users, self.n_items)
        )
        ui.data[:] = 1.0  # duplicates (none in MovieLens) count once
        self.ui = ui
        self.has = np.diff(ui.indptr) > 0
        if self.kind == "ease":
            self._fit_ease(r, c)
            self.fitted_upto = upto
            return
        if self.kind == "knn":
            from implicit.nearest_neighbours import CosineRecommender

            m = CosineRecommender(K=self.params["K"], num_threads=1)
        elif self.kind == "als":
            from implicit.cpu.als import AlternatingLeastSquares

            m = AlternatingLeastSquares(
                factors=self.params["factors"],
                regularization=self.params["reg"],
                alpha=self.params["alpha"],
                iterations=self.params.get("iterations", 15),
                num_threads=1,
                random_state=self.seed,
            )
        else:
            from implicit.cpu.bpr import BayesianPersonalizedRanking

            m = BayesianPersonalizedRanking(
                factors=self.params["factors"],
                learning_rate=self.params["lr"],
                regularization=self.params["reg"],
                iterations=self.params.get("iterations", 100),
                num_threads=1,
                random_state=self.seed,
            )
        m.fit(ui, show_progress=False)
        self.model = m
        self.fitted_upto = upto

    def _fit_ease(self, r: np.ndarray, c: np.ndarray) -> None:
        """cornac's EASE on the (user, item) positives; remembers cornac's index maps."""
        from cornac.data import Dataset
        from cornac.models import EASE

        us, its = r.astype(str).tolist(), c.astype(str).tolist()
        triples = list(zip(us, its, [1.0] * r.size, strict=True))
        ds = Dataset.build(triples, fmt="UIR", seed=self.seed)
        m = EASE(lamb=self.params["lamb"], posB=self.params.get("posB", True), verbose=False)
        m.fit(ds)
        self.u_col = np.full(self.n_users, -1, dtype=np.int64)
        for k, j in ds.uid_map.items():
            self.u_col[int(k)] = j
        self.i_col = np.full(self.n_items, -1, dtype=np.int64)
        for k, j in ds.iid_map.items():
            self.i_col[int(k)] = j
        self.model = m

    def scores(self, users: np.ndarray) -> np.ndarray:
        if self.kind == "ease":
            s = np.zeros((users.size, self.n_items))
            cu = self.u_col[users]
            have_i = self.i_col >= 0
            ok = cu >= 0
            if ok.any():
                x = self.model.U[cu[ok]]  # the users' rows of cornac's user x item matrix
                s_ok = np.asarray(x @ self.model.B, dtype=np.float64)
                block = np.zeros((int(ok.sum()), self.n_items))
                block[:, have_i] = s_ok[:, self.i_col[have_i]]
                s[ok] = block
        elif self.kind == "knn":
            s = np.asarray((self.ui[users] @ self.model.similarity).todense(), dtype=np.float64)
        else:
            s = self.model.user_factors[users] @ self.model.item_factors.T
            s = np.asarray(s, dtype=np.float64)
        tie = 1e-9 * self.pop / max(self.pop.max(), 1.0)
        s = s + tie
        no_data = ~self.has[users]  # interacted, but no positive yet: popularity
        if no_data.any():
            s[no_data] = self.pop
        return s


class OnlineFMModel(Model):
    """fmstream's online FM under a :class:`LearnPolicy`; recommends with the folded vectors
    exactly as serving does (``E_user @ E_item``), no context (one list per interval)."""

    name = "fmstream FM"
    uses_profile = True
    learns_online = True

    def __init__(
        self,
        d: Data,
        schema: FeatureSchema | None,
        config: TrainConfig,
        policy: LearnPolicy,
        poll: int | None = None,
        name: str | None = None,
    ) -> None:
        if name:
            self.name = name
        self.fm = OnlineFM(schema, config)
        self.fm.upsert_users(d.user_ids, d.user_profiles)
        self.fm.upsert_items(d.item_ids, d.item_profiles)
        self.learner = Learner(self.fm, policy)
        self.poll = poll
        self.d = d
        self.label = d.pos.astype(np.float32)
        self.uid = np.array(d.user_ids, dtype=object)
        self.iid = np.array(d.item_ids, dtype=object)
        self.hours = [{"hour": str(int(t // 3600) % 24)} for t in d.ts]
        self.bootstrap_cpu_s = 0.0

    def observe(self, d: Data, lo: int, hi: int) -> None:
        # the trainer hands the learner one Kafka poll at a time: emulate polls of `poll`
        step = self.poll or (hi - lo)
        for a in range(lo, hi, max(step, 1)):
            b = min(hi, a + step)
            self.learner.learn(
                self.uid[d.u[a:b]].tolist(),
                self.iid[d.i[a:b]].tolist(),
                self.label[a:b],
                contexts=self.hours[a:b],
                ts=d.ts[a:b],
            )
        if lo == 0 and self.learner.policy.bootstrap_passes:
            # the start of the evaluated period = a trainer (re)start: extra passes over the
            # retained history (its CPU is reported apart: once, not per interval)
            c0 = time.process_time()
            p = np.flatnonzero(d.pos[:hi])
            self.learner.bootstrap(
                self.uid[d.u[p]].tolist(),
                self.iid[d.i[p]].tolist(),
                contexts=[self.hours[j] for j in p.tolist()],
            )
            self.bootstrap_cpu_s += time.process_time() - c0

    def scores(self, users: np.ndarray) -> np.ndarray:
        _, e_items = self.fm.item_vectors(self.d.item_ids)
        e_users = self.fm.user_vectors(self.uid[users].tolist())
        return (e_users @ e_items.T).astype(np.float64)


# ----------------------------------------------------------------------------- protocol
@dataclasses.dataclass
class Score:
    hits: dict[str, int]
    n: dict[str, int]
    items: set[int]
    cpu_s: float
    intervals: int
    groups: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # g -> [hits, n]
    # warm positives by the age of their item (first event < / >= OLD_ITEM_S before the
    # interval): "new" -> [hits, n], "old" -> [hits, n]
    by_age: dict[str, list[int]] = dataclasses.field(
        default_factory=lambda: {"new": [0, 0], "old": [0, 0]}
    )
    # warm positives by their user's positives before the interval (< / >= HEAVY_USER):
    # "light" -> [hits, n], "heavy" -> [hits, n]
    by_user: dict[str, list[int]] = dataclasses.field(
        default_factory=lambda: {"light": [0, 0], "heavy": [0, 0]}
    )

    def hr(self, cohort: str) -> float:
        return self.hits[cohort] / max(self.n[cohort], 1)

    def hr_age(self, age: str) -> float:
        """Warm HR@10 on items first seen less (``new``) or more (``old``) than
        :data:`OLD_ITEM_S` before the interval."""
        h, n = self.by_age[age]
        return h / max(n, 1)

    def hr_user(self, kind: str) -> float:
        """Warm HR@10 of users with fewer (``light``) or at least (``heavy``)
        :data:`HEAVY_USER` positives before the interval."""
        h, n = self.by_user[kind]
        return h / max(n, 1)


def run(
    d: Data,
    models: list[Model],
    start: int,
    end: int,
    interval: str,
    catalogue: int,
    group: np.ndarray | None = None,
) -> dict[str, Score]:
    """Train every model on ``[0, start)``, then evaluate ``[start, end)`` by intervals.

    ``group`` (optional, one int per event, < 0 = none): hits and positives are also counted
    per group (e.g. drifted users after the switch).
    """
    torch.set_num_threads(1)
    out = {
        m.name: Score({"warm": 0, "cold": 0}, {"warm": 0, "cold": 0}, set(), 0.0, 0) for m in models
    }
    seen = np.zeros((d.n_users, d.n_items), dtype=bool)
    known = np.zeros(d.n_items, dtype=bool)
    active = np.zeros(d.n_users, dtype=bool)
    first_ts = np.full(d.n_items, np.inf)  # each item's first event (any rating)
    np.minimum.at(first_ts, d.i, d.ts)
    seen[d.u[:start], d.i[:start]] = True
    known[d.i[:start]] = True
    active[d.u[:start]] = True
    n_pos = np.bincount(d.u[:start][d.pos[:start]], minlength=d.n_users)  # positives so far
    pop = Popularity(d)
    pop.observe(d, 0, start)
    for m in models:
        m.observe(d, 0, start)
    cuts = boundaries(d, start, end, interval)
    done = start  # every model (and the masks) has seen [0, done)
    for a, b in itertools.pairwise(cuts):
        m_pos = d.pos[a:b]
        if not m_pos.any():
            continue
        if done < a:
            pop.observe(d, done, a)  # the reference for cold users of peers
            seen[d.u[done:a], d.i[done:a]] = True
            known[d.i[done:a]] = True
            active[d.u[done:a]] = True
            n_pos += np.bincount(d.u[done:a][d.pos[done:a]], minlength=d.n_users)
        ev_u, ev_i = d.u[a:b][m_pos], d.i[a:b][m_pos]
        users, row = np.unique(ev_u, return_inverse=True)
        warm = active[users]
        old_item = (d.ts[a] - first_ts[ev_i]) >= OLD_ITEM_S
        heavy = n_pos[ev_u] >= HEAVY_USER
        mask = seen[users] | ~known
        for m in models:
            c0 = time.process_time()
            if done < a:
                m.observe(d, done, a)
            m.refresh(d, a)
            out[m.name].cpu_s += time.process_time() - c0
            if done < a or not m.learns_online:
                out[m.name].intervals += 1  # an update: events learned, or a batch refit
            s = np.array(m.scores(users), dtype=np.float64, copy=True)
            if not m.uses_profile and (~warm).any():
                s[~warm] = pop.scores(users[~warm])
            s[mask] = -np.inf
            top = np.argpartition(-s, K, axis=1)[:, :K]
            hit = (top[row] == ev_i[:, None]).any(axis=1)
            sc = out[m.name]
            w = warm[row]
            sc.hits["warm"] += int(hit[w].sum())
            sc.hits["cold"] += int(hit[~w].sum())
            sc.n["warm"] += int(w.sum())
            sc.n["cold"] += int((~w).sum())
            sc.items.update(np.unique(top).tolist())
            for age, sel in (("old", w & old_item), ("new", w & ~old_item)):
                sc.by_age[age][0] += int(hit[sel].sum())
                sc.by_age[age][1] += int(sel.sum())
            for kind, sel in (("light", w & ~heavy), ("heavy", w & heavy)):
                sc.by_user[kind][0] += int(hit[sel].sum())
                sc.by_user[kind][1] += int(sel.sum())
            if group is not None:
                g = group[a:b][m_pos]
                for gv in np.unique(g[g >= 0]).tolist():
                    sel = g == gv
                    acc = sc.groups.setdefault(int(gv), [0, 0])
                    acc[0] += int(hit[sel].sum())
                    acc[1] += int(sel.sum())
        done = a
    del catalogue
    return out


# ----------------------------------------------------------------------------- the bench
def make(
    d: Data,
    spec: tuple[str, dict[str, Any]],
    seed: int,
    schema: FeatureSchema | None,
    poll: int | None = None,
) -> Model:
    kind, params = spec
    if kind == "pop":
        return Popularity(d)
    if kind == "pop7":
        return Popularity(d, 7 * DAY)
    if kind == "segpop":
        return SegmentPopularity(d)
    if kind == "fm":
        cfg = {k: v for k, v in params.items() if k in TrainConfig.__dataclass_fields__}
        pol = {k: v for k, v in params.items() if k in LearnPolicy.__dataclass_fields__}
        return OnlineFMModel(
            d,
            schema,
            TrainConfig(**{**cfg, "seed": seed}),
            LearnPolicy(**{**pol, "seed": seed}),
            poll=params.get("poll", poll),
            name=params.get("name"),
        )
    return BatchPeer(d, kind, params, seed)


def grids(quick: bool, schema: str = "movielens") -> dict[str, list[dict[str, Any]]]:
    """Hyper-parameter grids, searched on the validation period. The FM's first entry is the
    project defaults (sampled softmax, 512 shared popularity-drawn negatives, steps of 128);
    then the former defaults (BPR, 16 uniform negatives each the best of 3 candidates, steps
    of 256), and single knobs around the defaults (ids only: also the logistic loss at steps
    of 64, which won there before)."""
    bpr_hard = {
        "loss": "bpr",
        "negatives": 16,
        "neg_sampling": "uniform",
        "neg_alpha": 0.75,
        "neg_candidates": 3,
        "step_events": 256,
    }
    fm_quick = [
        {},
        bpr_hard,
        {"negatives": 256},
        {"step_events": 256},
        {"user_acc_decay": None},
        {"lr": 0.03},
    ]
    if schema == "ids":
        fm_quick += [
            {**bpr_hard, "loss": "logistic", "step_events": 64},
            {
                **bpr_hard,
                "loss": "logistic",
                "step_events": 64,
                "neg_candidates": 1,
                "acc_decay": 0.99,
                "user_acc_decay": None,
            },
        ]
    if quick:
        return {
            "als": [
                {"factors": f, "reg": r, "alpha": a}
                for f in (32, 64)
                for r in (10.0, 20.0)
                for a in (1.0, 2.0)
            ],
            "bpr": [{"factors": 64, "lr": lr, "reg": 0.01} for lr in (0.01, 0.05)],
            "knn": [{"K": k} for k in (100, 200)],
            "ease": [{"lamb": lam} for lam in (100.0, 500.0)],
            "fm": fm_quick,
        }
    return {
        "als": [
            {"factors": f, "reg": r, "alpha": a}
            for f in (16, 32, 64, 128)
            for r in (1.0, 10.0, 20.0, 50.0)
            for a in (1.0, 2.0, 10.0)
        ],
        "bpr": [
            {"factors": f, "lr": lr, "reg": r, "iterations": it}
            for f in (32, 64)
            for lr in (0.01, 0.05)
            for r in (0.001, 0.01)
            for it in (100, 300)
        ],
        "knn": [{"K": k} for k in (20, 50, 100, 200, 400)],
        "ease": [{"lamb": lam} for lam in (50.0, 100.0, 250.0, 500.0, 1000.0)],
        "fm": [
            *fm_quick,
            {**bpr_hard, "neg_candidates": 8},
            {"neg_alpha": 0.75},
            {"negatives": 1024},
            {"step_events": 64},
            {"dim": 64},
            {"replay": 1.0},
            {"bootstrap_passes": 1},
        ],
    }


def tune(
    d: Data,
    kind: str,
    grid: list[dict[str, Any]],
    base: dict[str, Any],
    schema: FeatureSchema | None,
) -> tuple[dict[str, Any], list[tuple[dict[str, Any], float]]]:
    """Best params by mean warm HR@10 on the validation period: batch peers at interval 2,000,
    seed 0 (a retrain per day of validation is too slow for the grids); the FM, whose runs are
    cheap, at intervals 2,000 and day, seeds 0 and 1."""
    start, end = period(d, 0.6, 0.8)
    seeds = (0, 1) if kind == "fm" else (0,)
    intervals = ("2000", "day") if kind == "fm" else ("2000",)
    tried = []
    for p in grid:
        params = {**base, **p}
        hrs = []
        for interval in intervals:
            for seed in seeds:
                m = make(d, (kind, params), seed, schema)
                hrs.append(run(d, [m], start, end, interval, d.n_items)[m.name].hr("warm"))
        tried.append((params, float(np.mean(hrs))))
        print(f"  validation {kind} {p}: warm HR@10 {np.mean(hrs):.4f}", file=sys.stderr)
    best = max(tried, key=lambda x: x[1])[0]
    return best, tried


def fmt(xs: list[float]) -> str:
    a = np.asarray(xs)
    return f"{a.mean():.4f} ± {a.std():.4f}" if a.size > 1 else f"{a.mean():.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--movielens", required=True, help="folder of ml-100k (or ml-1m) files")
    ap.add_argument("--schema", default="movielens", help="'movielens', 'ids', or a TOML path")
    ap.add_argument("--quick", action="store_true", help="intervals day+2000, small grids")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--first-seed",
        type=int,
        default=2,
        help="test seeds start here (the FM is tuned on seeds 0-1: reporting those would "
        "carry a winner's-curse bias)",
    )
    ap.add_argument("--intervals", default=None, help="comma list, e.g. day,2000,hour,1")
    ap.add_argument("--poll", type=int, default=0, help="FM: events per learn() call (0=interval)")
    ap.add_argument("--peers", default="als,bpr,knn,ease")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument(
        "--poll-check", action="store_true", help="add FM rows fed polls of 64 / 2048 events"
    )
    args = ap.parse_args()
    t_start = time.time()
    load0 = os.getloadavg()
    path = SCHEMAS.get(args.schema, args.schema)
    schema = None if path is None else FeatureSchema.load(path)
    d = load(args.movielens)
    intervals = (args.intervals or ("day,2000" if args.quick else "day,2000,hour,1")).split(",")
    peers = [p for p in args.peers.split(",") if p]
    g = grids(args.quick, args.schema)
    fm_base: dict[str, Any] = {}
    chosen: dict[str, dict[str, Any]] = {}
    for kind in [*peers, "fm"]:
        base = fm_base if kind == "fm" else {}
        chosen[kind], _ = tune(d, kind, g[kind], base, schema)
    start, end = period(d, 0.8, 1.0)
    rows = []
    kv: dict[str, Any] = {}
    for interval in intervals:
        res: dict[str, dict[str, list[float]]] = {}
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            specs = [("pop", {}), ("pop7", {}), ("segpop", {}), ("fm", chosen["fm"])]
            if args.poll_check and interval != "1":
                # poll-size invariance: the same policy fed polls of 64 / 2,048 events, and
                # what one step per poll of 2,048 (no Learner chunking) would do
                fm = chosen["fm"]
                specs += [
                    ("fm", {**fm, "poll": 64, "name": "FM, polls of 64"}),
                    ("fm", {**fm, "poll": 2048, "name": "FM, polls of 2048"}),
                    (
                        "fm",
                        {**fm, "poll": 2048, "step_events": 2048, "name": "FM, steps of 2048"},
                    ),
                ]
            if interval != "1":  # a retrain per positive is out of reach for the peers
                specs += [(k, chosen[k]) for k in peers]
            if seed > args.first_seed:  # deterministic baselines: once
                specs = [s for s in specs if s[0] not in ("pop", "pop7", "segpop", "knn", "ease")]
            models = [make(d, s, seed, schema, args.poll or None) for s in specs]
            out = run(d, models, start, end, interval, d.n_items)
            for name, s in out.items():
                r = res.setdefault(
                    name,
                    {
                        "warm": [],
                        "cold": [],
                        "cov": [],
                        "cpu": [],
                        "new": [],
                        "old": [],
                        "light": [],
                        "heavy": [],
                    },
                )
                r["warm"].append(s.hr("warm"))
                r["new"].append(s.hr_age("new"))
                r["old"].append(s.hr_age("old"))
                r["light"].append(s.hr_user("light"))
                r["heavy"].append(s.hr_user("heavy"))
                r["cold"].append(s.hr("cold"))
                r["cov"].append(len(s.items) / d.n_items)
                r["cpu"].append(s.cpu_s / max(s.intervals, 1))
                r["n"] = [
                    s.n["warm"],
                    s.n["cold"],
                    s.by_age["new"][1],
                    s.by_age["old"][1],
                    s.by_user["heavy"][1],
                ]
            print(f"  test interval={interval} seed={seed} done", file=sys.stderr)
        pw = np.mean(res["popularity"]["warm"])
        pc = np.mean(res["popularity"]["cold"])
        peer_names = [n for n in res if n in PEER_NAMES.values()]
        best_peer = max(peer_names, key=lambda n: np.mean(res[n]["warm"])) if peer_names else None
        bp = np.mean(res[best_peer]["warm"]) if best_peer else float("nan")
        for name, r in res.items():
            w = np.mean(r["warm"])
            rows.append(
                (
                    interval,
                    name,
                    len(r["warm"]),
                    fmt(r["warm"]),
                    f"{w / pw:.2f}x",
                    f"{w / bp:.2f}x" if best_peer else "-",
                    fmt(r["cold"]),
                    f"{np.mean(r['cold']) / pc:.2f}x",
                    f"{np.mean(r['new']):.4f}",
                    f"{np.mean(r['old']):.4f}",
                    f"{np.mean(r['light']):.4f} / {np.mean(r['heavy']):.4f}",
                    f"{np.mean(r['cov']):.1%}",
                    f"{np.mean(r['cpu']) * 1e3:.1f}",
                )
            )
        fm = res["fmstream FM"]
        tag = f"i{interval}"
        kv[f"{tag}_fm_warm"] = float(np.mean(fm["warm"]))
        kv[f"{tag}_fm_warm_vs_pop"] = float(np.mean(fm["warm"]) / pw)
        kv[f"{tag}_fm_cold_vs_pop"] = float(np.mean(fm["cold"]) / pc)
        if best_peer:
            kv[f"{tag}_fm_warm_vs_best_peer"] = float(np.mean(fm["warm"]) / bp)
            kv[f"{tag}_best_peer"] = best_peer
            kv[f"{tag}_fm_cpu_vs_peer_cpu"] = float(
                np.mean(fm["cpu"]) / np.mean(res[best_peer]["cpu"])
            )
        kv[f"{tag}_fm_coverage"] = float(np.mean(fm["cov"]))
        kv[f"{tag}_warm_events"] = fm["n"][0]
        kv[f"{tag}_cold_events"] = fm["n"][1]
        kv[f"{tag}_warm_new_item_events"] = fm["n"][2]
        kv[f"{tag}_fm_warm_old_items"] = float(np.mean(fm["old"]))
        if best_peer:
            kv[f"{tag}_best_peer_warm_old_items"] = float(np.mean(res[best_peer]["old"]))
        kv[f"{tag}_warm_heavy_user_events"] = fm["n"][4]
        kv[f"{tag}_fm_warm_heavy_users"] = float(np.mean(fm["heavy"]))
        if best_peer:
            kv[f"{tag}_best_peer_warm_heavy_users"] = float(np.mean(res[best_peer]["heavy"]))
    columns = (
        "interval",
        "model",
        "seeds",
        "warm HR@10",
        "warm / pop",
        "warm / best peer",
        "cold HR@10",
        "cold / pop",
        "warm, items < 120 d",
        "warm, items >= 120 d",
        f"warm, users < / >= {HEAVY_USER} prior positives",
        "coverage",
        "CPU ms / interval",
    )
    print_table(
        f"refresh-interval prequential top-10, {Path(args.movielens).name}, test = positives "
        f"80-100%, schema {args.schema}",
        columns,
        rows,
    )
    load1 = os.getloadavg()
    kv["loadavg"] = f"{load0[0]:.2f}->{load1[0]:.2f}"
    summary = summary_line(**kv)
    notes = (
        f"Chosen on validation (positives 60-80%; peers: interval 2000, seed 0; FM: mean of "
        f"intervals 2000 and day, seeds 0-1): {chosen}. "
        f"Schema {args.schema}; FM polls: {args.poll or 'one learn() per interval'}. "
        f"Test seeds {args.first_seed}-{args.first_seed + args.seeds - 1} (popularity "
        f"baselines, item-kNN and EASE are deterministic: one "
        f"run). "
        f"Load average {load0[0]:.2f}/{load0[1]:.2f} at start, {load1[0]:.2f}/{load1[1]:.2f} "
        f"at end: the 2-core box was shared with other helpers' tests and benches. "
        f"Wall {time.time() - t_start:.0f}s."
    )
    if not args.no_record:
        record("quality", columns, rows, summary, notes)
    print(notes)
    print(summary)


if __name__ == "__main__":
    main()
