"""The trainer process's collector thresholds (train/runtime.py)."""

from __future__ import annotations

import gc

import pytest

from train.errors import TrainConfigError
from train.runtime import GC_THRESHOLDS, relax_gc


def test_relax_gc_sets_and_returns_the_previous_thresholds() -> None:
    before = gc.get_threshold()
    try:
        assert relax_gc() == before
        assert gc.get_threshold() == GC_THRESHOLDS
        assert relax_gc((1000, 5, 5)) == GC_THRESHOLDS
        assert gc.get_threshold() == (1000, 5, 5)
    finally:
        gc.set_threshold(*before)


@pytest.mark.parametrize("bad", [(0, 10, 10), (700, 10), (700, -1, 10)])
def test_relax_gc_refuses_thresholds_that_would_turn_collection_off(bad) -> None:
    before = gc.get_threshold()
    with pytest.raises(TrainConfigError,
                       match=r"three thresholds >= 1 expected, got .*: pass GC_THRESHOLDS") as exc:
        relax_gc(bad)
    assert isinstance(exc.value, ValueError)
    assert gc.get_threshold() == before
