"""Live HR@10 samples under a paced replay: how many positives the trainer's live metric scores.

The operator's view of ``fmstream_live_hit_rate{k="10",cohort=...}`` is only as good as the
samples behind it. This replays MovieLens (profiles, then every rating as an event at
``--rate`` events/s, as ``fmstream replay --movielens PATH --rate R`` does) into the real
:class:`train.loop.Trainer` (its fetch process, checkpoints, and the publisher thread on Redis,
wired as ``fmstream train`` wires them, schema ``config/movielens.toml``), until every event is
applied, and reports:

- positives that arrived, polls the trainer applied, polls / positives the live metric sampled;
- the samples behind each cohort's rate (the metric's window) and in all;
- CPU of the trainer thread: learning, the live metric, the metric's share, CPU per sample;
- the trainer's wall time and events/s (paced: the replay's rate caps it).

Services: its own Kafka and Redis (``fmstream.services.up`` on free ports, stopped after), or
``--reuse`` those of the ``FMSTREAM_*`` variables; topics are unique per run.

Run: ``.venv/bin/python bench/live_samples.py [--movielens ../shared/data/ml-100k] [--rate 4000]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from queue import Empty

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, record, summary_line  # noqa: E402
from bench.serve import bench_settings  # noqa: E402
from fmstream import services  # noqa: E402
from fmstream.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _replay(settings_json: str, path: str, rate: float, out: mp.Queue) -> None:
    """The producer process: profiles, then the events at ``rate`` events/s."""
    from stream.consume import make_producer
    from stream.movielens import load_movielens
    from stream.replay import produce_events, produce_profiles

    settings = Settings.model_validate_json(settings_json)
    data = load_movielens(path)
    producer = make_producer(settings.kafka_config())
    produce_profiles(producer, settings.topics(), data.user_profiles(), data.item_profiles())
    t0 = time.perf_counter()
    n = produce_events(producer, settings.topics(), data.events(), rate=rate)
    out.put((n, time.perf_counter() - t0))
    producer.close()


def run(settings: Settings, path: str, rate: float) -> dict[str, float]:
    import redis

    from fmstream.app import new_model, redis_client
    from stream.consume import make_producer
    from stream.movielens import load_movielens
    from train.loop import Trainer
    from train.publish_thread import PublisherThread
    from train.publisher import Publisher
    from train.store_writer import StoreWriter

    events = list(load_movielens(path).events())
    n = len(events)
    positives = sum(e["label"] == 1 for e in events)
    client = redis_client(settings)
    dlq = make_producer(settings.kafka_config())
    trainer = Trainer(settings.trainer_config(), dead_letter_producer=dlq,
                      new_model=lambda: new_model(settings))
    writer = StoreWriter(client, settings.redis_keys(), settings.keep_versions)
    publisher = Publisher(settings.publish_config(), writer, trainer.model,
                          model_lock=trainer.model_lock)
    background = PublisherThread(publisher).start()
    trainer.sink = background
    if trainer.consumer is None:
        trainer.fetcher.start().wait_ready()
    queue: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(
        target=_replay, args=(settings.model_dump_json(), path, rate, queue))
    out: dict[str, float] = {"events": n, "positives": positives}
    polls = 0
    try:
        proc.start()
        load0 = os.getloadavg()[0]
        while not trainer.progress.events_applied:
            if trainer.step():
                polls += 1
            if not proc.is_alive() and proc.exitcode:
                raise SystemExit(f"replay process failed (exit {proc.exitcode})")
        t0, c0 = time.perf_counter(), time.thread_time()
        first = trainer.progress.events_applied
        while trainer.progress.events_applied < n:
            if trainer.step():
                polls += 1
            if not proc.is_alive() and proc.exitcode:
                raise SystemExit(f"replay process failed (exit {proc.exitcode})")
        out["wall_s"] = time.perf_counter() - t0
        out["trainer_cpu_s"] = time.thread_time() - c0
        out["events_per_s"] = (n - first) / out["wall_s"]
        out["loadavg_before"], out["loadavg_after"] = load0, os.getloadavg()[0]
        try:
            produced, produce_s = queue.get(timeout=60)
        except Empty:
            produced, produce_s = -1, float("nan")
        out["produced"], out["produce_per_s"] = produced, produced / produce_s
        proc.join(60)
        budget = trainer.live_budget
        out["polls"] = polls
        out["polls_sampled"] = budget.admitted
        out["polls_skipped"] = budget.skipped
        counts = trainer.live.counts()
        out["window_warm"], out["window_cold"] = counts["warm"], counts["cold"]
        total = getattr(trainer.live, "sampled", None)  # all samples (not only the window)
        out["samples"] = sum(counts.values()) if total is None else total
        rates = trainer.live.rates()
        out["hr_warm"], out["hr_cold"] = rates["warm"], rates["cold"]
        out["cpu_learn_s"], out["cpu_live_s"] = trainer.cpu["learn"], trainer.cpu["live"]
        out["live_share"] = trainer.cpu["live"] / max(1e-9, trainer.cpu["learn"]
                                                      + trainer.cpu["live"])
        out["cpu_live_us_per_sample"] = 1e6 * trainer.cpu["live"] / max(1, out["samples"])
        out["samples_per_min"] = 60 * out["samples"] / out["wall_s"]
    finally:
        if proc.is_alive():
            proc.terminate()
        background.close()
        trainer.close()
        dlq.close()
        try:
            client.close()
        except redis.RedisError:
            pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--movielens", default="/work/shared/data/ml-100k",
                    help="ml-100k or ml-1m folder")
    ap.add_argument("--rate", type=float, default=4000.0, help="events/s of the replay")
    ap.add_argument("--reuse", action="store_true",
                    help="use the Kafka/Redis of the FMSTREAM_* variables (else start own)")
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument("--note", default="", help="appended to the notes (what shared the box)")
    args = ap.parse_args()

    from fmstream.app import configure_threads
    from train.runtime import relax_gc

    configure_threads(Settings())  # as `fmstream train` runs
    relax_gc()
    tmp = Path(tempfile.mkdtemp(prefix="fmstream-live-"))
    # own services: the benches' private run dir and ports (bench.serve.bench_settings)
    base = Settings() if args.reuse else bench_settings(tmp / "services",
                                                        ports=(28092, 28093, 28379))
    tag = uuid.uuid4().hex[:8]
    update: dict[str, object] = {f"topic_{f}": f"bench.{f}.{tag}"
                                 for f in ("events", "users", "items", "requests", "responses",
                                           "dlq")}
    update.update(trainer_group=f"bench-live-{tag}", redis_prefix=f"fmlive:{tag}:",
                  checkpoint_dir=tmp / "checkpoints",
                  schema_path=ROOT / "config" / "movielens.toml")
    settings = base.model_copy(update=update)
    started = None
    try:
        if args.reuse:
            services.ensure_topics(settings)
        else:
            started = services.up(settings)
        out = run(settings, args.movielens, args.rate)
    finally:
        if started is not None:
            services.down(settings)
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [
        ["events / positives arrived", f"{out['events']:,.0f} / {out['positives']:,.0f}"],
        ["replay rate (events/s)", f"{out['produce_per_s']:,.0f}"],
        ["trainer wall s / events/s", f"{out['wall_s']:.1f} / {out['events_per_s']:,.0f}"],
        ["polls applied / sampled / skipped",
         f"{out['polls']:,.0f} / {out['polls_sampled']:,.0f} / {out['polls_skipped']:,.0f}"],
        ["live samples in all / per minute",
         f"{out['samples']:,.0f} / {out['samples_per_min']:,.0f}"],
        ["samples behind the rate: warm / cold",
         f"{out['window_warm']:,.0f} / {out['window_cold']:,.0f}"],
        ["live HR@10: warm / cold", f"{out['hr_warm']:.3f} / {out['hr_cold']:.3f}"],
        ["trainer CPU s: learn / live", f"{out['cpu_learn_s']:.2f} / {out['cpu_live_s']:.3f}"],
        ["live share of learn+live / setting",
         f"{out['live_share']:.4f} / {settings.live_cpu_share}"],
        ["live CPU per sample (us)", f"{out['cpu_live_us_per_sample']:.0f}"],
        ["loadavg before / after", f"{out['loadavg_before']:.2f} / {out['loadavg_after']:.2f}"],
    ]
    print_table("live HR@10 samples, paced MovieLens replay", ["", "value"], rows)
    summary = summary_line(rate=args.rate, live_cpu_share=settings.live_cpu_share,
                           live_sample_every=settings.live_sample_every, **out)
    if not args.no_record:
        record("Live HR@10 samples (bench/live_samples.py)", ["", "value"], rows, summary,
               args.note)
    print(summary)


if __name__ == "__main__":
    main()
