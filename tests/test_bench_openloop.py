"""The e2e bench's open-loop request arrivals (bench/openloop.py) and its per-phase load figures
(bench/scale_e2e.phase_load): unit tests, no services."""

from __future__ import annotations

import numpy as np
import pytest

from bench.freshness import Sample, latency_ms
from bench.openloop import PoissonArrivals
from bench.scale_e2e import load_model, load_row, phase_load


def test_arrivals_are_a_seeded_poisson_process_inside_the_phase() -> None:
    a = PoissonArrivals(200.0, 500.0, 1000.0, np.random.default_rng(7))
    again = PoissonArrivals(200.0, 500.0, 1000.0, np.random.default_rng(7))
    other = PoissonArrivals(200.0, 500.0, 1000.0, np.random.default_rng(8))
    np.testing.assert_array_equal(a.times, again.times)
    assert len(a) != len(other) or not np.array_equal(a.times, other.times)
    assert a.times[0] >= 1000.0 and a.times[-1] < 1500.0
    assert np.all(np.diff(a.times) >= 0)
    # 100,000 expected: within 5 standard deviations (sqrt(100,000) = 316)
    assert abs(len(a) - 100_000) < 5 * 316
    assert a.offered_rate == pytest.approx(len(a) / 500.0)
    gaps = np.diff(a.times)
    assert gaps.mean() == pytest.approx(1 / 200.0, rel=0.02)
    # exponential gaps: standard deviation = mean (evenly spaced sends would have 0)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.03)


def test_a_long_phase_at_a_high_rate_still_fills_the_whole_phase() -> None:
    a = PoissonArrivals(5.0, 0.01, 0.0, np.random.default_rng(0))  # often no arrival at all
    assert all(0.0 <= t < 0.01 for t in a.times)
    b = PoissonArrivals(1000.0, 30.0, 0.0, np.random.default_rng(1))
    assert b.times[-1] > 29.9


def test_due_hands_each_arrival_out_once_and_a_late_caller_gets_all_it_missed() -> None:
    a = PoissonArrivals(100.0, 10.0, 0.0, np.random.default_rng(3))
    t = a.times
    assert a.due(t[0] - 1e-9).size == 0
    assert a.wait_s(t[0] - 0.001) == pytest.approx(0.001)
    np.testing.assert_array_equal(a.due(t[0]), t[:1])
    assert a.due(t[0]).size == 0  # not again
    np.testing.assert_array_equal(a.due(t[10]), t[1:11])  # behind by 10: all 10 at once
    assert a.wait_s(t[11] + 5) == 0.0  # overdue
    np.testing.assert_array_equal(a.due(100.0), t[11:])
    assert a.wait_s(100.0) == float("inf")


def test_latency_runs_from_the_scheduled_time_when_the_client_falls_behind() -> None:
    """A client stalled 100 ms (a pause of its own, or of the box) sends the arrivals it missed
    at once: their latency includes the stall. A closed loop, or an open loop timing from the
    actual send, would report only the answer time and hide it (coordinated omission)."""
    a = PoissonArrivals(200.0, 1.0, 0.0, np.random.default_rng(5))
    clock = [0.0]
    sent: list[float] = []

    def send() -> str:
        clock[0] += 0.0001  # each send takes 0.1 ms
        sent.append(clock[0])
        return f"r{len(sent)}"

    stall_end = float(a.times[0]) + 0.1
    clock[0] = stall_end
    pairs = a.send_due(stall_end, send, lambda: clock[0])
    missed = a.times[a.times <= stall_end]
    assert len(pairs) == missed.size > 1
    assert [k for k, _ in pairs] == [f"r{i + 1}" for i in range(missed.size)]
    np.testing.assert_array_equal([s for _, s in pairs], missed)  # keyed to the schedule
    assert a.lags[0] == pytest.approx(0.1 + 0.0001)
    assert a.lags == pytest.approx(list(np.array(sent) - missed))
    # the server answers each 5 ms after it was actually sent
    samples = [Sample(sched, actual + 0.005, 1, None)
               for (_, sched), actual in zip(pairs, sent, strict=True)]
    lat = latency_ms(samples)
    np.testing.assert_allclose(lat, (np.array(sent) + 0.005 - missed) * 1000)
    assert lat[0] > 100.0  # the stall is counted, not just the 5-ms answer


@pytest.mark.parametrize("rate, seconds", [(0.0, 1.0), (-5.0, 1.0), (float("nan"), 1.0),
                                           (10.0, -1.0)])
def test_a_rate_or_phase_that_makes_no_sense_is_refused(rate: float, seconds: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        PoissonArrivals(rate, seconds, 0.0, np.random.default_rng(0))


def test_phase_load_counts_answers_failures_lateness_and_cpu_per_answer() -> None:
    a = PoissonArrivals(4.0, 1.0, 0.0, np.random.default_rng(0))
    a.lags = [0.001, 0.002, 0.010]
    samples = [
        Sample(0.0, 0.010, 3, None, 0.005),
        Sample(0.1, 0.130, 3, None, 0.105),
        Sample(0.2, 0.205, 3, "unknown_user"),  # answered with an error: answered, failed
        Sample(0.3, float("nan"), None, "no answer"),
    ]
    load = phase_load(samples, 2.0, a, {"worker": 0.006, "client": 0.003, "broker": 0.0})
    assert load["answered_rps"] == 1.5
    assert load["failed"] == 2 and load["no_answer"] == 1
    assert load["p50_ms"] == pytest.approx(20.0)
    assert load["offered_rps"] == pytest.approx(len(a) / 1.0)
    assert load["late_p99_ms"] == pytest.approx(9.84)
    assert load["p99_from_send_ms"] == pytest.approx(24.8)  # 5 and 25 ms from the send
    assert load["cpu_ms"] == pytest.approx({"worker": 2.0, "client": 1.0, "broker": 0.0})
    row = load_row(load_model(4.0, 8), load)
    assert "open loop, Poisson 4 req/s" in row[0]
    assert "2 failed (1 no answer)" in row[-1] and "sent late p99 9.84 ms" in row[-1]
    assert "p99 from the actual send 24.8 ms" in row[-1]
    closed = phase_load([Sample(s.sent, s.answered, s.version, s.error) for s in samples], 2.0,
                        None, {"worker": 0.0})
    assert closed["offered_rps"] is None and closed["late_p99_ms"] is None
    assert closed["p99_from_send_ms"] is None
    assert load_row(load_model(None, 8), closed)[0] == "  load: closed loop, 8 in flight"
