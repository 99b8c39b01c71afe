"""The live hit rate's CPU share (train.loop.CpuShare): a pure rule, no I/O."""

from __future__ import annotations

import pytest

from train.errors import TrainConfigError
from train.loop import CpuShare


def test_the_first_poll_is_sampled_and_the_share_is_kept_after() -> None:
    budget = CpuShare(0.05)
    assert budget.due(0.0, 0.0)  # nothing spent yet: the metric starts at once
    live = train = 0.0
    for _ in range(1000):  # each sampled poll costs 1 ms of metric, each poll 10 ms of training
        if budget.due(live, train):
            live += 0.001
        train += 0.010
    assert budget.admitted + budget.skipped == 1001
    assert 0 < budget.skipped < 1000
    assert live <= 0.05 * (live + train) + 0.001  # within the share (one poll's overshoot)
    assert live >= 0.05 * (live + train) - 0.002  # and it keeps sampling up to it


def test_share_one_samples_every_poll() -> None:
    budget = CpuShare(1.0)
    assert all(budget.due(float(k), 0.0) for k in range(100))
    assert budget.skipped == 0


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5, float("nan")])
def test_a_share_outside_0_1_is_refused_with_its_value(share: float) -> None:
    with pytest.raises(TrainConfigError, match=r"CPU share must be in \(0, 1\], got "
                       rf"{share!r}: set FMSTREAM_LIVE_CPU_SHARE") as exc:
        CpuShare(share)
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_fmstream_live_cpu_share_out_of_range_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    from pydantic import ValidationError

    from fmstream.settings import Settings

    monkeypatch.setenv("FMSTREAM_LIVE_CPU_SHARE", value)
    with pytest.raises(ValidationError, match="live_cpu_share"):
        Settings()
    monkeypatch.setenv("FMSTREAM_LIVE_CPU_SHARE", "0.2")
    assert Settings().trainer_config().live_cpu_share == 0.2
