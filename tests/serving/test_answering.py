"""Answering without Kafka or Redis: decoding, admission, every request type and every error
code, over an in-memory store and a flat index built from a random snapshot."""

from __future__ import annotations

import time
from typing import get_args

import numpy as np
import orjson
import pytest

from serving.answering import (
    Answerer,
    Pending,
    Rejected,
    ServingState,
    check_reply_to,
    decode_request,
)
from serving.config import ServingConfig
from serving.errors import REQUEST_ERRORS, InvalidRequest, RequestError, StoreUnavailable
from serving.index import ItemSnapshot, LoadedIndex
from serving.queries import item_queries
from serving.store import UserVectors
from stream.schemas import ErrorCode, ErrorInfo, Request, Response, ScoredItem, dumps

DIM = 6
N_ITEMS = 40
VERSION = 7
CONFIG = ServingConfig(max_k=50, max_message_bytes=4096)


class MemoryStore:
    """The four reads of ``AnswerStore`` from dicts; counts its round trips."""

    def __init__(self, users: dict[str, np.ndarray], histories: dict[str, list[str]],
                 offline: dict[str, list[tuple[str, float]]], popular: list[tuple[str, float]]):
        self.users, self.histories, self.offline, self.popular = users, histories, offline, popular
        self.calls: list[str] = []

    def get_user_vectors(self, user_ids, *, shared=None):
        self.calls.append("vectors")
        found = np.array([u in self.users for u in user_ids], dtype=bool)
        vectors = np.stack([self.users.get(u, np.zeros(DIM + 2, np.float32)) for u in user_ids])
        n = len(user_ids)
        return UserVectors(vectors.astype(np.float32), found, np.full(n, VERSION),
                           np.zeros(n))

    def get_histories(self, user_ids):
        self.calls.append("histories")
        return [list(self.histories.get(u, [])) for u in user_ids]

    def get_offline_i2i(self, item_ids):
        self.calls.append("offline")
        return 5, [self.offline.get(i) for i in item_ids]

    def get_popular(self, k):
        self.calls.append("popular")
        return self.popular[:k]


class BrokenStore(MemoryStore):
    def get_user_vectors(self, user_ids, *, shared=None):
        raise RuntimeError("redis fell over")


class DownStore(MemoryStore):
    """Every read fails as the real store's do while Redis is away; counts the attempts."""

    def _down(self, what: str):
        self.calls.append(what)
        raise StoreUnavailable("the store (Redis) did not answer: ConnectionError; retry shortly")

    def get_user_vectors(self, user_ids, *, shared=None):
        self._down("vectors")

    def get_histories(self, user_ids):
        self._down("histories")

    def get_offline_i2i(self, item_ids):
        self._down("offline")

    def get_popular(self, k):
        self._down("popular")


@pytest.fixture
def world() -> tuple[MemoryStore, ServingState, ItemSnapshot]:
    rng = np.random.default_rng(4)
    ids = [f"i{j}" for j in range(N_ITEMS)]
    vectors = rng.standard_normal((N_ITEMS, DIM + 2)).astype(np.float32)
    vectors[:, 1] = 1.0
    snapshot = ItemSnapshot(version=VERSION, item_ids=ids, vectors=vectors, bias=0.5)
    users = {f"u{n}": rng.standard_normal(DIM + 2).astype(np.float32) for n in range(5)}
    for v in users.values():
        v[0] = 1.0
    store = MemoryStore(
        users,
        histories={"u1": ["i3", "i4", "i5"], "u2": []},
        offline={"i1": [(f"i{j}", 1.0 / j) for j in range(2, 12)]},
        popular=[(f"i{j}", float(100 - j)) for j in range(N_ITEMS)],
    )
    return store, ServingState(LoadedIndex.build(snapshot, "flat"), None), snapshot


def ask(store, state, *requests: dict, config: ServingConfig = CONFIG) -> list[Pending]:
    pendings = []
    for n, r in enumerate(requests):
        out = decode_request(orjson.dumps({"request_id": f"r{n}", **r}), config)
        assert isinstance(out, Pending), out
        pendings.append(out)
    Answerer(store, config).answer(pendings, state)
    return pendings


def code(p: Pending) -> str | None:
    return None if p.error is None else p.error.code


def top(scores: np.ndarray, ids: list[str], k: int, banned=frozenset()) -> list[str]:
    order = [j for j in np.argsort(-scores, kind="stable") if ids[j] not in banned]
    return [ids[j] for j in order[:k]]


# --- error types ---------------------------------------------------------------------------


def test_every_wire_error_code_has_exactly_one_error_type() -> None:
    codes = [cls.code for cls in REQUEST_ERRORS]
    assert sorted(codes) == sorted(get_args(ErrorCode))
    assert all(issubclass(cls, RequestError) for cls in REQUEST_ERRORS)


def test_error_replies_encode_exactly_as_the_response_model() -> None:
    p = Pending(Request(request_id="r", type="u2i"), "fm.responses")
    p.fail(InvalidRequest("k must be between 1 and 5, got 9"), 3)
    want = Response(request_id="r", model_version=3,
                    error=ErrorInfo(code="invalid_request", message="k must be between 1 and 5, "
                                                                    "got 9"))
    assert p.encode() == dumps(want)
    ok = Pending(Request(request_id="r", type="u2i"), "fm.responses")
    ok.answer([("a", 1.5)], 2, "popular")
    assert ok.encode() == dumps(Response(request_id="r", items=[ScoredItem(item_id="a", score=1.5)],
                                         model_version=2, fallback="popular"))


def test_answers_name_the_item_version_beside_the_version(world) -> None:
    """The version contract on the wire: an answer names its state's version and the item
    version whose items answered (older when the state is a shared-rows version); errors made
    from a state name both, errors before any state neither."""
    store, state, _ = world
    assert state.item_version == state.version == VERSION  # an item version: itself
    shared = ServingState(state.loaded, None, None, VERSION - 2)
    ok, bad = ask(store, shared, {"type": "u2i", "user_id": "u1", "k": 3},
                  {"type": "i2i", "item_id": "nope", "k": 3})
    for p in (ok, bad):
        wire = orjson.loads(p.encode())
        assert (wire["model_version"], wire["item_version"]) == (VERSION, VERSION - 2)
        assert Response.model_validate(wire).item_version == VERSION - 2
    assert ok.error is None and code(bad) == "unknown_item"
    (early,) = ask(store, None, {"type": "u2i", "user_id": "u1", "k": 3})
    assert code(early) == "not_ready" and orjson.loads(early.encode())["item_version"] is None


def test_offline_i2i_answers_name_the_table_as_i2i_version(world) -> None:
    """An offline i2i answer keeps the version contract (``model_version`` the batch's state,
    ``item_version`` <= it, that state's item version) and names the precomputed table (here
    v5, older than the state) as ``i2i_version``; other answers carry no ``i2i_version``."""
    store, state, _ = world
    shared = ServingState(state.loaded, None, None, VERSION - 2)
    off, miss, online = ask(store, shared,
                            {"type": "i2i", "item_id": "i1", "source": "offline", "k": 3},
                            {"type": "i2i", "item_id": "nope", "source": "offline", "k": 3},
                            {"type": "i2i", "item_id": "i1", "k": 3})
    for p in (off, miss):
        wire = Response.model_validate(orjson.loads(p.encode()))
        assert (wire.model_version, wire.item_version, wire.i2i_version) == (VERSION,
                                                                             VERSION - 2, 5)
        assert wire.item_version <= wire.model_version
    assert off.error is None and code(miss) == "unknown_item"
    assert orjson.loads(online.encode())["i2i_version"] is None


# --- decoding ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "stage"),
    [
        (None, "decode"),
        (b"\xff\xfe\x00binary", "decode"),
        (b"[1, 2]", "decode"),
        (b'"just a string"', "decode"),
        (b'{"type": "u2i", "user_id": "u1"}', "validate"),
        (b'{"request_id": "   ", "type": "u2i", "user_id": "u1"}', "validate"),
        (b'{"request_id": true, "type": "u2i"}', "validate"),
        (b'{"request_id": null, "type": "u2i"}', "validate"),
        (b'{"request_id": ["r"], "type": "u2i"}', "validate"),
        (b'{"request_id": "' + b"x" * 300 + b'", "type": "u2i"}', "validate"),
    ],
)
def test_requests_without_a_usable_id_are_rejected(raw: bytes | None, stage: str) -> None:
    out = decode_request(raw, CONFIG)
    assert isinstance(out, Rejected) and out.stage == stage and out.reason


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"type": "teleport"}, "type"),
        ({"type": "u2i", "k": "ten"}, "k"),
        # a string is not a number, nor a boolean (audit 2026-12-01: lax pydantic took them)
        ({"type": "u2i", "k": "10"}, "k: Value error, expected a JSON number, got a string"),
        ({"type": "u2i", "k": "1e2"}, "k"),
        ({"type": "u2i", "deadline_ms": "4102444800000"},
         "deadline_ms: Value error, expected a JSON number, got a string"),
        ({"type": "u2i", "exclude_seen": "yes"},
         "exclude_seen: Value error, expected true or false, got a string"),
        ({"type": "u2i", "exclude_seen": "true"}, "exclude_seen"),
        ({"type": "u2i", "exclude_seen": 1}, "exclude_seen"),
        ({"type": "u2i", "k": True}, "k"),
        ({"type": "u2i", "k": 0}, "k"),
        ({"type": "u2i", "user_id": "  "}, "user_id"),
        ({"type": "u2i", "deadline_ms": True}, "deadline_ms"),
        ({"type": "u2i", "context": {"hour": True}}, "context"),
        ({"type": "u2i", "context": {"hour": [False]}}, "context"),
        ({"type": "u2i", "exclude_item_ids": [" "]}, "exclude_item_ids"),
        ({"type": "u2i", "reply_to": ""}, "reply_to"),
    ],
)
def test_invalid_requests_with_an_id_get_invalid_request(extra: dict, field: str) -> None:
    out = decode_request(orjson.dumps({"request_id": " r1 ", "user_id": "u1", **extra}), CONFIG)
    assert isinstance(out, Pending) and out.request_id == "r1"
    assert code(out) == "invalid_request" and field in str(out.error)
    assert out.reply_to == CONFIG.topic_responses


@pytest.mark.parametrize(("extra", "k"), [({"k": 10.0}, 10), ({"k": 1e2}, 100), ({}, 10)])
def test_k_is_any_json_number_without_a_fraction(extra: dict, k: int) -> None:
    """JSON has one number type: ``10.0`` and ``1e2`` are the integers 10 and 100 (as ``label``
    1.0 is 1 on events); ``1.5`` is refused (above)."""
    out = decode_request(orjson.dumps({"request_id": "r1", "type": "u2i", "user_id": "u1",
                                       **extra}), CONFIG)
    assert isinstance(out, Pending) and out.error is None and out.request.k == k


def test_integer_request_ids_are_their_decimal_text() -> None:
    out = decode_request(b'{"request_id": 42, "type": "u2i", "user_id": "u"}', CONFIG)
    assert isinstance(out, Pending) and out.request_id == "42" and out.error is None
    bad = decode_request(b'{"request_id": 42, "type": "nope"}', CONFIG)
    assert isinstance(bad, Pending) and bad.request_id == "42" and code(bad) == "invalid_request"


@pytest.mark.parametrize(
    "topic",
    ["bad topic!", ".", "..", "__consumer_offsets", "__transaction_state", "fm.events",
     "fm.requests", "x" * 250, "fm.replies.a/b", "fm.replies.ü", "fm.replies", "fm.dlq"],
)
def test_illegal_or_unlisted_reply_to_is_answered_on_the_response_topic(topic: str) -> None:
    raw = orjson.dumps({"request_id": "r", "type": "u2i", "user_id": "u", "reply_to": topic})
    out = decode_request(raw, CONFIG)
    assert isinstance(out, Pending) and code(out) == "invalid_request"
    assert out.reply_to == CONFIG.topic_responses
    with pytest.raises(InvalidRequest):
        check_reply_to(topic, CONFIG)


@pytest.mark.parametrize("topic", ["fm.responses", "fm.replies.client-7", "fm.replies.a_b.C-9"])
def test_allowed_reply_to(topic: str) -> None:
    raw = orjson.dumps({"request_id": "r", "type": "u2i", "user_id": "u", "reply_to": topic})
    out = decode_request(raw, CONFIG)
    assert isinstance(out, Pending) and out.error is None and out.reply_to == topic


def test_the_allow_list_follows_the_config() -> None:
    only_default = ServingConfig(reply_prefixes=())
    with pytest.raises(InvalidRequest):
        check_reply_to("fm.replies.x", only_default)
    custom = ServingConfig(topic_responses="answers", reply_prefixes=("team-a.", "team-b."))
    assert check_reply_to("answers", custom) == "answers"
    assert check_reply_to("team-b.x", custom) == "team-b.x"
    with pytest.raises(InvalidRequest):
        check_reply_to("fm.responses", custom)


def test_no_prefix_opens_fmstreams_own_topics_to_replies() -> None:
    broad = ServingConfig(reply_prefixes=("fm.", ""))  # an operator's broad prefix
    for topic in ("fm.requests", "fm.dlq", "fm.events", "fm.users", "fm.items"):
        with pytest.raises(InvalidRequest, match="own input or dead-letter topics"):
            check_reply_to(topic, broad)
    assert check_reply_to("fm.replies.x", broad) == "fm.replies.x"
    assert check_reply_to("fm.responses", broad) == "fm.responses"
    renamed = ServingConfig(reply_prefixes=("a.",), input_topics=("a.clicks",))
    with pytest.raises(InvalidRequest, match="own input"):
        check_reply_to("a.clicks", renamed)
    assert check_reply_to("fm.events", ServingConfig(reply_prefixes=("fm.",), input_topics=()))


def test_oversized_requests_get_an_error_reply_when_their_id_can_be_read() -> None:
    big = {"request_id": "big-1", "type": "u2i", "user_id": "u",
           "exclude_item_ids": [f"item-{j}" for j in range(2000)], "reply_to": "fm.replies.c"}
    raw = orjson.dumps(big)
    assert len(raw) > CONFIG.max_message_bytes
    out = decode_request(raw, CONFIG)
    assert isinstance(out, Pending) and out.request_id == "big-1"
    assert code(out) == "invalid_request" and str(len(raw)) in str(out.error)
    assert out.reply_to == "fm.replies.c"
    # cut in the middle (not JSON any more): the id is still found at the head
    cut = decode_request(raw[: CONFIG.max_message_bytes + 10], CONFIG)
    assert isinstance(cut, Pending) and cut.request_id == "big-1"
    # an illegal reply_to of an oversized request: answered on the response topic
    evil = orjson.dumps({**big, "reply_to": "__consumer_offsets"})
    out = decode_request(evil, CONFIG)
    assert isinstance(out, Pending) and out.reply_to == CONFIG.topic_responses
    # no id anywhere: a dead letter
    anon = decode_request(b'{"type": "u2i", "pad": "' + b"x" * 5000 + b'"}', CONFIG)
    assert isinstance(anon, Rejected) and anon.stage == "decode"
    blob = decode_request(b"\x00" * 5000, CONFIG)
    assert isinstance(blob, Rejected)


# --- answering -----------------------------------------------------------------------------


def test_u2i_is_the_exact_top_k_with_bias(world) -> None:
    store, state, snap = world
    for user in ("u0", "u3"):
        [p] = ask(store, state, {"type": "u2i", "user_id": user, "k": 7})
        scores = snap.vectors @ store.users[user] + snap.bias
        assert p.error is None and p.version == VERSION and p.fallback is None
        assert [i for i, _ in p.items] == top(scores, snap.item_ids, 7)
        np.testing.assert_allclose([s for _, s in p.items],
                                   np.sort(scores)[::-1][:7], rtol=1e-5)


def test_exclusions_and_exclude_seen(world) -> None:
    store, state, snap = world
    [p] = ask(store, state, {"type": "u2i", "user_id": "u1", "k": 10, "exclude_seen": True,
                             "exclude_item_ids": ["i0", "i9"]})
    scores = snap.vectors @ store.users["u1"] + snap.bias
    banned = {"i3", "i4", "i5", "i0", "i9"}
    assert [i for i, _ in p.items] == top(scores, snap.item_ids, 10, banned)


def test_a_batch_reads_the_store_once_per_kind(world) -> None:
    store, state, _ = world
    pendings = ask(store, state, *[{"type": "u2i", "user_id": f"u{n}", "exclude_seen": True}
                                   for n in range(5)],
                   {"type": "rank", "user_id": "u2", "item_ids": ["i1", "i2"]})
    assert all(p.error is None for p in pendings)
    assert store.calls == ["vectors", "histories"]


def test_unknown_user_gets_popular_items_minus_exclusions(world) -> None:
    store, state, _ = world
    [p] = ask(store, state, {"type": "u2i", "user_id": "stranger", "k": 3,
                             "exclude_item_ids": ["i0"]})
    assert p.fallback == "popular" and [i for i, _ in p.items] == ["i1", "i2", "i3"]


def test_i2i_online_never_returns_the_item_itself(world) -> None:
    store, state, snap = world
    [p] = ask(store, state, {"type": "i2i", "item_id": "i8", "k": 5})
    scores = snap.vectors @ item_queries(snap.vectors[[8]])[0]
    assert [i for i, _ in p.items] == top(scores, snap.item_ids, 5, {"i8"})


def test_i2i_offline_and_history(world) -> None:
    store, state, _ = world
    off, hist, none = ask(store, state,
                          {"type": "i2i", "item_id": "i1", "source": "offline", "k": 3},
                          {"type": "i2i_history", "user_id": "u1", "k": 4},
                          {"type": "i2i_history", "user_id": "u2", "k": 4})
    assert off.i2i_version == 5 and [i for i, _ in off.items] == ["i2", "i3", "i4"]
    assert (off.version, off.item_version) == (state.version, state.item_version)
    assert len(hist.items) == 4 and not {i for i, _ in hist.items} & {"i3", "i4", "i5"}
    assert none.fallback == "popular"


def test_rank_orders_the_given_items(world) -> None:
    store, state, snap = world
    [p] = ask(store, state, {"type": "rank", "user_id": "u4", "item_ids": ["i1", "i30", "zz"]})
    scores = {i: float(snap.vectors[int(i[1:])] @ store.users["u4"] + snap.bias)
              for i in ("i1", "i30")}
    assert [i for i, _ in p.items] == sorted(scores, key=lambda i: -scores[i])


@pytest.mark.parametrize(
    ("request_", "want"),
    [
        ({"type": "i2i", "item_id": "nope"}, "unknown_item"),
        ({"type": "i2i", "item_id": "nope", "source": "offline"}, "unknown_item"),
        ({"type": "rank", "user_id": "stranger", "item_ids": ["i1"]}, "unknown_user"),
        ({"type": "rank", "user_id": "u1", "item_ids": ["x", "y"]}, "unknown_item"),
        ({"type": "rank", "user_id": "u1"}, "invalid_request"),
        ({"type": "i2i"}, "invalid_request"),
        ({"type": "u2i", "user_id": "u1", "k": 51}, "invalid_request"),
        ({"type": "u2i", "user_id": "u1", "deadline_ms": 1000.0}, "deadline_exceeded"),
    ],
)
def test_error_codes(world, request_: dict, want: str) -> None:
    store, state, _ = world
    ok, p = ask(store, state, {"type": "u2i", "user_id": "u0"}, request_)
    assert code(p) == want and p.items is None and str(p.error)
    assert ok.error is None  # one bad request never fails another


def test_not_ready_without_an_index(world) -> None:
    store, _, _ = world
    [p] = ask(store, None, {"type": "u2i", "user_id": "u0"})
    assert code(p) == "not_ready"


def test_a_store_failure_is_internal_and_the_deadline_still_counts(world) -> None:
    store, state, _ = world
    broken = BrokenStore(store.users, store.histories, store.offline, store.popular)
    future = time.time() * 1000 + 60_000
    a, b = ask(broken, state, {"type": "u2i", "user_id": "u0", "deadline_ms": future},
               {"type": "i2i", "item_id": "i1"})
    assert code(a) == "internal" and "redis fell over" in str(a.error)
    assert b.error is None  # i2i needs no user vector: answered on its own


def test_a_store_away_fails_the_requests_reading_it_at_once_and_answers_the_others(world) -> None:
    store, state, _ = world
    down = DownStore(store.users, store.histories, store.offline, store.popular)
    requests = [{"type": "u2i", "user_id": f"u{n}"} for n in range(6)]
    requests += [{"type": "i2i", "item_id": "i1"}, {"type": "i2i", "item_id": "i1",
                                                    "source": "offline"}]
    out = ask(down, state, *requests)
    for p in out[:6] + out[7:]:
        assert code(p) == "internal" and "retry shortly" in str(p.error), p.error
        assert p.version == VERSION
    assert out[6].error is None and len(out[6].items) == 10  # online i2i reads nothing from it
    # one attempt for the batch, none per request: a dead Redis is not waited on eight times
    assert down.calls == ["vectors"]


def test_a_store_away_in_the_one_by_one_retry_is_not_waited_on_again(world) -> None:
    store, state, _ = world

    class Flaky(DownStore):
        """The batch fails for another reason first (a bad request), then Redis is away."""

        def get_user_vectors(self, user_ids, *, shared=None):
            if len(user_ids) > 1:
                self.calls.append("batch")
                raise RuntimeError("something else")
            self._down("vectors")

    flaky = Flaky(store.users, store.histories, store.offline, store.popular)
    out = ask(flaky, state, *[{"type": "u2i", "user_id": f"u{n}"} for n in range(5)])
    assert [code(p) for p in out] == ["internal"] * 5
    assert all("retry shortly" in str(p.error) for p in out)
    assert flaky.calls == ["batch", "vectors"]  # the first lone request found it away
