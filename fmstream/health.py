"""Consumer-group health by Burrow's lag evaluation rules: a pure function over a window.

Burrow (LinkedIn's Kafka lag checker) judges a group without a lag threshold, from how its
committed offsets and its lag moved over a window. fmstream applies the same rules per partition
(``evaluate_partition``) and takes the worst partition as the group's status (``evaluate_group``):

1. OK      the lag was 0 at some point in the window (or is 0 now): the consumer keeps up.
2. REWIND  a committed offset went backwards (someone reset the group, or a consumer replays).
3. STOP    the group committed nothing in the window, or its last commit is older than the span
           of its commits in the window (Burrow's rule: silence longer than the cadence seen).
4. STALL   the group keeps committing, but the same offset, while there is lag (stuck consumer).
5. WARN    offsets advance but the lag never fell from one commit to the next (falling behind).
   OK      otherwise.

Input is a window of :class:`Sample` per partition: the first sample is the baseline (what the
group had committed when the window opened), then one sample per commit the group made, each
with the lag at that moment (log-end offset then minus the committed offset). Where the commits
themselves cannot be observed, :func:`window_samples` derives them from periodic readings (an
offset that changed between two readings counts as a commit); STALL then cannot be told from
STOP (a consumer re-committing the same offset looks like one that commits nothing).

Nothing here does I/O; the samplers live in :mod:`fmstream.monitor` and :mod:`stream.lag`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum


class Status(IntEnum):
    """Health of a partition or group; a larger value is worse (Burrow's order)."""

    OK = 0
    WARN = 1
    STOP = 2
    STALL = 3
    REWIND = 4


@dataclass(frozen=True)
class Sample:
    """One entry of a partition's window.

    Attributes:
        ts: epoch seconds (of the commit, or of the reading).
        offset: the committed offset; None while the group never committed on the partition.
        lag: messages behind at ``ts`` (log-end offset minus ``offset``; never negative).
        commit: True when the group committed ``offset`` at ``ts``; False for the baseline
            reading (what was committed before the window) and other plain readings.
    """

    ts: float
    offset: int | None
    lag: int
    commit: bool = True


@dataclass(frozen=True)
class Reading:
    """What the broker said about one partition at ``ts`` (OffsetFetch + ListOffsets)."""

    ts: float
    committed: int | None
    log_end: int
    log_start: int = 0

    @property
    def lag(self) -> int:
        """Messages behind; a never-committed partition is behind by its whole retained log."""
        base = self.log_start if self.committed is None else self.committed
        return max(0, self.log_end - base)


@dataclass(frozen=True)
class Commit:
    """One offset commit of the group on a partition, as the commit log recorded it."""

    ts: float
    offset: int


@dataclass(frozen=True)
class PartitionHealth:
    """The verdict for one partition, with the numbers it was drawn from."""

    topic: str
    partition: int
    status: Status
    reason: str
    lag: int
    commits: int
    start_offset: int | None
    end_offset: int | None

    def to_json(self) -> dict:
        return {
            "topic": self.topic, "partition": self.partition, "status": self.status.name,
            "reason": self.reason, "lag": self.lag, "commits": self.commits,
            "start_offset": self.start_offset, "end_offset": self.end_offset,
        }


@dataclass(frozen=True)
class GroupHealth:
    """A group's status: its worst partition (ties broken by the larger lag)."""

    group: str
    status: Status
    partitions: list[PartitionHealth] = field(default_factory=list)

    @property
    def total_lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def worst(self) -> PartitionHealth | None:
        """The partition that decided the group's status (None without partitions)."""
        if not self.partitions:
            return None
        return max(self.partitions, key=lambda p: (p.status, p.lag))

    @property
    def reason(self) -> str | None:
        """Why the group has its status: the deciding partition and its rule."""
        worst = self.worst
        return None if worst is None else f"{worst.topic}[{worst.partition}]: {worst.reason}"

    def to_json(self) -> dict:
        return {
            "status": self.status.name,
            "total_lag": self.total_lag,
            "reason": self.reason,
            "partitions": [p.to_json() for p in self.partitions],
        }


def evaluate_partition(
    samples: Sequence[Sample], *, current_lag: int | None = None, now: float | None = None
) -> tuple[Status, str]:
    """Burrow's rules over one partition's window.

    Args:
        samples: the window in order: baseline first, then commits (and maybe plain readings).
        current_lag: the lag now (default: the last sample's).
        now: epoch seconds the window closes at (default: the last sample's ``ts``).

    Returns:
        ``(status, reason)``; the reason says which rule decided, with the numbers.
    """
    if not samples:
        return Status.OK, "no samples"
    current = samples[-1].lag if current_lag is None else current_lag
    now = samples[-1].ts if now is None else now
    # Rule 1: a consumer that was caught up at any point in the window is fine.
    if current == 0:
        return Status.OK, "caught up (lag 0)"
    if any(s.lag == 0 for s in samples):
        return Status.OK, "lag reached 0 within the window"
    # Rule 2: a committed offset went backwards.
    offsets = [s.offset for s in samples if s.offset is not None]
    for before, after in zip(offsets, offsets[1:], strict=False):
        if after < before:
            return Status.REWIND, f"committed offset went back from {before} to {after}"
    commits = [s for s in samples if s.commit]
    # Rule 3: no commit in the window, or silence longer than the span of the commits seen.
    if not commits:
        never = " (never committed)" if not offsets else ""
        span = now - samples[0].ts
        return Status.STOP, f"no commit in {span:.0f} s while {current} behind{never}"
    silence = now - commits[-1].ts
    if len(commits) >= 2 and silence > commits[-1].ts - commits[0].ts:
        return Status.STOP, (f"last commit {silence:.0f} s ago, longer than the "
                             f"{commits[-1].ts - commits[0].ts:.0f} s its commits spanned")
    # Rule 4: commits keep coming but the offset never moves (a first-ever commit is a move).
    if len(set(offsets)) == 1 and (samples[0].offset is not None or len(commits) >= 2):
        return Status.STALL, (f"{len(commits)} commit(s) of offset {offsets[0]} while "
                              f"{current} behind")
    # Rule 5: offsets move but the lag never fell from one commit to the next.
    lags = [samples[0].lag] + [s.lag for s in commits if s is not samples[0]]
    if all(b >= a for a, b in zip(lags, lags[1:], strict=False)):
        return Status.WARN, f"lag did not fall between commits ({lags[0]} -> {lags[-1]})"
    return Status.OK, f"offsets advance and lag falls ({lags[0]} -> {current})"


def window_samples(
    readings: Sequence[Reading], commits: Sequence[Commit] | None
) -> list[Sample]:
    """Turn one partition's readings (and commits, when observed) into evaluation samples.

    Args:
        readings: periodic readings in time order; the first is the baseline.
        commits: the group's commits on the partition after the baseline, in commit-log order;
            None when the commit log is not readable: a reading whose committed offset differs
            from the previous reading's then counts as a commit.

    Returns:
        The baseline followed by one sample per commit, each with the lag at its time (the
        newest reading at or before the commit gives the log-end offset).
    """
    if not readings:
        return []
    if commits is None:
        out = [Sample(readings[0].ts, readings[0].committed, readings[0].lag, commit=False)]
        for prev, cur in zip(readings, readings[1:], strict=False):
            moved = cur.committed is not None and cur.committed != prev.committed
            out.append(Sample(cur.ts, cur.committed, cur.lag, commit=moved))
        return out
    times = [r.ts for r in readings]
    out = [Sample(readings[0].ts, readings[0].committed, readings[0].lag, commit=False)]
    for c in commits:
        i = max(0, bisect.bisect_right(times, c.ts) - 1)
        out.append(Sample(c.ts, c.offset, max(0, readings[i].log_end - c.offset), commit=True))
    return out


def partition_health(
    topic: str,
    partition: int,
    readings: Sequence[Reading],
    commits: Sequence[Commit] | None,
    *,
    now: float | None = None,
) -> PartitionHealth:
    """Evaluate one partition from its readings and commits (see :func:`window_samples`)."""
    samples = window_samples(readings, commits)
    current = readings[-1].lag if readings else 0
    now = (readings[-1].ts if readings else 0.0) if now is None else now
    status, reason = evaluate_partition(samples, current_lag=current, now=now)
    offsets = [s.offset for s in samples if s.offset is not None]
    return PartitionHealth(
        topic, partition, status, reason, current, sum(1 for s in samples if s.commit),
        offsets[0] if offsets else None, offsets[-1] if offsets else None,
    )


def evaluate_group(
    group: str,
    readings: Mapping[tuple[str, int], Sequence[Reading]],
    commits: Mapping[tuple[str, int], Sequence[Commit]] | None,
    *,
    now: float | None = None,
) -> GroupHealth:
    """A group's health: every partition by Burrow's rules, the worst one decides.

    Args:
        group: the consumer group's id (for the report).
        readings: ``(topic, partition) -> readings`` over the window.
        commits: ``(topic, partition) -> commits`` from the commit log (a partition without an
            entry had none); None when the commit log was not readable.
        now: the window's end (default: each partition's last reading).
    """
    parts = [
        partition_health(
            topic, partition, rs,
            None if commits is None else commits.get((topic, partition), ()), now=now,
        )
        for (topic, partition), rs in sorted(readings.items())
    ]
    return GroupHealth(group, worst_status(p.status for p in parts), parts)


def worst_status(statuses: Iterable[Status]) -> Status:
    """The most severe of ``statuses`` (OK for none)."""
    return max(statuses, default=Status.OK)


__all__ = [
    "Commit", "GroupHealth", "PartitionHealth", "Reading", "Sample", "Status",
    "evaluate_group", "evaluate_partition", "partition_health", "window_samples", "worst_status",
]
