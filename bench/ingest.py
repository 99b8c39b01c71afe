"""Ingest throughput: events/s from Kafka into the model, end to end, and where the time goes.

One run, side by side on the same backlog of synthetic events (``stream/synthetic.py``):

1. **produce** — a separate producer *process* fills the events topic (pre-encoded JSON,
   idempotent, acks=all, batched): the rate a kafka-python producer reaches here.
2. **bare consume** — a kafka-python consumer with the trainer's settings reads the whole topic
   and does nothing else: the ceiling the client puts on any trainer written with it.
3. **trainer** — the real :class:`train.loop.Trainer` with its publisher (Redis) and
   checkpoints on (the configured cadence), from an empty model and an empty checkpoint folder,
   until every event is applied and a final checkpoint is written. Polling and decoding run in
   the fetch process (``FMSTREAM_TRAINER_FETCH_PROCESS``, default) or a fetch thread. Its
   ``timings`` split the wall time into poll / decode / update / publish / checkpoint, and CPU
   time is reported per thread and for the fetch process.

Services: by default it starts its own Kafka and Redis with ``fmstream.services.up`` under a
temporary run dir on free ports, and stops them at the end; ``--reuse`` points at the services
named by the ``FMSTREAM_*`` variables instead (topics are unique per run and deleted after).

Run: ``.venv/bin/python bench/ingest.py [--events 200000] [--dim 32] [--quick]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from queue import Empty

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, record, summary_line  # noqa: E402
from fmstream import services  # noqa: E402
from fmstream.settings import Settings  # noqa: E402
from train.fetch_process import FETCH_CPU_PIECES  # noqa: E402
from train.loop import CPU_PIECES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _fill(settings_json: str, n: int, seed: int, out: mp.Queue) -> None:
    """The producer process: encode ``n`` events, then time producing them."""
    import orjson

    from stream.consume import make_producer
    from stream.synthetic import SyntheticStream

    settings = Settings.model_validate_json(settings_json)
    stream = SyntheticStream(users=100_000, items=20_000, clusters=50, seed=seed)
    pairs = [(e["user_id"].encode(), orjson.dumps(e)) for e in stream.events(n)]
    producer = make_producer(settings.kafka_config(), linger_ms=20, batch_size=512 * 1024)
    t0 = time.perf_counter()
    for key, value in pairs:
        producer.send(settings.topic_events, key=key, value=value)
    producer.flush(timeout=300)
    elapsed = time.perf_counter() - t0
    producer.close()
    out.put((n, elapsed, sum(len(v) for _, v in pairs)))


def bare_consume(settings: Settings, n: int, *, fast_records: bool = False,
                 **overrides: object) -> tuple[float, float]:
    """Seconds (wall, process CPU) for a kafka-python consumer (the trainer's config) to read
    ``n`` records; ``fast_records``: parsed by stream/record_parse.py, not kafka-python."""
    from kafka import TopicPartition

    from stream.consume import make_consumer
    from stream.record_parse import use_fast_records

    options = {"max_poll_records": settings.max_poll_records, **overrides}
    consumer = make_consumer(settings.kafka_config(), None, **options)
    if fast_records:
        use_fast_records(consumer)
    tps = [
        TopicPartition(settings.topic_events, p)
        for p in sorted(consumer.partitions_for_topic(settings.topic_events))
    ]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    got = 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    while got < n:
        for batch in consumer.poll(timeout_ms=500).values():
            got += len(batch)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    consumer.close(autocommit=False)
    return elapsed, cpu


def bare_consume_confluent(settings: Settings, n: int) -> float | None:
    """The same bare read with confluent-kafka (librdkafka), if installed: the peer client."""
    try:
        from confluent_kafka import Consumer, TopicPartition
    except ImportError:
        return None
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"bench-peer-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    meta = consumer.list_topics(settings.topic_events, timeout=10)
    parts = sorted(meta.topics[settings.topic_events].partitions)
    consumer.assign([TopicPartition(settings.topic_events, p, 0) for p in parts])
    got = 0
    t0 = time.perf_counter()
    while got < n:
        batch = consumer.consume(num_messages=settings.max_poll_records, timeout=0.5)
        got += sum(1 for m in batch if m.error() is None)
    elapsed = time.perf_counter() - t0
    consumer.close()
    return elapsed


def service_pids(settings: Settings) -> dict[str, int]:
    """The broker's and Redis's process ids from their pid files (services this bench started;
    empty for reused ones, whose CPU is then not reported)."""
    out = {}
    for name, folder in (("broker", services.kafka_dir(settings)),
                         ("redis", services.redis_dir(settings))):
        try:
            out[name] = int((folder / f"{'kafka' if name == 'broker' else 'redis'}.pid")
                            .read_text().strip())
        except (OSError, ValueError):
            pass
    return out


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far, from /proc (NaN if unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_faults() -> tuple[int, float]:
    """The calling thread's minor page faults and system CPU seconds so far (/proc; zeros
    where unreadable). Copy-on-write after a checkpoint fork shows here: the trainer thread's
    first write to each page the forked writer still shares is a fault and a page copy."""
    try:
        fields = Path("/proc/thread-self/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0.0
    return int(fields[7]), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def run_trainer_once(settings: Settings, n: int, *, publish: bool = True,
                     pids: dict[str, int] | None = None) -> dict[str, float]:
    """The trainer from scratch until ``n`` events are applied and checkpointed.

    ``publish``: with the publisher (Redis history, vectors, snapshots) in its own thread, as
    ``fmstream.app.run_trainer`` wires it.

    Returns seconds: ``startup``, ``loop`` (incl. the final checkpoint), the trainer's phases
    (wall time of the thread that runs each), ``cpu_*`` (CPU seconds per thread: trainer, fetch,
    publisher, the rest of the process = kafka-python's IO thread, GC), ``drain`` (the publisher
    still busy after the loop, not in the rate) and ``checkpoints`` written; with ``pids``
    (name -> process id, e.g. the broker's and Redis's) also ``cpu_<name>``, their CPU seconds
    over the same loop, and ``fetch_piece_*`` (the fetch process's CPU by piece).
    """
    import redis

    from fmstream.app import new_model, redis_client
    from stream.consume import make_producer
    from train.loop import Trainer
    from train.publish_thread import PublisherThread
    from train.publisher import Publisher
    from train.store_writer import StoreWriter

    t0 = time.perf_counter()
    client = redis_client(settings)
    producer = make_producer(settings.kafka_config())
    trainer = Trainer(
        settings.trainer_config(), dead_letter_producer=producer,
        new_model=lambda: new_model(settings),
    )
    background = None
    if publish:
        writer = StoreWriter(client, settings.redis_keys(), settings.keep_versions)
        publisher = Publisher(
            settings.publish_config(), writer, trainer.model, model_lock=trainer.model_lock
        )
        background = PublisherThread(publisher).start()
        trainer.sink = background
    out: dict[str, float] = {"checkpoints": 0}
    if trainer.consumer is None:  # a fetch process: its start-up (spawn, imports) is startup
        trainer.fetcher.start().wait_ready()
    pids = pids or {}
    services0 = {name: process_cpu_s(pid) for name, pid in pids.items()}
    proc0, thread0 = time.process_time(), time.thread_time()
    faults0, sys0 = thread_faults()
    t1 = time.perf_counter()
    try:
        while not trainer.progress.events_applied:  # the first batch: the pipeline fills
            trainer.step()
        out["first_wait"] = trainer.timings.get("wait", 0.0)
        out["first_at"], out["first_events"] = time.perf_counter() - t1, (
            trainer.progress.events_applied)
        while trainer.progress.events_applied < n:
            trainer.step()
        trainer.fetcher.pause()
        t_final = time.perf_counter()
        trainer.checkpoint(final=True)
        t2 = time.perf_counter()
        out["final_checkpoint"] = t2 - t_final
        for name, pid in pids.items():
            out[f"cpu_{name}"] = process_cpu_s(pid) - services0[name]
        out["cpu_trainer"] = time.thread_time() - thread0
        faults1, sys1 = thread_faults()
        out["trainer_minor_faults"], out["cpu_trainer_sys"] = faults1 - faults0, sys1 - sys0
        out["cpu_process"] = time.process_time() - proc0
        out["cpu_fetch"] = trainer.fetcher.cpu_s
        out["fetch_process"] = float(trainer.consumer is None)
        for piece, secs in getattr(trainer.fetcher, "cpu_pieces", {}).items():
            out[f"fetch_piece_{piece}"] = secs
        if trainer.consumer is None:  # the fetch process's CPU is not in ours: add it
            out["cpu_process"] += out["cpu_fetch"]
        # forked checkpoint writers (FMSTREAM_CHECKPOINT_BACKGROUND): their CPU is not in
        # process_time(); count it, and count checkpoints written, not background starts
        out["cpu_ckpt_writer"] = trainer.checkpoint_child_cpu_s
        out["cpu_process"] += out["cpu_ckpt_writer"]
        out["checkpoints"] = trainer.checkpoints_written
        out["cpu_publisher"] = background.cpu_s if background is not None else 0.0
        if background is not None:
            t3 = time.perf_counter()
            background.flush()
            out["drain"] = time.perf_counter() - t3
            out["publisher_busy"] = background.busy_s
            out["publisher_dropped"] = background.dropped
    finally:
        if background is not None:
            background.close()
        trainer.close()
        producer.close()
        try:
            client.close()
        except redis.RedisError:
            pass
    out["cpu_other"] = max(
        0.0, out["cpu_process"] - out["cpu_trainer"] - out["cpu_fetch"] - out["cpu_publisher"]
        - out["cpu_ckpt_writer"]
    )
    out.update(startup=t1 - t0, loop=t2 - t1)
    out.update({f"phase_{k}": v for k, v in trainer.timings.items()})
    out.update({f"cpu_piece_{k}": v for k, v in trainer.cpu.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument(
        "--max-poll-records", type=int, default=None, help="default: the settings' value"
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="use the Kafka/Redis of the FMSTREAM_* variables (else start own)",
    )
    ap.add_argument(
        "--no-check-crcs", action="store_true", help="trainer consumer with check_crcs=False"
    )
    ap.add_argument("--kafka-python-records", action="store_true",
                    help="the trainer parses records with kafka-python's own parser "
                         "(FMSTREAM_KAFKA_FAST_RECORDS=false), not stream/record_parse.py")
    ap.add_argument("--fetch-depth", type=int, default=None,
                    help="decoded polls kept ready (FMSTREAM_TRAINER_FETCH_DEPTH; default: the "
                         "settings' value)")
    ap.add_argument("--switch-interval-ms", type=float, default=None,
                    help="the trainer process's GIL switch interval (sys.setswitchinterval; "
                         "Python's default 5 ms): how long the publisher thread may keep the "
                         "GIL once the trainer thread wants it back")
    ap.add_argument("--quick", action="store_true", help="20,000 events (smoke run)")
    ap.add_argument("--no-thread-peer", action="store_true",
                    help="skip the side-by-side run with a fetch thread instead of the process")
    ap.add_argument("--fetch-thread", action="store_true",
                    help="the trainer polls in a thread (FMSTREAM_TRAINER_FETCH_PROCESS=false)")
    ap.add_argument("--default-gc", action="store_true",
                    help="Python's default collector thresholds in the trainer process (the "
                         "fetch process always relaxes them), not train.runtime.relax_gc")
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument("--note", default="", help="appended to the notes (e.g. what shared the box)")
    args = ap.parse_args()
    n = 20_000 if args.quick else args.events

    from fmstream.app import configure_threads

    configure_threads(Settings())  # one torch/faiss/BLAS thread, as `fmstream train` runs
    if not args.default_gc:
        from train.runtime import relax_gc

        relax_gc()  # the collector's thresholds, as `fmstream train` sets them
    tmp = Path(tempfile.mkdtemp(prefix="fmstream-bench-"))
    if args.reuse:
        base = Settings()
    else:
        ports = {
            "kafka_port": _free_port(),
            "kafka_controller_port": _free_port(),
            "redis_port": _free_port(),
        }
        base = Settings(
            run_dir=tmp / "services",
            kafka_libs=ROOT / "infra" / "kafka" / "target" / "libs",
            kafka_bootstrap=f"127.0.0.1:{ports['kafka_port']}",
            redis_url=f"redis://127.0.0.1:{ports['redis_port']}/0",
            **ports,
        )
    run = uuid.uuid4().hex[:8]
    update: dict[str, object] = {
        f"topic_{f}": f"bench.{f}.{run}"
        for f in ("events", "users", "items", "requests", "responses", "dlq")
    }
    update.update(
        trainer_group=f"bench-trainer-{run}",
        redis_prefix=f"fmbench:{run}:",
        checkpoint_dir=tmp / "checkpoints",
        dim=args.dim,
        partitions_events=args.partitions,
    )
    if args.max_poll_records:
        update["max_poll_records"] = args.max_poll_records
    if args.no_check_crcs:
        update["kafka_check_crcs"] = False
    if args.fetch_thread:
        update["trainer_fetch_process"] = False
    if args.kafka_python_records:
        update["kafka_fast_records"] = False
    if args.fetch_depth is not None:
        update["trainer_fetch_depth"] = args.fetch_depth
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    settings = base.model_copy(update=update)
    started = None
    try:
        if args.reuse:
            services.ensure_topics(settings)
        else:
            started = services.up(settings)
        print(
            f"services: {started or 'reused'}; {n} events, dim {args.dim}, "
            f"{args.partitions} partitions, max_poll_records {settings.max_poll_records}, "
            f"checkpoint every {settings.checkpoint_every_events} events / "
            f"{settings.checkpoint_every_s} s",
            flush=True,
        )

        queue: mp.Queue = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(
            target=_fill, args=(settings.model_dump_json(), n, 0, queue)
        )
        proc.start()
        while True:  # the producer process reports once; fail fast if it died instead
            try:
                produced, produce_s, nbytes = queue.get(timeout=1.0)
                break
            except Empty:
                if not proc.is_alive():
                    raise SystemExit(f"producer process failed (exit {proc.exitcode})") from None
        proc.join(60)
        print(
            f"produced {produced} events ({nbytes / produced:.0f} B each) in {produce_s:.1f} s",
            flush=True,
        )

        bare_s, bare_cpu = bare_consume(settings, n)
        print(f"bare kafka-python consume: {n / bare_s:,.0f} events/s", flush=True)
        nocrc_s, nocrc_cpu = bare_consume(settings, n, check_crcs=False)
        print(f"bare consume, CRC checks off: {n / nocrc_s:,.0f} events/s", flush=True)
        fast_s, fast_cpu = bare_consume(settings, n, fast_records=True)
        print(f"bare consume, stream/record_parse: {n / fast_s:,.0f} events/s", flush=True)
        peer_s = bare_consume_confluent(settings, n)
        if peer_s is not None:
            print(f"bare consume, confluent-kafka: {n / peer_s:,.0f} events/s", flush=True)
        core = run_trainer_once(
            settings.model_copy(
                update={
                    "checkpoint_dir": tmp / "checkpoints-core",
                    "trainer_group": settings.trainer_group + "-core",
                }
            ),
            n,
            publish=False,
        )
        print(f"trainer without publisher: {n / core['loop']:,.0f} events/s", flush=True)
        threaded = None
        if settings.trainer_fetch_process and not args.no_thread_peer:
            threaded = run_trainer_once(  # the same trainer with its fetch thread, side by side
                settings.model_copy(update={
                    "checkpoint_dir": tmp / "checkpoints-thread",
                    "trainer_group": settings.trainer_group + "-thread",
                    "redis_prefix": settings.redis_prefix + "thread:",
                    "trainer_fetch_process": False,
                }),
                n,
            )
            print(f"trainer end to end, fetch thread: {n / threaded['loop']:,.0f} events/s",
                  flush=True)
        load_before = os.getloadavg()[0]
        full = run_trainer_once(settings, n, pids=service_pids(settings) if started else None)
        load_after = os.getloadavg()[0]
    finally:
        _cleanup(settings, own_services=started is not None)
        shutil.rmtree(tmp, ignore_errors=True)

    loop_s = full["loop"]
    eps = n / loop_s
    from kafka.record import util as record_util

    crc = "crc32c-C" if getattr(record_util, "crc32c_c", None) is not None else "pure-python"
    us = 1e6 / n

    def row(name: str, secs: float, *, cpu: bool = False) -> list[str]:
        return [name, f"{secs:.2f}", f"{secs * us:.1f}" if cpu else "",
                f"{secs / loop_s:.0%}" if not cpu else "", f"{n / secs:,.0f}" if secs > 0 else "-"]

    rows = [
        ["produce (separate process)", f"{produce_s:.2f}", "", "", f"{n / produce_s:,.0f}"],
        ["bare consume (kafka-python)", f"{bare_s:.2f}", f"{bare_cpu * us:.1f}", "",
         f"{n / bare_s:,.0f}"],
        ["bare consume, check_crcs=False", f"{nocrc_s:.2f}", f"{nocrc_cpu * us:.1f}", "",
         f"{n / nocrc_s:,.0f}"],
        ["bare consume, records parsed by stream/record_parse.py", f"{fast_s:.2f}",
         f"{fast_cpu * us:.1f}", "", f"{n / fast_s:,.0f}"],
        [
            "bare consume, confluent-kafka (peer)",
            f"{peer_s:.2f}" if peer_s else "not installed",
            "",
            "",
            f"{n / peer_s:,.0f}" if peer_s else "-",
        ],
        ["trainer without publisher", f"{core['loop']:.2f}", f"{core['cpu_process'] * us:.1f}",
         "", f"{n / core['loop']:,.0f}"],
    ]
    if threaded is not None:
        rows.append(["trainer end to end, fetch thread instead of process",
                     f"{threaded['loop']:.2f}", f"{threaded['cpu_process'] * us:.1f}", "",
                     f"{n / threaded['loop']:,.0f}"])
        for who in ("trainer", "fetch", "publisher", "other"):
            rows.append([f"  CPU (fetch thread run): {who}", f"{threaded[f'cpu_{who}']:.2f}",
                         f"{threaded[f'cpu_{who}'] * us:.1f}", "", ""])
    rows.append(["trainer end to end (publisher + checkpoints)", f"{loop_s:.2f}",
                 f"{full['cpu_process'] * us:.1f}", "100%", f"{eps:,.0f}"])
    steady_eps = (n - full["first_events"]) / (loop_s - full["first_at"])
    rows.append(["  after its first batch (the same run, not the headline)",
                 f"{loop_s - full['first_at']:.2f}", "", "", f"{steady_eps:,.0f}"])
    fetcher = "fetch process" if full["fetch_process"] else "fetch thread"
    for phase in ("poll", "decode"):
        rows.append(row(f"  {fetcher}: {phase} (wall)", full[f"phase_{phase}"]))
    for phase in ("wait", "update", "publish", "checkpoint"):
        label = "hand-over to publisher" if phase == "publish" else phase
        rows.append(row(f"  trainer thread: {label} (wall)", full[f"phase_{phase}"]))
        if phase == "wait":
            rows.append(row("    of it: for the first batch (fetch start-up)", full["first_wait"]))
        if phase == "checkpoint":
            rows.append(row("    of it: the final checkpoint (inline)", full["final_checkpoint"]))
    rows.append(row("  publisher thread busy (wall)", full["publisher_busy"]))
    rows.append(row("  publisher still busy after the loop", full["drain"]))
    for who in ("trainer", "fetch", "publisher", "ckpt_writer", "other"):
        name = {"other": "other threads (kafka-python IO, GC)",
                "ckpt_writer": "checkpoint writers (forked children)",
                "fetch": f"{fetcher} (kafka-python + decode)"}.get(who, f"{who} thread")
        rows.append(row(f"  CPU: {name}", full[f"cpu_{who}"], cpu=True))
        if who == "fetch" and full["fetch_process"]:  # where the fetch process's CPU goes
            rest = full["cpu_fetch"]
            for piece in FETCH_CPU_PIECES:
                rows.append(row(f"    fetch process CPU: {piece}", full[f"fetch_piece_{piece}"],
                                cpu=True))
                rest -= full[f"fetch_piece_{piece}"]
            rows.append(row("    fetch process CPU: rest (pickling to the trainer, IO)",
                            max(0.0, rest), cpu=True))
        if who == "trainer":  # where the trainer thread's CPU goes (Trainer.cpu)
            for piece in CPU_PIECES:
                rows.append(row(f"    trainer thread CPU: {piece}", full[f"cpu_piece_{piece}"],
                                cpu=True))
            rows.append(row(f"    trainer thread CPU: of it, system time "
                            f"({full['trainer_minor_faults']:,} minor page faults)",
                            full["cpu_trainer_sys"], cpu=True))
    for name in ("broker", "redis"):
        if f"cpu_{name}" in full:
            rows.append(row(f"  CPU: {'Kafka broker' if name == 'broker' else 'Redis'} "
                            "(whole process, same interval)", full[f"cpu_{name}"], cpu=True))
    if "cpu_broker" in full and "cpu_redis" in full:
        rows.append(row("  CPU: all of the above (trainer process + fetch process + broker + "
                        "Redis)", full["cpu_process"] + full["cpu_broker"] + full["cpu_redis"],
                        cpu=True))
    columns = ["stage", "seconds", "CPU us/event", "share of trainer wall", "events/s"]
    print_table(f"ingest: {n} events, dim {args.dim}, CRC32C {crc}", columns, rows)
    summary = summary_line(
        events=n,
        dim=args.dim,
        partitions=args.partitions,
        max_poll_records=settings.max_poll_records,
        check_crcs=settings.kafka_check_crcs,
        fast_records=settings.kafka_fast_records,
        fetch_depth=settings.trainer_fetch_depth,
        first_wait_s=full["first_wait"],
        after_first_batch_per_s=steady_eps,
        final_checkpoint_s=full["final_checkpoint"],
        switch_interval_ms=sys.getswitchinterval() * 1000,
        checkpoints=int(full["checkpoints"]),
        produce_per_s=n / produce_s,
        bare_consume_per_s=n / bare_s,
        bare_consume_nocrc_per_s=n / nocrc_s,
        bare_consume_fast_records_per_s=n / fast_s,
        bare_consume_cpu_us=bare_cpu * us,
        bare_consume_fast_records_cpu_us=fast_cpu * us,
        bare_consume_confluent_per_s=n / peer_s if peer_s else "n/a",
        trainer_no_publisher_per_s=n / core["loop"],
        fetch=fetcher,
        trainer_fetch_thread_per_s=n / threaded["loop"] if threaded else "n/a",
        cpu_fetch_thread_run_us=threaded["cpu_process"] * us if threaded else "n/a",
        cpu_us_per_event=full["cpu_process"] * us,
        cpu_trainer_us=full["cpu_trainer"] * us,
        cpu_trainer_sys_us=full["cpu_trainer_sys"] * us,
        trainer_minor_faults=int(full["trainer_minor_faults"]),
        cpu_fetch_us=full["cpu_fetch"] * us,
        cpu_publisher_us=full["cpu_publisher"] * us,
        cpu_ckpt_writer_us=full["cpu_ckpt_writer"] * us,
        cpu_other_us=full["cpu_other"] * us,
        **{f"cpu_trainer_{piece}_us": full[f"cpu_piece_{piece}"] * us for piece in CPU_PIECES},
        **{f"cpu_fetch_{piece}_us": full[f"fetch_piece_{piece}"] * us
           for piece in FETCH_CPU_PIECES if f"fetch_piece_{piece}" in full},
        cpu_broker_us=full["cpu_broker"] * us if "cpu_broker" in full else "n/a",
        cpu_redis_us=full["cpu_redis"] * us if "cpu_redis" in full else "n/a",
        publisher_dropped=int(full["publisher_dropped"]),
        startup_s=full["startup"],
        crc32c=crc,
        gc="default" if args.default_gc else "relaxed",
        loadavg=f"{load_before:.1f}-{load_after:.1f}",
        events_per_s=eps,
    )
    notes = (
        f"Trainer = the real Trainer ({fetcher}: kafka-python poll + columnar decode; trainer "
        "thread: model update, checkpoints) + Publisher in its own thread (Redis history, "
        "vectors, item versions), checkpoints on, from an empty model, as `fmstream train` "
        "wires it; the rate counts until every event is applied and the final checkpoint "
        "written (the fetch process's start-up is not in it: startup_s). Phases are wall "
        "seconds of the thread or process that runs them (they overlap); CPU us/event is CPU "
        "time per event by thread (time.thread_time; the fetch process: its whole process "
        "time, kafka-python's IO thread included), 'other' = the rest of the trainer process "
        "(kafka-python IO, GC); the trainer thread's CPU by piece (Trainer.cpu): receive = "
        "taking a batch from the fetcher (unpickling), learn = the model update, live = live "
        "hit-rate sampling + ranking, bookkeeping = the rest of applying a poll, checkpoint, "
        "handover = telling the publisher thread (checkpoint = the trainer thread's part: the "
        "fork of a background writer and installing its file, or a whole inline write); "
        "'of it, system time' = the trainer thread's kernel CPU over the run (inside the pieces "
        "above), with its minor page faults: mostly copy-on-write, the first write to each "
        "page after each checkpoint fork (/proc/thread-self/stat); "
        "checkpoint writers = CPU of the forked children that write the files (from wait4); "
        "the fetch process's CPU by piece "
        "(FetchProcess.cpu_pieces, its main thread): poll = kafka-python (fetches, record "
        "parsing), align = train/align.py, decode = JSON + validation into columns, rest = "
        "its other threads (the queue's feeder pickling batches); broker and Redis = CPU of "
        "their whole processes over the same interval (/proc/<pid>/stat; they serve only this "
        "bench). Bare consume reads "
        "the same topic with the same consumer settings and does nothing else (kafka-python's "
        "record parser; the 'record_parse' row: stream/record_parse.py's, which the trainer "
        f"uses {'' if settings.kafka_fast_records else 'NOT (--kafka-python-records) '}by "
        "default: FMSTREAM_KAFKA_FAST_RECORDS). loadavg = 1-min "
        f"load before/after the trainer run on {os.cpu_count()} cores (other processes share "
        f"the machine). CRC32C of fetched batches: {crc}. {args.note}"
    ).strip()
    if not args.no_record:
        record("ingest", columns, rows, summary, notes)
    print(summary)


def _cleanup(settings: Settings, *, own_services: bool) -> None:
    shutil.rmtree(settings.checkpoint_dir, ignore_errors=True)
    if own_services:
        services.down(settings)
        shutil.rmtree(settings.run_dir, ignore_errors=True)
        return
    try:
        with services.kafka_admin(settings.kafka_config()) as admin:
            present = set(admin.list_topics())
            admin.delete_topics([t for t in settings.topic_partitions if t in present])
    except Exception as exc:  # noqa: BLE001 - best effort
        print(f"could not delete the bench topics: {exc!r}", file=sys.stderr)


if __name__ == "__main__":
    main()
