"""The hyper-parameter range checks of TrainConfig and LearnPolicy (model/checks.py)."""

from __future__ import annotations

import pytest

from model import ConfigError, TrainConfig
from model.learner import LearnPolicy

BAD_TRAIN = [
    ("dim", 0, "an integer >= 1"),
    ("dim", 2.0, "an integer >= 1"),
    ("dim", True, "an integer >= 1"),
    ("lr", 0, "a finite number > 0"),
    ("lr", float("inf"), "a finite number > 0"),
    ("lr", True, "a finite number > 0"),  # a bool is not a learning rate
    ("l2", -1e-9, "a finite number >= 0"),
    ("l2", "0.1", "a finite number >= 0"),
    ("loss", "mse", "'logistic', 'bpr', 'hinge' or 'softmax'"),
    ("negatives", -1, "an integer >= 0"),
    ("neg_sampling", "hard", "'uniform' or 'popularity'"),
    ("neg_alpha", float("nan"), "a finite number >= 0"),
    ("neg_alpha", False, "a finite number >= 0"),
    ("seed", -1, "an integer >= 0"),
    ("init_std", -0.1, "a finite number >= 0"),
    ("hinge_margin", 0.0, "a finite number > 0"),
    ("neg_pool", 1.5, "an integer >= 0"),
    ("step_scaling", "sqrt", "'none' or 'count'"),
    ("acc_decay", 0.0, "a number in (0, 1]"),
    ("acc_decay", 1.01, "a number in (0, 1]"),
    ("recent_items", -3, "an integer >= 0"),
    ("neg_candidates", 0, "an integer >= 1"),
    ("user_acc_decay", 0.0, "None or a number in (0, 1]"),
    ("user_acc_decay", True, "None or a number in (0, 1]"),
    ("neg_updates", -1, "an integer >= 0"),
    ("neg_update_by", "random", "'uniform' or 'mass'"),
]


@pytest.mark.parametrize(("name", "value", "rule"), BAD_TRAIN)
def test_train_config_names_the_field_the_rule_and_the_value(name, value, rule) -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig(**{name: value})
    assert str(err.value) == f"TrainConfig.{name} must be {rule}, got {value!r}"


@pytest.mark.parametrize(("name", "value", "rule"), [
    ("step_events", 0, "an integer >= 1"),
    ("replay", -0.5, "a finite number >= 0"),
    ("replay", True, "a finite number >= 0"),
    ("replay_buffer", 0, "an integer >= 1"),
    ("seed", "1", "an integer >= 0"),
    ("bootstrap_passes", -1, "an integer >= 0"),
])
def test_learn_policy_names_the_field_the_rule_and_the_value(name, value, rule) -> None:
    with pytest.raises(ConfigError) as err:
        LearnPolicy(**{name: value})
    assert str(err.value) == f"LearnPolicy.{name} must be {rule}, got {value!r}"


def test_rules_across_fields() -> None:
    with pytest.raises(ConfigError, match=r"negatives must be >= 1 for the loss 'bpr', got 0"):
        TrainConfig(loss="bpr", negatives=0)
    with pytest.raises(ConfigError, match=r"neg_updates applies to loss 'softmax' only"):
        TrainConfig(loss="logistic", neg_updates=4)
    # the edges of every range are accepted
    TrainConfig(l2=0.0, negatives=0, loss="logistic", neg_alpha=0, seed=0, init_std=0,
                neg_pool=0, acc_decay=1.0, user_acc_decay=None, recent_items=0)
    LearnPolicy(step_events=1, replay=0, replay_buffer=1, seed=0, bootstrap_passes=0)
