"""How long a checkpoint stops the trainer thread, written in it vs by a forked child (issue 10).

One process, no Kafka/Redis: a model like the 1M-user e2e's (``segment`` user profiles,
``category`` items, dim 32) is trained on ``--events`` events, then for each mode ``--reps``
checkpoints are taken while this thread keeps training in steps (``learn_many`` of 2,048 events,
like the trainer between checkpoints):

- ``inline, json``: ``model.checkpoint.save_checkpoint`` in this thread with the header written by
  ``json.dumps`` (the trainer before this change; this thread and, through the GIL, the publisher
  thread stop for all of it);
- ``inline``: the same with ``model.codec.dumps_json`` (orjson for the long lists): the final
  checkpoint, and every one with ``FMSTREAM_CHECKPOINT_BACKGROUND=false``;
- ``fork``: ``train.checkpointer.BackgroundCheckpoint.start`` (the fork) in this thread, then
  training on while the child writes, reaping it with ``poll()`` between steps and installing the
  file (``install_pending``) as the trainer does.

Reported per checkpoint: this thread's wall and CPU in checkpoint calls (the stall), the child's
wall and CPU (``wait4``), and the CPU per training step while a child was in flight vs without
one (the copy-on-write page faults the parent pays). Also the JSON header alone: ``json.dumps``
vs ``model.codec.dumps_json`` (orjson for the long lists), which must read back equal.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, record, summary_line  # noqa: E402
from bench.scale import synthetic_shop  # noqa: E402


def _model(n_users: int, n_items: int, events: int):
    from model import FeatureSchema
    from model.online import OnlineFM, TrainConfig

    schema = {"user": {"segment": {}}, "item": {"category": {}}, "context": {"hour": {}}}
    model = OnlineFM(FeatureSchema.from_dict(schema), TrainConfig(dim=32, seed=0))
    synthetic_shop(model, n_users, n_items)
    rng = np.random.default_rng(0)
    done = 0
    while done < events:
        b = min(50_000, events - done)
        model.learn_many([f"u{j}" for j in rng.integers(0, n_users, b)],
                         [f"i{j}" for j in rng.integers(0, n_items, b)])
        done += b
    return model, rng


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--events", type=int, default=1_000_000, help="trained before measuring")
    p.add_argument("--reps", type=int, default=3, help="checkpoints per mode")
    p.add_argument("--dir", type=Path, default=None, help="checkpoint folder (default: a temp)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)

    from model.checkpoint import install_pending, save_checkpoint
    from model.codec import dumps_json
    from train.checkpointer import BackgroundCheckpoint

    t_build = time.perf_counter()
    model, rng = _model(args.users, args.items, args.events)
    build_s = time.perf_counter() - t_build
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    users = [f"u{j}" for j in range(args.users)]
    items = [f"i{j}" for j in range(args.items)]

    def train_step() -> float:
        c0 = time.thread_time()
        us = rng.integers(0, args.users, 2048)
        it = rng.integers(0, args.items, 2048)
        model.learn_many([users[j] for j in us], [items[j] for j in it])
        return time.thread_time() - c0

    meta = {"positions": {"fm.events|0": 1}, "events_applied": args.events}
    tmp = tempfile.TemporaryDirectory(prefix="fmstream-ckpt-stall-")
    folder = args.dir or Path(tmp.name)
    rows = []
    out: dict[str, float] = {}

    # header only
    header, _ = model.state()
    c0 = time.thread_time()
    slow = json.dumps(header, separators=(",", ":")).encode()
    json_s = time.thread_time() - c0
    c0 = time.thread_time()
    fast = dumps_json(header)
    fast_s = time.thread_time() - c0
    assert json.loads(fast) == json.loads(slow), "dumps_json does not read back as json.dumps"
    out.update(header_json_cpu_s=json_s, header_fast_cpu_s=fast_s, header_mb=len(slow) / 1e6)

    # inline: the trainer thread writes (header by json.dumps as before, then by dumps_json)
    import model.codec as codec

    fast_dumps = codec.dumps_json
    for key, label, dumps in (
        ("inline_json", "inline, json.dumps header (before)",
         lambda h: json.dumps(h, separators=(",", ":")).encode()),
        ("inline", "inline, dumps_json header (final checkpoint)", fast_dumps),
    ):
        codec.dumps_json = dumps
        walls, cpus = [], []
        try:
            for _ in range(args.reps):
                for _ in range(3):
                    train_step()
                t0, c0 = time.perf_counter(), time.thread_time()
                path = save_checkpoint(folder, model, meta)
                walls.append(time.perf_counter() - t0)
                cpus.append(time.thread_time() - c0)
        finally:
            codec.dumps_json = fast_dumps
        rows.append([label, f"{statistics.median(walls) * 1e3:.0f} ms",
                     f"{statistics.median(cpus) * 1e3:.0f} ms", "-", "-", "-"])
        out[f"{key}_stall_wall_ms"] = statistics.median(walls) * 1e3
        out[f"{key}_stall_cpu_ms"] = statistics.median(cpus) * 1e3
    size_mb = path.stat().st_size / 1e6

    # fork: the trainer thread forks, trains on, reaps and installs
    bg = BackgroundCheckpoint(folder, keep=3)  # as the trainer: the writer prunes
    quiet = [train_step() for _ in range(10)]
    stalls, stall_cpu, child_wall, child_cpu, during, installs, install_cpu = ([] for _ in range(7))
    for _ in range(args.reps):
        t0, c0 = time.perf_counter(), time.thread_time()
        bg.start(model, lambda: meta)
        stalls.append(time.perf_counter() - t0)
        stall_cpu.append(time.thread_time() - c0)
        done = None
        while done is None:
            during.append(train_step())
            t0, c0 = time.perf_counter(), time.thread_time()
            done = bg.poll()
            if done is not None:
                assert done.ok, done
                install_pending(done.pending, keep=None)
                installs.append(time.perf_counter() - t0)
                install_cpu.append(time.thread_time() - c0)
        child_wall.append(done.wall_s)
        child_cpu.append(done.cpu_s)
    rows.append(["fork (BackgroundCheckpoint)",
                 f"{statistics.median(stalls) * 1e3:.1f} ms",
                 f"{statistics.median(stall_cpu) * 1e3:.1f} ms",
                 f"{statistics.median(installs) * 1e3:.1f} ms wall, "
                 f"{statistics.median(install_cpu) * 1e3:.1f} ms CPU",
                 f"{statistics.median(child_wall):.2f} s / {statistics.median(child_cpu):.2f} s",
                 f"{statistics.median(during) * 1e3:.1f} vs "
                 f"{statistics.median(quiet) * 1e3:.1f} ms"])
    out.update(fork_stall_wall_ms=statistics.median(stalls) * 1e3,
               fork_stall_cpu_ms=statistics.median(stall_cpu) * 1e3,
               fork_install_wall_ms=statistics.median(installs) * 1e3,
               fork_install_cpu_ms=statistics.median(install_cpu) * 1e3,
               child_wall_s=statistics.median(child_wall), child_cpu_s=statistics.median(child_cpu),
               step_cpu_ms_child_running=statistics.median(during) * 1e3,
               step_cpu_ms_no_child=statistics.median(quiet) * 1e3,
               steps_while_child_ran=len(during) / args.reps,
               file_mb=size_mb, rss_mb=rss_mb, build_s=build_s,
               loadavg="/".join(f"{x:.1f}" for x in os.getloadavg()))
    columns = ["mode", "trainer thread stall: wall", "stall: CPU", "install (reap, rename, prune)",
               "writer wall / CPU", "CPU per 2,048-event step: during / without"]
    print_table(f"checkpoint stall at {args.users:,} users x {args.items:,} items", columns, rows)
    notes = (f"Header JSON alone ({out['header_mb']:.1f} MB): json.dumps {json_s:.2f} s CPU, "
             f"dumps_json {fast_s:.2f} s. Checkpoint file {size_mb:.0f} MB; process max RSS "
             f"{rss_mb:.0f} MB; load average {out['loadavg']} at the end. Medians of "
             f"{args.reps} checkpoints per mode; the model trained on {args.events:,} events "
             f"first ({build_s:.0f} s).")
    print(notes)
    summary = summary_line(**out)
    print(summary)
    if not args.no_record:
        record("checkpoint stall (bench/checkpoint_stall.py)", columns, rows, summary, notes)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
