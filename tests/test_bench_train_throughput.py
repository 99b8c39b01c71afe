"""bench/train_throughput.py --also: extra rows are validated before anything runs."""

from __future__ import annotations

import argparse

import pytest

from bench.train_throughput import extra_fields


def test_also_takes_train_config_and_policy_fields() -> None:
    got = extra_fields('{"neg_updates": 128, "neg_update_by": "mass", "step_events": 256}')
    assert got == {"neg_updates": 128, "neg_update_by": "mass", "step_events": 256}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"neg_update": 1}', "not TrainConfig/LearnPolicy fields"),
        ("[1, 2]", "JSON object"),
        ('{"lr": ', "JSON object"),
    ],
)
def test_also_refuses_what_it_cannot_run(text: str, match: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=match):
        extra_fields(text)
