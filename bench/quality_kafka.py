"""Recommendation quality through the real pipeline (issue 11, item 4): the same protocol as
``bench/quality.py``, but the FM is ``fmstream train`` fed through Kafka and the lists are u2i
answers of ``fmstream serve`` asked through the request topic.

Protocol: ``bench.quality.run`` itself (imported, not copied): ratings in time order, positives
>= 4, test period = positives 80-100%, refresh intervals of 1 day of event time or 2,000
positives; at the start of an interval every user with a positive in it gets ONE top-10 list,
excluding items the user interacted with before and items no one interacted with yet; a
positive is a hit if its item is in its user's list; warm / cold apart. Side by side in the same
run, with the same seed: the in-process FM of ``bench/quality.py`` at the project defaults
(``config/movielens.toml``, the trainer's defaults: no tuning, since the trainer runs the
defaults) and popularity.

How the Kafka path is driven: services on private ports (``fmstream.services.up``); profiles
are produced first and the trainer's committed offsets on the profile topics are awaited; then
for every interval the bench produces the interval's events to ``fm.events`` (keyed by user, as
``fmstream replay`` does, with the same label / ts / hour context the in-process FM learns) and
one *marker* per partition (a label-0 event of a user ``__mark<n>_<p>``: a pairwise loss skips
it). Kafka keeps each partition's order, so once every marker user has a record in Redis and
the worker serves an *item version* at or above the records' stamps (``item_version``, the
version contract: a shared-rows version above the stamp may still serve older items), the
served model has applied and published every event before the boundary. Then each user is
asked ``u2i`` with ``k`` = 10 and ``exclude_item_ids`` = the protocol's excluded items, through
:class:`serving.client.FmClient`.

Besides HR the bench compares the two FMs' lists user by user at the same boundaries
(:func:`overlap`: shared items of the top-10, identical lists, same top-1) and counts answers
naming an item version older than the one that holds the interval's last event (must be 0). The two
FMs do not see identical batches: the trainer learns what each poll hands over (sizes set by
kafka-python, events of 6 partitions merged by record timestamp, :mod:`train.align`), the
in-process model learns the whole history in one call and each interval in one call, both cut
into steps of 256. With several seeds the difference of the means is compared with its standard
error (``within_noise``: at most 2 standard errors).

Run: ``.venv/bin/python bench/quality_kafka.py --movielens ../shared/data/ml-100k``
(``--intervals day,2000 --seeds 1``; the MovieLens files are never shipped).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import orjson  # noqa: E402

from bench.common import print_table, record, summary_line  # noqa: E402
from bench.quality import SCHEMAS, Data, K, Model, load, make, period, run  # noqa: E402
from bench.serve import bench_settings  # noqa: E402
from fmstream import services  # noqa: E402
from fmstream.settings import Settings  # noqa: E402
from model import FeatureSchema  # noqa: E402
from serving.client import FmClient  # noqa: E402
from serving.store import VectorStore  # noqa: E402
from stream.connect import kafka_producer, redis_client  # noqa: E402
from stream.lag import group_lag  # noqa: E402

log = logging.getLogger("bench.quality_kafka")
INPROC = "fmstream FM (in process)"


class KafkaFM(Model):
    """``fmstream train`` + ``fmstream serve`` under the protocol of ``bench.quality.run``."""

    name = "fmstream train + serve (Kafka)"
    uses_profile = True

    def __init__(self, d: Data, settings: Settings, client: FmClient, store: VectorStore,
                 timeout_s: float = 600.0) -> None:
        self.d, self.settings, self.client, self.store = d, settings, client, store
        self.timeout_s = timeout_s
        self.producer = kafka_producer(settings.kafka_config(), linger_ms=20, acks="all")
        self.partitions = sorted(self.producer.partitions_for(settings.topic_events))
        self.seen = np.zeros((d.n_users, d.n_items), dtype=bool)
        self.known = np.zeros(d.n_items, dtype=bool)
        self.marks: list[str] = []
        self.n_marks = 0
        self.waited_s = 0.0
        self.requests = 0
        self.versions: set[int] = set()
        self.awaited = 0  # the marker records' newest stamp at the last boundary
        self.stale_answers = 0  # answers naming an item version below it (must stay 0)
        self.retried = 0  # requests asked again after no answer within timeout_s

    def produce_profiles(self) -> None:
        t = self.settings
        d = self.d
        for uid, prof in zip(d.user_ids, d.user_profiles, strict=True):
            self.producer.send(t.topic_users, key=uid.encode(),
                               value=orjson.dumps({"user_id": uid, "features": prof}))
        for iid, prof in zip(d.item_ids, d.item_profiles, strict=True):
            self.producer.send(t.topic_items, key=iid.encode(),
                               value=orjson.dumps({"item_id": iid, "features": prof}))
        self.producer.flush()
        topics = [t.topic_users, t.topic_items]
        deadline = time.monotonic() + self.timeout_s
        while True:  # the trainer commits what it checkpointed: profiles applied
            lags = group_lag(t.kafka_config(), t.trainer_group, topics)
            if lags and all(p.committed is not None and p.lag == 0 for p in lags):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("the trainer did not apply the profiles")
            time.sleep(0.5)

    def observe(self, d: Data, lo: int, hi: int) -> None:
        topic = self.settings.topic_events
        for j in range(lo, hi):
            uid, iid = d.user_ids[d.u[j]], d.item_ids[d.i[j]]
            ts = float(d.ts[j])
            self.producer.send(topic, key=uid.encode(), value=orjson.dumps({
                "user_id": uid, "item_id": iid, "label": int(d.pos[j]), "ts": ts,
                "context": {"hour": str(int(ts // 3600) % 24)},
            }))
        self.seen[d.u[lo:hi], d.i[lo:hi]] = True
        self.known[d.i[lo:hi]] = True
        self.n_marks += 1
        self.marks = [f"__mark{self.n_marks}_{p}" for p in self.partitions]
        ts = float(d.ts[hi - 1])
        for p, uid in zip(self.partitions, self.marks, strict=True):
            self.producer.send(topic, key=uid.encode(), partition=p, value=orjson.dumps(
                {"user_id": uid, "item_id": d.item_ids[d.i[hi - 1]], "label": 0, "ts": ts}))
        self.producer.flush()

    def refresh(self, d: Data, upto: int) -> None:
        """Wait until the served model has applied and published everything before ``upto``."""
        if not self.marks:
            return
        t0 = time.monotonic()
        while True:
            got = self.store.get_user_vectors(self.marks)
            # the version contract: item_version >= the records' stamp (a shared-rows version
            # at or above the stamp may still serve the items of an older item version)
            served = self.store.worker_item_versions().values()
            if got.found.all() and served and min(served) >= int(got.versions.max()):
                self.awaited = int(got.versions.max())
                break
            if time.monotonic() - t0 > self.timeout_s:
                raise TimeoutError(f"markers {self.marks} not served within {self.timeout_s} s")
            time.sleep(0.05)
        self.marks = []
        self.waited_s += time.monotonic() - t0

    def scores(self, users: np.ndarray) -> np.ndarray:
        d = self.d
        s = np.full((len(users), d.n_items), -1e30)
        unknown = np.flatnonzero(~self.known)
        reqs = []
        for u in users.tolist():
            excl = np.union1d(np.flatnonzero(self.seen[u]), unknown)
            reqs.append({"type": "u2i", "user_id": d.user_ids[u], "k": K,
                         "exclude_item_ids": [d.item_ids[i] for i in excl.tolist()]})
        answers = self.client.request_many(reqs, timeout=self.timeout_s)
        missing = [j for j, a in enumerate(answers) if a is None]
        if missing:  # requests are at least once: a client with no answer asks again, once
            log.warning("%d of %d u2i unanswered within %.0f s (worker rebalancing?); asking "
                        "again", len(missing), len(reqs), self.timeout_s)
            again = self.client.request_many([reqs[j] for j in missing], timeout=self.timeout_s)
            for j, a in zip(missing, again, strict=True):
                answers[j] = a
            self.retried += len(missing)
        index = {iid: j for j, iid in enumerate(d.item_ids)}
        for row, a in enumerate(answers):
            if a is None or a.error is not None:
                raise RuntimeError(f"u2i for {reqs[row]['user_id']} failed: {a!r}")
            version = int(a.model_version or 0)
            self.versions.add(version)
            self.stale_answers += int(a.item_version or 0) < self.awaited
            for item in a.items:
                s[row, index[item.item_id]] = item.score
        self.requests += len(reqs)
        return s


class Lists(Model):
    """A model under ``bench.quality.run`` whose top-10 per user is recorded at every boundary
    (the same masks as ``run``: items seen before the interval and items no one saw yet)."""

    def __init__(self, inner: Model, d: Data) -> None:
        self.inner, self.name, self.uses_profile = inner, inner.name, inner.uses_profile
        self.seen = np.zeros((d.n_users, d.n_items), dtype=bool)
        self.known = np.zeros(d.n_items, dtype=bool)
        self.active = np.zeros(d.n_users, dtype=bool)
        self.tops: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # users, warm, top (n, K)

    def observe(self, d: Data, lo: int, hi: int) -> None:
        self.inner.observe(d, lo, hi)
        self.seen[d.u[lo:hi], d.i[lo:hi]] = True
        self.known[d.i[lo:hi]] = True
        self.active[d.u[lo:hi]] = True

    def refresh(self, d: Data, upto: int) -> None:
        self.inner.refresh(d, upto)

    def scores(self, users: np.ndarray) -> np.ndarray:
        s = np.array(self.inner.scores(users), dtype=np.float64, copy=True)
        masked = np.where(self.seen[users] | ~self.known, -np.inf, s)
        top = np.argsort(-masked, axis=1, kind="stable")[:, :K]
        self.tops.append((users.copy(), self.active[users].copy(), top))
        return s


def overlap(a: Lists, b: Lists) -> dict[str, float]:
    """How alike two models' lists were, user by user at the same boundaries (warm users):
    mean shared items of the top-10 (/10), share of identical lists, share of equal top-1."""
    shared, same, first = [], [], []
    for (ua, wa, ta), (ub, _, tb) in zip(a.tops, b.tops, strict=True):
        if not np.array_equal(ua, ub):
            raise ValueError("the two models were asked for different users")
        for row in np.flatnonzero(wa):
            n = len(set(ta[row].tolist()) & set(tb[row].tolist()))
            shared.append(n / K)
            same.append(n == K)
            first.append(ta[row, 0] == tb[row, 0])
    return {"shared": float(np.mean(shared)), "identical": float(np.mean(same)),
            "top1": float(np.mean(first)), "lists": len(shared)}


def spawn(settings: Settings, command: str, log_path: Path, env: dict[str, str]
          ) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fmstream.cli", command],
        env={**os.environ, **settings.to_env(), **env}, cwd=ROOT,
        stdout=log_path.open("ab"), stderr=subprocess.STDOUT,
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def one_run(d: Data, schema_path: Path | None, interval: str, seed: int, start: int, end: int,
            run_dir: Path, partitions: int = 6
            ) -> tuple[dict[str, Any], KafkaFM, dict[str, float]]:
    """The Kafka path and the in-process FM (same seed) plus popularity, in one protocol run;
    also how alike the two FMs' lists were (:func:`overlap`)."""
    settings = bench_settings(
        run_dir / f"{interval}-{seed}", ports=(27092, 27093, 27379),
        schema_path=schema_path, seed=seed, partitions_events=partitions,
    )
    services.up(settings)
    procs: list[subprocess.Popen] = []
    try:
        procs.append(spawn(settings, "train", run_dir / f"trainer-{interval}-{seed}.log", {}))
        procs.append(spawn(settings, "serve", run_dir / f"worker-{interval}-{seed}.log", {}))
        store = VectorStore(redis_client(settings.redis_config()), settings.redis_keys())
        with FmClient(settings) as client:
            kafka = KafkaFM(d, settings, client, store)
            kafka.produce_profiles()
            schema = None if schema_path is None else FeatureSchema.load(schema_path)
            inproc = Lists(make(d, ("fm", {"name": INPROC}), seed, schema), d)
            via = Lists(kafka, d)
            out = run(d, [make(d, ("pop", {}), seed, schema), inproc, via],
                      start, end, interval, d.n_items)
            kafka.producer.close()
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a process exited early ({p.args}): see {run_dir}")
        return out, kafka, overlap(inproc, via)
    finally:
        for p in procs:
            stop(p)
        services.down(settings)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--movielens", required=True, help="folder of ml-100k (or ml-1m) files")
    ap.add_argument("--schema", default="movielens", help="'movielens', 'ids', or a TOML path")
    ap.add_argument("--intervals", default="day,2000")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--partitions", type=int, default=6,
                    help="partitions of the events topic (6 = the project default)")
    ap.add_argument("--keep", action="store_true", help="keep the run folder (logs)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    t_start, load0 = time.time(), os.getloadavg()
    path = SCHEMAS.get(args.schema, args.schema)
    schema_path = None if path is None else Path(path)
    d = load(args.movielens)
    start, end = period(d, 0.8, 1.0)
    run_dir = Path(tempfile.mkdtemp(prefix="fmstream-qkafka-"))
    rows, kv = [], {}
    try:
        for interval in args.intervals.split(","):
            res: dict[str, dict[str, list[float]]] = {}
            extra, alike = [], []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                out, kafka, same = one_run(d, schema_path, interval, seed, start, end, run_dir,
                                           args.partitions)
                alike.append(same)
                for name, sc in out.items():
                    r = res.setdefault(name, {"warm": [], "cold": [], "cov": []})
                    r["warm"].append(sc.hr("warm"))
                    r["cold"].append(sc.hr("cold"))
                    r["cov"].append(len(sc.items) / d.n_items)
                    r["n"] = [sc.n["warm"], sc.n["cold"]]
                extra.append((kafka.requests, kafka.waited_s, len(kafka.versions),
                              kafka.stale_answers))
                log.info("interval %s seed %d: %s; lists alike %s", interval, seed,
                         {n: round(s.hr("warm"), 4) for n, s in out.items()}, same)
            pw = np.mean(res["popularity"]["warm"])
            for name, r in res.items():
                w = np.mean(r["warm"])
                sd = np.std(r["warm"], ddof=1) if len(r["warm"]) > 1 else 0.0
                rows.append([interval, name, len(r["warm"]),
                             " / ".join(f"{x:.4f}" for x in r["warm"]),
                             f"{w:.4f} ± {sd:.4f}",
                             f"{w / pw:.2f}x",
                             " / ".join(f"{x:.4f}" for x in r["cold"]),
                             f"{np.mean(r['cov']):.1%}", r["n"][0], r["n"][1]])
            a, b = np.array(res[INPROC]["warm"]), np.array(res[KafkaFM.name]["warm"])
            inproc, via = a.mean(), b.mean()
            if a.size > 1:  # noise: the standard error of the difference of the two means
                se = float(np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size))
                kv[f"i{interval}_diff_se"] = se
                kv[f"i{interval}_within_noise"] = bool(abs(via - inproc) <= 2 * se)
            kv[f"i{interval}_paired_diff"] = float((b - a).mean())
            for key in ("shared", "identical", "top1"):
                kv[f"i{interval}_lists_{key}"] = float(np.mean([x[key] for x in alike]))
            kv[f"i{interval}_stale_answers"] = sum(e[3] for e in extra)
            kv[f"i{interval}_kafka_warm"] = float(via)
            kv[f"i{interval}_inprocess_warm"] = float(inproc)
            kv[f"i{interval}_kafka_vs_inprocess"] = float(via / inproc)
            kv[f"i{interval}_kafka_cold"] = float(np.mean(res[KafkaFM.name]["cold"]))
            kv[f"i{interval}_inprocess_cold"] = float(
                np.mean(res["fmstream FM (in process)"]["cold"]))
            kv[f"i{interval}_requests"] = sum(e[0] for e in extra)
            kv[f"i{interval}_versions_seen"] = sum(e[2] for e in extra)
    finally:
        if args.keep:
            log.info("run folder kept: %s", run_dir)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    columns = ["interval", "model", "seeds", "warm HR@10 (per seed)", "mean ± std", "warm / pop",
               "cold HR@10 (per seed)", "coverage", "warm positives", "cold positives"]
    print_table(f"HR@10 through Kafka vs in process, {Path(args.movielens).name}, "
                f"test = positives 80-100%, schema {args.schema}", columns, rows)
    load1 = os.getloadavg()
    kv["loadavg"] = f"{load0[0]:.2f}->{load1[0]:.2f}"
    summary = summary_line(**kv)
    notes = (
        "Protocol: bench.quality.run (the same code as bench/quality.py). Kafka path: "
        "`fmstream train` and one `fmstream serve` as processes, project defaults, schema "
        f"{args.schema}; events produced interval by interval, a marker per partition awaited "
        "(applied, published, served), then one u2i per user through the request topic with "
        "the protocol's exclusions. In process: OnlineFM + Learner at the same defaults and "
        f"seed. Load average {load0[0]:.2f} at start, {load1[0]:.2f} at end; wall "
        f"{time.time() - t_start:.0f} s."
    )
    print(notes)
    print(summary)
    if not args.no_record:
        record("Quality through Kafka (bench/quality_kafka.py)", columns, rows, summary, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
