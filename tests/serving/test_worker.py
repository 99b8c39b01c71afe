"""The serving worker against the real Kafka and Redis: every request type, exclusions, bounds,
errors, dead letters and readiness.

The published state is built in-process: an :class:`OnlineFM` trained on a synthetic stream and
published with :meth:`Publisher.publish_all`, so every expected answer is computed from the very
model (``model.score``) or snapshot the worker serves. ``Worker.run`` runs in a thread; requests
go through Kafka with :class:`FmClient`, or as raw bytes where the client would refuse them.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis

from fmstream.settings import Settings
from model.online import OnlineFM, TrainConfig
from model.schema import FeatureSchema
from serving.client import FmClient
from serving.queries import item_queries
from serving.store import VectorStore
from serving.worker import BLAS_THRESHOLD, Pending, Worker
from stream.schemas import Request, Response, ScoredItem, dumps, parse_event
from stream.synthetic import SyntheticStream
from tests.kafka_helpers import KafkaIO
from tests.worker_helpers import start_worker
from train.publisher import Publisher
from train.store_writer import StoreWriter

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOL = dict(rtol=1e-4, atol=1e-4)
PROFILE_ONLY_USER = "newcomer"  # a profile, never an event: gets a cold-start vector


# --- published state and a running worker ----------------------------------------------------


@dataclass
class Served:
    settings: Settings
    model: OnlineFM
    stream: SyntheticStream
    store: VectorStore
    publisher: Publisher
    worker: Worker
    client: FmClient

    @property
    def items(self) -> list[str]:
        return self.model.known_items()

    def history(self, user: str) -> list[str]:
        return self.store.get_histories([user])[0]

    def ask(self, **request) -> Response:
        response = self.client.request(request, timeout=20)
        assert response.request_id
        return response


def train_model(stream: SyntheticStream, n_events: int = 6000) -> tuple[OnlineFM, list[dict]]:
    model = OnlineFM(
        FeatureSchema.load(ROOT / "config" / "synthetic.toml"), TrainConfig(dim=8, seed=3)
    )
    model.upsert_users(
        list(u["user_id"] for u in stream.user_profiles()),
        [u["features"] for u in stream.user_profiles()],
    )
    model.upsert_items(
        list(i["item_id"] for i in stream.item_profiles()),
        [i["features"] for i in stream.item_profiles()],
    )
    model.upsert_users([PROFILE_ONLY_USER], [{"segment": "s2"}])
    events = list(stream.events(n_events))
    for i in range(0, len(events), 1000):
        chunk = events[i : i + 1000]
        model.learn_many(
            [e["user_id"] for e in chunk],
            [e["item_id"] for e in chunk],
            contexts=[e["context"] for e in chunk],
        )
    return model, events


def wait_for_version(worker: Worker, version: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while worker.state is None or worker.state.version < version:
        assert time.monotonic() < deadline, f"worker never loaded v{version}"
        time.sleep(0.05)


@pytest.fixture
def served(settings: Settings, redis_client: redis.Redis) -> Iterator[Served]:
    settings = settings.model_copy(update={"max_k": 100, "swap_poll_s": 0.05})
    stream = SyntheticStream(users=150, items=300, clusters=5, seed=11)
    model, events = train_model(stream)
    store = VectorStore(redis_client, settings.redis_keys())
    writer = StoreWriter(redis_client, settings.redis_keys(), settings.keep_versions)
    publisher = Publisher(settings.publish_config(), writer, model)
    publisher.applied([parse_event(e) for e in events])  # histories
    publisher.publish_all()
    running = start_worker(settings, store, "test-worker")
    try:
        wait_for_version(running.worker, publisher.version)
        with FmClient(settings) as client:
            yield Served(settings, model, stream, store, publisher, running.worker, client)
    finally:
        running.close()


# --- helpers -------------------------------------------------------------------------------


def ids_scores(response: Response) -> tuple[list[str], np.ndarray]:
    assert response.error is None, response.error
    return [i.item_id for i in response.items], np.array([i.score for i in response.items])


def expected_top(scores: np.ndarray, ids: list[str], k: int, exclude=frozenset()):
    """Top-k (ids, scores) by score among ids not excluded."""
    keep = [j for j, i in enumerate(ids) if i not in exclude]
    order = sorted(keep, key=lambda j: -scores[j])[:k]
    return [ids[j] for j in order], scores[order]


def assert_top_k(
    response: Response, all_ids: list[str], all_scores: np.ndarray, k: int, exclude=frozenset()
) -> None:
    """The response holds the k best (ties tolerated), each with its true score, best first."""
    got_ids, got_scores = ids_scores(response)
    want_ids, want_scores = expected_top(all_scores, all_ids, k, exclude)
    assert len(got_ids) == len(want_ids) == min(k, len(all_ids) - len(exclude))
    assert len(set(got_ids)) == len(got_ids), "duplicate items"
    assert not set(got_ids) & set(exclude), "an excluded item came back"
    true = dict(zip(all_ids, all_scores, strict=True))
    np.testing.assert_allclose(got_scores, [true[i] for i in got_ids], **TOL)
    np.testing.assert_allclose(got_scores, want_scores, **TOL)  # the best k (ties allowed)
    assert np.all(np.diff(got_scores) <= 1e-6), "not best first"


def i2i_scores(served: Served, item: str) -> np.ndarray:
    """Online i2i score of every item for ``item``: ``<[1, 0, V_i], E_j>``."""
    ids, vectors = served.model.item_vectors()
    q = item_queries(vectors[[ids.index(item)]])[0]
    return vectors @ q


def raw_replies(
    settings: Settings,
    kafka_io: KafkaIO,
    messages: list[tuple[str, bytes]],
    want: set[str],
    topic: str | None = None,
) -> dict[str, dict]:
    """Produce raw request bytes; wait for the responses named by ``want`` (by request id)."""
    kafka_io.produce(settings.topic_requests, messages)
    topic = topic or settings.topic_responses

    def ids(records) -> set[str]:
        return {orjson.loads(r.value)["request_id"] for r in records}

    records = kafka_io.consume_until(topic, lambda rs: want <= ids(rs), timeout_s=30)
    return {(obj := orjson.loads(r.value))["request_id"]: obj for r in records}


# --- the wire format ---------------------------------------------------------------------


def test_answers_are_encoded_exactly_as_the_response_model() -> None:
    """The hot path writes JSON without pydantic; it must be byte-identical to the model's."""
    request = Request(request_id="r-1", type="u2i", user_id="u1")
    items = [("i1", 2.5), ("i2", -0.125)]
    for fallback in (None, "popular"):
        pending = Pending(request, "fm.responses")
        pending.answer(items, 7, fallback)
        model = Response(
            request_id="r-1",
            items=[ScoredItem(item_id=i, score=s) for i, s in items],
            model_version=7,
            fallback=fallback,
        )
        assert pending.encode() == dumps(model)


# --- readiness -----------------------------------------------------------------------------


def test_not_ready_before_any_snapshot_then_serves_once_published(
    settings: Settings, redis_client: redis.Redis
) -> None:
    settings = settings.model_copy(update={"swap_poll_s": 0.05})
    store = VectorStore(redis_client, settings.redis_keys())
    running = start_worker(settings, store, "test-worker")
    try:
        with FmClient(settings) as client:
            early = client.request({"type": "u2i", "user_id": "u1"}, timeout=20)
            assert early.error is not None and early.error.code == "not_ready"
            assert early.items == []
            stream = SyntheticStream(users=50, items=80, clusters=4, seed=2)
            model, _ = train_model(stream, 1500)
            publisher = Publisher(
                settings.publish_config(),
                StoreWriter(redis_client, settings.redis_keys(), settings.keep_versions),
                model,
            )
            publisher.publish_all()
            wait_for_version(running.worker, publisher.version)
            later = client.request({"type": "u2i", "user_id": "u1", "k": 5}, timeout=20)
            assert later.error is None and len(later.items) == 5
            assert later.model_version == publisher.version
            assert later.item_version == publisher.versions.item_version
            assert store.worker_versions() == {"test-worker": publisher.version}
            assert store.worker_item_versions() == {
                "test-worker": publisher.versions.item_version}
    finally:
        running.close()


def test_an_idle_worker_commits_what_it_answered_so_its_group_lag_reads_zero(
    settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acknowledged offsets are committed at most every COMMIT_INTERVAL_S while requests keep
    coming; when a poll finds none the worker commits at once, so ``fmstream lag`` of an idle
    system reads 0 instead of its last answers (the demo's table showed the serving group at
    lag 6, its six questions). With the interval out of the way (an hour), only the idle commit
    can move the group's offsets to the end of the request topic."""
    from stream.lag import group_lag
    from tests.kafka_helpers import wait_for

    def behind() -> list[tuple[int, int | None, int]]:
        return [(p.partition, p.committed, p.log_end) for p in group_lag(
            settings.kafka_config(), settings.serving_group, [settings.topic_requests]) if p.lag]

    monkeypatch.setattr("serving.worker.COMMIT_INTERVAL_S", 3600.0)
    store = VectorStore(redis_client, settings.redis_keys())
    running = start_worker(settings, store, "idle-worker")
    try:
        with FmClient(settings) as client:
            for n in range(3):  # answered (not_ready: nothing is published), then idle
                answer = client.request({"type": "u2i", "user_id": f"u{n}"}, timeout=20)
                assert answer.error is not None and answer.error.code == "not_ready"
                wait_for(lambda: not behind(), 30, f"the group's commit to cover answer {n}",
                         poll_s=0.05)
            assert running.thread.is_alive()
    finally:
        running.close()


def test_worker_configures_faiss_for_batched_search(served: Served) -> None:
    import faiss

    assert faiss.cvar.distance_compute_blas_threshold == BLAS_THRESHOLD


# --- request types -------------------------------------------------------------------------


def test_u2i_returns_the_fm_top_k_with_its_scores(served: Served) -> None:
    items = served.items
    for user in ["u0", "u7", "u33", PROFILE_ONLY_USER]:
        response = served.ask(type="u2i", user_id=user, k=10)
        assert response.model_version == served.publisher.version
        assert response.fallback is None
        scores = served.model.score([user] * len(items), items)
        assert_top_k(response, items, scores, 10)


def test_u2i_with_context_scores_the_full_fm_including_context(served: Served) -> None:
    items = served.items
    for user, hour in [("u1", "3"), ("u12", "17"), ("u1", "never-seen-hour")]:
        ctx = {"hour": hour}
        response = served.ask(type="u2i", user_id=user, k=12, context=ctx)
        scores = served.model.score([user] * len(items), items, [ctx] * len(items))
        assert_top_k(response, items, scores, 12)
        # The context really is in the score: it differs from the context-free one.
        plain = served.model.score([user] * len(items), items)
        got = {i.item_id: i.score for i in response.items}
        assert any(abs(got[i] - plain[items.index(i)]) > 1e-3 for i in got)


def test_i2i_online_nearest_items_never_the_item_itself(served: Served) -> None:
    items = served.items
    for item in ["i0", "i42", "i299"]:
        response = served.ask(type="i2i", item_id=item, k=8)
        assert response.model_version == served.publisher.version
        assert item not in [i.item_id for i in response.items]
        assert_top_k(response, items, i2i_scores(served, item), 8, exclude={item})


def test_i2i_offline_reads_the_precomputed_table(served: Served) -> None:
    version, [table] = served.store.get_offline_i2i(["i5"])
    assert table is not None and len(table) == served.settings.offline_i2i_k
    response = served.ask(type="i2i", item_id="i5", k=6, source="offline")
    assert response.error is None and response.i2i_version == version
    assert response.item_version is not None and response.model_version is not None
    assert response.item_version <= response.model_version  # the serving state's pair
    assert [(i.item_id, i.score) for i in response.items] == [
        (i, pytest.approx(s)) for i, s in table[:6]
    ]
    # ... and they are the online neighbours of that version
    online = served.ask(type="i2i", item_id="i5", k=6)
    assert [i.item_id for i in response.items] == [i.item_id for i in online.items]
    skip = {table[0][0], table[2][0]}
    excluded = served.ask(
        type="i2i", item_id="i5", k=6, source="offline", exclude_item_ids=sorted(skip)
    )
    assert [i.item_id for i in excluded.items] == [i for i, _ in table if i not in skip][:6]


def test_i2i_history_merges_neighbours_of_recent_items_without_history(served: Served) -> None:
    items = served.items
    ids, vectors = served.model.item_vectors()
    for user in ["u3", "u48"]:
        history = served.history(user)
        assert len(history) > 20  # more than the recent items queried: all must be excluded
        response = served.ask(type="i2i_history", user_id=user, k=15)
        assert response.model_version == served.publisher.version and response.fallback is None
        recent = history[:20]
        queries = item_queries(vectors[[ids.index(i) for i in recent]])
        merged = (vectors @ queries.T).max(axis=1)  # best score over the recent items
        got_ids, _ = ids_scores(response)
        assert len(got_ids) == len(set(got_ids)) == 15, "duplicates or too few"
        assert not set(got_ids) & set(history), "a history item came back"
        assert_top_k(response, items, merged, 15, exclude=set(history))


def test_i2i_history_without_history_falls_back_to_popular(served: Served) -> None:
    response = served.ask(type="i2i_history", user_id=PROFILE_ONLY_USER, k=5)
    assert response.error is None and response.fallback == "popular" and len(response.items) == 5


def test_rank_scores_the_given_items_with_context_best_first(served: Served) -> None:
    given = ["i3", "i100", "i7", "i250", "i64", "i8"]
    for ctx in [{}, {"hour": "9"}]:
        response = served.ask(type="rank", user_id="u20", item_ids=given, context=ctx)
        assert response.model_version == served.publisher.version
        got_ids, got_scores = ids_scores(response)
        assert sorted(got_ids) == sorted(given)
        want = served.model.score(["u20"] * len(given), given, [ctx] * len(given))
        true = dict(zip(given, want, strict=True))
        np.testing.assert_allclose(got_scores, [true[i] for i in got_ids], **TOL)
        assert np.all(np.diff(got_scores) <= 0)


def test_rank_scores_a_repeated_item_once_and_refuses_an_empty_list(
    served: Served, kafka_io: KafkaIO
) -> None:
    """Sent as raw bytes (as kcat would): the client refuses an empty list itself."""
    replies = raw_replies(
        served.settings,
        kafka_io,
        [
            ("rank-dup", b'{"request_id": "rank-dup", "type": "rank", "user_id": "u20", '
                         b'"item_ids": ["i3", "i3", "i7", " i3 ", 3, "i7", "nope"]}'),
            ("rank-empty", b'{"request_id": "rank-empty", "type": "rank", "user_id": "u20", '
                           b'"item_ids": []}'),
            ("rank-none", b'{"request_id": "rank-none", "type": "rank", "user_id": "u20", '
                          b'"item_ids": ["nope-1", "nope-1", "nope-2"]}'),
        ],
        {"rank-dup", "rank-empty", "rank-none"},
    )
    dup = replies["rank-dup"]
    assert dup["error"] is None, dup
    got = [i["item_id"] for i in dup["items"]]
    assert sorted(got) == ["i3", "i7"], got  # " i3 " is i3; 3 is "3", not an item
    empty = replies["rank-empty"]["error"]
    assert empty["code"] == "invalid_request" and "item_ids" in empty["message"], empty
    none = replies["rank-none"]["error"]
    assert none["code"] == "unknown_item" and "2 item_ids" in none["message"], none


def test_rank_of_an_unknown_user_is_an_error(served: Served) -> None:
    response = served.ask(type="rank", user_id="nobody-at-all", item_ids=["i1"])
    assert response.error is not None and response.error.code == "unknown_user"


# --- exclusions and bounds -----------------------------------------------------------------


def test_exclude_seen_and_exclude_item_ids_are_exact_and_still_return_k(served: Served) -> None:
    items = served.items
    user = "u9"
    history = set(served.history(user))
    scores = served.model.score([user] * len(items), items)
    plain = served.ask(type="u2i", user_id=user, k=10)
    top = [i.item_id for i in plain.items]

    seen = served.ask(type="u2i", user_id=user, k=10, exclude_seen=True)
    assert_top_k(seen, items, scores, 10, exclude=history)

    skip = set(top[:5])
    both = served.ask(
        type="u2i", user_id=user, k=10, exclude_seen=True, exclude_item_ids=sorted(skip)
    )
    assert_top_k(both, items, scores, 10, exclude=history | skip)

    # Excluding all but 40 items: exactly those 40 best first, k=40 satisfied to the last one.
    rest = sorted(set(items) - history)
    keep = set(rest[::3][:40])
    many = set(items) - history - keep
    near_all = served.ask(
        type="u2i", user_id=user, k=40, exclude_seen=True, exclude_item_ids=sorted(many)
    )
    assert_top_k(near_all, items, scores, 40, exclude=history | many)
    assert {i.item_id for i in near_all.items} == keep
    # k above what is left: all that is left, no padding.
    over = served.ask(
        type="u2i", user_id=user, k=60, exclude_seen=True, exclude_item_ids=sorted(many)
    )
    assert {i.item_id for i in over.items} == keep

    # i2i honours exclusions too
    nbrs = served.ask(type="i2i", item_id="i1", k=10)
    skip = {i.item_id for i in nbrs.items[:4]}
    fewer = served.ask(type="i2i", item_id="i1", k=10, exclude_item_ids=sorted(skip))
    assert_top_k(fewer, items, i2i_scores(served, "i1"), 10, exclude=skip | {"i1"})


def test_k_out_of_bounds_is_invalid_request(served: Served, kafka_io: KafkaIO) -> None:
    s = served.settings
    over = served.ask(type="u2i", user_id="u1", k=s.max_k + 1)
    assert over.error is not None and over.error.code == "invalid_request"
    assert str(s.max_k) in over.error.message
    at_max = served.ask(type="u2i", user_id="u1", k=s.max_k)
    assert at_max.error is None and len(at_max.items) == s.max_k
    # k = 0 (and negative) never passes the client, so send the bytes ourselves.
    replies = raw_replies(
        s,
        kafka_io,
        [
            ("k0", b'{"request_id": "k0", "type": "u2i", "user_id": "u1", "k": 0}'),
            ("kneg", b'{"request_id": "kneg", "type": "i2i", "item_id": "i1", "k": -3}'),
        ],
        {"k0", "kneg"},
    )
    for rid in ("k0", "kneg"):
        assert replies[rid]["error"]["code"] == "invalid_request"
        assert "k" in replies[rid]["error"]["message"]
        assert replies[rid]["items"] == []


def test_deadline_in_the_past_is_deadline_exceeded(served: Served) -> None:
    past = served.ask(type="u2i", user_id="u1", deadline_ms=time.time() * 1000 - 1000)
    assert past.error is not None and past.error.code == "deadline_exceeded"
    assert past.items == []
    future = served.ask(type="u2i", user_id="u1", deadline_ms=time.time() * 1000 + 30_000)
    assert future.error is None and len(future.items) == 10


# --- fallbacks and errors ------------------------------------------------------------------


def test_user_without_vector_or_profile_gets_popular_items(served: Served) -> None:
    ids, counts = served.model.item_counts()
    order = np.argsort(-counts, kind="stable")
    response = served.ask(type="u2i", user_id="never-seen-anywhere", k=7)
    assert response.error is None and response.fallback == "popular"
    assert response.model_version == served.publisher.version
    got_ids, got_scores = ids_scores(response)
    assert len(got_ids) == 7
    np.testing.assert_allclose(got_scores, counts[order[:7]])  # ties may reorder equal counts
    assert all(counts[ids.index(i)] == s for i, s in zip(got_ids, got_scores, strict=True))
    skip = got_ids[:3]
    fewer = served.ask(type="u2i", user_id="never-seen-anywhere", k=7, exclude_item_ids=skip)
    assert len(fewer.items) == 7 and not {i.item_id for i in fewer.items} & set(skip)


def test_unknown_item_is_an_error_naming_it(served: Served) -> None:
    for source in ("online", "offline"):
        response = served.ask(type="i2i", item_id="no-such-item", source=source)
        assert response.error is not None and response.error.code == "unknown_item"
        assert "no-such-item" in response.error.message and response.items == []
    rank = served.ask(type="rank", user_id="u1", item_ids=["nope-1", "nope-2"])
    assert rank.error is not None and rank.error.code == "unknown_item"


def test_malformed_requests_with_an_id_get_invalid_request(
    served: Served, kafka_io: KafkaIO
) -> None:
    s = served.settings
    replies = raw_replies(
        s,
        kafka_io,
        [
            ("bad-type", b'{"request_id": "bad-type", "type": "teleport", "user_id": "u1"}'),
            ("no-user", b'{"request_id": "no-user", "type": "u2i"}'),
            ("bad-k", b'{"request_id": "bad-k", "type": "u2i", "user_id": "u1", "k": "ten"}'),
            ("no-items", b'{"request_id": "no-items", "type": "rank", "user_id": "u1"}'),
            ("ok", b'{"request_id": "ok", "type": "u2i", "user_id": "u1", "k": 3}'),
        ],
        {"bad-type", "no-user", "bad-k", "no-items", "ok"},
    )
    for rid in ("bad-type", "no-user", "bad-k", "no-items"):
        error = replies[rid]["error"]
        assert error["code"] == "invalid_request", replies[rid]
        assert error["message"]
    assert "type" in replies["bad-type"]["error"]["message"]
    assert "user_id" in replies["no-user"]["error"]["message"]
    assert "item_ids" in replies["no-items"]["error"]["message"]
    assert replies["ok"]["error"] is None and len(replies["ok"]["items"]) == 3


def test_bad_context_fails_only_its_own_request(served: Served) -> None:
    futures = [
        served.client.submit({"type": "u2i", "user_id": f"u{n}", "k": 4}, timeout=20)
        for n in range(5)
    ]
    bad = served.client.submit(
        {"type": "u2i", "user_id": "u1", "context": {"hour": ["1", "2"]}}, timeout=20
    )
    futures += [
        served.client.submit(
            {"type": "rank", "user_id": "u2", "item_ids": ["i1", "i2"], "context": {"hour": "4"}},
            timeout=20,
        )
    ]
    response = bad.result(30)
    assert response.error is not None and response.error.code == "invalid_request"
    assert "hour" in response.error.message
    for f in futures:
        assert f.result(30).error is None


def test_unreadable_request_goes_to_the_dead_letter_topic(
    served: Served, kafka_io: KafkaIO
) -> None:
    s = served.settings
    garbage = [
        (b"g1", b"\xff\xfe not json"),
        (b"g2", b"[1, 2, 3]"),
        (b"g3", b'{"type": "u2i", "user_id": "u1"}'),
    ]  # JSON, but no request id
    sent = kafka_io.produce(s.topic_requests, garbage)
    after = served.ask(type="u2i", user_id="u1", k=2)  # the worker goes on
    assert after.error is None
    letters = kafka_io.consume_all(s.topic_dlq, expect=3, timeout_s=30)
    by_key = {r.key: orjson.loads(r.value) for r in letters}
    assert set(by_key) == {b"g1", b"g2", b"g3"}
    for (key, value), meta in zip(garbage, sent, strict=True):
        letter = by_key[key]
        assert letter["source_topic"] == s.topic_requests
        assert (letter["source_partition"], letter["source_offset"]) == (
            meta.partition,
            meta.offset,
        )
        assert base64.b64decode(letter["value_b64"]) == value
        assert letter["reason"]
    assert by_key[b"g1"]["stage"] == "decode" and by_key[b"g3"]["stage"] == "validate"
    assert served.worker.answered >= 1
