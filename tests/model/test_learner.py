"""The training policy (model/learner.py): batches become steps of a fixed size whatever the
transport's batching, replay is deterministic and survives a state round trip, replay changes
parameters only, policy values are validated."""

from __future__ import annotations

import numpy as np
import pytest

from model import ConfigError, FeatureSchema, InputError, ModelError, OnlineFM, TrainConfig
from model.learner import Learner, LearnPolicy
from model.optim import RowTable

SCHEMA = FeatureSchema.from_dict(
    {
        "user": {"segment": {}, "recent": {"kind": "history", "history_len": 4}},
        "item": {"category": {}},
        "context": {"hour": {}},
    }
)


def events(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    u = [f"u{x}" for x in rng.integers(0, 20, n)]
    i = [f"i{x}" for x in rng.integers(0, 30, n)]
    y = (rng.random(n) < 0.8).astype(np.float32)
    ctx = [{"hour": str(h)} for h in rng.integers(0, 24, n)]
    ts = np.arange(n, dtype=np.float64)
    return u, i, y, ctx, ts


def model(seed: int = 0) -> OnlineFM:
    fm = OnlineFM(SCHEMA, TrainConfig(dim=4, negatives=3, seed=seed))
    fm.upsert_users([f"u{x}" for x in range(20)], [{"segment": f"s{x % 3}"} for x in range(20)])
    fm.upsert_items([f"i{x}" for x in range(30)], [{"category": f"c{x % 3}"} for x in range(30)])
    return fm


def params(fm: OnlineFM) -> np.ndarray:
    t = fm._table
    return np.concatenate([t.params[: t.n_rows].ravel(), t.acc[: t.n_rows].ravel(), [fm.bias]])


def feed(learner: Learner, polls: list[int], data) -> None:
    u, i, y, ctx, ts = data
    lo = 0
    for size in polls:
        hi = lo + size
        learner.learn(u[lo:hi], i[lo:hi], y[lo:hi], contexts=ctx[lo:hi], ts=ts[lo:hi])
        lo = hi
    assert lo == len(u)


def test_a_batch_is_learned_as_steps_of_step_events() -> None:
    data = events(100)
    u, i, y, ctx, ts = data
    a = model()
    Learner(a, LearnPolicy(step_events=32)).learn(u, i, y, contexts=ctx, ts=ts)
    b = model()
    for lo in (0, 32, 64, 96):
        sl = slice(lo, lo + 32)
        b.learn_many(u[sl], i[sl], y[sl], contexts=ctx[sl], ts=ts[sl])
    assert np.array_equal(params(a), params(b))
    assert a.n_updates == b.n_updates == 100


@pytest.mark.parametrize("replay", [0.0, 1.5])
def test_result_does_not_depend_on_poll_sizes(replay: float) -> None:
    """Polls that are multiples of step_events give the same steps, hence the same model."""
    data = events(256)
    one, many = model(), model()
    pol = LearnPolicy(step_events=32, replay=replay, replay_buffer=50)
    feed(Learner(one, pol), [256], data)
    feed(Learner(many, pol), [64, 32, 128, 32], data)
    assert np.array_equal(params(one), params(many))


def test_replay_trains_parameters_only() -> None:
    fm = model()
    learner = Learner(fm, LearnPolicy(step_events=16, replay=2.0, replay_buffer=40))
    u, i, y, ctx, ts = events(64)
    learner.learn(u, i, y, contexts=ctx, ts=ts)
    counts_before = fm.item_counts()[1].copy()
    hist_before = {x: fm.user_history(x) for x in set(u)}
    updates = fm.n_updates
    p = params(fm)
    learner._replay(16)
    assert learner.n_replayed > 0
    assert not np.array_equal(params(fm), p)  # it trained
    assert np.array_equal(fm.item_counts()[1], counts_before)
    assert {x: fm.user_history(x) for x in set(u)} == hist_before
    assert fm.n_updates == updates
    # 2 per positive (none owed while the buffer was still empty), + 32 for the 16 asked
    assert 32 < learner.n_replayed <= 2.0 * float((y >= 0.5).sum()) + 32


def test_replay_buffer_is_bounded() -> None:
    learner = Learner(model(), LearnPolicy(step_events=16, replay=1.0, replay_buffer=10))
    u, i, y, ctx, ts = events(200)
    learner.learn(u, i, y, contexts=ctx, ts=ts)
    st = learner.state()
    assert len(st["buf_u"]) == len(st["buf_i"]) == len(st["buf_c"]) == 10
    assert st["buf_n"] == int((y >= 0.5).sum())


def test_restored_learner_continues_exactly() -> None:
    """Model state + learner state restore to a run identical to an uninterrupted one."""
    data = events(300)
    u, i, y, ctx, ts = data
    pol = LearnPolicy(step_events=16, replay=1.5, replay_buffer=64, seed=3)
    straight = Learner(model(), pol)
    feed(straight, [100, 200], data)

    first = Learner(model(), pol)
    first.learn(u[:100], i[:100], y[:100], contexts=ctx[:100], ts=ts[:100])
    header, arrays = first.model.state()
    restored = Learner.from_state(OnlineFM.from_state(header, arrays), first.state())
    restored.learn(u[100:], i[100:], y[100:], contexts=ctx[100:], ts=ts[100:])
    assert np.array_equal(params(straight.model), params(restored.model))
    assert straight.n_replayed == restored.n_replayed


def test_same_seed_same_model_other_seed_differs() -> None:
    data = events(200)
    runs = []
    for seed in (1, 1, 2):
        learner = Learner(model(), LearnPolicy(step_events=32, replay=1.0, seed=seed))
        feed(learner, [200], data)
        runs.append(params(learner.model))
    assert np.array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_policy_and_input_validation() -> None:
    for bad in (
        {"step_events": 0},
        {"step_events": 1.5},
        {"replay": -1},
        {"replay": float("nan")},
        {"replay_buffer": 0},
        {"seed": -1},
        {"step_events": True},
    ):
        with pytest.raises(ConfigError):
            LearnPolicy(**bad)
    with pytest.raises(ConfigError):
        Learner(model(), policy="fast")  # type: ignore[arg-type]
    learner = Learner(model())
    with pytest.raises(InputError):
        learner.learn(["u1"], ["i1", "i2"])
    with pytest.raises(InputError):
        learner.learn(["u1"], ["i1"], labels=np.array([1.0, 0.0]))
    with pytest.raises(InputError):
        learner.learn(["u1"], ["i1"], contexts=[])
    with pytest.raises(InputError):
        learner.learn(["u1"], ["i1"], ts=np.array([1.0, 2.0]))
    assert learner.learn([], []) == 0.0
    with pytest.raises(InputError):
        learner.model.replay_many(["u1"], [])


def test_count_scaling_of_one_event_rows_is_plain_adagrad() -> None:
    rng = np.random.default_rng(0)
    rows = np.array([1, 2, 3])
    grads = rng.normal(size=(3, 5)).astype(np.float32)
    out = []
    for counts in (None, np.ones(3)):
        t = RowTable(4, 0.1, np.random.default_rng(1))
        t.alloc(4)
        t.adagrad_step(rows, t.params[rows].copy(), grads.copy(), 0.1, 0.0, counts)
        out.append(t.params[:4].copy())
    assert np.array_equal(out[0], out[1])


def test_count_scaling_moves_a_burst_further() -> None:
    """n agreeing events in one step move a row ~√n as far as one event (plain Adagrad: 1x)."""
    g = np.ones((1, 5), dtype=np.float32)
    moved = {}
    for counts in (None, np.array([16.0])):
        t = RowTable(4, 0.0, np.random.default_rng(1))
        t.alloc(2)
        t.adagrad_step(np.array([1]), t.params[[1]].copy(), 16 * g, 0.1, 0.0, counts)
        moved["plain" if counts is None else "count"] = float(np.abs(t.params[1]).max())
    assert moved["plain"] == pytest.approx(0.1, rel=1e-4)
    assert moved["count"] == pytest.approx(0.4, rel=1e-4)


def test_step_scaling_config_is_validated_and_trains() -> None:
    with pytest.raises(ConfigError):
        TrainConfig(step_scaling="sqrt")  # type: ignore[arg-type]
    fm = OnlineFM(SCHEMA, TrainConfig(dim=4, negatives=3, step_scaling="count"))
    u, i, y, ctx, ts = events(64)
    loss = fm.learn_many(u, i, y, contexts=ctx, ts=ts)
    assert np.isfinite(loss)
    assert np.isfinite(params(fm)).all()


def test_a_bad_batch_changes_nothing_even_across_steps() -> None:
    """The trainer bisects a rejected batch: a half-applied one would be applied twice."""
    fm = model()
    learner = Learner(fm, LearnPolicy(step_events=8, replay=1.0))
    u, i, y, ctx, ts = events(40)
    before = params(fm)
    bad_ctx = [*ctx[:30], {"hour": [1, 2]}, *ctx[31:]]  # a list for a categorical field
    bad_ts = ts.copy()
    bad_ts[35] = np.nan
    bad_y = y.copy()
    bad_y[39] = 2.0
    for kw in ({"contexts": bad_ctx, "ts": ts}, {"contexts": ctx, "ts": bad_ts}):
        with pytest.raises(ModelError):
            learner.learn(u, i, y, **kw)
    with pytest.raises(InputError):
        learner.learn(u, i, bad_y, contexts=ctx, ts=ts)
    with pytest.raises(ModelError):
        learner.learn([*u[:20], ["not", "an", "id"], *u[21:]], i, y, contexts=ctx, ts=ts)
    assert np.array_equal(params(fm), before)
    assert fm.n_updates == 0
    assert learner.state()["buf_n"] == 0


def test_accumulator_decay_keeps_steps_from_vanishing() -> None:
    """Adagrad's step for a row shrinks like 1/√t; with decay it levels off (follows drift)."""
    g = np.ones((1, 5), dtype=np.float32)
    last = {}
    for decay in (1.0, 0.9):
        t = RowTable(4, 0.0, np.random.default_rng(1))
        t.alloc(2)
        for _ in range(200):
            before = t.params[1].copy()
            t.adagrad_step(np.array([1]), t.params[[1]].copy(), g.copy(), 0.1, 0.0, None, decay)
        last[decay] = float(np.abs(t.params[1] - before).max())
    assert last[1.0] == pytest.approx(0.1 / np.sqrt(200), rel=1e-3)
    assert last[0.9] == pytest.approx(0.1 * np.sqrt(1 - 0.9), rel=1e-2)
    with pytest.raises(ConfigError):
        TrainConfig(acc_decay=0.0)
    with pytest.raises(ConfigError):
        TrainConfig(acc_decay=1.5)


def test_before_step_sees_each_step_just_before_it_is_learned() -> None:
    fm = model()
    u, i, y, c, t = events(10)
    seen: list[tuple[int, int, int]] = []
    Learner(fm, LearnPolicy(step_events=4)).learn(
        u, i, y, c, t, before_step=lambda w: seen.append((w.start, w.stop, fm.n_updates)))
    start = fm.n_updates - 10
    assert seen == [(0, 4, start), (4, 8, start + 4), (8, 10, start + 8)]


def test_hard_negatives_keep_the_highest_scoring_of_their_candidates() -> None:
    """neg_candidates=m: each negative is the best-scored (for its user) of m sampled ones."""
    k, m = 3, 4
    fm = OnlineFM(SCHEMA, TrainConfig(dim=4, negatives=k, neg_candidates=m, seed=3))
    fm.upsert_items([f"i{x}" for x in range(30)], [{"category": f"c{x % 3}"} for x in range(30)])
    u, i, y, ctx, ts = events(200, seed=2)
    Learner(fm, LearnPolicy(step_events=16)).learn(u, i, y, contexts=ctx, ts=ts)
    users = ["u1", "u2", "u1", "u7"]
    ents = fm._users.lookup(users)
    uu, owner = np.unique(ents, return_inverse=True)
    ukeys, uw = fm._users.keys_of(uu)
    positives = fm._items.lookup(["i0", "i5", "i9", "i3"])
    rng_state = fm._sampler.rng.bit_generator.state
    neg, valid = fm._negatives(ukeys, uw, owner, positives, k)
    fm._sampler.rng.bit_generator.state = rng_state  # the same draws again, by hand
    cand, _ = fm._sampler.sample(
        fm._items.counts, fm.n_items, positives, k * m, fm.config.neg_pool
    )
    ids = fm.known_items()
    expect = np.empty((len(users), k), dtype=np.int64)
    for r, user in enumerate(users):
        groups = cand[r].reshape(k, m)
        for j in range(k):
            s = fm.score([user] * m, [ids[e] for e in groups[j]])
            expect[r, j] = groups[j][int(np.argmax(s))]
    assert valid.all() and neg.shape == (len(users), k)
    assert np.array_equal(neg, expect)
    assert not (neg == positives[:, None]).any()


def test_one_candidate_is_plain_sampling() -> None:
    fm = OnlineFM(SCHEMA, TrainConfig(dim=4, negatives=3, seed=5, neg_candidates=1))
    fm.upsert_items([f"i{x}" for x in range(30)], [{"category": f"c{x % 3}"} for x in range(30)])
    feed(Learner(fm, LearnPolicy(step_events=32)), [120], events(120))
    ents = fm._users.lookup(["u1", "u2"])
    ukeys, uw = fm._users.keys_of(ents)
    positives = fm._items.lookup(["i0", "i5"])
    rng_state = fm._sampler.rng.bit_generator.state
    neg, _ = fm._negatives(ukeys, uw, np.arange(2), positives, 3)
    fm._sampler.rng.bit_generator.state = rng_state
    plain, _ = fm._sampler.sample(fm._items.counts, fm.n_items, positives, 3, fm.config.neg_pool)
    assert np.array_equal(neg, plain)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError):
            TrainConfig(neg_candidates=bad)


def test_per_row_decay_equals_scalar_decay_row_by_row() -> None:
    g = np.ones((2, 5), dtype=np.float32)
    t = RowTable(4, 0.0, np.random.default_rng(1))
    rows = t.alloc(3)[1:]
    for _ in range(50):
        t.adagrad_step(rows, t.params[rows].copy(), g.copy(), 0.1, 0.0, None, np.array([1.0, 0.9]))
    for r, decay in zip(rows.tolist(), (1.0, 0.9), strict=True):
        s = RowTable(4, 0.0, np.random.default_rng(1))
        s.alloc(3)
        for _ in range(50):
            s.adagrad_step(np.array([r]), s.params[[r]].copy(), g[:1].copy(), 0.1, 0.0, None, decay)
        assert np.allclose(s.params[r], t.params[r]) and np.allclose(s.acc[r], t.acc[r])


def test_user_acc_decay_applies_to_user_side_rows_only() -> None:
    fm = OnlineFM(SCHEMA, TrainConfig(dim=4, negatives=3, acc_decay=1.0, user_acc_decay=0.5))
    fm.upsert_users([f"u{x}" for x in range(20)], [{"segment": f"s{x % 3}"} for x in range(20)])
    fm.upsert_items([f"i{x}" for x in range(30)], [{"category": f"c{x % 3}"} for x in range(30)])
    u, i, y, ctx, ts = events(64)
    fm.learn_many(u[:32], i[:32], y[:32], contexts=ctx[:32], ts=ts[:32])  # fills histories
    seen = []
    step = fm._table.adagrad_step

    def spy(rows, values, grad, lr, l2, counts, decay):
        seen.append((rows.copy(), np.broadcast_to(decay, rows.shape).copy()))
        return step(rows, values, grad, lr, l2, counts, decay)

    fm._table.adagrad_step = spy
    fm.learn_many(u[32:], i[32:], y[32:], contexts=ctx[32:], ts=ts[32:])
    rows, decay = seen[0]
    space = fm._space
    user_fields = [j for j, f in enumerate(space.specs) if f.side == "user"]
    kf = space.key_field[: space.n_keys]
    user_rows = set(space.key_row[: space.n_keys][np.isin(kf, user_fields)].tolist())
    expect = np.array([0.5 if r in user_rows else 1.0 for r in rows.tolist()])
    assert np.array_equal(decay, expect)
    assert (decay == 0.5).sum() > 20 and (decay == 1.0).sum() > 20  # ids, segments, history
    for bad in (0.0, 1.5, True, float("nan")):
        with pytest.raises(ConfigError):
            TrainConfig(user_acc_decay=bad)


def test_bootstrap_makes_seeded_passes_over_history_parameters_only() -> None:
    """Bootstrap passes: ``passes x len(history)`` events replayed (each pass reshuffled),
    parameters change but counts/histories do not, same seed = same model, and a restored
    learner keeps the policy."""
    u, i, y, ctx, ts = events(200)
    p = np.flatnonzero(y >= 0.5)
    hu, hi, hc = [u[j] for j in p], [i[j] for j in p], [ctx[j] for j in p]
    runs = []
    for seed in (4, 4, 5):
        learner = Learner(model(), LearnPolicy(step_events=32, seed=seed, bootstrap_passes=2))
        learner.learn(u, i, y, contexts=ctx, ts=ts)
        n_pos, before = learner.model.n_positives, params(learner.model)
        hist = learner.model.user_history("u1")
        assert learner.bootstrap(hu, hi, hc) == 2 * p.size
        assert learner.model.n_positives == n_pos
        assert learner.model.user_history("u1") == hist
        assert not np.array_equal(params(learner.model), before)
        runs.append(params(learner.model))
    assert np.array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    restored = Learner.from_state(learner.model, learner.state())
    assert restored.policy.bootstrap_passes == 2


def test_bootstrap_off_or_empty_changes_nothing_and_bad_input_is_refused() -> None:
    u, i, y, ctx, ts = events(100)
    learner = Learner(model(), LearnPolicy(step_events=32))  # bootstrap_passes = 0
    learner.learn(u, i, y, contexts=ctx, ts=ts)
    before = params(learner.model)
    assert learner.bootstrap(u, i, ctx) == 0
    on = Learner(learner.model, LearnPolicy(bootstrap_passes=3))
    assert on.bootstrap([], []) == 0
    assert np.array_equal(params(learner.model), before)
    with pytest.raises(InputError):
        on.bootstrap(["u1"], ["i1", "i2"])
    with pytest.raises(InputError):
        on.bootstrap(["u1"], ["i1"], contexts=[])
    assert np.array_equal(params(learner.model), before)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="bootstrap_passes"):
            LearnPolicy(bootstrap_passes=bad)  # type: ignore[arg-type]
