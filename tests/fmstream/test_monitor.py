"""``fmstream lag`` and the Prometheus metrics, against the session's Kafka and Redis.

The lag numbers are checked against Kafka's own ``kafka-consumer-groups --describe`` (run from
the same jars as the broker), read over HTTP from a trainer and a worker running in threads.
"""

from __future__ import annotations

import io
import json
import math
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
import redis
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata
from prometheus_client.parser import text_string_to_metric_families

import stream.metrics
from fmstream import cli
from fmstream.errors import NoSamplesError
from fmstream.health import GroupHealth, PartitionHealth, Status
from fmstream.monitor import LagReport, dead_letter_warnings, exceeded, plot_history, render
from fmstream.settings import Settings
from serving.store import VectorStore
from stream.config import KafkaConfig
from stream.connect import kafka_consumer
from stream.consume import make_producer
from stream.lag import PartitionLag
from stream.replay import produce_events
from stream.synthetic import SyntheticStream
from tests.kafka_helpers import KafkaIO, wait_for
from tests.worker_helpers import trainer_and_worker
from train.store_writer import StoreWriter

ROOT = Path(__file__).resolve().parents[2]
STREAM = SyntheticStream(users=100, items=50, clusters=4, seed=5)


# --- pure -------------------------------------------------------------------------------------


def _report(**kw) -> LagReport:
    parts = [PartitionLag("tr", "ev", 0, 10, 40), PartitionLag("tr", "ev", 1, None, 5),
             PartitionLag("sv", "rq", 0, 7, 7)]
    now = 1_700_000_000.0
    status = {"model_version": 9, "trainer_event_time": now - 12.0, "checkpoint_at": now - 2.0,
              "items_published_at": now - 1.0, "live_hit_rate_warm": "0.125",
              "live_samples_warm": "1999"}
    status["item_version"] = 8
    kw.setdefault("worker_items", {"w1": 8, "w2": 8})
    return LagReport(now, parts, status, {"w1": 9, "w2": 8}, **kw)


def test_totals_ages_and_thresholds() -> None:
    report = _report()
    assert report.total("tr") == 35 and report.total("sv") == 0
    ages = report.ages()
    assert ages["event_time_freshness_s"] == 12.0 and ages["users_publish_age_s"] is None
    assert exceeded(report, groups=["tr", "sv"]) == []
    assert exceeded(report, groups=["tr", "sv"], max_lag=35) == []
    assert exceeded(report, groups=["tr", "sv"], max_lag=34) == [
        "group tr: lag 35 > --max-lag 34"]
    assert exceeded(report, groups=["tr", "sv"], max_age=10) == [
        "event_time_freshness_s 12.0 s > --max-age 10"]
    stall = PartitionHealth("ev", 0, Status.STALL, "stuck", 30, 3, 10, 10)
    report.health = {"tr": GroupHealth("tr", Status.STALL, [stall]),
                     "sv": GroupHealth("sv", Status.OK, [])}
    assert exceeded(report, groups=["tr"], fail_on=Status.REWIND) == []
    assert exceeded(report, groups=["tr"], fail_on=Status.STOP) == [
        "group tr: STALL (ev[0]: stuck) >= --fail-on STOP"]


def test_render_shows_lag_health_and_versions() -> None:
    from rich.console import Console

    report = _report()
    report.health = {"tr": GroupHealth("tr", Status.WARN, [
        PartitionHealth("ev", 0, Status.WARN, "lag did not fall", 30, 2, 5, 10)])}
    out = io.StringIO()
    Console(file=out, width=160).print(render(report, ["over a threshold"]))
    text = out.getvalue()
    for expected in ("consumer lag", "WARN ev[0]: lag did not fall", "v9 (items v8)",
                     "v8 (1 behind)", "item_version (Redis)",
                     "over a threshold", "never", "live HR@10 warm", "0.125 (n 1,999)"):
        assert expected in text, expected
    data = report.to_json()
    assert data["partitions"][1]["committed"] is None and data["partitions"][1]["lag"] == 5
    assert data["health"]["groups"]["tr"]["status"] == "WARN"
    assert data["live_hit_rate"] == {"warm": 0.125, "cold": None}
    assert data["live_samples"] == {"warm": 1999, "cold": None}
    assert data["item_version"] == 8 and data["worker_item_versions"] == {"w1": 8, "w2": 8}


def test_render_shows_a_worker_out_of_its_group_and_its_renewals() -> None:
    from rich.console import Console

    groups = {"w1": {"member": False, "out_s": 35.2, "renewals": 1},
              "w2": {"member": True, "out_s": 0.0, "renewals": 0}}
    report = _report(worker_groups=groups)
    out = io.StringIO()
    Console(file=out, width=200).print(render(report, []))
    lines = {line.split("│")[1].strip(): line for line in out.getvalue().splitlines()
             if line.count("│") >= 3 and "worker w" in line}
    assert "not a group member for 35 s, 1 consumer renewal" in lines["worker w1"]
    assert "group member" not in lines["worker w2"] and "renewal" not in lines["worker w2"]
    assert report.to_json()["worker_groups"] == groups


def _exported_names() -> set[str]:
    """Every sample name a trainer and a worker export (from stand-ins, no Kafka)."""
    from prometheus_client import generate_latest

    from serving.metrics import WorkerMetrics
    from stream.metrics import GroupLagCollector, new_registry
    from train.loop import TrainerStats
    from train.metrics import TrainerMetrics
    from train.publisher import PublishStats, PublishTimes

    def trainer() -> TrainerStats:
        return TrainerStats(events_applied=0, dead_letters=0, newest_event_ts=None,
                            checkpoint_age_s=0.0)

    def publisher() -> PublishStats:
        return PublishStats(version=0, times=PublishTimes())
    names = set()
    for registry, metrics in ((new_registry(), "trainer"), (new_registry(), "worker")):
        if metrics == "trainer":
            TrainerMetrics(registry).bind(trainer, publisher).records.labels("t").inc()
        else:
            group = {"member": False, "out_s": 12.5, "renewals": 2}
            worker = SimpleNamespace(state=None, swaps=0, group_report=group.copy)
            wm = WorkerMetrics(registry).bind(worker)
            wm.errors.labels("unknown_user").inc()
        lag = GroupLagCollector(KafkaConfig("127.0.0.1:1"), "g", ["t"])
        lag.partitions = [PartitionLag("g", "t", 0, 3, 5)]
        registry.register(lag)
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            names.update(sample.name for sample in family.samples)
    return names


def test_dashboard_and_scrape_config_name_what_is_exported() -> None:
    import re

    names = _exported_names()
    dashboard = json.loads((ROOT / "infra" / "grafana" / "dashboards" / "fmstream.json")
                           .read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    used = {n for e in exprs for n in re.findall(r"\b(?:fmstream|kafka)_[a-z_]+", e)}
    assert used and used <= names, sorted(used - names)
    for needed in ("kafka_consumergroup_lag", "kafka_consumergroup_lag_sum",
                   "fmstream_model_version", "fmstream_request_seconds_bucket",
                   "fmstream_trainer_batch_seconds_bucket", "fmstream_request_errors_total",
                   "fmstream_dead_letters_total", "fmstream_event_time_lag_seconds",
                   "fmstream_live_hit_rate", "fmstream_worker_group_member",
                   "fmstream_worker_out_of_group_seconds",
                   "fmstream_worker_consumer_renewals_total"):
        assert needed in names, needed
    # the live quality has its panel, by cohort (issue 11: operators watch quality)
    live = [p for p in dashboard["panels"]
            if any("fmstream_live_hit_rate" in t["expr"] for t in p.get("targets", ()))]
    assert len(live) == 1 and "cohort" in live[0]["targets"][0]["expr"]
    # the worker watchdog's view has its panel (a worker out of its group is visible)
    group = [p for p in dashboard["panels"]
             if any("fmstream_worker_out_of_group_seconds" in t["expr"]
                    for t in p.get("targets", ()))]
    assert len(group) == 1 and any("fmstream_worker_consumer_renewals_total" in t["expr"]
                                   for t in group[0]["targets"])
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", ())}
    datasource = (ROOT / "infra" / "grafana" / "provisioning" / "datasources"
                  / "prometheus.yml").read_text()
    assert uids == {"fmstream-prometheus"} and "uid: fmstream-prometheus" in datasource
    scrape = (ROOT / "infra" / "prometheus" / "prometheus.yml").read_text()
    compose = (ROOT / "docker-compose.yml").read_text()
    for port, var in (("9100", "FMSTREAM_TRAINER_METRICS_PORT"),
                      ("9101", "FMSTREAM_WORKER_METRICS_PORT")):
        assert f'{var}: "{port}"' in compose and port in scrape
    # Prometheus scrapes from its own container: both bind every interface there (the
    # default, 127.0.0.1, would refuse it)
    assert compose.count('FMSTREAM_METRICS_HOST: "0.0.0.0"') == 2


# --- the command ------------------------------------------------------------------------------


def _use(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """Point ``fmstream`` (which reads FMSTREAM_* variables) at this test's settings."""
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is not None:
            monkeypatch.setenv(f"FMSTREAM_{name.upper()}", str(value))


def _lag(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["lag", *args])
    return code, capsys.readouterr().out


@pytest.fixture
def state(settings: Settings, kafka_io: KafkaIO, redis_client: redis.Redis,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """A trainer group 10 behind on one partition, a caught-up serving group, a status hash."""
    kafka_io.produce(settings.topic_events, [b"e"] * 30, partition=0)
    kafka_io.produce(settings.topic_requests, [b"r"] * 10, partition=1)
    for group, tp, offset in ((settings.trainer_group, (settings.topic_events, 0), 20),
                              (settings.serving_group, (settings.topic_requests, 1), 10)):
        consumer = kafka_consumer(settings.kafka_config(), group_id=group,
                                  enable_auto_commit=False)
        consumer.assign([TopicPartition(*tp)])
        consumer.commit({TopicPartition(*tp): OffsetAndMetadata(offset, "", -1)})
        consumer.close(autocommit=False)
    store = VectorStore(redis_client, settings.redis_keys())
    now = time.time()
    StoreWriter(redis_client, settings.redis_keys()).put_status(
        model_version=7, trainer_event_time=now - 12, checkpoint_at=now - 3,
        users_published_at=now - 1, items_published_at=now - 2, i2i_published_at=now - 40)
    store.set_worker_version("w1", 7, ttl_s=3600)  # a loaded box may take long to get there
    store.set_worker_version("w2", 6, ttl_s=3600, item_version=5)
    _use(monkeypatch, settings)
    yield settings


def test_lag_json_has_lag_ages_versions_and_exit_codes(
    state: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    redis_client: redis.Redis,
) -> None:
    written = VectorStore(redis_client, state.redis_keys()).get_status()
    before = time.time()
    code, out = _lag(capsys, "--json")
    after = time.time()
    assert code == 0
    data = json.loads(out)
    assert data["total_lag"] == {state.trainer_group: 10, state.serving_group: 0}
    rows = {(p["group"], p["topic"], p["partition"]): p for p in data["partitions"]}
    first = rows[(state.trainer_group, state.topic_events, 0)]
    assert (first["committed"], first["log_end"], first["lag"]) == (20, 30, 10)
    assert rows[(state.trainer_group, state.topic_events, 1)]["committed"] is None
    assert len([r for r in rows if r[0] == state.trainer_group]) == (
        state.partitions_events + 2 * state.partitions_profiles)
    assert data["model_version"] == 7
    assert data["worker_versions"] == {"w1": 7, "w2": 6}
    assert data["worker_item_versions"] == {"w1": 7, "w2": 5}
    ages = data["ages"]
    # ages are read between `before` and `after`, whatever the load: bounds from those clocks
    for age, stamp in (("event_time_freshness_s", "trainer_event_time"),
                       ("i2i_publish_age_s", "i2i_published_at")):
        t = float(written[stamp])
        assert before - t - 0.01 <= ages[age] <= after - t + 0.01, (age, ages[age])
    assert data["health"] is None and data["exceeded"] == []
    assert data["groups"][state.trainer_group] == {"state": "Empty", "members": 0,
                                                   "total_lag": 10}

    code, out = _lag(capsys, "--json", "--max-lag", "5")
    assert code == 2
    assert json.loads(out)["exceeded"] == [f"group {state.trainer_group}: lag 10 > --max-lag 5"]
    code, out = _lag(capsys, "--json", "--max-age", "30")
    assert code == 2 and "i2i_publish_age_s" in json.loads(out)["exceeded"][0]
    assert _lag(capsys, "--json", "--max-lag", "10", "--max-age", "3600")[0] == 0

    monkeypatch.setenv("COLUMNS", "220")  # rich shortens long group names to fit 80 columns
    code, out = _lag(capsys)
    assert code == 0
    for expected in (state.trainer_group, "v7", "v6 (items v5) (1 behind)",
                     "event_time_freshness_s"):
        assert expected in out, expected


def test_lag_window_judges_health_and_plots(
    state: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    png = tmp_path / "lag.png"
    code, out = _lag(capsys, "--json", "--window", "2", "--fail-on", "STOP", "--plot", str(png))
    data = json.loads(out)
    health = data["health"]
    assert health["commit_log"] is True and health["window_s"] >= 1.5
    trainer = health["groups"][state.trainer_group]
    # 10 behind and no commit in the window: stopped; the serving group is caught up.
    assert trainer["status"] == "STOP" and trainer["reason"].startswith(f"{state.topic_events}[0]")
    assert health["groups"][state.serving_group]["status"] == "OK"
    assert code == 2 and "--fail-on STOP" in data["exceeded"][0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_watch_json_prints_a_line_per_refresh(
    state: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fmstream.monitor as monitor

    calls: list[float] = []

    def sleep(seconds: float) -> None:  # Ctrl-C on the third refresh
        calls.append(seconds)
        if len(calls) == 3:
            raise KeyboardInterrupt

    clock = SimpleNamespace(time=time.time, monotonic=time.monotonic, sleep=sleep)
    monkeypatch.setattr(monitor, "time", clock)
    code, out = _lag(capsys, "--watch", "--json", "--interval", "0.5")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) == 3 and calls == [0.5, 0.5, 0.5]
    assert all(line["total_lag"][state.trainer_group] == 10 for line in lines)
    assert all(line["health"] is None for line in lines)  # the 60 s window is not full yet


# --- Prometheus metrics vs Kafka's own tool ---------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _lags(metrics: dict, group: str) -> dict[tuple[str, int], float]:
    out = {}
    for (name, labels), v in metrics.items():
        lab = dict(labels)
        if name == "kafka_consumergroup_lag" and lab["consumergroup"] == group:
            out[(lab["topic"], int(lab["partition"]))] = v
    return out


def _value(metrics: dict, name: str, **labels: str) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]



def _kafka_describe(settings: Settings, *groups: str) -> dict[tuple[str, str, int], dict]:
    """``kafka-consumer-groups --describe`` from the broker's own jars, parsed."""
    args = ["java", "-cp", str(Path(settings.kafka_libs) / "*"),
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            "--bootstrap-server", settings.kafka_bootstrap, "--describe"]
    for g in groups:
        args += ["--group", g]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=60).stdout
    rows = {}
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 6 and cols[0] in groups:
            rows[(cols[0], cols[1], int(cols[2]))] = {
                "current": cols[3], "log_end": int(cols[4]), "lag": cols[5]}
    return rows


@pytest.fixture
def stack(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """A trainer (checkpointing every 1000 records only) and a worker, both serving /metrics."""
    monkeypatch.setattr(stream.metrics, "LAG_REFRESH_S", 0.3)
    settings = settings.model_copy(update={
        "trainer_metrics_port": _free_port(), "worker_metrics_port": _free_port(), "dim": 8,
        "checkpoint_every_events": 1000, "checkpoint_every_s": 3600.0,
        "publish_items_s": 0.2, "publish_active_s": 0.2,
    })
    with trainer_and_worker(settings):
        yield settings


def test_metrics_lag_equals_kafka_consumer_groups_tool(stack: Settings, kafka_io: KafkaIO) -> None:
    s = stack
    tport, wport = s.trainer_metrics_port, s.worker_metrics_port
    producer = make_producer(s.kafka_config())
    events = list(STREAM.events(1300))
    produce_events(producer, s.topics(), events[:1000])
    producer.flush()

    # 1000 records: the trainer checkpoints and commits them all -> a caught-up group reports 0.
    def caught_up():
        m = _scrape(tport)
        lags = _lags(m, s.trainer_group)
        done = _value(m, "fmstream_trainer_events_applied_total") == 1000
        return m if done and all(lags[(s.topic_events, p)] == 0
                                 for p in range(s.partitions_events)) else None

    m = wait_for(caught_up, 60, "the trainer to apply and commit 1000 events")
    # test-then-train quality of sampled positives (every 16th of 1000 -> some samples): the
    # first poll's users are all cold; warm ones exist only if Kafka split the 1000 into several
    # polls (NaN = no sample yet), so warm is checked after the next 300 events below
    assert 0.0 <= _value(m, "fmstream_live_hit_rate", k="10", cohort="cold") <= 1.0
    warm = _value(m, "fmstream_live_hit_rate", k="10", cohort="warm")
    assert math.isnan(warm) or 0.0 <= warm <= 1.0
    assert _value(m, "kafka_consumergroup_lag_sum", consumergroup=s.trainer_group,
                  topic=s.topic_events) == 0
    assert sum(_value(m, "kafka_consumergroup_current_offset", consumergroup=s.trainer_group,
                      topic=s.topic_events, partition=str(p))
               for p in range(s.partitions_events)) == 1000
    # Profile topics are empty and never committed: -1, as kafka_exporter reports them.
    assert _lags(m, s.trainer_group)[(s.topic_users, 0)] == -1

    # One request per partition: the worker answers and commits -> its group is caught up.
    for p in range(s.partitions_requests):
        kafka_io.produce(s.topic_requests, [orjson.dumps(
            {"request_id": f"r{p}", "type": "u2i", "user_id": "u1", "k": 3})], partition=p)
    # 300 more events: applied, but not checkpointed (< 1000), so not committed -> lag 300.
    produce_events(producer, s.topics(), events[1000:])
    producer.close()

    def quiescent():
        mt, mw = _scrape(tport), _scrape(wport)
        lag = _value(mt, "kafka_consumergroup_lag_sum", consumergroup=s.trainer_group,
                     topic=s.topic_events)
        wl = _lags(mw, s.serving_group)
        ok = (_value(mt, "fmstream_trainer_events_applied_total") == 1300 and lag == 300
              and _value(mw, "fmstream_requests_total") == s.partitions_requests
              and wl and all(v == 0 for v in wl.values()))
        return (mt, mw) if ok else None

    wait_for(quiescent, 60, "trainer lag 300 and a caught-up worker")
    tool = _kafka_describe(s, s.trainer_group, s.serving_group)
    mt, mw = _scrape(tport), _scrape(wport)  # quiescent: nothing moved since the tool ran

    for group, metrics in ((s.trainer_group, mt), (s.serving_group, mw)):
        mine = _lags(metrics, group)
        theirs = {(t, p): row for (g, t, p), row in tool.items() if g == group}
        assert theirs, f"the tool reported nothing for {group}: {tool}"
        for (topic, part), row in theirs.items():
            labels = {"consumergroup": group, "topic": topic, "partition": str(part)}
            expected = -1 if row["lag"] == "-" else int(row["lag"])
            assert mine[(topic, part)] == expected, (group, topic, part, row)
            if row["current"] != "-":
                assert _value(metrics, "kafka_consumergroup_current_offset", **labels) == int(
                    row["current"])
            assert _value(metrics, "kafka_topic_partition_current_offset", topic=topic,
                          partition=str(part)) == row["log_end"]
        # Every partition with a committed offset is one the tool lists too.
        assert {k for k, v in mine.items() if v >= 0} <= set(theirs)
    assert sum(int(r["lag"]) for (g, t, _), r in tool.items()
               if g == s.trainer_group and t == s.topic_events) == 300
    assert all(r["lag"] == "0" for (g, _, _), r in tool.items() if g == s.serving_group)

    # The rest of the trainer's and the worker's metrics.
    # the 300 events came after the first 1000 were applied: their users are warm
    assert 0.0 <= _value(mt, "fmstream_live_hit_rate", k="10", cohort="warm") <= 1.0
    # the rate says how many samples it is over (every 16th positive of 1300: at most 82)
    assert 1 <= _value(mt, "fmstream_live_hit_rate_samples", cohort="warm") \
        + _value(mt, "fmstream_live_hit_rate_samples", cohort="cold") <= 1300 // 16 + 1
    assert _value(mt, "fmstream_trainer_batch_seconds_count") >= 1
    assert _value(mt, "fmstream_trainer_records_total", topic=s.topic_events) == 1300
    assert 0 <= _value(mt, "fmstream_event_time_lag_seconds") < 3600
    assert _value(mt, "fmstream_model_version") >= 1
    assert _value(mt, "fmstream_publish_age_seconds", what="items") >= 0
    assert math.isnan(_value(mt, "fmstream_publish_age_seconds", what="i2i")) or \
        _value(mt, "fmstream_publish_age_seconds", what="i2i") >= 0
    assert _value(mt, "fmstream_dead_letters_total") == 0
    assert _value(mw, "fmstream_request_seconds_count") == s.partitions_requests
    assert _value(mw, "fmstream_worker_batch_seconds_count") >= 1
    assert _value(mw, "fmstream_index_swaps_total") >= 0
    assert _value(mw, "fmstream_lag_refresh_age_seconds") < 5


def test_publish_ages_count_from_the_status_read_so_a_publish_during_the_read_is_not_negative(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """The publisher stamps i2i every second, so a stamp often lands while ``fmstream lag``
    reads Kafka (~1 s): its age counts from the status read, not from before the Kafka reads
    (``i2i_publish_age_s`` showed -1.2 s)."""
    from fmstream.monitor import read_lag
    from stream.lag import LagReader

    writer = StoreWriter(redis_client, settings.redis_keys(), 1)

    class PublishedDuringTheRead(LagReader):
        def read(self, groups):  # noqa: ANN001, ANN202 - LagReader's signature
            out = super().read(groups)
            writer.put_status(i2i_published_at=time.time())  # the publisher, meanwhile
            return out

    with PublishedDuringTheRead(settings.kafka_config()) as reader:
        report = read_lag(settings, reader=reader)
    age = report.ages()["i2i_publish_age_s"]
    assert age is not None and 0 <= age < 60
    assert report.to_json()["ages"]["i2i_publish_age_s"] == age


def test_plot_without_samples_is_refused_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(NoSamplesError, match="no samples to plot: .*longer --window") as exc:
        plot_history([], tmp_path / "lag.png")
    assert isinstance(exc.value, ValueError) and not (tmp_path / "lag.png").exists()


def test_a_blocked_dead_letter_topic_is_a_warning_until_the_trainer_clears_it() -> None:
    blocked = {"dlq_blocked_since": "100.0", "dlq_waiting": "3",
               "dlq_error": "TopicAuthorizationFailedError"}
    [line] = dead_letter_warnings(blocked, "fm.dlq", now=142.4)
    assert line.startswith("trainer: dead-letter topic fm.dlq has taken no letters for 42 s "
                           "(TopicAuthorizationFailedError; 3 waiting)")
    assert "grant the trainer's Kafka user (FMSTREAM_KAFKA_USERNAME) Write on topic fm.dlq" in line
    missing = dict(blocked, dlq_error="KafkaTimeoutError")
    [timed_out] = dead_letter_warnings(missing, "fm.dlq", now=142.4)
    # no metadata in time: the topic may be missing or the broker away; the line names both
    assert "create topic fm.dlq" in timed_out and "FMSTREAM_KAFKA_BOOTSTRAP" in timed_out
    unknown = dict(blocked, dlq_error="UnknownTopicOrPartitionError")
    [line] = dead_letter_warnings(unknown, "fm.dlq", now=142.4)
    assert "create topic fm.dlq" in line and "BOOTSTRAP" not in line
    cleared = {"dlq_blocked_since": "0.0", "dlq_waiting": "0", "dlq_error": ""}
    assert dead_letter_warnings(cleared, "fm.dlq", now=1.0) == []
    assert dead_letter_warnings({}, "fm.dlq", now=1.0) == []  # a trainer of before this field
