"""``fmstream lag``: is the model up to date? Consumer lag, freshness, publish ages, versions."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field

from fmstream.settings import Settings
from stream.lag import PartitionLag, group_lag


@dataclass
class LagReport:
    """One reading of everything ``fmstream lag`` shows."""

    at: float
    partitions: list[PartitionLag]
    status: dict = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)

    def total(self, group: str) -> int:
        return sum(p.lag for p in self.partitions if p.group == group)

    def ages(self) -> dict[str, float | None]:
        """Seconds since each published/applied thing (None: never)."""
        def age(key: str) -> float | None:
            v = self.status.get(key)
            return None if not v else round(self.at - float(v), 3)

        return {
            "event_time_freshness_s": age("trainer_event_time"),
            "checkpoint_age_s": age("checkpoint_at"),
            "users_publish_age_s": age("users_published_at"),
            "items_publish_age_s": age("items_published_at"),
            "i2i_publish_age_s": age("i2i_published_at"),
        }

    def to_json(self) -> dict:
        return {
            "at": self.at,
            "partitions": [asdict(p) | {"lag": p.lag} for p in self.partitions],
            "total_lag": {g: self.total(g) for g in {p.group for p in self.partitions}},
            "ages": self.ages(),
            "model_version": self.status.get("model_version"),
            "worker_versions": self.workers,
        }


def read_lag(settings: Settings) -> LagReport:
    """Read consumer lag of the trainer and serving groups and the published status."""
    from fmstream.app import redis_client
    from serving.store import VectorStore

    parts = group_lag(settings, settings.trainer_group,
                      [settings.topic_events, settings.topic_users, settings.topic_items])
    parts += group_lag(settings, settings.serving_group, [settings.topic_requests])
    store = VectorStore(redis_client(settings), settings)
    return LagReport(time.time(), parts, store.get_status(), store.worker_versions())


def render(report: LagReport):
    """A rich renderable of the report."""
    from rich.console import Group
    from rich.table import Table

    table = Table(title="consumer lag")
    for col in ("group", "topic", "partition", "committed", "log end", "lag"):
        table.add_column(col, justify="right" if col in ("partition", "committed", "log end", "lag")
                         else "left")
    for p in report.partitions:
        table.add_row(p.group, p.topic, str(p.partition),
                      "-" if p.committed is None else str(p.committed), str(p.log_end), str(p.lag))
    status = Table(title="freshness")
    status.add_column("what")
    status.add_column("value", justify="right")
    for k, v in report.ages().items():
        status.add_row(k, "never" if v is None else f"{v:.1f}")
    status.add_row("model_version (Redis)", str(report.status.get("model_version", "-")))
    for worker, version in sorted(report.workers.items()):
        status.add_row(f"worker {worker}", f"v{version}")
    return Group(table, status)


def lag_command(settings: Settings, args: argparse.Namespace) -> int:
    """Print (or watch) the lag report; exit 2 when a threshold is exceeded."""
    import orjson
    from rich.console import Console
    from rich.live import Live

    def exceeded(report: LagReport) -> bool:
        lag_bad = args.max_lag is not None and any(
            report.total(g) > args.max_lag for g in (settings.trainer_group,))
        ages = [v for v in report.ages().values() if v is not None]
        age_bad = args.max_age is not None and any(v > args.max_age for v in ages)
        return lag_bad or age_bad

    if args.watch and not args.json:
        with Live(render(read_lag(settings)), refresh_per_second=4) as live:
            try:
                while True:
                    time.sleep(args.interval)
                    live.update(render(read_lag(settings)))
            except KeyboardInterrupt:
                return 0
    report = read_lag(settings)
    if args.json:
        print(orjson.dumps(report.to_json()).decode())
    else:
        Console().print(render(report))
    return 2 if exceeded(report) else 0
