"""``fmstream demo``: the whole loop on local services, start to finish, with visible progress.

services up → trainer and worker processes → replay (MovieLens if FMSTREAM_MOVIELENS, else a
planted-cluster stream) → wait until the trainer caught up and the worker serves the newest
version → u2i / i2i / i2i_history / rank through the request topic → lag → stop what it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fmstream import services
from fmstream.settings import Settings
from stream.schemas import Response

console = Console()
CONFIG = Path(__file__).resolve().parent.parent / "config"


def _spawn(settings: Settings, command: str, env: dict[str, str]) -> subprocess.Popen:
    logs = settings.run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = open(logs / f"demo-{command}.log", "ab")  # noqa: SIM115 - lives as long as the child
    return subprocess.Popen([sys.executable, "-m", "fmstream.cli", "-v", command],
                            stdout=out, stderr=subprocess.STDOUT, env=env)


def _wait_caught_up(settings: Settings, produced: int, timeout: float = 300.0) -> None:
    from fmstream.monitor import read_lag

    deadline = time.monotonic() + timeout
    shown = None
    with console.status("waiting for the trainer to catch up and the worker to swap") as status:
        while time.monotonic() < deadline:
            report = read_lag(settings)
            lag = sum(p.lag for p in report.partitions
                      if p.group == settings.trainer_group and p.topic == settings.topic_events)
            version = report.status.get("model_version")
            served = set(report.workers.values())
            applied = int(float(report.status.get("events_applied", 0) or 0))
            line = (f"trainer lag {lag}, applied {applied}/{produced}, "
                    f"model v{version}, workers serve {sorted(served) or '-'}")
            status.update(line)
            if not console.is_terminal:
                console.print(line)
            elif version != shown:  # every new version stays on screen, not only in the spinner
                console.print(escape(line))
            shown = version
            if lag == 0 and applied >= produced and version and served \
                    and min(served) >= int(version):
                console.print(escape(f"caught up: {applied} events applied, model v{version} "
                                     f"published, workers serve {sorted(served)}"))
                return
            time.sleep(1.0 if console.is_terminal else 3.0)
    raise TimeoutError("the trainer/worker did not catch up in time; see .fmstream/logs")


def show_answer(title: str, resp: Response, names: dict[str, str],
                out: Console | None = None) -> None:
    """Print one answer: a heading naming the model version that answered, then its items.

    Args:
        title: what was asked (printed verbatim, never read as rich markup).
        resp: the worker's response.
        names: display names by item id (an id without one is printed as is).
        out: where to print (default: the demo's console).
    """
    out = console if out is None else out
    # escaped: "[model v3]" is rich markup syntax and would vanish; a heading line, not a table
    # title, so that it is not wrapped to the table's width
    out.print(escape(f"{title}  [model v{resp.model_version}"
                     + (f", fallback={resp.fallback}" if resp.fallback else "") + "]"),
              style="bold")
    if resp.error:
        out.print(f"[red]{escape(title)}: {resp.error.code}: {escape(resp.error.message)}")
        return
    table = Table()
    table.add_column("#", justify="right")
    table.add_column("item")
    table.add_column("score", justify="right")
    for n, item in enumerate(resp.items, 1):
        table.add_row(str(n), names.get(item.item_id, item.item_id), f"{item.score:.3f}")
    out.print(table)


def _settled_lag(settings: Settings, timeout: float = 5.0):
    """The lag report once the serving group's commit covers every request asked (an idle
    worker commits what it answered at its next empty poll), or as it is after ``timeout``:
    read at once, the last answers could still show as lag."""
    from fmstream.monitor import read_lag

    deadline = time.monotonic() + timeout
    while True:
        report = read_lag(settings)
        serving = [p for p in report.partitions if p.group == settings.serving_group]
        if not any(p.lag for p in serving) or time.monotonic() >= deadline:
            return report
        time.sleep(0.1)


def run_demo(settings: Settings, *, events: int | None = None) -> int:
    """Run the demo; returns the exit status."""
    from serving.client import FmClient
    from stream.consume import make_producer
    from stream.replay import produce_events, produce_profiles

    console.rule("fmstream demo")
    started = services.up(settings)
    console.print(f"services: {started}")
    env = dict(os.environ)
    if settings.movielens:
        from stream.movielens import load_movielens

        data = load_movielens(settings.movielens)
        stream = data.events()
        total = len(data.ratings)
        names = data.titles
        schema = CONFIG / "movielens.toml"
        users, item = ["196", "186", "22"], "50"
    else:
        from stream.synthetic import SyntheticStream

        data = SyntheticStream(users=1000, items=500, clusters=10, seed=settings.seed)
        total = events or 30_000
        stream = data.events(total)
        names = {f"i{m}": f"i{m} (cluster {m % 10})" for m in range(500)}
        schema = CONFIG / "synthetic.toml"
        users, item = ["u0", "u1", "u7"], "i0"
    if settings.schema_path is None:
        env["FMSTREAM_SCHEMA_PATH"] = str(schema)
    procs = {name: _spawn(settings, name, env) for name in ("train", "serve")}
    try:
        producer = make_producer(settings.kafka_config())
        n_users, n_items = produce_profiles(producer, settings.topics(), data.user_profiles(),
                                            data.item_profiles())
        console.print(f"profiles sent: {n_users} users, {n_items} items")
        from rich.progress import Progress

        with Progress(console=console) as bar:
            task = bar.add_task("replaying events", total=total)
            produced = produce_events(producer, settings.topics(), stream,
                                      progress=lambda k: bar.advance(task, k))
        producer.close()
        _wait_caught_up(settings, produced)
        with FmClient(settings) as client:
            for u in users:
                label = "" if settings.movielens else f" (planted cluster {data.user_cluster(u)})"
                resp = client.request({"type": "u2i", "user_id": u, "k": 10,
                                       "exclude_seen": True}, timeout=10)
                show_answer(f"u2i for user {u}{label}", resp, names)
            resp = client.request({"type": "i2i", "item_id": item, "k": 10}, timeout=10)
            show_answer(f"i2i for {names.get(item, item)}", resp, names)
            resp = client.request({"type": "i2i_history", "user_id": users[0], "k": 5},
                                  timeout=10)
            show_answer(f"i2i_history for user {users[0]}", resp, names)
            cands = [i.item_id for i in resp.items][:3] + [item]
            resp = client.request({"type": "rank", "user_id": users[0], "item_ids": cands,
                                   "context": {"hour": "20"}}, timeout=10)
            show_answer(f"rank for user {users[0]} (context hour=20)", resp, names)
        from fmstream.monitor import render

        console.print(render(_settled_lag(settings)))
        return 0
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        # stop only what this demo started; services someone else started keep running
        if started.get("kafka") == "started":
            services.stop_kafka(settings)
        if started.get("redis") == "started":
            services.stop_redis(settings)
        console.rule("demo done")
