"""Checkpoints: round trip (identical scores and identical continued training), atomic files,
retention, and corrupt / truncated files refused with CheckpointError."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from model import (
    CheckpointError,
    FeatureSchema,
    OnlineFM,
    TrainConfig,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from model.checkpoint import checkpoint_files

SCHEMA = FeatureSchema.from_dict(
    {
        "user": {
            "user_id": {"min_count": 2, "expire_after_s": 500.0},
            "gender": {},
            "zip": {"hash_buckets": 5},
            "recent": {"kind": "history", "history_len": 4},
        },
        "item": {"genres": {"kind": "multi"}, "year": {"kind": "numeric", "boundaries": [1990]}},
        "context": {"hour": {}},
    }
)


def _events(seed: int, n: int = 600, t0: float = 0.0):
    rng = np.random.default_rng(seed)
    u = [f"u{x}" for x in rng.integers(0, 40, n)]
    i = [f"i{x}" for x in rng.zipf(1.5, n) % 60]
    ctx = [{"hour": str(h)} for h in rng.integers(0, 24, n)]
    labels = (rng.random(n) < 0.9).astype(np.float32)
    ts = t0 + np.arange(n, dtype=float)
    return u, i, ctx, labels, ts


def _train(fm: OnlineFM, seed: int, t0: float = 0.0) -> list[float]:
    u, i, ctx, y, ts = _events(seed, t0=t0)
    return [
        fm.learn_many(u[s : s + 64], i[s : s + 64], y[s : s + 64], ctx[s : s + 64], ts[s : s + 64])
        for s in range(0, len(u), 64)
    ]


def _model() -> OnlineFM:
    fm = OnlineFM(SCHEMA, TrainConfig(dim=6, seed=3))
    fm.upsert_users(
        [f"u{j}" for j in range(30)], [{"gender": "MF"[j % 2], "zip": f"9{j}"} for j in range(30)]
    )
    fm.upsert_items(
        [f"i{j}" for j in range(50)],
        [{"genres": ["a", "b", "c"][: 1 + j % 3], "year": 1980 + j} for j in range(50)],
    )
    _train(fm, seed=1)
    return fm


def _probe(fm: OnlineFM) -> np.ndarray:
    users = ["u1", "u7", "u35", "nobody"]
    items = ["i1", "i2", "i55", "nothing"]
    pu = [u for u in users for _ in items]
    pi = items * len(users)
    ctx = [{"hour": str(j % 30)} for j in range(len(pu))]
    return np.concatenate(
        [fm.score(pu, pi, ctx), fm.user_vectors(users).ravel(), fm.item_vectors()[1].ravel()]
    )


def test_round_trip_identical_scores_and_training(tmp_path: Path) -> None:
    fm = _model()
    meta = {"offsets": {"fm.events": {"0": 1234, "1": 99}}, "note": "ünïcode"}
    path = save_checkpoint(tmp_path, fm, meta)
    assert path.name == "ckpt-000000000001.fmck"
    back, meta2 = load_checkpoint(path)
    assert meta2 == meta
    assert np.array_equal(_probe(back), _probe(fm))
    assert back.bias == fm.bias and back.n_updates == fm.n_updates
    assert back.known_users() == fm.known_users() and back.known_items() == fm.known_items()
    assert back.item_counts()[1].tolist() == fm.item_counts()[1].tolist()
    assert back.user_profile("u3") == fm.user_profile("u3")
    assert back.user_history("u3") == fm.user_history("u3") and fm.user_history("u3")["recent"]
    assert back.stats() | {"rows_capacity": 0, "array_bytes": 0} == fm.stats() | {
        "rows_capacity": 0,
        "array_bytes": 0,
    }
    # continued training is identical (RNGs, sampler, optimiser state, admission counts)
    l1 = _train(fm, seed=2, t0=700.0)
    l2 = _train(back, seed=2, t0=700.0)
    assert l1 == l2
    assert np.array_equal(_probe(back), _probe(fm))
    ct1, ct2 = fm.context_table(), back.context_table()
    assert np.array_equal(ct1.v, ct2.v) and ct1.vocabs == ct2.vocabs


def test_sequence_names_and_retention(tmp_path: Path) -> None:
    fm = OnlineFM(config=TrainConfig(dim=2))
    paths = [save_checkpoint(tmp_path, fm, {"n": j}, keep=3) for j in range(5)]
    assert [p.name for p in paths] == [f"ckpt-{j:012d}.fmck" for j in range(1, 6)]
    assert checkpoint_files(tmp_path) == paths[-3:]
    assert sorted(os.listdir(tmp_path)) == [p.name for p in paths[-3:]]  # no temp files left
    got = latest_checkpoint(tmp_path)
    assert got is not None and got[1] == {"n": 4}


def test_corrupt_and_truncated_are_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _model(), {"k": 1})
    blob = path.read_bytes()
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x01
    cases = {
        "checksum": bytes(flipped),
        "truncated": blob[: len(blob) - 100],
        "shorter than": blob[:10],
        "bad magic": b"NOTACKPT" + blob[8:],
        "trailing": blob + b"junk",
    }
    for needle, data in cases.items():
        bad = tmp_path / "bad.fmck"
        bad.write_bytes(data)
        with pytest.raises(CheckpointError, match=needle) as info:
            load_checkpoint(bad)
        assert str(bad) in str(info.value)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "missing.fmck")


def test_latest_skips_corrupt_ones(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fm = OnlineFM(config=TrainConfig(dim=2))
    save_checkpoint(tmp_path, fm, {"n": 1})
    newest = save_checkpoint(tmp_path, fm, {"n": 2})
    newest.write_bytes(newest.read_bytes()[:-7])  # torn / truncated by a crash or disk
    with caplog.at_level(logging.WARNING, logger="model.checkpoint"):
        got = latest_checkpoint(tmp_path)
    assert got is not None and got[1] == {"n": 1}
    assert "skipping unusable checkpoint" in caplog.text
    newest.unlink()
    for p in checkpoint_files(tmp_path):
        p.write_bytes(b"garbage")
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "does-not-exist") is None


def test_metadata_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path, OnlineFM(config=TrainConfig(dim=2)), {"x": object()})
    assert checkpoint_files(tmp_path) == []
