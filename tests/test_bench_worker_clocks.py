"""The benches' per-process clocks (bench/serve.py) and the e2e's reading of the worker's log
(bench/scale_e2e.worker_note): unit tests, no services."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.scale_e2e import worker_note
from bench.serve import runq_seconds
from serving.timing import BatchTimes, parse_stats, summarise


def test_runq_seconds_reads_every_thread_or_the_main_one_and_zero_when_gone() -> None:
    pid = os.getpid()
    first, main = runq_seconds(pid), runq_seconds(pid, main_thread=True)
    assert first >= main >= 0.0
    assert runq_seconds(pid) >= first  # a counter: never goes back
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    assert runq_seconds(int(done.stdout)) == 0.0  # the process is gone


def test_worker_note_names_where_the_blocked_time_was() -> None:
    b = BatchTimes(requests=8, queued=0.004, decode=0.001, store=0.010, answer=0.003,
                   send=0.001, cpu=0.003, runq=0.002, store_idle=0.008)
    windows = [parse_stats(summarise(10.0, [b] * 10, []))]
    text, stats = worker_note(windows)
    assert stats["blocked_p99_ms"] == pytest.approx(10.0)
    assert stats["blocked_store_p99_ms"] == pytest.approx(8.0)
    assert stats["blocked_other_p99_ms"] == pytest.approx(2.0)
    assert "in the store reads 8.0, elsewhere 2.0" in text
