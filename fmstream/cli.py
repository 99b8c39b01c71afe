"""The ``fmstream`` command: a thin shell over services, trainer, worker, replay, query and lag.

Every setting comes from an FMSTREAM_* environment variable (all of them are listed below with
their defaults); the few flags of each command override them for one run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

from fmstream.settings import Settings, UnknownSettingError

EXIT_SETTINGS = 2
"""Exit status when the settings are invalid (unknown FMSTREAM_* variable, bad value)."""
EXIT_CONNECT = 3
"""Exit status when Kafka or Redis refuses the credentials or TLS."""
EXIT_SERVICE = 1
"""Exit status when a local service cannot be started or reached (``fmstream.services``)."""


def _settings_epilog() -> str:
    lines = ["settings (environment variables, defaults):"]
    for name, f in Settings.model_fields.items():
        default = f.default if f.default is not None else "-"
        desc = f" — {f.description}" if f.description else ""
        lines.append(f"  FMSTREAM_{name.upper()}={default}{desc}")
    return "\n".join(lines)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(show_path=False, rich_tracebacks=True)])
    logging.getLogger("kafka").setLevel(logging.ERROR)


class _Redact(logging.Filter):
    """Replaces every secret of the settings (and URL passwords) in a log record's text.

    Secrets are SecretStr and URLs are shown redacted, so nothing should need this; it is the
    net under a library that logs what it was given.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = self.settings.redact(text)
        if clean != text:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            if self.settings.redact(str(exc)) != str(exc):
                record.exc_info, record.exc_text = None, None
                record.msg = f"{record.msg} ({type(exc).__name__}; details hidden: a secret)"
        return True


def _redact_logs(settings: Settings) -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Redact(settings))


def _preflight(
    settings: Settings,
    *,
    kafka: bool = True,
    redis: bool = False,
    topics: Sequence[str] = (),
    groups: Sequence[str] = (),
) -> None:
    """Fail fast and closed on wrong credentials or TLS, or on a principal the broker's ACLs
    deny the ``topics`` / ``groups`` it needs, before any work starts.

    Raises:
        stream.connect.ConnectError: Kafka or Redis refused the credentials or the TLS
            handshake, or Kafka denies a topic or group. A service that does not answer yet is
            only logged: the trainer and the worker wait for it as they do after a restart.
    """
    from stream.connect import Unreachable, check_kafka, check_redis

    checks = []
    if redis:
        checks.append(lambda: check_redis(settings.redis_config()))
    if kafka:
        checks.append(lambda: check_kafka(settings.kafka_config(), topics=topics,
                                          groups=groups))
    for check in checks:
        try:
            check()
        except Unreachable as exc:
            logging.getLogger(__name__).warning("%s", exc)


@contextlib.contextmanager
def _credential_watch(
    settings: Settings, stop: threading.Event, *, kafka: bool = True, redis: bool = False
) -> Iterator[None]:
    """While the body runs, re-check the credentials (``FMSTREAM_CREDENTIALS_CHECK_S``); when
    they were revoked the body is stopped through ``stop`` and the refusal is raised after it
    (exit status 3, one line on stderr, see :mod:`fmstream.credentials`)."""
    if settings.credentials_check_s <= 0:
        yield
        return
    from fmstream.credentials import CredentialWatch
    from stream.connect import check_kafka, check_redis

    checks = []
    if kafka:
        checks.append(lambda: check_kafka(settings.kafka_config()))
    if redis:
        checks.append(lambda: check_redis(settings.redis_config()))
    watch = CredentialWatch(checks, stop, every_s=settings.credentials_check_s).start()
    try:
        yield
    except Exception:
        # e.g. "Unable to bootstrap" from a client made after the credentials were revoked:
        # report the refusal itself (exit 3), not a traceback
        refusal = watch.failed or watch.refusal_now()
        if refusal is not None:
            raise refusal from None
        raise
    finally:
        watch.close()
    if watch.failed is not None:
        raise watch.failed


# --- commands -------------------------------------------------------------------------------


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from fmstream import services

    result = services.up(settings)
    print(f"kafka {settings.kafka_bootstrap}  redis {settings.redis_url_display}  ({result})")
    return 0


def cmd_down(settings: Settings, args: argparse.Namespace) -> int:
    from fmstream import services

    result = services.down(settings)  # "stopped" / "not running" (never started from here)
    print(f"kafka {result['kafka']}, redis {result['redis']} ({settings.run_dir})")
    return 0


def cmd_topics(settings: Settings, args: argparse.Namespace) -> int:
    from fmstream import services

    _preflight(settings)
    created = services.ensure_topics(settings, reply_topics=args.reply or ())
    print(f"created {', '.join(created)}" if created else "every topic exists")
    return 0


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    _preflight(settings, redis=True,  # before torch is imported: fail in a second
               topics=[settings.topic_events, settings.topic_users, settings.topic_items,
                       settings.topic_dlq], groups=[settings.trainer_group])
    from fmstream.app import configure_threads, lower_priority, run_trainer
    from train.runtime import relax_gc

    lower_priority(settings.trainer_nice)  # before its children start: they inherit it
    configure_threads(settings)
    relax_gc()  # fewer collector passes: ~1.7 us CPU per event (train/runtime.py)
    stop = _stop_on_signals()
    with _credential_watch(settings, stop, redis=True):
        progress = run_trainer(settings, stop, idle_exit_s=args.idle_exit)
    if progress is not None:
        print(f"applied {progress.events_applied} events, {progress.dead_letters} dead letters")
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    _preflight(settings, redis=True,
               topics=[settings.topic_requests, settings.topic_responses, settings.topic_dlq],
               groups=[settings.serving_group])
    from fmstream.app import configure_threads, request_slice, run_worker

    request_slice(settings.worker_slice_us)  # before any thread starts: they inherit it
    configure_threads(settings)
    stop = _stop_on_signals()
    with _credential_watch(settings, stop, redis=True):
        run_worker(settings, stop)
    return 0


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from stream.consume import make_producer
    from stream.replay import produce_events, produce_profiles

    if args.movielens:
        from stream.movielens import load_movielens

        data = load_movielens(args.movielens)
        events = data.events()
        total = len(data.ratings) if args.events is None else min(args.events, len(data.ratings))
        events = (e for _, e in zip(range(total), events, strict=False))
    else:
        from stream.synthetic import SyntheticStream

        data = SyntheticStream(users=args.users, items=args.items, clusters=args.clusters,
                               seed=settings.seed)
        total = args.events or 50_000
        events = data.events(total)
    _preflight(settings, topics=[settings.topic_events, settings.topic_users, settings.topic_items])
    producer = make_producer(settings.kafka_config())
    try:
        if not args.no_profiles:
            n_users, n_items = produce_profiles(producer, settings.topics(), data.user_profiles(),
                                                data.item_profiles())
            print(f"profiles: {n_users} users, {n_items} items")
        with Progress() as bar:
            task = bar.add_task("replaying events", total=total)
            n = produce_events(producer, settings.topics(), events, rate=args.rate,
                               progress=lambda k: bar.advance(task, k))
        print(f"produced {n} events to {settings.topic_events}")
    finally:
        producer.close()
    return 0


def cmd_query(settings: Settings, args: argparse.Namespace) -> int:
    import orjson
    from rich.console import Console
    from rich.table import Table

    from serving.client import FmClient

    req: dict = {"type": args.type, "k": args.k, "exclude_seen": args.exclude_seen}
    if args.user:
        req["user_id"] = args.user
    if args.item:
        req["item_id"] = args.item
    if args.items:
        req["item_ids"] = args.items.split(",")
    if args.offline:
        req["source"] = "offline"
    if args.context:
        req["context"] = orjson.loads(args.context)
    _preflight(settings, topics=[settings.topic_requests, settings.topic_responses])
    with FmClient(settings) as client:
        resp = client.request(req, timeout=args.timeout)
    if args.json:
        print(orjson.dumps(resp.model_dump(mode="json")).decode())
        return 1 if resp.error else 0
    if resp.error:
        print(f"error {resp.error.code}: {resp.error.message}", file=sys.stderr)
        return 1
    table = Table(title=f"{args.type} (model v{resp.model_version})"
                  + (f" fallback={resp.fallback}" if resp.fallback else ""))
    table.add_column("#", justify="right")
    table.add_column("item_id")
    table.add_column("score", justify="right")
    for n, item in enumerate(resp.items, 1):
        table.add_row(str(n), item.item_id, f"{item.score:.4f}")
    Console().print(table)
    return 0


def cmd_lag(settings: Settings, args: argparse.Namespace) -> int:
    from fmstream.monitor import lag_command

    # Redis too: wrong or unchecked credentials fail closed here, before a half report
    _preflight(settings, redis=True)
    return lag_command(settings, args)


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from fmstream.demo import run_demo

    return run_demo(settings, events=args.events)


# --- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="fmstream", description=__doc__, epilog=_settings_epilog(), formatter_class=fmt
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=_settings_epilog(),
                           formatter_class=fmt)
        p.set_defaults(func=func)
        return p

    add("up", cmd_up, "start local Kafka (KRaft) and Redis and create the topics")
    add("down", cmd_down, "stop the local services that `up` started")
    p = add("topics", cmd_topics, "create the contract's topics on the configured Kafka")
    p.add_argument("--reply", action="append", metavar="TOPIC",
                   help="also create this reply topic for requests' reply_to (repeatable; it "
                        "must start with a prefix of FMSTREAM_REPLY_TOPIC_PREFIXES; workers "
                        "never create one)")
    p = add("train", cmd_train, "consume events and profiles, train the FM, publish vectors")
    p.add_argument("--idle-exit", type=float, default=None, metavar="S",
                   help="exit after S seconds without new records (default: run forever)")
    add("serve", cmd_serve, "answer requests from the request topic (one worker)")
    p = add("replay", cmd_replay, "produce profiles and events (synthetic or MovieLens)")
    p.add_argument("--movielens", metavar="PATH", help="ml-100k or ml-1m folder")
    p.add_argument("--events", type=int, default=None, help="events to send (synthetic: 50000)")
    p.add_argument("--rate", type=float, default=None, help="events/s (default: as fast as can)")
    p.add_argument("--users", type=int, default=1000, help="synthetic users")
    p.add_argument("--items", type=int, default=500, help="synthetic items")
    p.add_argument("--clusters", type=int, default=10, help="synthetic planted clusters")
    p.add_argument("--no-profiles", action="store_true", help="send events only")
    p = add("query", cmd_query, "ask one question through the request topic")
    p.add_argument("type", choices=["u2i", "i2i", "i2i_history", "rank"])
    p.add_argument("--user")
    p.add_argument("--item")
    p.add_argument("--items", help="comma-separated item ids (rank)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--exclude-seen", action="store_true")
    p.add_argument("--offline", action="store_true", help="i2i from the precomputed table")
    p.add_argument("--context", help='request context as JSON, e.g. \'{"hour": "14"}\'')
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--json", action="store_true", help="print the raw response")
    p = add("lag", cmd_lag, "consumer lag, freshness, publish ages and model versions")
    p.add_argument("--watch", action="store_true", help="refresh in place")
    p.add_argument("--interval", type=float, default=2.0,
                   help="seconds between refreshes (default 2; --window samples >= 10 times)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--max-lag", type=int, default=None,
                   help="exit 2 when any group's total lag exceeds this")
    p.add_argument("--max-age", type=float, default=None,
                   help="exit 2 when freshness or publish age exceeds this many seconds")
    p.add_argument("--window", type=float, default=0.0, metavar="S",
                   help="sample S seconds, then report with each group's health (Burrow's "
                        "rules; default 0: one reading; --watch: a rolling 60 s)")
    p.add_argument("--fail-on", choices=["WARN", "STOP", "STALL", "REWIND"], default=None,
                   help="exit 2 when a group's health is this or worse (default: never)")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="draw lag and freshness over the window (default window 60 s; "
                        "needs fmstream[plot])")
    p = add("demo", cmd_demo, "the whole loop: up, train, serve, replay, query, lag, down")
    p.add_argument("--events", type=int, default=None, help="synthetic events (default 30000)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Exit status: the command's, or 1 when a local service cannot be started
    or reached, 2 for invalid settings, 3 when Kafka or Redis refuses the credentials or TLS
    (a one-line message on stderr, never a secret)."""
    from pydantic import ValidationError

    from fmstream.services import ServiceError
    from stream.connect import ConnectError

    args = build_parser().parse_args(argv)
    _logging(args.verbose)
    try:
        settings = Settings()
    except UnknownSettingError as exc:
        print(f"fmstream: {exc}", file=sys.stderr)
        return EXIT_SETTINGS
    except ValidationError as exc:
        print(f"fmstream: invalid settings (FMSTREAM_* environment variables):\n{exc}",
              file=sys.stderr)
        return EXIT_SETTINGS
    _redact_logs(settings)
    try:
        return args.func(settings, args)
    except ConnectError as exc:
        print(f"fmstream {args.command}: {settings.redact(str(exc))}", file=sys.stderr)
        return EXIT_CONNECT
    except ServiceError as exc:  # a port taken, a broker that does not answer: one line
        print(f"fmstream {args.command}: {settings.redact(str(exc))}", file=sys.stderr)
        return EXIT_SERVICE


if __name__ == "__main__":
    sys.exit(main())
