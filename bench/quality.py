"""Recommendation quality on MovieLens, prequential, side by side with online popularity.

Protocol:
* the stream is every rating in time order (ties keep file order) with label = rating >= 4:
  positives are the evaluated events; low ratings are explicit negatives (the FM sees them;
  with the default BPR loss they are not trained on) and count as interactions to exclude.
  ``--positives-only`` streams the positives alone;
* all user and item profiles are upserted first (like compacted profile topics consumed before
  events), so a user's profile is known when the user first appears (cold start);
* the stream up to the first 80% of the positives warms the model in one pass of mini-batches
  (``--batch``, default 64);
* the rest is processed in chunks of ``--chunk`` positives (default 1: exact prequential): for
  every positive of the chunk, top-10 items for its user are recommended by the model as it was
  before the chunk, excluding items the user interacted with before the event, THEN the chunk
  (with the negatives inside it) is learned. The online popularity recommender (positive counts
  so far) follows the same protocol;
* an event is *warm* when its user has an interaction before it, *cold* otherwise (the profile
  is known: all profiles were upserted first);
* HR@10 = share of events whose item is in the top-10; NDCG@10 = 1/log2(2 + rank) on a hit.

Recommendations use the folded vectors exactly as serving does: ``q = context_query(E_user, ctx)``
with the event's hour of day as context, scored against ``E_item`` of every known item.

Run: ``.venv/bin/python bench/quality.py --movielens ../shared/data/ml-100k``
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import (  # noqa: E402
    MovieLens,
    print_table,
    read_movielens,
    record,
    summary_line,
)
from model import FeatureSchema, OnlineFM, TrainConfig, context_query  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = {
    "movielens": ROOT / "config" / "movielens.toml",
    "ids": None,
}


@dataclasses.dataclass
class Metrics:
    hits: float = 0.0
    ndcg: float = 0.0
    n: int = 0

    def add(self, rank: int | None) -> None:
        self.n += 1
        if rank is not None:
            self.hits += 1
            self.ndcg += 1.0 / np.log2(rank + 2)

    @property
    def hr(self) -> float:
        return self.hits / max(self.n, 1)

    @property
    def ndcg10(self) -> float:
        return self.ndcg / max(self.n, 1)


def hour_of(ts: float) -> str:
    return str(dt.datetime.fromtimestamp(ts, dt.UTC).hour)


def top_k_excluding(scores: np.ndarray, exclude: list[int], k: int) -> np.ndarray:
    s = scores.copy()
    if exclude:
        s[exclude] = -np.inf
    top = np.argpartition(-s, k)[:k]
    return top[np.argsort(-s[top], kind="stable")]


def rank_of(top: np.ndarray, target: int) -> int | None:
    hit = np.flatnonzero(top == target)
    return int(hit[0]) if hit.size else None


def evaluate(
    ml: MovieLens,
    config: TrainConfig,
    schema: FeatureSchema,
    *,
    warm_frac: float = 0.8,
    batch: int = 64,
    chunk: int = 1,
    k: int = 10,
    use_context: bool = True,
    all_ratings: bool = True,
    log: bool = False,
) -> dict[str, Any]:
    """Run the prequential protocol; returns metrics for the FM and popularity.

    With ``all_ratings`` the stream holds every rating (label = rating >= 4; low ratings are
    explicit negatives that the FM learns and that count as interactions to exclude);
    otherwise only the positives are streamed.
    """
    torch.set_num_threads(1)
    label = (ml.ratings >= 4).astype(np.float32)
    keep = np.ones(label.size, dtype=bool) if all_ratings else label > 0
    users, items, ts, label = ml.users[keep], ml.items[keep], ml.ts[keep], label[keep]
    n = users.size
    pos_idx = np.flatnonzero(label > 0)
    split = int(pos_idx[int(pos_idx.size * warm_frac)])  # stream index of the first eval positive
    fm = OnlineFM(schema, config)
    uids = sorted(ml.user_profiles)
    fm.upsert_users(uids, [ml.user_profiles[u] for u in uids])
    iids = sorted(ml.item_profiles)
    fm.upsert_items(iids, [ml.item_profiles[i] for i in iids])
    ctx_all = [{"hour": hour_of(t)} for t in ts]
    hist: dict[str, list[str]] = {}
    pop: dict[str, int] = {}
    t0 = time.perf_counter()
    for lo in range(0, split, batch):
        hi = min(split, lo + batch)
        fm.learn_many(
            users[lo:hi].tolist(),
            items[lo:hi].tolist(),
            label[lo:hi],
            contexts=ctx_all[lo:hi],
            ts=ts[lo:hi],
        )
    for u, i, y in zip(users[:split].tolist(), items[:split].tolist(), label[:split], strict=True):
        hist.setdefault(u, []).append(i)
        if y > 0:
            pop[i] = pop.get(i, 0) + 1
    warm_s = time.perf_counter() - t0

    res = {name: {"warm": Metrics(), "cold": Metrics()} for name in ("fm", "pop")}
    t1 = time.perf_counter()
    n_eval_pos = 0
    lo = split
    while lo < n:
        # the next chunk holds `chunk` positives (and the negatives between them)
        stop = np.searchsorted(pos_idx, lo) + chunk
        hi = n if stop >= pos_idx.size else int(pos_idx[stop])
        ids, e_items = fm.item_vectors()
        index = {x: j for j, x in enumerate(ids)}
        cu = users[lo:hi].tolist()
        ci = items[lo:hi].tolist()
        cy = label[lo:hi]
        e_users = fm.user_vectors(cu)
        if use_context:
            cl, cv = fm.context_table().encode(ctx_all[lo:hi])
            e_users = context_query(e_users, cl, cv)
        scores = e_users @ e_items.T
        pop_scores = np.array([pop.get(x, 0) for x in ids], dtype=np.float64)
        pop_scores -= np.arange(len(ids)) * 1e-9  # deterministic ties: catalog order
        for j, (u, i) in enumerate(zip(cu, ci, strict=True)):
            seen = hist.get(u, [])
            if cy[j] > 0:
                n_eval_pos += 1
                kind = "warm" if seen else "cold"
                excl = [index[x] for x in seen if x in index]
                target = index.get(i, -1)
                res["fm"][kind].add(rank_of(top_k_excluding(scores[j], excl, k), target))
                res["pop"][kind].add(rank_of(top_k_excluding(pop_scores, excl, k), target))
            hist.setdefault(u, []).append(i)
        fm.learn_many(cu, ci, cy, contexts=ctx_all[lo:hi], ts=ts[lo:hi])
        for i, y in zip(ci, cy, strict=True):
            if y > 0:
                pop[i] = pop.get(i, 0) + 1
        if log and n_eval_pos // chunk % max(1, 2000 // chunk) == 0:
            print(
                f"  {n_eval_pos} eval positives, fm warm HR@10 {res['fm']['warm'].hr:.4f}",
                file=sys.stderr,
            )
        lo = hi
    return {
        "res": res,
        "n_pos": int(pos_idx.size),
        "n_warmup": int(np.searchsorted(pos_idx, split)),
        "n_eval": n_eval_pos,
        "warm_s": warm_s,
        "eval_s": time.perf_counter() - t1,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--movielens", required=True, help="folder of ml-100k or ml-1m files")
    ap.add_argument(
        "--schema",
        default="movielens",
        help="'movielens' (config/movielens.toml), 'ids', or a TOML path",
    )
    ap.add_argument("--batch", type=int, default=64, help="warm-up mini-batch size (events)")
    ap.add_argument(
        "--chunk", type=int, default=1, help="evaluated positives per recommend-then-learn step"
    )
    ap.add_argument("--no-context", action="store_true", help="recommend without the hour")
    ap.add_argument(
        "--positives-only",
        action="store_true",
        help="stream only ratings >= 4 (no explicit negatives)",
    )
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        ap.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
            help=f"TrainConfig.{f.name} (default {getattr(defaults, f.name)})",
        )
    args = ap.parse_args()
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    path = SCHEMAS.get(args.schema, args.schema)
    schema = FeatureSchema.ids_only() if path is None else FeatureSchema.load(path)
    ml = read_movielens(args.movielens)
    out = evaluate(
        ml,
        config,
        schema,
        batch=args.batch,
        chunk=args.chunk,
        use_context=not args.no_context,
        all_ratings=not args.positives_only,
        log=True,
    )
    res = out["res"]
    rows = []
    for kind in ("warm", "cold"):
        f, p = res["fm"][kind], res["pop"][kind]
        rows.append(
            (
                kind,
                f.n,
                f"{f.hr:.4f}",
                f"{f.ndcg10:.4f}",
                f"{p.hr:.4f}",
                f"{p.ndcg10:.4f}",
                f"{f.hr / max(p.hr, 1e-12):.2f}x",
            )
        )
    columns = ("users", "events", "FM HR@10", "FM NDCG@10", "pop HR@10", "pop NDCG@10", "FM/pop HR")
    print_table(
        f"prequential top-10 on {Path(args.movielens).name} "
        f"({out['n_warmup']} warm-up + {out['n_eval']} evaluated positives)",
        columns,
        rows,
    )
    cfg = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items())
    summary = summary_line(
        warm_hr10=res["fm"]["warm"].hr,
        cold_hr10=res["fm"]["cold"].hr,
        pop_warm_hr10=res["pop"]["warm"].hr,
        pop_cold_hr10=res["pop"]["cold"].hr,
        warm_ndcg10=res["fm"]["warm"].ndcg10,
        cold_ndcg10=res["fm"]["cold"].ndcg10,
        pop_warm_ndcg10=res["pop"]["warm"].ndcg10,
        pop_cold_ndcg10=res["pop"]["cold"].ndcg10,
        warm_ratio=res["fm"]["warm"].hr / max(res["pop"]["warm"].hr, 1e-12),
        warm_events=res["fm"]["warm"].n,
        cold_events=res["fm"]["cold"].n,
    )
    notes = (
        f"Config: {cfg}; schema={args.schema}; stream="
        f"{'positives only' if args.positives_only else 'all ratings (label = rating>=4)'}"
        f"; warm-up batch={args.batch}; eval chunk={args.chunk} positives (recommend for "
        f"the whole chunk, then learn it); context={not args.no_context}; warm-up "
        f"{out['warm_s']:.1f}s, eval {out['eval_s']:.1f}s."
    )
    record("quality", columns, rows, summary, notes)
    print(notes)
    print(summary)


if __name__ == "__main__":
    main()
