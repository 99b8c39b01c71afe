"""Burrow's lag evaluation rules: every status from hand-made windows (pure), then the same
statuses made to happen on real consumer groups of the session's broker."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from fmstream.health import (
    Commit,
    GroupHealth,
    Reading,
    Sample,
    Status,
    evaluate_group,
    evaluate_partition,
    partition_health,
    window_samples,
    worst_status,
)
from fmstream.monitor import LagSampler
from fmstream.settings import Settings
from stream.connect import kafka_admin, kafka_consumer
from tests.kafka_helpers import KafkaIO

T0 = 1_700_000_000.0


def _window(*entries: tuple[float, int | None, int], baseline: bool = True) -> list[Sample]:
    """Samples from ``(seconds after T0, offset, lag)``; the first is the baseline reading."""
    return [Sample(T0 + t, off, lag, commit=not (baseline and i == 0))
            for i, (t, off, lag) in enumerate(entries)]


# --- OK ---------------------------------------------------------------------------------------


def test_ok_when_caught_up_now() -> None:
    status, reason = evaluate_partition(_window((0, 10, 5), (5, 15, 0)))
    assert status is Status.OK and "lag 0" in reason


def test_ok_when_lag_touched_zero_even_if_it_grew_again() -> None:
    # Rule 1 wins over everything: a consumer that caught up in the window is keeping up.
    samples = _window((0, 10, 0), (5, 10, 40), (10, 10, 90))
    assert evaluate_partition(samples, current_lag=90, now=T0 + 10)[0] is Status.OK


def test_ok_when_offsets_advance_and_lag_falls() -> None:
    samples = _window((0, 100, 50), (3, 120, 60), (6, 150, 30), (9, 170, 20))
    status, reason = evaluate_partition(samples, now=T0 + 10)
    assert status is Status.OK and "falls" in reason


def test_ok_without_samples() -> None:
    assert evaluate_partition([])[0] is Status.OK


# --- WARN -------------------------------------------------------------------------------------


def test_warn_when_offsets_advance_but_lag_never_falls() -> None:
    samples = _window((0, 100, 50), (3, 110, 60), (6, 120, 60), (9, 130, 75))
    status, reason = evaluate_partition(samples, now=T0 + 10)
    assert status is Status.WARN and "50 -> 75" in reason


# --- STALL ------------------------------------------------------------------------------------


def test_stall_when_commits_repeat_one_offset_with_lag() -> None:
    samples = _window((0, 100, 50), (3, 100, 55), (6, 100, 60), (9, 100, 61))
    status, reason = evaluate_partition(samples, now=T0 + 10)
    assert status is Status.STALL and "offset 100" in reason


def test_a_first_ever_commit_is_progress_not_a_stall() -> None:
    samples = _window((0, None, 50), (3, 20, 40))
    assert evaluate_partition(samples, now=T0 + 4)[0] is Status.OK


# --- STOP -------------------------------------------------------------------------------------


def test_stop_when_nothing_is_committed_while_behind() -> None:
    samples = [Sample(T0, 100, 50, commit=False)]
    status, reason = evaluate_partition(samples, current_lag=80, now=T0 + 30)
    assert status is Status.STOP and "no commit in 30 s" in reason


def test_stop_when_never_committed_with_a_backlog() -> None:
    status, reason = evaluate_partition([Sample(T0, None, 500, commit=False)], now=T0 + 10)
    assert status is Status.STOP and "never committed" in reason


def test_stop_when_silent_for_longer_than_the_commits_spanned() -> None:
    # Burrow's rule 3: commits at 1 s and 3 s, nothing for 7 s since.
    samples = _window((0, 100, 50), (1, 110, 45), (3, 120, 40))
    status, reason = evaluate_partition(samples, current_lag=60, now=T0 + 10)
    assert status is Status.STOP and "last commit 7 s ago" in reason


def test_one_commit_is_not_judged_silent() -> None:
    samples = _window((0, 100, 50), (1, 110, 45))
    assert evaluate_partition(samples, current_lag=60, now=T0 + 10)[0] is Status.OK


# --- REWIND -----------------------------------------------------------------------------------


def test_rewind_when_an_offset_goes_back() -> None:
    samples = _window((0, 100, 50), (3, 120, 40), (6, 60, 110), (9, 60, 115))
    status, reason = evaluate_partition(samples, now=T0 + 10)
    assert status is Status.REWIND and "from 120 to 60" in reason


def test_rewind_outranks_stop_and_stall() -> None:
    # Only the baseline and one commit that went back: also a STOP by silence and no progress.
    samples = _window((0, 100, 50), (1, 90, 60))
    assert evaluate_partition(samples, now=T0 + 100)[0] is Status.REWIND


# --- readings, commits and groups -------------------------------------------------------------


def test_lag_at_a_commit_comes_from_the_newest_reading_before_it() -> None:
    readings = [Reading(T0, 100, 150), Reading(T0 + 2, 100, 170), Reading(T0 + 4, 110, 200)]
    commits = [Commit(T0 + 1, 105), Commit(T0 + 3, 110)]
    samples = window_samples(readings, commits)
    assert [(s.offset, s.lag, s.commit) for s in samples] == [
        (100, 50, False), (105, 45, True), (110, 60, True)]


def test_without_a_commit_log_offset_changes_count_as_commits() -> None:
    readings = [Reading(T0, 100, 150), Reading(T0 + 1, 100, 160), Reading(T0 + 2, 120, 170)]
    samples = window_samples(readings, None)
    assert [s.commit for s in samples] == [False, False, True]
    # ...so a consumer that re-commits one offset cannot be told from one that stopped.
    stuck = [Reading(T0 + t, 100, 150 + t) for t in range(5)]
    assert partition_health("t", 0, stuck, None).status is Status.STOP
    assert partition_health("t", 0, stuck, [Commit(T0 + 1, 100), Commit(T0 + 3, 100)],
                            now=T0 + 4).status is Status.STALL


def test_never_committed_reading_lags_by_the_retained_log() -> None:
    assert Reading(T0, None, log_end=500, log_start=120).lag == 380
    assert Reading(T0, 490, log_end=480).lag == 0  # never negative


def test_group_takes_its_worst_partition() -> None:
    readings = {
        ("t", 0): [Reading(T0, 10, 10), Reading(T0 + 5, 10, 10)],  # caught up: OK
        ("t", 1): [Reading(T0, 10, 50), Reading(T0 + 5, 10, 60)],  # no commits: STOP
        ("t", 2): [Reading(T0, 10, 50), Reading(T0 + 5, 10, 60)],  # re-commits: STALL
    }
    commits = {("t", 2): [Commit(T0 + 1, 10), Commit(T0 + 4, 10)]}
    health = evaluate_group("g", readings, commits)
    assert [p.status for p in health.partitions] == [Status.OK, Status.STOP, Status.STALL]
    assert health.status is Status.STALL
    assert health.reason.startswith("t[2]:")
    assert health.total_lag == 100
    assert health.to_json()["status"] == "STALL"
    assert GroupHealth("empty", Status.OK).worst is None


def test_severity_follows_burrow() -> None:
    assert [s.name for s in sorted(Status)] == ["OK", "WARN", "STOP", "STALL", "REWIND"]
    assert worst_status([Status.WARN, Status.REWIND, Status.STOP]) is Status.REWIND
    assert worst_status([]) is Status.OK


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 1000)), min_size=1, max_size=12))
def test_rule_one_any_zero_lag_is_ok_and_rewind_needs_a_decrease(pairs) -> None:
    samples = [Sample(T0 + i, off, lag, commit=i > 0) for i, (off, lag) in enumerate(pairs)]
    status, _ = evaluate_partition(samples)
    offsets = [off for off, _ in pairs]
    if any(lag == 0 for _, lag in pairs):
        assert status is Status.OK
    elif any(b < a for a, b in zip(offsets, offsets[1:], strict=False)):
        assert status is Status.REWIND
    else:
        assert status is not Status.REWIND


# --- on a real broker -------------------------------------------------------------------------


@pytest.mark.integration
def test_real_groups_reach_ok_stall_rewind_stop_and_warn(
    settings: Settings, kafka_io: KafkaIO
) -> None:
    """Five groups, committed by hand (and reset backwards with the admin API), one window."""
    events, requests = settings.topic_events, settings.topic_requests
    kafka_io.produce(events, [b"e"] * 100, partition=0)
    kafka_io.produce(requests, [b"r"] * 100, partition=0)
    names = ["ok", "stall", "rewind", "stop", "warn"]
    groups = {f"{settings.trainer_group}.{n}": [requests if n == "warn" else events]
              for n in names}
    group = dict(zip(names, groups, strict=True))
    tp = {n: TopicPartition(requests if n == "warn" else events, 0) for n in names}
    kafka = settings.kafka_config()
    consumers = {n: kafka_consumer(kafka, group_id=group[n], enable_auto_commit=False)
                 for n in names}
    admin = kafka_admin(kafka)

    def commit(name: str, offset: int) -> None:
        consumers[name].commit({tp[name]: OffsetAndMetadata(offset, "", -1)})

    try:
        for n in names:
            consumers[n].assign([tp[n]])
            commit(n, 50)  # the baseline: 50 behind
        with LagSampler(settings, window_s=60, groups=groups) as sampler:
            sampler.sample()  # the baseline reading; the commit log is tailed from here
            assert sampler.commit_log, "__consumer_offsets should be readable on a local broker"
            warn_offset = 50
            for step in range(1, 13):
                if step in (2, 4):
                    commit("ok", {2: 70, 4: 100}[step])  # catches up to the log end
                if step % 2:
                    commit("stall", 50)  # alive, committing, not moving
                if step == 2:
                    commit("rewind", 60)
                if step == 5:  # an operator resets the group backwards
                    errors = admin.alter_group_offsets(
                        group["rewind"], {tp["rewind"]: OffsetAndMetadata(30, "", -1)})
                    assert all(e.errno == 0 for e in errors.values()), errors
                if step % 2:
                    kafka_io.produce(requests, [b"r"] * 20, partition=0)  # the log grows...
                else:
                    warn_offset += 5  # ...faster than the consumer commits
                    commit("warn", warn_offset)
                time.sleep(0.25)
                report = sampler.sample()
    finally:
        admin.close()
        for c in consumers.values():
            c.close(autocommit=False)

    health = report.health
    assert health is not None
    got = {n: health[group[n]].status for n in names}
    assert got == {"ok": Status.OK, "stall": Status.STALL, "rewind": Status.REWIND,
                   "stop": Status.STOP, "warn": Status.WARN}, {
        n: health[group[n]].reason for n in names}
    stall = health[group["stall"]].worst
    assert stall is not None and stall.commits == 6 and stall.lag == 50
    assert "from 60 to 30" in (health[group["rewind"]].reason or "")
