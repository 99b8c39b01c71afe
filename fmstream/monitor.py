"""``fmstream lag``: is the model up to date? Lag, health, freshness, publish ages, versions.

One reading (:func:`read_lag`) shows, for the trainer and the serving group, every partition's
committed offset, log-end offset and lag, plus what the trainer and publisher wrote to Redis:
event-time freshness (now minus the newest applied event), checkpoint age, publish ages of user
vectors, the item index and offline i2i, the model version and the version each worker serves.

A window of readings (:class:`LagSampler`, ``--window S`` or ``--watch``) adds each group's
health by Burrow's rules (:mod:`fmstream.health`): the sampler also tails the groups' commits in
``__consumer_offsets`` (:class:`stream.lag.CommitLog`), so a stalled consumer that re-commits
one offset is told from a stopped one. ``--plot FILE.png`` draws lag and freshness over it.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kafka.errors import KafkaError

from fmstream.errors import NoSamplesError
from fmstream.health import Commit, GroupHealth, Reading, Status, evaluate_group
from fmstream.settings import Settings
from stream.connect import explain_kafka_error
from stream.lag import CommitLog, GroupState, LagReader, PartitionLag

log = logging.getLogger(__name__)

AGE_KEYS = {
    "event_time_freshness_s": "trainer_event_time",
    "checkpoint_age_s": "checkpoint_at",
    "users_publish_age_s": "users_published_at",
    "items_publish_age_s": "items_published_at",
    "i2i_publish_age_s": "i2i_published_at",
}
"""Each age ``fmstream lag`` shows and the status-hash field (epoch seconds) it is computed from."""

DEFAULT_WATCH_WINDOW_S = 60.0
HISTORY_S = 600.0
"""Seconds of totals and ages kept for ``--plot`` (at least the window)."""


def group_topics(settings: Settings) -> dict[str, list[str]]:
    """The monitored groups and the topics each consumes."""
    return {
        settings.trainer_group: [settings.topic_events, settings.topic_users, settings.topic_items],
        settings.serving_group: [settings.topic_requests],
    }


@dataclass
class LagReport:
    """One reading of everything ``fmstream lag`` shows (and the health of its window, if any)."""

    at: float
    partitions: list[PartitionLag]
    status: dict = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)
    worker_items: dict[str, int] = field(default_factory=dict)  # the item version behind each
    worker_groups: dict[str, dict] = field(default_factory=dict)  # each one's group membership
    groups: dict[str, GroupState] = field(default_factory=dict)
    health: dict[str, GroupHealth] | None = None
    window_s: float = 0.0  # seconds of readings the health covers
    commit_log: bool | None = None  # whether commits were observed (else derived)
    problems: list[str] = field(default_factory=list)  # what could not be read
    status_at: float | None = None  # when ``status`` was read (ages count from it; else ``at``)

    def total(self, group: str) -> int:
        """The group's lag over all its partitions."""
        return sum(p.lag for p in self.partitions if p.group == group)

    def ages(self) -> dict[str, float | None]:
        """Seconds since each published/applied thing (None: never)."""
        # from the moment the status was read, not ``at`` (before the Kafka reads): a publish
        # stamped while Kafka was read is younger than ``at`` and showed a negative age
        now = self.at if self.status_at is None else self.status_at

        def age(key: str) -> float | None:
            v = self.status.get(key)
            return None if not v else round(now - float(v), 3)

        return {name: age(key) for name, key in AGE_KEYS.items()}

    def live_hit_rate(self) -> dict[str, float | None]:
        """The trainer's test-then-train HR@10 by cohort, from the status hash (None: no
        sample yet)."""
        out: dict[str, float | None] = {}
        for cohort in ("warm", "cold"):
            v = self.status.get(f"live_hit_rate_{cohort}")
            out[cohort] = None if v in (None, "") else float(v)
        return out

    def live_samples(self) -> dict[str, int | None]:
        """How many sampled positives each cohort's live HR@10 is over (None: not reported)."""
        out: dict[str, int | None] = {}
        for cohort in ("warm", "cold"):
            v = self.status.get(f"live_samples_{cohort}")
            out[cohort] = None if v in (None, "") else int(float(v))
        return out

    def to_json(self) -> dict:
        """Everything as plain JSON types (``fmstream lag --json``)."""
        groups = {}
        for g in dict.fromkeys(p.group for p in self.partitions):
            state = self.groups.get(g)
            groups[g] = {
                "state": None if state is None else state.state,
                "members": None if state is None else state.members,
                "total_lag": self.total(g),
            }
        return {
            "at": self.at,
            "partitions": [asdict(p) | {"lag": p.lag} for p in self.partitions],
            "groups": groups,
            "total_lag": {g: v["total_lag"] for g, v in groups.items()},
            "ages": self.ages(),
            "model_version": self.status.get("model_version"),
            "item_version": self.status.get("item_version"),
            "live_hit_rate": self.live_hit_rate(),
            "live_samples": self.live_samples(),
            "worker_versions": self.workers,
            "worker_item_versions": self.worker_items,
            "worker_groups": self.worker_groups,
            "health": None if self.health is None else {
                "window_s": round(self.window_s, 3),
                "commit_log": self.commit_log,
                "groups": {g: h.to_json() for g, h in self.health.items()},
            },
            "problems": self.problems,
        }


def version_warnings(
    workers: Mapping[str, int], head: int | None, available: set[int]
) -> list[str]:
    """Warnings for workers serving a version the store no longer has.

    Args:
        workers: worker id -> the version it serves.
        head: the store's newest item version (None: Redis holds none, e.g. after a flush).
        available: versions a worker can still be at and follow from (full snapshots, deltas
            and the head).
    """
    out = []
    for worker, served in sorted(workers.items()):
        if head is None:
            out.append(f"worker {worker} serves v{served} but Redis holds no item version "
                       "(flushed?): it keeps answering from memory until the publisher "
                       "republishes")
        elif served > head:
            out.append(f"worker {worker} serves v{served}, newer than the store's v{head}: "
                       "versions went back (a trainer restarted without its checkpoint?)")
        elif served not in available:
            out.append(f"worker {worker} serves v{served}, which the store no longer has "
                       f"(newest v{head}): it must reload a full snapshot")
    return out


def _group_note(report: LagReport, worker: str) -> str:
    """`` — out of the group 35 s, 1 consumer renewal`` (nothing for a healthy member)."""
    group = report.worker_groups.get(worker)
    if not group:
        return ""
    notes = []
    if not group.get("member"):
        notes.append(f"not a group member for {float(group.get('out_s') or 0):.0f} s")
    renewals = int(group.get("renewals") or 0)
    if renewals:
        notes.append(f"{renewals} consumer renewal{'s' if renewals != 1 else ''}")
    return f" — {', '.join(notes)}" if notes else ""


def dead_letter_warnings(status: Mapping[str, str], topic: str, now: float) -> list[str]:
    """A warning while the trainer reports that the dead-letter topic takes no letters (the
    status hash's ``dlq_*`` fields): its intake is held at them until the topic does."""
    try:
        since = float(status.get("dlq_blocked_since") or 0)
        waiting = int(float(status.get("dlq_waiting") or 0))
    except ValueError:
        return []
    if since <= 0:
        return []
    from stream.consume import dead_letter_fix

    error = status.get("dlq_error") or "no acknowledgement"
    return [f"trainer: dead-letter topic {topic} has taken no letters for "
            f"{max(0.0, now - since):.0f} s ({error}; {waiting} waiting): the trainer holds its "
            f"intake until it does; to fix: {dead_letter_fix(topic, error)}"]


def _read_status(
    settings: Settings, problems: list[str]
) -> tuple[dict, dict[str, int], dict[str, int], dict[str, dict]]:
    from serving.store import VectorStore
    from stream.connect import explain_redis_error, redis_client

    conn = settings.redis_config()
    try:
        # Not fmstream.app.redis_client: that module imports torch (seconds) for the trainer.
        client = redis_client(conn, socket_timeout=5, socket_connect_timeout=5)
        store = VectorStore(client, settings.redis_keys())
        workers = store.worker_versions()
        if workers:
            keys = settings.redis_keys()
            head = store.current_item_version()
            deltas = {int(v) for v in client.zrange(keys.items_deltas(), 0, -1)}
            available = set(store.item_versions()) | deltas | ({head} if head else set())
            problems.extend(version_warnings(workers, head, available))
        if not workers:
            return store.get_status(), workers, {}, {}
        return (store.get_status(), workers, store.worker_item_versions(),
                store.worker_groups())
    except Exception as exc:  # noqa: BLE001 - Kafka lag is still worth showing without Redis
        explained = explain_redis_error(conn, exc)
        if explained is not None:
            raise explained from None  # wrong credentials: fail, don't show a half report
        problems.append(f"Redis at {conn.display_url()} unreadable: {type(exc).__name__}: "
                        f"{settings.redact(str(exc))}")
        return {}, {}, {}, {}


def read_lag(
    settings: Settings,
    *,
    reader: LagReader | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> LagReport:
    """Read consumer lag of the trainer and serving groups and the published status (no health).

    Args:
        settings: addresses, groups, topics.
        reader: a connected reader to reuse (else one is made and closed).
        groups: ``group -> topics`` to read instead of the trainer and serving groups.
    """
    groups = group_topics(settings) if groups is None else groups
    at = time.time()  # before the reads: a commit after this may or may not be in them
    own = reader is None
    reader = reader or LagReader(settings.kafka_config())
    try:
        parts = reader.read(groups)
        states = reader.group_states(list(groups))
    finally:
        if own:
            reader.close()
    problems: list[str] = []
    status, workers, worker_items, worker_groups = _read_status(settings, problems)
    status_at = time.time()
    problems.extend(dead_letter_warnings(status, settings.topic_dlq, status_at))
    return LagReport(at, parts, status, workers, worker_items, worker_groups, states,
                     problems=problems, status_at=status_at)


@dataclass(frozen=True)
class HistoryPoint:
    """What a plot draws for one reading."""

    ts: float
    lag: dict[str, int]
    ages: dict[str, float | None]


class LagSampler:
    """Readings of both groups over a sliding window, with their commits; health on demand.

    Args:
        settings: addresses, groups and topics.
        window_s: seconds of readings kept (the health window).
        commit_log: tail ``__consumer_offsets`` for the groups' commits (else commits are
            derived from readings, and STALL reads as STOP).
        groups: ``group -> topics`` to watch (default: the trainer and serving groups).
    """

    def __init__(
        self,
        settings: Settings,
        window_s: float,
        *,
        commit_log: bool = True,
        groups: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.settings = settings
        self.window_s = window_s
        self.groups = dict(group_topics(settings) if groups is None else groups)
        self.reader = LagReader(settings.kafka_config())
        self._want_commits = commit_log
        self._commit_log: CommitLog | None = None
        self.readings: dict[tuple[str, str, int], deque[Reading]] = {}
        self.commits: dict[tuple[str, str, int], deque[Commit]] = {}
        self.history: deque[HistoryPoint] = deque()
        self.last: LagReport | None = None

    def __enter__(self) -> LagSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.reader.close()
        if self._commit_log is not None:
            self._commit_log.close()

    @property
    def commit_log(self) -> bool:
        """Whether commits are observed in the commit log (not derived from readings)."""
        return self._commit_log is not None and self._commit_log.available

    def sample(self) -> LagReport:
        """Take one reading, add it to the window, and return it with the window's health."""
        if self._commit_log is not None:
            for c in self._commit_log.poll(0.05):
                self.commits.setdefault((c.group, c.topic, c.partition), deque()).append(
                    Commit(c.ts, c.offset))
        report = read_lag(self.settings, reader=self.reader, groups=self.groups)
        for p in report.partitions:
            self.readings.setdefault((p.group, p.topic, p.partition), deque()).append(
                Reading(report.at, p.committed, p.log_end, p.log_start))
        if self._want_commits and self._commit_log is None:
            # After the first (baseline) reading: every commit observed comes after it.
            self._commit_log = CommitLog(self.settings.kafka_config(), self.groups).start()
        self.history.append(HistoryPoint(report.at, {g: report.total(g) for g in self.groups},
                                         report.ages()))
        self._prune(report.at)
        report.window_s = self.span()
        report.commit_log = self.commit_log
        report.health = self.health(report.at)
        self.last = report
        return report

    def span(self) -> float:
        """Seconds between the oldest and the newest reading in the window."""
        spans = [rs[-1].ts - rs[0].ts for rs in self.readings.values() if rs]
        return max(spans, default=0.0)

    def _prune(self, now: float) -> None:
        cutoff = now - self.window_s
        for key, rs in self.readings.items():
            # Keep the newest reading at or before the cutoff: it is the window's baseline, and
            # the commits before it are history (it already shows their result).
            if len(rs) >= 2 and rs[1].ts <= cutoff:
                while len(rs) >= 2 and rs[1].ts <= cutoff:
                    rs.popleft()
                cs = self.commits.get(key)
                while cs and cs[0].ts <= rs[0].ts:
                    cs.popleft()
        keep_from = now - max(self.window_s, HISTORY_S)
        while len(self.history) >= 2 and self.history[1].ts <= keep_from:
            self.history.popleft()

    def health(self, now: float | None = None) -> dict[str, GroupHealth] | None:
        """Each group's health over the window (None before two readings)."""
        if self.span() <= 0:
            return None
        use_commits = self.commit_log
        out = {}
        for group in self.groups:
            readings = {(t, p): list(rs) for (g, t, p), rs in self.readings.items() if g == group}
            commits = None
            if use_commits:
                commits = {(t, p): list(cs) for (g, t, p), cs in self.commits.items()
                           if g == group}
            out[group] = evaluate_group(group, readings, commits, now=now)
        return out


# --- thresholds -----------------------------------------------------------------------------


def exceeded(report: LagReport, *, groups: Sequence[str], max_lag: int | None = None,
             max_age: float | None = None, fail_on: Status | None = None) -> list[str]:
    """What breaks the thresholds (empty: all fine), one line each."""
    out = []
    if max_lag is not None:
        for g in groups:
            if report.total(g) > max_lag:
                out.append(f"group {g}: lag {report.total(g)} > --max-lag {max_lag}")
    if max_age is not None:
        for name, value in report.ages().items():
            if value is not None and value > max_age:
                out.append(f"{name} {value:.1f} s > --max-age {max_age:g}")
    if fail_on is not None and report.health:
        for g, h in report.health.items():
            if h.status >= fail_on:
                out.append(f"group {g}: {h.status.name} ({h.reason}) >= --fail-on {fail_on.name}")
    return out


# --- rendering ------------------------------------------------------------------------------

_STYLE = {Status.OK: "green", Status.WARN: "yellow", Status.STOP: "red", Status.STALL: "red",
          Status.REWIND: "magenta"}


def _fmt_age(v: float | None) -> str:
    if v is None:
        return "never"
    if v >= 86400 * 2:
        return f"{v / 86400:.0f} d"
    return f"{v:.1f} s"


def render(report: LagReport, problems: Sequence[str] = (), *, window_s: float | None = None):
    """A rich renderable of the report (and of the threshold ``problems``)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    health = report.health or {}
    part_status = {(g, p.topic, p.partition): p for g, h in health.items() for p in h.partitions}
    table = Table(title="consumer lag", title_justify="left")
    cols = ["group", "topic", "partition", "committed", "log end", "lag"]
    if health:
        cols.append("health")
    for col in cols:
        table.add_column(col, justify="left" if col in ("group", "topic", "health") else "right")
    for p in report.partitions:
        row = [p.group, p.topic, str(p.partition),
               "-" if p.committed is None else str(p.committed), str(p.log_end), str(p.lag)]
        if health:
            ph = part_status.get((p.group, p.topic, p.partition))
            row.append("" if ph is None else f"[{_STYLE[ph.status]}]{ph.status.name}[/]")
        table.add_row(*row)

    groups = Table(title="groups", title_justify="left")
    for col in ("group", "state", "members", "total lag", "health"):
        groups.add_column(col, justify="right" if col in ("members", "total lag") else "left")
    for g in dict.fromkeys(p.group for p in report.partitions):
        state = report.groups.get(g)
        h = health.get(g)
        if h is not None:
            verdict = f"[{_STYLE[h.status]}]{h.status.name}[/] {h.reason or ''}"
        elif window_s:
            verdict = f"collecting ({report.window_s:.0f}/{window_s:.0f} s)"
        else:
            verdict = "- (needs --window or --watch)"
        groups.add_row(g, "-" if state is None else state.state,
                       "-" if state is None else str(state.members), str(report.total(g)), verdict)

    fresh = Table(title="freshness", title_justify="left")
    fresh.add_column("what")
    fresh.add_column("value", justify="right")
    for k, v in report.ages().items():
        fresh.add_row(k, _fmt_age(v))
    version = report.status.get("model_version")
    fresh.add_row("model_version (Redis)", "-" if version is None else f"v{version}")
    items_at = report.status.get("item_version")
    fresh.add_row("item_version (Redis)", "-" if items_at is None else f"v{items_at}")
    samples = report.live_samples()
    for cohort, rate in report.live_hit_rate().items():
        n = samples.get(cohort)
        over = "" if n is None else f" (n {n:,})"
        fresh.add_row(f"live HR@10 {cohort}", "-" if rate is None else f"{rate:.3f}{over}")
    for worker, served in sorted(report.workers.items()):
        behind = "" if version is None or served >= int(version) else \
            f" ({int(version) - served} behind)"
        items = report.worker_items.get(worker)
        shown = f"v{served}" if items is None or items == served else f"v{served} (items v{items})"
        fresh.add_row(f"worker {worker}", f"{shown}{behind}{_group_note(report, worker)}")
    if not report.workers:
        fresh.add_row("workers", "none reporting")
    parts: list = [table, groups, fresh]
    if report.health is not None and report.commit_log is False:
        parts.append(Text("commits derived from readings (__consumer_offsets unreadable): "
                          "STALL shows as STOP", style="yellow"))
    for line in [*report.problems, *problems]:
        parts.append(Text(line, style="bold red"))
    return Group(*parts)


# --- the plot -------------------------------------------------------------------------------


def plot_history(history: Sequence[HistoryPoint], path: Path, *,
                 health: dict[str, GroupHealth] | None = None) -> Path:
    """Draw lag (per group) and freshness/publish ages over the sampled window to a PNG.

    Needs matplotlib (``pip install 'fmstream[plot]'``).
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'fmstream[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        raise NoSamplesError("no samples to plot: the lag window took none; give a longer "
                             "--window or a shorter --interval")
    end = history[-1].ts
    xs = [p.ts - end for p in history]
    fig, (ax_lag, ax_age) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for group in history[-1].lag:
        label = group
        if health and group in health:
            label += f"  [{health[group].status.name}]"
        ax_lag.step(xs, [p.lag.get(group, 0) for p in history], where="post", label=label,
                    linewidth=2)
    ax_lag.set_ylabel("consumer lag (messages)")
    ax_lag.set_title(time.strftime("fmstream lag — window ending %Y-%m-%d %H:%M:%S",
                                   time.localtime(end)))
    ax_lag.grid(alpha=0.3)
    ax_lag.legend(loc="best", framealpha=0.8)
    drawn = False
    for name in AGE_KEYS:
        ys = [p.ages.get(name) for p in history]
        if all(y is None for y in ys):
            continue
        ax_age.plot(xs, [math.nan if y is None else max(y, 1e-3) for y in ys],
                    label=name.removesuffix("_s").replace("_", " "), linewidth=2)
        drawn = True
    ax_age.set_ylabel("age (s)")
    ax_age.set_xlabel("seconds before the last sample")
    ax_age.grid(alpha=0.3, which="both")
    if drawn:
        ax_age.set_yscale("log")
        ax_age.legend(loc="best", fontsize="small", framealpha=0.8)
    else:
        ax_age.text(0.5, 0.5, "nothing published yet", ha="center", transform=ax_age.transAxes)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- the command ----------------------------------------------------------------------------


def lag_command(settings: Settings, args: argparse.Namespace) -> int:
    """``fmstream lag``: print once, sample a window, or watch; exit 2 past a threshold.

    Exit status: 0 fine, 1 Kafka unreadable, 2 a threshold (``--max-lag``, ``--max-age``,
    ``--fail-on``) is exceeded.
    """
    import orjson
    from rich.console import Console

    console = Console()
    err = Console(stderr=True)
    window = float(getattr(args, "window", 0) or 0)
    plot = getattr(args, "plot", None)
    fail_on = getattr(args, "fail_on", None)
    fail_on = Status[fail_on] if isinstance(fail_on, str) else fail_on
    if plot and not window:
        window = DEFAULT_WATCH_WINDOW_S
        if not args.watch:
            err.print(f"--plot without --window: sampling {window:.0f} s")
    if args.watch and not window:
        window = DEFAULT_WATCH_WINDOW_S

    def check(report: LagReport) -> list[str]:
        return exceeded(report, groups=list(group_topics(settings)), max_lag=args.max_lag,
                        max_age=args.max_age, fail_on=fail_on)

    def emit(report: LagReport, problems: list[str]) -> None:
        if args.json:
            print(orjson.dumps(report.to_json() | {"exceeded": problems}).decode(), flush=True)
        else:
            console.print(render(report, problems, window_s=window))

    try:
        if not window:
            report = read_lag(settings)
            problems = check(report)
            emit(report, problems)
            return 2 if problems else 0
        with LagSampler(settings, window) as sampler:
            if args.watch:
                report = _watch(sampler, args, console, check, emit, window)
            else:
                report = _sample_window(sampler, window, args.interval, err, quiet=args.json)
                emit(report, check(report))
            if plot:
                out = plot_history(list(sampler.history), Path(plot), health=report.health)
                err.print(f"plot written to {out}")
            return 2 if check(report) else 0
    except KafkaError as exc:
        explained = explain_kafka_error(settings.kafka_config(), exc)
        if explained is not None:
            raise explained from None  # the CLI prints it and exits non-zero
        print(f"cannot read consumer lag from Kafka at {settings.kafka_bootstrap}: "
              f"{settings.redact(repr(exc))}", file=sys.stderr)
        return 1


def _sample_window(sampler: LagSampler, window: float, interval: float, err, *,
                   quiet: bool) -> LagReport:
    """Sample for ``window`` seconds (at least 10 readings) and return the last report."""
    step = max(0.1, min(interval, window / 10))
    report = sampler.sample()
    start = time.monotonic()  # the window opens at the baseline reading

    def loop() -> LagReport:
        nonlocal report
        while (left := window - (time.monotonic() - start)) > 0:
            time.sleep(min(step, left))
            report = sampler.sample()
        return report

    if quiet:
        return loop()
    with err.status(f"sampling {window:.0f} s for health and plots"):
        return loop()


def _watch(sampler: LagSampler, args: argparse.Namespace, console, check, emit,
           window: float) -> LagReport:
    """Refresh every ``--interval`` until Ctrl-C; health appears once the window is full."""
    from rich.live import Live

    report = sampler.sample()

    def shown(r: LagReport) -> LagReport:
        if r.window_s + args.interval / 2 < window:
            r.health = None  # a partial window judges too early (STOP before the first commit)
        return r

    try:
        if args.json:
            while True:
                emit(shown(report), check(report))
                time.sleep(args.interval)
                report = sampler.sample()
        with Live(render(shown(report), check(report), window_s=window), console=console,
                  refresh_per_second=4) as live:
            while True:
                time.sleep(args.interval)
                report = shown(sampler.sample())
                live.update(render(report, check(report), window_s=window))
    except KeyboardInterrupt:
        return report


__all__ = [
    "AGE_KEYS", "HistoryPoint", "LagReport", "LagSampler", "exceeded", "group_topics",
    "lag_command", "plot_history", "read_lag", "render",
]
