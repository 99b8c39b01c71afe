"""The training policy: how a stream of events becomes optimiser steps (one call for everyone).

``OnlineFM.learn_many`` is one optimiser step on whatever it is given. How many events go into
one step, whether past events are replayed, and how big a step may be are *policy*, and quality
depends on it (measured in ``bench/quality.py``): with row-wise Adagrad one step moves a row by
about ``lr`` whatever the number of events in the batch, so a Kafka poll of 2,048 events applied
as one step learns far less than the same events applied as steps of 64. :class:`Learner` is the
one place that decides; the trainer and the benches both call :meth:`Learner.learn`.

Policy (:class:`LearnPolicy`):

* **step_events**: a batch is cut into consecutive steps of at most this many events (order
  kept), so the result does not depend on how the transport happened to batch the events.
* **replay**: after each step, ``replay`` x (positives of the step) past positives are drawn
  uniformly from a bounded buffer of the most recent ``replay_buffer`` positives and trained
  again (no counts, no history, no sightings: they are not new events). The draws come from the
  learner's own seeded generator, and the buffer and generator state are part of
  :meth:`state`, so a restore from a checkpoint replays exactly what an uninterrupted run would.
* **bootstrap_passes**: :meth:`Learner.bootstrap` makes this many extra passes over retained
  history (e.g. the Kafka topic read again when a trainer starts, the way a batch job retrains
  on all history), each pass in a fresh seeded random order, in steps of ``step_events``, as
  replay (parameters only). Called once, after the history was learned online.

Same seed + same inputs (in the same batches) + same thread count = identical model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from model import checks
from model.errors import ConfigError, InputError
from model.online import OnlineFM


@dataclass(frozen=True)
class LearnPolicy:
    """How events become optimiser steps; see the module docstring.

    Attributes:
        step_events: at most this many events per optimiser step (>= 1).
        replay: past positives replayed per new positive (>= 0; 0 = off).
        replay_buffer: how many recent positives the replay buffer keeps.
        seed: seeds the replay draws (and the bootstrap passes' order).
        bootstrap_passes: extra passes :meth:`Learner.bootstrap` makes over retained history.
    """

    step_events: int = 128
    replay: float = 0.0
    replay_buffer: int = 20_000
    seed: int = 0
    bootstrap_passes: int = 0

    def __post_init__(self) -> None:
        me = "LearnPolicy"
        checks.integer(me, "step_events", self.step_events, 1)
        checks.finite(me, "replay", self.replay, minimum=0)
        checks.integer(me, "replay_buffer", self.replay_buffer, 1)
        checks.integer(me, "seed", self.seed, 0)
        checks.integer(me, "bootstrap_passes", self.bootstrap_passes, 0)


class Learner:
    """Applies batches of events to an :class:`OnlineFM` under a :class:`LearnPolicy`.

    Not thread-safe (like the model). The replay buffer holds user/item ids (and contexts) of
    recent positives; its size is bounded by ``policy.replay_buffer``.
    """

    def __init__(self, model: OnlineFM, policy: LearnPolicy | None = None) -> None:
        self.model = model
        self.policy = LearnPolicy() if policy is None else policy
        if not isinstance(self.policy, LearnPolicy):
            raise ConfigError(f"policy must be a LearnPolicy, got {type(policy).__name__}")
        cap = self.policy.replay_buffer
        self._buf_u: list[str | None] = [None] * cap if self.policy.replay else []
        self._buf_i: list[str | None] = [None] * cap if self.policy.replay else []
        self._buf_c: list[Mapping[str, Any] | None] = [None] * cap if self.policy.replay else []
        self._buf_n = 0  # positives ever pushed (ring position = n % cap)
        self._rng = np.random.default_rng(self.policy.seed)
        self._carry = 0.0  # fractional replay owed
        self.n_replayed = 0

    def learn(
        self,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        labels: np.ndarray | None = None,
        contexts: Sequence[Mapping[str, Any] | None] | None = None,
        ts: np.ndarray | float | None = None,
        *,
        before_step: Callable[[slice], None] | None = None,
    ) -> float:
        """Learn a batch of events (any size) under the policy; returns the mean step loss.

        Same arguments and errors as :meth:`OnlineFM.learn_many`, and all-or-nothing like it:
        the whole batch is validated before its first step, so an error changes nothing.
        ``before_step(where)`` is called before each step with the slice of the batch it is
        about to learn (test-then-train metrics score those events there).
        """
        b = len(user_ids)
        if len(item_ids) != b:
            raise InputError(f"learn: {b} user ids but {len(item_ids)} item ids")
        if labels is not None:
            labels = np.asarray(labels, dtype=np.float32).reshape(-1)
            if labels.size != b:
                raise InputError(f"learn: {b} events but {labels.size} labels")
        if contexts is not None and len(contexts) != b:
            raise InputError(f"learn: {b} events but {len(contexts)} contexts")
        if ts is not None and not np.isscalar(ts):
            ts = np.asarray(ts, dtype=np.float64).reshape(-1)
            if ts.size != b:
                raise InputError(f"learn: {b} events but {ts.size} timestamps")
        step = self.policy.step_events
        # the whole batch is validated (and its ids looked up) once, before its first step
        events = self.model.prepare_events(user_ids, item_ids, labels, contexts, ts)
        losses = []
        for lo in range(0, b, step):
            hi = min(b, lo + step)
            if before_step is not None:
                before_step(slice(lo, hi))
            losses.append(self.model.learn_prepared(events[lo:hi]))
            if self.policy.replay:
                u, i = user_ids[lo:hi], item_ids[lo:hi]
                y = None if labels is None else labels[lo:hi]
                c = None if contexts is None else contexts[lo:hi]
                pos = np.arange(hi - lo) if y is None else np.flatnonzero(y >= 0.5)
                self._replay(pos.size)
                self._push(u, i, c, pos)
        return float(np.mean(losses)) if losses else 0.0

    def bootstrap(
        self,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        contexts: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> int:
        """``policy.bootstrap_passes`` extra passes over retained history positives (each
        pass in a new random order from the learner's generator, steps of ``step_events``,
        trained as replay: parameters only, no counts or histories). Returns the number of
        events trained. The events should already have been learned once (:meth:`learn`).

        Raises:
            InputError: lengths differ.
        """
        b = len(user_ids)
        if len(item_ids) != b:
            raise InputError(f"bootstrap: {b} user ids but {len(item_ids)} item ids")
        if contexts is not None and len(contexts) != b:
            raise InputError(f"bootstrap: {b} events but {len(contexts)} contexts")
        step = self.policy.step_events
        done = 0
        for _ in range(self.policy.bootstrap_passes if b else 0):
            order = self._rng.permutation(b)
            for lo in range(0, b, step):
                idx = order[lo : lo + step].tolist()
                ctx = None if contexts is None else [contexts[k] for k in idx]
                self.model.replay_many(
                    [user_ids[k] for k in idx], [item_ids[k] for k in idx], contexts=ctx
                )
                done += len(idx)
        return done

    def _push(
        self,
        u: Sequence[str],
        i: Sequence[str],
        c: Sequence[Mapping[str, Any] | None] | None,
        pos: np.ndarray,
    ) -> None:
        cap = self.policy.replay_buffer
        for j in pos.tolist():
            k = self._buf_n % cap
            self._buf_u[k] = u[j]
            self._buf_i[k] = i[j]
            self._buf_c[k] = None if c is None else c[j]
            self._buf_n += 1

    def _replay(self, n_new: int) -> None:
        have = min(self._buf_n, self.policy.replay_buffer)
        owed = self._carry + self.policy.replay * n_new
        n = int(owed)
        self._carry = owed - n
        if have == 0 or n == 0:
            return
        step = self.policy.step_events
        pick = self._rng.integers(0, have, size=n)
        for lo in range(0, n, step):
            idx = pick[lo : lo + step].tolist()
            ctx = [self._buf_c[k] for k in idx]
            self.model.replay_many(
                [self._buf_u[k] for k in idx],
                [self._buf_i[k] for k in idx],
                contexts=None if all(x is None for x in ctx) else ctx,
            )
        self.n_replayed += n

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """JSON-able learner state (policy, replay buffer, generator): checkpoint it with the
        model so that a restored learner replays exactly what an uninterrupted one would."""
        cap = self.policy.replay_buffer
        have = min(self._buf_n, cap)
        return {
            "policy": asdict(self.policy),
            "buf_n": self._buf_n,
            "buf_u": self._buf_u[:have] if self.policy.replay else [],
            "buf_i": self._buf_i[:have] if self.policy.replay else [],
            "buf_c": self._buf_c[:have] if self.policy.replay else [],
            "rng": self._rng.bit_generator.state,
            "carry": self._carry,
            "n_replayed": self.n_replayed,
        }

    @classmethod
    def from_state(cls, model: OnlineFM, state: Mapping[str, Any]) -> Learner:
        """Inverse of :meth:`state` (raises KeyError/ValueError/ConfigError on bad input)."""
        learner = cls(model, LearnPolicy(**state["policy"]))
        cap = learner.policy.replay_buffer
        have = min(int(state["buf_n"]), cap)
        if learner.policy.replay:
            for name in ("buf_u", "buf_i", "buf_c"):
                got = list(state[name])
                if len(got) != have:
                    raise ValueError(f"learner state: {name} holds {len(got)}, expected {have}")
                getattr(learner, f"_{name}")[:have] = got
        learner._buf_n = int(state["buf_n"])
        learner._rng.bit_generator.state = state["rng"]
        learner._carry = float(state["carry"])
        learner.n_replayed = int(state["n_replayed"])
        return learner
