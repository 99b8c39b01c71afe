"""Fault tests of the trainer against the session's real Kafka and Redis.

Each test proves the same invariant after a different fault: every valid event produced is applied
to the model exactly once. The proof is in the newest checkpoint, where the model and its Kafka
positions are saved together: per partition, events applied == positions == the log-end offset;
``events_applied`` == events produced; and the model's own ``n_updates`` == events produced (an
event applied twice would push it above).

The crash tests run the trainer as a real process (``python -m fmstream.cli train``, configured
with ``FMSTREAM_*`` variables from the test's settings) and kill it with signals. Tests that stop
the shared broker or Redis bring it back in a ``finally`` (and the ``settings`` fixture heals a
service an earlier test left down).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis

from fmstream import services as fm_services
from fmstream.app import run_trainer
from fmstream.settings import Settings
from model.checkpoint import checkpoint_files, latest_checkpoint
from model.errors import CheckpointError
from stream.consume import make_producer
from stream.lag import group_lag
from stream.replay import produce_profiles
from stream.synthetic import SyntheticStream
from tests.kafka_helpers import consume_all, end_offsets
from train.lease import Lease, LeaseLost
from train.resilience import DeadLetterOutbox, GuardedSink, LeaseKeeper

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
STREAM = SyntheticStream(users=1000, items=500, clusters=10, seed=7)
SCHEMA = REPO_ROOT / "config" / "synthetic.toml"


# --- helpers ----------------------------------------------------------------------------------


def _fast(settings: Settings, **overrides: Any) -> Settings:
    """Small model, frequent checkpoints and publishes: faults land between many checkpoints."""
    values: dict[str, Any] = dict(
        dim=8,
        negatives=2,
        checkpoint_every_events=5_000,
        checkpoint_every_s=0.5,
        publish_items_s=0.5,
        publish_active_s=0.5,
        publish_all_s=5.0,
        offline_i2i_s=5.0,
    )
    values.update(overrides)
    return settings.model_copy(update=values)


Pairs = list[tuple[bytes, bytes]]


def _encode(events: list[dict]) -> Pairs:
    """Pre-encoded ``(key, value)`` pairs, so producing is only the client's work."""
    return [(e["user_id"].encode(), orjson.dumps(e)) for e in events]


def _produce(
    settings: Settings, pairs: Pairs, *, rate: float | None = None, tap: Tap | None = None
) -> None:
    """Produce to the events topic (idempotent, acks=all, batched), optionally at ``rate``/s.

    With a ``tap``, each block of 1,000 events waits until the tap grants it (see :class:`Tap`).
    """
    producer = make_producer(settings.kafka_config(), linger_ms=20, batch_size=256 * 1024)
    start = time.monotonic()
    try:
        for n, (key, value) in enumerate(pairs, 1):
            if tap is not None and n % 1000 == 1:
                producer.flush(timeout=60)
                tap.take(min(1000, len(pairs) - n + 1))
                start = time.monotonic() - (n - 1) / rate if rate else start
            producer.send(settings.topic_events, key=key, value=value)
            if rate and n % 1000 == 0:
                ahead = n / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=10)


class Tap:
    """Lets a producer through only while open, and at most ``quota`` events per opening.

    The kill -9 test opens it once a new trainer holds the lease and closes it before the kill,
    so every trainer's life sees the stream arriving, however slowly a loaded machine starts one.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._left = 0

    def open(self, quota: int) -> None:
        with self._cond:
            self._left = quota
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._left = 0

    def take(self, n: int, timeout: float = 300.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._left >= n, timeout):
                raise TimeoutError(f"the tap stayed closed for {timeout} s")
            self._left -= n


class Background(threading.Thread):
    """A thread whose exception is re-raised by :meth:`result`."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self._call = (fn, args, kwargs)
        self.error: BaseException | None = None
        self.value: Any = None
        self.start()

    def run(self) -> None:
        fn, args, kwargs = self._call
        try:
            self.value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to result()
            self.error = exc

    def result(self, timeout: float) -> Any:
        self.join(timeout)
        assert not self.is_alive(), f"{self._call[0].__name__} still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.value


def _env(settings: Settings) -> dict[str, str]:
    """The environment of a trainer process: every setting as ``FMSTREAM_<FIELD>``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FMSTREAM_")}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"FMSTREAM_{name.upper()}"] = str(value)
    env.update(PYTHONUNBUFFERED="1", COLUMNS="250")  # wide log lines, never wrapped
    return env


class TrainerProcess:
    """``python -m fmstream.cli -v train`` as a child process, its output in ``log``."""

    def __init__(self, settings: Settings, log: Path, *, idle_exit: float | None = None) -> None:
        args = [sys.executable, "-m", "fmstream.cli", "-v", "train"]
        if idle_exit is not None:
            args += ["--idle-exit", str(idle_exit)]
        self.log = log
        with log.open("ab") as out:
            out.write(f"\n===== {' '.join(args[1:])}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(  # noqa: S603
                args,
                cwd=REPO_ROOT,
                env=_env(settings),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"trainer did not exit within {timeout} s\n{self.tail()}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def __enter__(self) -> TrainerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)


def _newest(settings: Settings) -> tuple[Any, dict[str, Any]] | None:
    """The newest checkpoint (retrying while the trainer rotates files under us)."""
    for _ in range(20):
        try:
            return latest_checkpoint(settings.checkpoint_dir)
        except (CheckpointError, OSError):
            time.sleep(0.05)
    return latest_checkpoint(settings.checkpoint_dir)


def _applied(settings: Settings) -> int:
    newest = _newest(settings)
    return -1 if newest is None else int(newest[1]["events_applied"])


def _wait_for(
    what: str, cond: Callable[[], bool], timeout: float, trainer: TrainerProcess | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if trainer is not None and not trainer.alive():
            pytest.fail(
                f"trainer exited (rc {trainer.proc.returncode}) while waiting for "
                f"{what}\n{trainer.tail()}"
            )
        if time.monotonic() > deadline:
            tail = trainer.tail() if trainer is not None else ""
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tail}")
        time.sleep(0.1)


def _checkpoint_seq(settings: Settings) -> int:
    files = checkpoint_files(settings.checkpoint_dir)
    return int(files[-1].name[5:17]) if files else 0


def assert_exactly_once(settings: Settings, produced: int) -> tuple[Any, dict[str, Any]]:
    """The newest checkpoint covers every event of the events topic, each applied once."""
    newest = _newest(settings)
    assert newest is not None, "no checkpoint written"
    model, meta = newest
    ends = end_offsets(settings, settings.topic_events)
    assert sum(ends.values()) == produced
    assert len(ends) >= 3
    for tp, end in ends.items():
        key = f"{tp.topic}|{tp.partition}"
        assert meta["applied"].get(key, 0) == end, (key, meta["applied"], end)
        assert meta["positions"].get(key, 0) == end, (key, meta["positions"], end)
    assert meta["events_applied"] == produced
    assert model.n_updates == produced
    return model, meta


def assert_finite(model: Any) -> None:
    _, arrays = model.state()
    for name, arr in arrays.items():
        if np.issubdtype(arr.dtype, np.floating):
            assert np.all(np.isfinite(arr)), f"non-finite values in {name}"


# --- crashes ----------------------------------------------------------------------------------


def test_kill_9_every_few_seconds_loses_and_repeats_nothing(
    settings: Settings, tmp_path: Path, redis_client: redis.Redis
) -> None:
    n = 100_000
    s = _fast(settings)
    assert s.partitions_events >= 3
    # The replay arrives at up to 5,000 events/s, as a live stream does, and only while a trainer
    # holds the lease, at most 15,000 events per trainer: each life sees the stream arriving, so
    # the trainer is killed mid-stream repeatedly however long a loaded machine takes to start one
    # (a trainer that drains a backlog faster than it is killed would finish between two kills).
    tap = Tap()
    producer = Background(_produce, s, _encode(list(STREAM.events(n))), rate=5_000, tap=tap)
    log = tmp_path / "trainer.log"
    lease_key = s.redis_key("trainer", "lease")
    rng = random.Random(0)
    kills: list[int] = []  # events covered by the newest checkpoint after each kill
    while len(kills) < 8 and _applied(s) < n:
        with TrainerProcess(s, log) as trainer:
            seq = _checkpoint_seq(s)
            _wait_for("the lease", lambda: redis_client.exists(lease_key) == 1, 60, trainer)
            tap.open(15_000)
            _wait_for("a new checkpoint", lambda seq=seq: _checkpoint_seq(s) > seq, 60, trainer)
            time.sleep(rng.uniform(0.1, 0.8))  # between checkpoints, mid-batch
            tap.close()
            trainer.kill9()
            kills.append(_applied(s))
            # A killed holder's lease stays until its TTL (15 s) runs out, and the next trainer
            # waits as a standby until then (test_second_trainer_waits...); skip the wait.
            redis_client.delete(s.redis_key("trainer", "lease"))
    tap.open(n)  # the rest of the replay, if the kills ended first
    producer.result(timeout=60)
    assert len([k for k in kills if 0 < k < n]) >= 3, kills  # killed mid-stream, repeatedly
    assert kills == sorted(kills), kills

    with TrainerProcess(s, log, idle_exit=3.0) as trainer:
        assert trainer.wait(timeout=90) == 0, trainer.tail()
    model, _ = assert_exactly_once(s, n)
    assert_finite(model)


def test_sigterm_checkpoints_and_a_restart_resumes_there(
    settings: Settings, tmp_path: Path, redis_client: redis.Redis
) -> None:
    n = 30_000
    # No periodic checkpoint: the only one the first process writes is the one SIGTERM causes.
    s = _fast(
        settings, checkpoint_every_events=10**9, checkpoint_every_s=3600.0, publish_items_s=0.2
    )
    pairs = _encode(list(STREAM.events(n)))
    _produce(s, pairs[:1_000])
    log = tmp_path / "trainer.log"
    with TrainerProcess(s, log) as trainer:
        _wait_for(
            "the first item snapshot",
            lambda: redis_client.exists(s.redis_key("items", "current")),
            60,
            trainer,
        )
        # The trainer is up: the rest of the replay arrives while it runs (~5 s).
        producer = Background(_produce, s, pairs[1_000:], rate=6_000)
        time.sleep(1.0)
        trainer.signal(signal.SIGTERM)
        assert trainer.wait(timeout=30) == 0, trainer.tail()
    assert len(checkpoint_files(s.checkpoint_dir)) == 1
    model, meta = _newest(s)
    stopped_at = meta["events_applied"]
    assert 0 < stopped_at
    assert model.n_updates == stopped_at == sum(meta["applied"].values())
    assert meta["positions"] == meta["applied"]  # no poison: next offset == events applied
    producer.result(timeout=60)
    assert stopped_at < n, "the replay ended before SIGTERM; nothing left to resume"

    with TrainerProcess(s, log, idle_exit=2.0) as trainer:
        assert trainer.wait(timeout=90) == 0, trainer.tail()
    assert f"{stopped_at} events applied" in log.read_text(), "did not restore the checkpoint"
    assert_exactly_once(s, n)


# --- outages ----------------------------------------------------------------------------------


def test_broker_stopped_and_restarted_mid_stream(settings: Settings, tmp_path: Path) -> None:
    first, later = 60_000, 10_000
    s = _fast(settings)
    events = list(STREAM.events(first + later))
    _produce(s, _encode(events[:first]))
    log = tmp_path / "trainer.log"
    with TrainerProcess(s, log) as trainer:
        _wait_for("a first checkpoint", lambda: _applied(s) > 0, 60, trainer)
        fm_services.stop_kafka(s)
        try:
            time.sleep(3.0)  # the trainer keeps polling a broker that is gone
            assert trainer.alive(), trainer.tail()
        finally:
            fm_services.start_kafka(s)
        _produce(s, _encode(events[first:]))
        _wait_for("every event checkpointed", lambda: _applied(s) == first + later, 120, trainer)
        trainer.signal(signal.SIGTERM)
        assert trainer.wait(timeout=30) == 0, trainer.tail()
    assert_exactly_once(s, first + later)
    lags = group_lag(s.kafka_config(), s.trainer_group, [s.topic_events])
    assert [p.lag for p in lags] == [0] * len(lags)


def test_redis_stopped_and_restarted(
    settings: Settings, tmp_path: Path, redis_client: redis.Redis
) -> None:
    sizes = (15_000, 10_000, 5_000)
    s = _fast(settings, history_len=20)
    events = list(STREAM.events(sum(sizes)))
    parts = [events[: sizes[0]], events[sizes[0] : sizes[0] + sizes[1]], events[-sizes[2] :]]
    _produce(s, _encode(parts[0]))
    log = tmp_path / "trainer.log"
    with TrainerProcess(s, log) as trainer:
        _wait_for("the first events", lambda: _applied(s) == sizes[0], 60, trainer)
        fm_services.stop_redis(s)
        try:
            down_at = time.monotonic()
            _produce(s, _encode(parts[1]))
            # Within the lease TTL the trainer goes on training and checkpointing.
            _wait_for(
                "events checkpointed while Redis is down",
                lambda: _applied(s) == sizes[0] + sizes[1],
                10,
                trainer,
            )
            assert time.monotonic() - down_at < 13.0
            assert trainer.alive()
        finally:
            fm_services.start_redis(s)
        _produce(s, _encode(parts[2]))
        status_key = s.redis_key("status")

        def published_all() -> bool:
            raw = redis_client.hget(status_key, "events_applied")
            return raw is not None and int(raw) == len(events)

        _wait_for("the publisher to report every event", published_all, 60, trainer)
        trainer.signal(signal.SIGTERM)
        assert trainer.wait(timeout=30) == 0, trainer.tail()
    model, _ = assert_exactly_once(s, len(events))
    # History (bounded, newest first) holds every positive, including those applied while
    # Redis was down: the publisher replayed them when it came back.
    per_user: dict[str, list[str]] = defaultdict(list)
    for e in events:
        if e["label"] == 1:
            per_user[e["user_id"]].append(e["item_id"])
    for user in sorted(per_user)[:200]:
        stored = [v.decode() for v in redis_client.lrange(s.redis_key("hist", user), 0, -1)]
        assert stored == per_user[user][::-1][: s.history_len], user
    assert redis_client.exists(s.redis_key("user", events[-1]["user_id"]))


# --- poison -----------------------------------------------------------------------------------


def _poison(rng: random.Random, k: int) -> tuple[bytes | None, str, str]:
    """The k-th poison message: ``(value, expected stage, fragment of the reason)``."""
    long_id = "u" * 300
    kinds: list[tuple[bytes | None, str, str]] = [
        (b"not json at all %d" % k, "decode", "JSON"),
        (b'{"user_id": "u1", "item_id": "i1", "ts": NaN}', "decode", "JSON"),
        (b'{"user_id": "u1", "item_id": "i1", "ts": 1e999}', "decode", "infinity"),
        (b"[1, 2, %d]" % k, "decode", "JSON object"),
        (b"{" + b" " * 70_000 + b"}", "decode", "exceeds the limit"),
        (b'{"user_id": "u1"}', "validate", "item_id"),
        (b'{"user_id": "u1", "item_id": "i1", "label": "yes"}', "validate", "label"),
        (b'{"user_id": "u1", "item_id": "i1", "ts": "yesterday"}', "validate", "ts"),
        (b'{"user_id": true, "item_id": "i1"}', "validate", "user_id"),
        (orjson.dumps({"user_id": long_id, "item_id": "i1"}), "validate", "user_id"),
        (b'{"user_id": "u1", "item_id": "i1", "ts": -5}', "validate", "ts"),
        # Valid on the wire, rejected by the model (the schema's hour is one categorical value;
        # segment too): isolated at stage "apply".
        (
            b'{"user_id": "u1", "item_id": "i1", "context": {"hour": ["1", "2"]}}',
            "apply",
            "categorical",
        ),
        (
            b'{"user_id": "u2", "item_id": "i2", "user": {"segment": ["a", "b"]}}',
            "apply",
            "categorical",
        ),
    ]
    value, stage, reason = kinds[k % len(kinds)]
    if value is not None and value.startswith(b"{") and k >= len(kinds):
        value = value[:-1] + b', "n": %d}' % k  # distinct bytes for each poison message
    return value, stage, reason


def test_one_percent_poison_is_dead_lettered_and_the_rest_applied(
    settings: Settings, kafka_io: Any
) -> None:
    s = _fast(settings, schema_path=SCHEMA, checkpoint_every_events=4_000)
    producer = make_producer(s.kafka_config(), linger_ms=20)
    produce_profiles(producer, s.topics(), STREAM.user_profiles(), STREAM.item_profiles())
    producer.close()
    valid = list(STREAM.events(20_000))
    rng = random.Random(3)
    poison = [_poison(rng, k) for k in range(200)]
    stream: list[tuple[bytes, bytes | None]] = [
        (e["user_id"].encode(), orjson.dumps(e)) for e in valid
    ]
    for k, (value, _, _) in enumerate(poison):
        stream.insert(rng.randrange(len(stream) + 1), (b"u%d" % k, value))
    _produce(s, stream)  # type: ignore[arg-type]

    progress = run_trainer(s, threading.Event(), idle_exit_s=2.0)

    assert progress is not None
    assert progress.events_applied == len(valid)
    assert progress.dead_letters == len(poison)
    letters = [orjson.loads(r.value) for r in consume_all(s, s.topic_dlq, expect=len(poison))]
    assert len(letters) == len(poison)
    by_hash = {b["value_sha256"]: b for b in letters}  # big values are kept as a prefix
    for value, stage, reason in poison:
        letter = by_hash[hashlib.sha256(value or b"").hexdigest()]
        assert (value or b"").startswith(base64.b64decode(letter["value_b64"]))
        assert letter["value_length"] == len(value or b"")
        assert letter["stage"] == stage, (value[:80], letter)
        assert reason.lower() in letter["reason"].lower(), (value[:80], letter["reason"])
        assert letter["source_topic"] == s.topic_events
        assert letter["error_class"]
        assert letter["source_timestamp_ms"] and letter["source_offset"] >= 0
    model, meta = _newest(s)
    assert model.n_updates == len(valid)
    ends = end_offsets(s, s.topic_events)
    assert sum(ends.values()) == len(stream)
    for tp, end in ends.items():
        assert meta["positions"][f"{tp.topic}|{tp.partition}"] == end
    topics = [s.topic_events, s.topic_users, s.topic_items]
    lags = group_lag(s.kafka_config(), s.trainer_group, topics)
    assert {(p.topic, p.partition): p.lag for p in lags} == {
        (p.topic, p.partition): 0 for p in lags
    }
    assert all(p.committed == p.log_end for p in lags if p.log_end)
    assert_finite(model)


# --- lease and history ------------------------------------------------------------------------


def test_second_trainer_waits_as_standby_until_the_first_releases(
    settings: Settings, redis_client: redis.Redis
) -> None:
    s = _fast(settings)
    events = list(STREAM.events(6_000))
    _produce(s, _encode(events[:3_000]))
    lease_key = s.redis_key("trainer", "lease")
    stop_a, stop_b = threading.Event(), threading.Event()
    a = Background(run_trainer, s, stop_a)
    try:
        _wait_for("trainer A to apply", lambda: _applied(s) == 3_000, 60)
        holder_a = redis_client.get(lease_key)
        assert holder_a
        b = Background(run_trainer, s, stop_b)
        time.sleep(2.5)
        assert b.is_alive() and redis_client.get(lease_key) == holder_a  # B waits
        files_before = checkpoint_files(s.checkpoint_dir)
        stop_a.set()
        progress_a = a.result(timeout=30)
        assert progress_a.events_applied == 3_000
        _wait_for(
            "B to take the lease", lambda: redis_client.get(lease_key) not in (None, holder_a), 10
        )
        assert checkpoint_files(s.checkpoint_dir)[-1] != files_before[-1]  # A's final one
        _produce(s, _encode(events[3_000:]))
        _wait_for("trainer B to apply the rest", lambda: _applied(s) == 6_000, 60)
    finally:
        stop_a.set()
        stop_b.set()
    progress_b = b.result(timeout=30)
    assert progress_b.events_applied == 6_000  # resumed from A's checkpoint, nothing twice
    assert_exactly_once(s, 6_000)
    assert redis_client.get(lease_key) is None  # released on exit


def test_user_history_is_bounded_and_newest_first(
    settings: Settings, redis_client: redis.Redis
) -> None:
    s = _fast(settings, history_len=5)
    events = list(STREAM.events(4_000))
    events[10]["label"] = 0  # an explicit negative never enters the history
    _produce(s, _encode(events))
    progress = run_trainer(s, threading.Event(), idle_exit_s=1.5)
    assert progress is not None and progress.events_applied == len(events)
    per_user: dict[str, list[str]] = defaultdict(list)
    for e in events:
        if e["label"] == 1:
            per_user[e["user_id"]].append(e["item_id"])
    checked = 0
    for user, items in per_user.items():
        stored = [v.decode() for v in redis_client.lrange(s.redis_key("hist", user), 0, -1)]
        assert stored == items[::-1][:5], user
        checked += len(items) > 5
    assert checked > 100  # bounded: most users clicked more than history_len items


# --- the outage rules, with a fake clock ------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lease_keeper_rides_out_a_short_redis_outage_and_pauses_past_the_ttl() -> None:
    clock = FakeClock()
    redis_up = [True]
    holder = ["us"]

    def renew() -> None:
        if not redis_up[0]:
            raise redis.ConnectionError("refused")
        if holder[0] != "us":
            raise LeaseLost("someone else")

    keeper = LeaseKeeper(
        renew,
        ttl_s=15.0,
        margin_s=2.0,
        clock=clock,
        try_acquire=lambda: holder[0] is None,
        may_reacquire=lambda: True,
    )
    assert keeper.keep()
    redis_up[0] = False
    clock.now += 12.0
    assert keeper.keep()  # proven until 1000 + 15 - 2
    assert keeper.down_since == clock.now
    clock.now += 1.5
    assert not keeper.keep()  # past the TTL minus margin: pause, write nothing
    redis_up[0] = True
    clock.now += 1.0
    assert keeper.keep() and keeper.down_since is None  # still ours: carry on
    # Expired during an outage and free: taken again (the newest checkpoint is ours).
    holder[0] = None
    clock.now += 1.0
    assert keeper.keep(force=True)
    # Someone else took it: stop.
    holder[0] = "them"
    with pytest.raises(LeaseLost):
        keeper.keep(force=True)


def test_lease_keeper_refuses_to_retake_a_lease_after_another_trainer_wrote() -> None:
    def renew() -> None:
        raise LeaseLost("expired")

    keeper = LeaseKeeper(renew, ttl_s=15.0, try_acquire=lambda: True, may_reacquire=lambda: False)
    with pytest.raises(LeaseLost):
        keeper.keep(force=True)


def test_real_lease_expiry_and_retake(settings: Settings, redis_client: redis.Redis) -> None:
    lease = Lease(redis_client, settings.redis_key("trainer", "lease"), ttl_s=15.0)
    assert lease.try_acquire()
    keeper = LeaseKeeper(lease.renew, 15.0, try_acquire=lease.try_acquire)
    redis_client.delete(settings.redis_key("trainer", "lease"))  # as if it expired
    assert keeper.keep(force=True)
    assert lease.holder() == lease.token


def test_guarded_sink_queues_history_while_redis_is_down() -> None:
    clock = FakeClock()

    class Sink:
        def __init__(self) -> None:
            self.up = True
            self.applied_batches: list[list[int]] = []
            self.reports: list[object] = []
            self.ticks = 0

        def applied(self, events: list[int]) -> None:
            if not self.up:
                raise redis.ConnectionError("down")
            self.applied_batches.append(list(events))

        def profiles_changed(self, user_ids: list[str]) -> None:
            pass

        def checkpointed(self, progress: object) -> None:
            if not self.up:
                raise redis.ConnectionError("down")
            self.reports.append(progress)

        def tick(self, now: float) -> None:
            if not self.up:
                raise redis.ConnectionError("down")
            self.ticks += 1

    inner = Sink()
    sink = GuardedSink(inner, backoff_s=0.5, max_queued=5, clock=clock)
    sink.applied([1, 2])
    inner.up = False
    sink.applied([3])
    sink.tick(0)
    sink.checkpointed("ckpt 1")
    assert sink.down
    for batch in ([4, 5], [6], [7, 8]):
        clock.now += 0.1
        sink.applied(batch)
    assert sink.dropped == 1  # [3] fell out: at most 5 queued
    sink.checkpointed("ckpt 2")  # in the backoff: kept, replaces ckpt 1
    inner.up = True
    clock.now += 10
    sink.tick(0)
    assert not sink.down and inner.ticks == 1
    assert inner.applied_batches == [[1, 2], [4, 5], [6], [7, 8]]
    assert inner.reports == ["ckpt 2"]  # the newest report, delivered once Redis answered


def test_dead_letter_outbox_resends_what_the_broker_never_acked() -> None:
    class Fut:
        def __init__(self, ok: bool) -> None:
            self.ok = ok

        def failed(self) -> bool:
            return not self.ok

        def succeeded(self) -> bool:
            return self.ok

        @property
        def exception(self) -> Exception | None:
            return None if self.ok else RuntimeError("delivery timed out")

    class Producer:
        def __init__(self) -> None:
            self.sent: list[bytes] = []
            self.fail_next = 1

        def partitions_for(self, topic: str) -> set[int]:
            return {0}

        def send(self, topic: str, key: bytes | None, value: bytes) -> Fut:
            self.sent.append(value)
            ok = self.fail_next <= 0
            self.fail_next -= 1
            return Fut(ok)

        def flush(self, timeout: float) -> None:
            pass

    class Rec:
        topic, partition, offset, timestamp, key, value = "t", 0, 5, 1, b"k", b"bad"

    producer = Producer()
    outbox = DeadLetterOutbox(producer, "dlq")  # type: ignore[arg-type]
    outbox.send(Rec, "decode", ValueError("x"), "not JSON")  # type: ignore[arg-type]
    assert outbox.flush(timeout=5.0)
    assert outbox.pending == 0 and len(producer.sent) == 2  # failed once, re-sent, acked
    letter = orjson.loads(producer.sent[-1])
    assert letter["source_offset"] == 5 and base64.b64decode(letter["value_b64"]) == b"bad"
    assert letter["stage"] == "decode" and letter["reason"] == "not JSON"


def test_a_flush_never_waits_on_its_callers_thread_for_a_topic_known_to_be_missing() -> None:
    """The trainer thread flushes the outbox at every checkpoint attempt. A send to a topic with
    no metadata (missing, auto-create off) waits the producer's ``max_block_ms`` (2 s) on the
    thread that calls it; the outbox used to re-send the oldest letter on the flushing thread, so
    every checkpoint attempt held the trainer that long. Once a send found no metadata, the
    retries run on the outbox's own thread, one at a time, and the letter goes once the topic
    exists."""
    from kafka.errors import KafkaTimeoutError

    class Fut:
        def failed(self) -> bool:
            return False

        def succeeded(self) -> bool:
            return True

    class Producer:  # kafka-python's send blocks for metadata on the calling thread, then raises
        def __init__(self) -> None:
            self.missing = True
            self.senders: list[str] = []  # the thread of every send
            self.sent: list[bytes] = []

        def partitions_for(self, topic: str) -> set[int]:
            if self.missing:
                raise KafkaTimeoutError("Failed to update metadata after 2.0 secs.")
            return {0}

        def send(self, topic: str, key: bytes | None, value: bytes) -> Fut:
            self.senders.append(threading.current_thread().name)
            if self.missing:
                raise KafkaTimeoutError("Failed to update metadata after 2.0 secs.")
            self.sent.append(value)
            return Fut()

        def flush(self, timeout: float) -> None:
            pass

    class Rec:
        topic, partition, offset, timestamp, key, value = "t", 0, 5, 1, b"k", b"bad"

    me = threading.current_thread().name
    producer = Producer()
    outbox = DeadLetterOutbox(producer, "dlq")  # type: ignore[arg-type]
    outbox.send(Rec, "decode", ValueError("x"), "not JSON")  # type: ignore[arg-type]
    assert producer.senders == [me]  # the first send finds out (one wait, then it is known)
    # checkpoint attempts while it is missing: each only looks; retries go on elsewhere
    _wait_for("the outbox to retry the letter three times",
              lambda: not outbox.flush(timeout=0.0) and len(producer.senders) >= 4, 60)
    assert outbox.blocked() is not None and outbox.pending == 1
    assert not outbox.flush(timeout=0.5)  # a flush that may wait still sends nothing itself
    assert me not in producer.senders[1:], producer.senders
    producer.missing = False  # the topic is created
    _wait_for("the letter to go through", lambda: outbox.flush(timeout=0.0), 60)
    assert outbox.blocked() is None and outbox.pending == 0
    assert me not in producer.senders[1:], producer.senders
    assert len(producer.sent) == 1  # sent once, not once per flush
    assert orjson.loads(producer.sent[0])["source_offset"] == 5


# --- background checkpoints (a forked writer, train/checkpointer.py) -------------------------


def _children(pid: int) -> list[int]:
    """Child pids of every thread of ``pid``."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _proc_state(pid: int) -> str | None:
    """The state letter of ``pid`` (R, S, T, Z ...); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _stop_a_checkpoint_writer(trainer: TrainerProcess, timeout: float = 60.0) -> int:
    """SIGSTOP the trainer's checkpoint writer (a fork: same command line as the trainer; the
    fetch process is a spawned interpreter) while it is in flight; its pid."""
    cmdline = Path(f"/proc/{trainer.proc.pid}/cmdline").read_bytes()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert trainer.alive(), trainer.tail()
        for child in _children(trainer.proc.pid):
            try:
                if Path(f"/proc/{child}/cmdline").read_bytes() != cmdline:
                    continue
                os.kill(child, signal.SIGSTOP)
            except (OSError, ProcessLookupError):
                continue  # it finished meanwhile: wait for the next one
            if _proc_state(child) == "T":  # stopped before it exited: in flight
                return child
        time.sleep(0.005)
    pytest.fail(f"no checkpoint writer caught in flight within {timeout} s\n{trainer.tail()}")


def test_kill_9_while_a_background_checkpoint_is_written_loses_and_repeats_nothing(
    settings: Settings, tmp_path: Path, redis_client: redis.Redis
) -> None:
    """The writer is frozen mid-checkpoint, then the trainer is killed with -9: the writer dies
    with it, its file never becomes a checkpoint, and the restarted trainer removes the temp
    file and applies every event exactly once."""
    n = 40_000
    s = _fast(settings)
    producer = Background(_produce, s, _encode(list(STREAM.events(n))), rate=5_000)
    log = tmp_path / "trainer.log"
    with TrainerProcess(s, log) as trainer:
        _wait_for("a first checkpoint", lambda: _checkpoint_seq(s) > 0, 60, trainer)
        writer = _stop_a_checkpoint_writer(trainer)
        seq = _checkpoint_seq(s)
        applied = _applied(s)
        trainer.kill9()
    # A writer frozen past its prctl got SIGKILL with its trainer; one frozen just after the fork,
    # before it, got nothing: continued, it finds its parent gone (the getppid check) and exits.
    with contextlib.suppress(ProcessLookupError):
        os.kill(writer, signal.SIGCONT)
    _wait_for("the writer to die with its trainer", lambda: _proc_state(writer) in (None, "Z"), 30)
    assert _checkpoint_seq(s) == seq  # the frozen writer's file was never installed
    stale = [p.name for p in s.checkpoint_dir.iterdir() if p.name.endswith(".tmp")]
    assert stale, "the writer in flight left no temp file"
    assert 0 < applied < n, applied  # killed mid-stream
    redis_client.delete(s.redis_key("trainer", "lease"))
    producer.result(timeout=60)

    with TrainerProcess(s, log, idle_exit=3.0) as trainer:
        assert trainer.wait(timeout=90) == 0, trainer.tail()
    model, _ = assert_exactly_once(s, n)
    assert_finite(model)
    assert not [p.name for p in s.checkpoint_dir.iterdir() if p.name.endswith(".tmp")]
    lags = group_lag(s.kafka_config(), s.trainer_group, [s.topic_events])
    assert [p.lag for p in lags] == [0] * len(lags)  # the final checkpoint's commit


def test_guarded_sink_keeps_status_reports_until_redis_answers() -> None:
    clock = FakeClock()

    class Sink:
        def __init__(self) -> None:
            self.up = False
            self.reports: list[dict] = []

        def report(self, fields: dict) -> None:
            if not self.up:
                raise redis.ConnectionError("down")
            self.reports.append(dict(fields))

    inner = Sink()
    sink = GuardedSink(inner, backoff_s=0.5, clock=clock)
    sink.report({"dlq_blocked_since": 5.0, "dlq_waiting": 1})
    clock.now += 1
    sink.report({"dlq_waiting": 2})  # merged with what waits: the newest value of each
    assert inner.reports == []
    inner.up = True
    clock.now += 10
    sink.report({"dlq_error": "TopicAuthorizationFailedError"})
    assert inner.reports == [{"dlq_blocked_since": 5.0, "dlq_waiting": 2,
                              "dlq_error": "TopicAuthorizationFailedError"}]
    GuardedSink(object()).report({"x": 1})  # a sink without report() takes none
