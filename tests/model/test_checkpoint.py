"""Checkpoints: round trip (identical scores and identical continued training), atomic files,
retention, and corrupt / truncated files refused with CheckpointError."""

from __future__ import annotations

import json
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
    codec,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from model.checkpoint import (
    checkpoint_files,
    install_pending,
    pending_path,
    prune_checkpoints,
    remove_stale_pending,
    write_pending,
)
from model.codec import dumps_json

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
    assert os.listdir(tmp_path) == []  # the temp file is gone too


# --- the header codec (orjson for long lists) and the split write ---------------------------


def _json_text(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    "obj",
    [
        {"ids": [f"u{j}" for j in range(500)], "n": 3},
        {"vocab": [(f"k{j}", j) for j in range(500)]},  # tuples: arrays, as json writes them
        {"rng": np.random.default_rng(1).bit_generator.state},  # 128-bit ints
        {"long": [2**70] + list(range(200))},  # a big int inside a long list
        {"nan": [float("nan"), float("inf"), -float("inf")] * 40, "x": float("nan")},
        {"p": [{"age": float("inf")}] + [{"a": j} for j in range(300)]},  # profile with inf
        {"none": [None] * 100, "s": ["null"] * 100},  # legit nulls / a "null" string
        {"keys": [{1: "int key"}] * 100, "short": {2: 3}},  # non-str keys: json stringifies
        {"np": [np.float64(0.1)] * 100},  # float subclass orjson refuses
        {"unicode": ["ünïcode \u2028 \ud7ff"] * 100, "e": [1e16, -0.0, 5e-324] * 50},
        [[], {}, "", 0, [[1, 2]] * 70],
    ],
)
def test_dumps_json_reads_back_as_json_dumps(obj: object) -> None:
    want = json.loads(_json_text(obj))
    got = json.loads(dumps_json(obj))
    assert repr(got) == repr(want)  # repr: NaN != NaN, and int vs float must not slip


def test_a_checkpoint_with_a_json_dumps_header_still_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files written before dumps_json (header by json.dumps) read back identically."""
    fm = _model()
    monkeypatch.setattr(codec, "dumps_json", _json_text)
    old = save_checkpoint(tmp_path / "old", fm, {"k": 1})
    monkeypatch.undo()
    new = save_checkpoint(tmp_path / "new", fm, {"k": 1})
    a, meta_a = load_checkpoint(old)
    b, meta_b = load_checkpoint(new)
    assert meta_a == meta_b == {"k": 1}
    assert np.array_equal(_probe(a), _probe(b)) and np.array_equal(_probe(a), _probe(fm))
    assert a.state()[0] == b.state()[0]


def test_split_write_then_install_and_stale_temps(tmp_path: Path) -> None:
    fm = _model()
    save_checkpoint(tmp_path, fm, {"n": 1})
    pending = pending_path(tmp_path)
    assert pending.name.startswith(".ckpt-") and pending.name.endswith(".tmp")
    write_pending(pending, fm, {"n": 2})
    assert latest_checkpoint(tmp_path)[1] == {"n": 1}  # a written temp is not a checkpoint
    final = install_pending(pending, keep=3)
    assert final.name == "ckpt-000000000002.fmck" and not pending.exists()
    assert latest_checkpoint(tmp_path)[1] == {"n": 2}
    # temps of writers killed mid-write (this version's name and the previous one's)
    (tmp_path / ".ckpt-pending.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".ckpt-000000000003.fmck.x1y2.tmp").write_bytes(b"half")
    assert remove_stale_pending(tmp_path) == 2
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000000001.fmck", "ckpt-000000000002.fmck"]
    assert remove_stale_pending(tmp_path / "missing") == 0


def test_a_failed_pending_write_leaves_nothing(tmp_path: Path) -> None:
    pending = pending_path(tmp_path)
    with pytest.raises(CheckpointError, match="JSON"):
        write_pending(pending, OnlineFM(config=TrainConfig(dim=2)), {"x": object()})
    assert os.listdir(tmp_path) == []
    pending = pending_path(tmp_path / "sub")
    pending.unlink()
    pending.parent.rmdir()  # the folder vanished: the write fails with an OSError
    with pytest.raises(CheckpointError, match="cannot write"):
        write_pending(pending, OnlineFM(config=TrainConfig(dim=2)), {})
    with pytest.raises(CheckpointError, match="cannot install"):
        install_pending(tmp_path / ".ckpt-pending.gone.tmp")
    assert os.listdir(tmp_path) == []


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    fm = OnlineFM(config=TrainConfig(dim=2))
    for j in range(4):
        install_pending(_pending_with(tmp_path, fm, j), keep=None)  # nothing deleted
    assert len(checkpoint_files(tmp_path)) == 4
    assert prune_checkpoints(tmp_path, keep=1) == 3
    assert latest_checkpoint(tmp_path)[1] == {"n": 3}
    with pytest.raises(CheckpointError, match="keep"):
        prune_checkpoints(tmp_path, keep=0)


def _pending_with(folder: Path, fm: OnlineFM, n: int) -> Path:
    pending = pending_path(folder)
    write_pending(pending, fm, {"n": n})
    return pending
