"""Process-wide settings of the trainer process (and its fetch process).

Python's cyclic garbage collector runs a young-generation pass every 700 net allocations and a
full pass over every tracked object now and then. A trainer allocates a few tens of objects per
event (decoded ids, contexts, batches) that reference counting frees, so those passes find
nothing, yet they cost ~1.8 us of CPU per event on the GIL the trainer shares with the publisher
thread, 1.4 of them in full passes over the model's growing heap (bench/ingest.py, 200k events;
two full passes of ~140 ms each). :func:`relax_gc` makes them rarer; garbage with reference
cycles is still collected, later.
"""

from __future__ import annotations

import gc

from train.errors import TrainConfigError

GC_THRESHOLDS = (50_000, 20, 100)
"""Young pass every 50,000 net allocations (was 700), middle every 20 young passes (10), full
every 100 middle ones (10), and never before the heap grew by 25% since the last full pass
(CPython's own rule): at ~1M allocations/s, a full pass at most every ~100 s."""


def relax_gc(thresholds: tuple[int, int, int] = GC_THRESHOLDS) -> tuple[int, int, int]:
    """Set the collector's thresholds for this process; returns the previous ones."""
    if len(thresholds) != 3 or min(thresholds) < 1:
        raise TrainConfigError(f"relax_gc: three thresholds >= 1 expected, got {thresholds!r} "
                               "(a 0 turns collection off: pass GC_THRESHOLDS or omit them)")
    previous = gc.get_threshold()
    gc.set_threshold(*thresholds)
    return previous  # type: ignore[return-value]
