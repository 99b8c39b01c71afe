"""serving/timing.py: the worker's request-path summary (unit tests, no I/O)."""

from __future__ import annotations

import logging

import pytest

from serving.timing import ApplyTimes, BatchTimes, PathLog, parse_stats, summarise, thread_clock


def batch(busy_ms: float, cpu_ms: float, runq_ms: float = 0.0) -> BatchTimes:
    s = busy_ms / 1000
    return BatchTimes(requests=4, queued=0.002, decode=s / 4, store=s / 4, answer=s / 4,
                      send=s / 4, cpu=cpu_ms / 1000, runq=runq_ms / 1000)


def test_blocked_is_what_neither_ran_nor_waited_for_a_core() -> None:
    assert batch(10, 4, 3).blocked == pytest.approx(0.003)
    assert batch(10, 8, 5).blocked == 0.0  # clock granularity never makes it negative


def test_blocked_splits_into_the_store_reads_and_the_rest() -> None:
    b = BatchTimes(requests=4, queued=0.0, decode=0.001, store=0.004, answer=0.004, send=0.001,
                   cpu=0.004, runq=0.001, store_idle=0.003)
    assert b.blocked == pytest.approx(0.005)
    assert b.blocked_store == pytest.approx(0.003) and b.blocked_other == pytest.approx(0.002)
    # the store's idle time never exceeds the batch's blocked time (clocks read apart)
    b = BatchTimes(requests=1, queued=0.0, decode=0.0, store=0.004, answer=0.0, send=0.0,
                   cpu=0.003, runq=0.0, store_idle=0.002)
    assert b.blocked_store == pytest.approx(0.001) and b.blocked_other == 0.0
    stats = parse_stats(summarise(10.0, [b], []))
    assert stats["blocked_store_p99_ms"] == pytest.approx(1.0)
    assert stats["blocked_other_p99_ms"] == 0.0


def test_summary_line_round_trips_its_stats() -> None:
    batches = [batch(10, 4, 1) for _ in range(99)] + [batch(50, 5, 40)]
    applies = [ApplyTimes(1, 0.05, 0.03, 0.004, 0.0), ApplyTimes(2, 0.09, 0.05, 0.01, 0.001)]
    line = summarise(10.0, batches, applies)
    assert line.startswith("request path, last 10 s: 400 requests in 100 batches")
    stats = parse_stats(line)
    assert stats["batches"] == 100 and stats["requests"] == 400 and stats["versions"] == 3
    assert 10 < stats["busy_p99_ms"] <= 50 and stats["apply_cpu_p50_ms"] == pytest.approx(40)
    assert parse_stats("no stats here") == {}


def test_path_log_logs_once_per_interval_and_then_starts_afresh(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = PathLog(every_s=0.0)
    assert log.maybe_log() is None  # nothing recorded: nothing to say
    log.batch(batch(10, 4))
    log.applied(ApplyTimes(1, 0.05, 0.03, 0.004, 0.0))
    with caplog.at_level(logging.INFO, logger="serving.timing"):
        line = log.maybe_log()
    assert line is not None and "1 versions" in line and line in caplog.text
    assert log.maybe_log() is None  # the window's records were consumed


def test_thread_clock_moves_with_this_threads_cpu() -> None:
    cpu0, wait0 = thread_clock()
    sum(i * i for i in range(200_000))
    cpu1, wait1 = thread_clock()
    assert cpu1 > cpu0 and wait1 >= wait0 >= 0.0
