"""Memory per id: bytes per user id row, all-in (parameters + optimiser + vocabulary + catalog).

Builds an ids-only model at dim 32 and streams events of ``--ids`` distinct users (over a small
item set) through ``learn_many``, so every user id is registered, admitted and owns a row, as in
production. Measured two ways:

* tracemalloc: every Python object and numpy buffer allocated while building the model (the id
  strings, dicts, lists and arrays); torch holds no persistent tensors (rows live in numpy);
* RSS growth of the process (includes allocator slack and freed-but-kept memory).

Rows grow by capacity doubling, so capacity can exceed use by up to 2x; the table shows both the
bytes actually allocated and the bytes used per id.

Run: ``.venv/bin/python bench/memory.py [--ids 1000000]``
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import print_table, record, summary_line  # noqa: E402
from model import FeatureSchema, OnlineFM, TrainConfig  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", type=int, default=1_000_000, help="distinct user ids")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8192)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n, d = args.ids, args.dim
    items = [f"item-{j}" for j in range(args.items)]
    rng = np.random.default_rng(0)
    item_idx = rng.integers(0, args.items, n)
    warm = OnlineFM(FeatureSchema.ids_only(), TrainConfig(dim=d, negatives=1))
    warm.learn_many(["a", "b"], ["x", "y"])  # torch / numpy lazy initialisation, not per-id
    del warm
    gc.collect()
    rss0 = rss_bytes()
    tracemalloc.start()
    t0 = time.perf_counter()
    fm = OnlineFM(FeatureSchema.ids_only(), TrainConfig(dim=d, negatives=1))
    for lo in range(0, n, args.batch):
        hi = min(n, lo + args.batch)
        users = [f"user-{j:09d}" for j in range(lo, hi)]
        fm.learn_many(users, [items[j] for j in item_idx[lo:hi]], ts=np.full(hi - lo, 1.0))
    build_s = time.perf_counter() - t0
    gc.collect()
    traced, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = rss_bytes() - rss0

    use = fm.memory_use()
    n_ids = use.ids
    rows_used = use.rows_live
    param_used = rows_used * (d + 1) * 4 + rows_used * 2 * 4
    arrays = use.arrays_bytes
    python_objs = traced - arrays
    rows = [
        (
            "parameters (w, v) float32 + row-wise Adagrad 2 x float32",
            f"{(d + 1) * 4 + 8}",
            f"{use.params_bytes / n_ids:.1f}",
        ),
        ("scratch (dedupe) int32", "4", f"{use.scratch_bytes / n_ids:.1f}"),
        ("key arrays (row, count, field)", "10", f"{use.keys_bytes / n_ids:.1f}"),
        ("catalog arrays (id key, counts)", "12", f"{use.catalog_bytes / n_ids:.1f}"),
        ("python: id dict + str + int + lists", "-", f"{python_objs / n_ids:.1f}"),
        (
            "all-in, tracemalloc",
            f"{(param_used + python_objs) / n_ids:.0f} (used)",
            f"{traced / n_ids:.1f}",
        ),
        ("all-in, RSS growth", "-", f"{rss / n_ids:.1f}"),
    ]
    columns = ("component", "bytes/id in use", "bytes/id allocated")
    print_table(
        f"memory per id: {n_ids:,} ids, dim {d} (rows capacity {use.rows_capacity:,})", columns,
        rows,
    )
    summary = summary_line(
        bytes_per_id=traced / n_ids,
        bytes_per_id_rss=rss / n_ids,
        bytes_per_id_params=use.params_bytes / n_ids,
        bytes_per_id_python=python_objs / n_ids,
        ids=n_ids,
        dim=d,
        rows_capacity=use.rows_capacity,
        peak_traced_mb=peak / 2**20,
        build_s=build_s,
    )
    notes = (
        f"{n:,} user ids + {args.items} items registered through learn_many (negatives=1, "
        f"batches of {args.batch}); bytes/id = bytes / (users + items). Capacity doubling: "
        f"{use.rows_capacity:,} rows allocated for {rows_used:,} live rows."
    )
    record("memory", columns, rows, summary, notes)
    print(notes)
    print(summary)


if __name__ == "__main__":
    main()
