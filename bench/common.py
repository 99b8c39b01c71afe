"""Shared helpers of the model benchmarks: machine details, tables, results file, data readers.

Benchmarks print a rich table, then LAST one line of ``key=value`` pairs, and append a dated
section with the machine details to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    """CPU model, cores, library versions: recorded beside every result."""
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "os": f"{platform.system()} {platform.release()}",
    }
    try:
        import river

        info["river"] = river.__version__
    except ImportError:
        pass
    return info


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A rich table on stdout (plain text when rich is missing)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(" | ".join(columns))
        for r in rows:
            print(" | ".join(str(c) for c in r))
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*(str(c) for c in r))
    Console(width=160).print(table)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def record(
    name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], summary: str, notes: str = ""
) -> None:
    """Append one dated result section (machine details, table, summary line) to RESULTS.md."""
    m = machine()
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## {name} — {when}",
        "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in m.items()),
        "",
        f"Command: `{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`",
        "",
        markdown_table(columns, rows),
        "",
    ]
    if notes:
        lines += [notes, ""]
    lines += ["```", summary, "```", "", ""]
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nAppended by the scripts in `bench/` (newest last). "
            "Each section names the machine it ran on; compare numbers only across the same "
            "machine.\n\n"
        )
    with RESULTS.open("a", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


def summary_line(**kv: Any) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
        return str(v)

    return " ".join(f"{k}={fmt(v)}" for k, v in kv.items())


# ----------------------------------------------------------------------------- MovieLens
@dataclass
class MovieLens:
    """Ratings sorted by time plus user and item profiles (feature dicts)."""

    users: np.ndarray  # (n,) str ids
    items: np.ndarray  # (n,) str ids
    ratings: np.ndarray  # (n,) float
    ts: np.ndarray  # (n,) float seconds
    user_profiles: dict[str, dict[str, Any]]
    item_profiles: dict[str, dict[str, Any]]


def _year(text: str) -> int | None:
    m = re.search(r"(\d{4})", text or "")
    return int(m.group(1)) if m else None


def read_movielens(path: str | Path) -> MovieLens:
    """Read ml-100k (``u.data``, ``u.user``, ``u.item``) or ml-1m (``*.dat`` with ``::``).

    Ratings are sorted by timestamp (stable). Profiles: users ``gender, age, occupation, zip``
    (zip prefix of 3 characters), items ``genres`` (list) and ``year``.
    """
    p = Path(path)
    users_p: dict[str, dict[str, Any]] = {}
    items_p: dict[str, dict[str, Any]] = {}
    if (p / "u.data").exists():
        raw = np.loadtxt(p / "u.data", dtype=np.int64, delimiter="\t")
        u, i, r, t = raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3]
        for line in (p / "u.user").read_text(encoding="latin-1").splitlines():
            if not line.strip():
                continue
            uid, age, gender, occ, zipc = line.split("|")
            users_p[uid] = {"gender": gender, "age": int(age), "occupation": occ, "zip": zipc[:3]}
        genre_names = []
        if (p / "u.genre").exists():
            for line in (p / "u.genre").read_text(encoding="latin-1").splitlines():
                if "|" in line:
                    genre_names.append(line.split("|")[0])
        for line in (p / "u.item").read_text(encoding="latin-1").splitlines():
            if not line.strip():
                continue
            parts = line.split("|")
            flags = parts[5:]
            names = genre_names or [f"g{k}" for k in range(len(flags))]
            genres = [names[k] for k, f in enumerate(flags) if f.strip() == "1"]
            prof: dict[str, Any] = {"genres": genres}
            y = _year(parts[2])
            if y is not None:
                prof["year"] = y
            items_p[parts[0]] = prof
    elif (p / "ratings.dat").exists():
        rows = [
            line.split("::")
            for line in (p / "ratings.dat").read_text(encoding="latin-1").splitlines()
            if line
        ]
        raw = np.array(rows, dtype=np.int64)
        u, i, r, t = raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3]
        for line in (p / "users.dat").read_text(encoding="latin-1").splitlines():
            if not line.strip():
                continue
            uid, gender, age, occ, zipc = line.split("::")
            users_p[uid] = {"gender": gender, "age": int(age), "occupation": occ, "zip": zipc[:3]}
        for line in (p / "movies.dat").read_text(encoding="latin-1").splitlines():
            if not line.strip():
                continue
            mid, title, genres = line.split("::")
            prof = {"genres": [g for g in genres.split("|") if g]}
            m = re.search(r"\((\d{4})\)\s*$", title)
            if m:
                prof["year"] = int(m.group(1))
            items_p[mid] = prof
    else:
        raise SystemExit(f"{p}: expected ml-100k (u.data) or ml-1m (ratings.dat) files")
    order = np.argsort(t, kind="stable")
    return MovieLens(
        users=u[order].astype(str),
        items=i[order].astype(str),
        ratings=r[order].astype(np.float64),
        ts=t[order].astype(np.float64),
        user_profiles=users_p,
        item_profiles=items_p,
    )


# ----------------------------------------------------------------------------- synthetic
@dataclass
class SyntheticProfiles:
    user_ids: list[str]
    item_ids: list[str]
    user_feats: list[dict[str, Any]]
    item_feats: list[dict[str, Any]]
    item_pop: np.ndarray  # sampling probabilities


GENRES = [f"genre{k}" for k in range(18)]


def synthetic_profiles(n_users: int, n_items: int, seed: int = 0) -> SyntheticProfiles:
    """MovieLens-shaped profiles for the 8-field throughput schema, Zipf item popularity."""
    rng = np.random.default_rng(seed)
    user_ids = [f"u{j}" for j in range(n_users)]
    item_ids = [f"i{j}" for j in range(n_items)]
    occ = rng.integers(0, 21, n_users)
    gender = rng.integers(0, 2, n_users)
    age = rng.integers(10, 70, n_users)
    user_feats = [
        {"gender": "MF"[g], "age": int(a), "occupation": f"occ{o}"}
        for g, a, o in zip(gender, age, occ, strict=True)
    ]
    n_gen = rng.integers(1, 4, n_items)
    year = rng.integers(1930, 2000, n_items)
    item_feats = [
        {"genres": list(rng.choice(GENRES, size=k, replace=False)), "year": int(y)}
        for k, y in zip(n_gen, year, strict=True)
    ]
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.9
    pop = rng.permutation(pop / pop.sum())
    return SyntheticProfiles(user_ids, item_ids, user_feats, item_feats, pop)


def request_io(settings, client_id: str):
    """A producer for requests and a group-less consumer at the end of every reply partition.

    The benches drive request/reply without threads (unlike ``serving.client.FmClient``) so
    that their own timing overhead stays out of the measured latency.
    """
    from kafka.structs import TopicPartition

    from stream.connect import kafka_consumer, kafka_producer

    kafka = settings.kafka_config()
    producer = kafka_producer(kafka, acks="all", linger_ms=0, client_id=client_id)
    consumer = kafka_consumer(kafka, group_id=None, enable_auto_commit=False,
                              fetch_max_wait_ms=100, fetch_min_bytes=1, client_id=client_id)
    parts = consumer.partitions_for_topic(settings.topic_responses)
    tps = [TopicPartition(settings.topic_responses, p) for p in sorted(parts)]
    consumer.assign(tps)
    consumer.seek_to_end(*tps)
    for tp in tps:
        consumer.position(tp)  # resolve now, so no early reply is missed
    return producer, consumer
