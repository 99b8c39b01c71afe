"""Recovery after Redis loses everything (issue 10: "Redis FLUSHALL with an idle trainer: u2i
answers normally again within 5 s; with a trainer restart as well: versions keep increasing and
workers follow").

Starts its own Kafka and Redis (``fmstream.services.up`` on a private run dir and ports), runs
``fmstream train`` and ``fmstream serve`` as processes, exactly as deployed, with the default
cadences, feeds a synthetic stream (profiles + ``--events`` events over ``--users`` x
``--items``), waits until the trainer applied it all and is idle, then:

1. **FLUSHALL, idle trainer** (``--flushes`` times): from the FLUSHALL, seconds until the store
   holds a version again, until every probed user (``--probes`` users with a history) gets a
   normal u2i answer (k items from its vector: no error, no popularity fallback) through the
   request topic, until their histories are back, and until the worker serves the republished
   version.
2. **FLUSHALL + trainer restart** (``--restarts`` times): SIGTERM the trainer (final checkpoint),
   FLUSHALL, start it again; seconds until the probes answer normally at a version above every
   version served before (versions keep increasing; the worker follows).
3. **Redis killed and restarted** (``--redis-kills`` times): ``kill -9`` of redis-server while the
   trainer and the worker run, ``--redis-down-s`` seconds away, then a new one on the same port
   with the settings' persistence (default none: it starts empty). From the kill: seconds until
   the store holds a version, the probes answer normally at a version above the one before, the
   histories are back, the worker follows, the trainer holds its lease again; and what the
   probes got meanwhile (answers by error code / fallback / normal, and unanswered within 2 s).

Probes are sent in rounds (one round = all probes at once, answered or timed out within 2 s);
the figures are the end of the first all-normal round, so they include up to one round of
granularity. Prints a table and appends it to ``bench/RESULTS.md`` with the machine and its load.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: `python bench/recovery.py`
    sys.path.insert(0, str(ROOT))

from bench.common import print_table, record, summary_line  # noqa: E402
from bench.serve import bench_settings  # noqa: E402
from fmstream import services  # noqa: E402
from fmstream.settings import Settings  # noqa: E402
from serving.client import FmClient  # noqa: E402
from serving.store import VectorStore  # noqa: E402
from stream.connect import redis_client  # noqa: E402
from stream.consume import make_producer  # noqa: E402
from stream.replay import produce_events, produce_profiles  # noqa: E402
from stream.synthetic import SyntheticStream  # noqa: E402

log = logging.getLogger("bench.recovery")

COLUMNS = ["case", "#", "store has a version s", "u2i normal s", "histories back s",
           "worker follows s", "version before -> after", "first probe round normal"]
KILL_COLUMNS = ["#", "Redis away s", "store has a version s", "u2i normal s",
                "histories back s", "worker follows s", "lease back s",
                "version before -> after", "probe answers meanwhile"]


def spawn(settings: Settings, command: str, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, **settings.to_env()}
    return subprocess.Popen([sys.executable, "-m", "fmstream.cli", "-v", command], env=env,
                            cwd=ROOT, stdout=log_path.open("ab"), stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen, timeout_s: float = 120) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait(pred: Callable[[], bool], timeout_s: float, what: str, step_s: float = 0.05) -> float:
    """Seconds until ``pred`` holds (raises after ``timeout_s``)."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(step_s)
    return time.monotonic() - t0


def _worker_at(store: VectorStore, version: int, t0: float) -> float:
    """Seconds since ``t0`` until every registered worker serves ``version`` or later."""
    wait(lambda: min(store.worker_versions().values(), default=-1) >= version, 60,
         "the worker to follow")
    return time.monotonic() - t0


def _back(store: VectorStore, users: list[str], histories: list[list[str]], t0: float,
          timeout_s: float) -> tuple[float, int, float]:
    """After a loss: seconds since ``t0`` until the probed users' histories are ``histories``
    again, the store's version then, and seconds until the worker serves it."""
    wait(lambda: store.get_histories(users) == histories, timeout_s, "the histories back")
    t_hist = time.monotonic() - t0
    after = store.current_item_version() or 0
    return t_hist, after, _worker_at(store, after, t0)


class Probe:
    """Rounds of u2i requests for the probed users through the request topic."""

    def __init__(self, client: FmClient, users: list[str], k: int = 10) -> None:
        self.client, self.users, self.k = client, users, k
        self.rounds = 0
        self.last_versions: set[int] = set()
        self.outcomes: Counter[str] = Counter()  # what the answers were, since the last reset

    def normal(self, min_version: int = 0) -> bool:
        self.rounds += 1
        answers = self.client.request_many(
            [{"type": "u2i", "user_id": u, "k": self.k} for u in self.users], timeout=2.0
        )
        self.last_versions = {a.model_version for a in answers if a and a.model_version}
        for a in answers:
            if a is None:
                self.outcomes["no answer in 2 s"] += 1
            elif a.error is not None:
                self.outcomes[f"error {a.error.code}"] += 1
            elif a.fallback is not None:
                self.outcomes[f"fallback {a.fallback}"] += 1
            else:
                self.outcomes["normal" if len(a.items) == self.k else "short"] += 1
        return all(
            a is not None and a.error is None and a.fallback is None and len(a.items) == self.k
            and (a.model_version or 0) >= min_version
            for a in answers
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--items", type=int, default=5_000)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--probes", type=int, default=64, help="users asked each round")
    ap.add_argument("--flushes", type=int, default=3)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--redis-kills", type=int, default=2,
                    help="kill -9 of redis-server, then a new one (empty by default)")
    ap.add_argument("--redis-down-s", type=float, default=2.0,
                    help="how long Redis stays away after each kill")
    ap.add_argument("--setup-timeout", type=float, default=900.0)
    ap.add_argument("--redis-persistence", choices=["none", "aof"], default="none",
                    help="FMSTREAM_REDIS_PERSISTENCE of the bench's Redis")
    ap.add_argument("--keep", action="store_true", help="keep the run folder (logs)")
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    run_dir = Path(tempfile.mkdtemp(prefix="fmstream-recovery-"))
    settings = bench_settings(
        run_dir, ports=(26092, 26093, 26379), schema_path=ROOT / "config" / "synthetic.toml",
        redis_persistence=args.redis_persistence,
    )
    rows: list[list] = []
    kills: list[list] = []
    try:
        log.info("services: %s", services.up(settings))
        stream = SyntheticStream(users=args.users, items=args.items, clusters=10, seed=7)
        store = VectorStore(redis_client(settings.redis_config()), settings.redis_keys())
        trainer = spawn(settings, "train", run_dir / "trainer.log")
        worker = spawn(settings, "serve", run_dir / "worker.log")
        producer = make_producer(settings.kafka_config())
        produce_profiles(producer, settings.topics(), stream.user_profiles(),
                         stream.item_profiles())
        events = list(stream.events(args.events))
        produce_events(producer, settings.topics(), events)
        producer.close()
        wait(lambda: int(store.get_status().get("events_applied", 0) or 0) >= args.events,
             args.setup_timeout, "the trainer to apply the stream", step_s=0.5)
        clicked = sorted({e["user_id"] for e in events if e.get("label", 1) == 1})
        # arbitrary users with a history (any of them may be the last a republish writes)
        pick = random.Random(3).sample(range(len(clicked)), min(args.probes, len(clicked)))
        users = [clicked[j] for j in pick]
        del events
        with FmClient(settings) as client:
            probe = Probe(client, users)
            wait(probe.normal, 120, "u2i answers before any flush", step_s=0.2)
            r = store.redis
            for n in range(1, args.flushes + 1):
                time.sleep(3.0)  # idle: the publisher has nothing left to publish
                histories = store.get_histories(users)
                before = store.current_item_version() or 0
                probe.rounds = 0
                r.flushall()
                t0 = time.monotonic()
                t_version, first_normal, t_normal = None, None, None
                while t_normal is None:
                    if t_version is None and store.current_item_version() is not None:
                        t_version = time.monotonic() - t0
                    ok = probe.normal()
                    first_normal = ok if first_normal is None else first_normal
                    if ok:
                        t_normal = time.monotonic() - t0
                    elif time.monotonic() - t0 > 120:
                        raise TimeoutError("u2i not normal within 120 s of FLUSHALL")
                if t_version is None:
                    t_version = t_normal
                t_hist, after, t_follow = _back(store, users, histories, t0, 60)
                rows.append(["FLUSHALL, idle trainer", n, round(t_version, 2),
                             round(t_normal, 2), round(t_hist, 2), round(t_follow, 2),
                             f"v{before} -> v{after}", first_normal])
                log.info("flush %d: %s", n, rows[-1])
            for n in range(1, args.restarts + 1):
                time.sleep(3.0)
                stop(trainer)
                served = max(store.worker_versions().values(), default=0)
                r.flushall()
                t0 = time.monotonic()
                trainer = spawn(settings, "train", run_dir / "trainer.log")
                t_version = wait(lambda s=served: (store.current_item_version() or 0) > s, 180,
                                 "the restarted trainer to publish above every served version")
                after = store.current_item_version() or 0
                wait(lambda a=after: probe.normal(min_version=a), 120,
                     "u2i normal at the new version", step_s=0.0)
                t_normal = time.monotonic() - t0
                wait(lambda: all(store.get_histories(users)), 60, "histories back")
                t_hist = time.monotonic() - t0
                t_follow = _worker_at(store, after, t0)
                rows.append(["FLUSHALL + trainer restart", n, round(t_version, 2),
                             round(t_normal, 2), round(t_hist, 2), round(t_follow, 2),
                             f"v{served} -> v{after}", False])
                log.info("restart %d: %s", n, rows[-1])
            lease_key = settings.redis_keys().trainer_lease()
            for n in range(1, args.redis_kills + 1):
                time.sleep(3.0)
                histories = store.get_histories(users)
                before = store.current_item_version() or 0
                probe.outcomes.clear()
                services.stop_redis(settings, kill=True)
                t0 = time.monotonic()
                while time.monotonic() - t0 < args.redis_down_s:  # Redis away: ask anyway
                    probe.normal()
                services.start_redis(settings)
                away = time.monotonic() - t0
                # none: an empty store, the trainer must publish above `before`; aof: the file
                # may hold `before` (then nothing needs republishing)
                need = before + 1 if store.current_item_version() != before else before
                t_version = t_normal = None
                while t_normal is None:
                    if t_version is None and (store.current_item_version() or 0) >= need:
                        t_version = time.monotonic() - t0
                    if probe.normal(min_version=need):
                        t_normal = time.monotonic() - t0
                    elif time.monotonic() - t0 > args.setup_timeout:
                        raise TimeoutError("u2i not normal after the Redis restart")
                meanwhile = ", ".join(f"{k} {v}" for k, v in probe.outcomes.most_common())
                t_version = t_normal if t_version is None else t_version
                t_hist, after, t_follow = _back(store, users, histories, t0, 120)
                wait(lambda: r.get(lease_key) is not None, 60, "the trainer lease back")
                t_lease = time.monotonic() - t0
                kills.append([n, round(away, 2), round(t_version, 2), round(t_normal, 2),
                              round(t_hist, 2), round(t_follow, 2), round(t_lease, 2),
                              f"v{before} -> v{after}", meanwhile])
                log.info("redis kill %d: %s", n, kills[-1])
        assert worker.poll() is None, "the worker died"
        assert trainer.poll() is None, "the trainer died"
        stop(worker)
        stop(trainer)
    finally:
        services.down(settings)
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            log.info("run folder kept: %s", run_dir)
    print_table("Recovery after Redis FLUSHALL (bench/recovery.py)", COLUMNS, rows)
    kill_title = (f"Redis killed (kill -9) and restarted with persistence "
                  f"'{settings.redis_persistence}' (bench/recovery.py)")
    if kills:
        print_table(kill_title, KILL_COLUMNS, kills)
    idle = [row[3] for row in rows if row[0].startswith("FLUSHALL, idle")]
    restart = [row[3] for row in rows if "restart" in row[0]]
    summary = summary_line(
        users=args.users, items=args.items, events=args.events, probes=args.probes,
        flush_u2i_normal_max_s=max(idle, default=float("nan")),
        restart_u2i_normal_max_s=max(restart, default=float("nan")),
        redis_kill_u2i_normal_max_s=max((k[3] for k in kills), default=float("nan")),
        redis_persistence=settings.redis_persistence,
        load=os.getloadavg()[0],
    )
    print(summary)
    if not args.no_record:
        notes = (
            f"Default cadences (lost check every {settings.lost_check_s} s, worker swap poll "
            f"{settings.swap_poll_s} s). Times from the FLUSHALL; a probe round is all "
            f"{args.probes} users' u2i through the request topic (up to 2 s each); 'u2i normal' = "
            "every probe answered with k items from the user's vector (no error, no popularity "
            "fallback); 'first probe round normal' False = the flush was visible to clients. "
            "With a restart, times include the trainer's start (checkpoint load) and the version "
            "must be above every version served before."
        )
        if rows:
            record("Recovery after Redis FLUSHALL (bench/recovery.py)", COLUMNS, rows, summary,
                   notes)
        if kills:
            record(kill_title, KILL_COLUMNS, kills, summary, (
                f"{args.users:,} users x {args.items:,} items, {args.events:,} events. "
                f"redis-server got SIGKILL while trainer and worker ran, stayed away "
                f"{args.redis_down_s:g} s (probe rounds meanwhile), then a new one started on the "
                f"same port with redis_persistence={settings.redis_persistence}; times from the "
                "kill; 'u2i normal' = every probe (arbitrary users with a history) answered "
                "with k items from its vector at a version above the one before the kill "
                "(with aof and nothing lost no new version is needed: then the first normal "
                "round at any version); 'probe answers meanwhile' counts every probe answer "
                "from the kill to the first all-normal round. " + notes.split(". ", 1)[0] + "."
            ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
