"""Shared fixtures of the model tests: one torch thread, small schemas."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `pytest` without `python -m` or an installed package
    sys.path.insert(0, str(ROOT))

from model import FeatureSchema  # noqa: E402

torch.set_num_threads(1)  # tests and benches run one intra-op thread (see PERF-NOTES)


@pytest.fixture
def rich_schema() -> FeatureSchema:
    """Every kind of field on every side, incl. hashing, admission and a multi-valued field."""
    return FeatureSchema.from_dict(
        {
            "user": {
                "gender": {},
                "age": {"kind": "numeric", "boundaries": [18, 25, 35, 45]},
                "zip": {"hash_buckets": 7},
                "tags": {"kind": "multi", "min_count": 2},
            },
            "item": {
                "genres": {"kind": "multi"},
                "year": {"kind": "numeric", "boundaries": [1980, 1990, 2000]},
                "brand": {"min_count": 3},
                "labels": {"kind": "multi", "hash_buckets": 5},
            },
            "context": {"hour": {}, "device": {"hash_buckets": 3}},
        }
    )


@pytest.fixture
def config_dir() -> Path:
    return ROOT / "config"
