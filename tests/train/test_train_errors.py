"""Every error ``train`` raises is under one base (``TrainError``), and the types that replaced
plain ``ValueError`` / ``RuntimeError`` still are those, so existing callers catch them."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.config import KafkaConfig
from train.config import TrainerConfig
from train.errors import CheckpointBusy, TrainConfigError, TrainError
from train.fetch import FetchFailed
from train.lease import LeaseLost
from train.publish_thread import PublisherFailed


@pytest.mark.parametrize(("error", "builtin"), [
    (TrainConfigError, ValueError),
    (CheckpointBusy, RuntimeError),
    (LeaseLost, RuntimeError),
    (PublisherFailed, RuntimeError),
    (FetchFailed, RuntimeError),
])
def test_each_error_is_a_train_error_and_what_it_replaced(
    error: type[Exception], builtin: type[Exception]
) -> None:
    assert issubclass(error, TrainError) and issubclass(error, builtin)


@pytest.mark.parametrize("depth", [0, -1])
def test_a_fetch_depth_below_one_names_the_setting(tmp_path: Path, depth: int) -> None:
    with pytest.raises(TrainConfigError, match=rf"fetch_depth: .* >= 1, got {depth}: set "
                                               "FMSTREAM_TRAINER_FETCH_DEPTH"):
        TrainerConfig(kafka=KafkaConfig(bootstrap="localhost:1"), checkpoint_dir=tmp_path,
                      fetch_depth=depth)
