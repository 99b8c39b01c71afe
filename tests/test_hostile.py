"""Hostile input against a real worker, a real 3-worker group and a real trainer.

A catalogue of malformed requests and events (bad JSON, binary, null key/value, wrong types,
booleans as numbers, whitespace ids, huge values, unicode, ~1 MB messages, illegal ``reply_to``,
nested junk, ...) and a hypothesis-generated batch of each are sent in rounds. After each round:
the process is alive, a valid message on every partition is answered (or applied), and every
hostile message was answered, applied or dead-lettered exactly as the contract says:

- requests: ``answered + dead-lettered == sent``, each answered once with the expected code, each
  dead letter named by its source ``topic/partition/offset``;
- events: ``applied (trainer checkpoint counter) + dead-lettered == sent``.

Expected verdicts of the catalogue are written out; those of generated messages come from the
pure decoders (``serving.answering.decode_request``, ``stream.schemas.parse_event``), so the rounds
check
that the running processes follow their decoders and survive everything.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from kafka import TopicPartition

from fmstream.app import run_trainer
from fmstream.settings import Settings
from model.checkpoint import CheckpointError, latest_checkpoint
from model.online import OnlineFM, TrainConfig
from model.schema import FeatureSchema
from serving.answering import Pending, decode_request
from serving.store import VectorStore
from stream.consume import make_producer
from stream.lag import group_lag
from stream.replay import produce_profiles
from stream.schemas import (
    MAX_EVENT_AHEAD_S,
    DecodeError,
    MessageInvalid,
    check_event_time,
    loads_object,
    parse_event,
)
from stream.synthetic import SyntheticStream
from tests.kafka_helpers import KafkaIO, wait_for
from tests.worker_helpers import RunningWorker, launch_worker
from train.publisher import Publisher
from train.store_writer import StoreWriter

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "config" / "synthetic.toml"
STREAM = SyntheticStream(users=50, items=80, clusters=4, seed=2)
DEAD = "dead"
OK = "ok"
MB = 1_000_000
HYPOTHESIS = hsettings(
    max_examples=1,
    derandomize=True,
    phases=[Phase.generate],
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def j(obj: Any) -> bytes:
    return orjson.dumps(obj)


# --- the request catalogue --------------------------------------------------------------------


def request_catalogue(s: Settings) -> list[tuple[str, bytes | None, bytes | None, str]]:
    """``(request id or label, key, value, expected)``: expected is an error code, ``ok`` (an
    answer) or ``dead`` (a dead letter; the first field is then only a label)."""
    u = {"type": "u2i", "user_id": "u1"}
    cases: list[tuple[str, bytes | None, str]] = [
        # nothing says whom to answer: dead letters
        ("null value", None, DEAD),
        ("empty bytes", b"", DEAD),
        ("not json", b"not json at all", DEAD),
        ("binary", bytes(range(256)), DEAD),
        ("a list", b"[1, 2, 3]", DEAD),
        ("a string", b'"r1"', DEAD),
        ("json null", b"null", DEAD),
        ("a number", b"42", DEAD),
        ("empty object", b"{}", DEAD),
        ("no request id", j(u), DEAD),
        ("whitespace id", j({"request_id": "   ", **u}), DEAD),
        ("empty id", j({"request_id": "", **u}), DEAD),
        ("boolean id", j({"request_id": True, **u}), DEAD),
        ("null id", j({"request_id": None, **u}), DEAD),
        ("list id", j({"request_id": ["h"], **u}), DEAD),
        ("object id", j({"request_id": {"x": 1}, **u}), DEAD),
        ("float id", j({"request_id": 1.5, **u}), DEAD),
        ("300-char id", j({"request_id": "x" * 300, **u}), DEAD),
        ("1 MB without id", j({"pad": "x" * (MB - 100)}), DEAD),
        ("100 kB binary", b"\xff" * 100_000, DEAD),
        ("deep nesting", b"[" * 5000 + b"]" * 5000, DEAD),
        ("cut json", b'{"request_id": "cut", "type": ', DEAD),
        ("bad utf-8", b'{"request_id": "h\xff\xfe", "type": "u2i"}', DEAD),
        ("NaN literal", b'{"request_id": "nan", "type": "u2i", "k": NaN}', DEAD),
        ("lone surrogate", b'{"request_id": "\\ud800", "type": "u2i"}', DEAD),
        # not JSON numbers, whichever field holds them (as NaN above): never an endless deadline
        ("Infinity literal", b'{"request_id": "inf", "type": "u2i", "user_id": "u1", '
                             b'"deadline_ms": Infinity}', DEAD),
        ("1e999", b'{"request_id": "big", "type": "u2i", "user_id": "u1", '
                  b'"deadline_ms": 1e999}', DEAD),
    ]
    answered: list[tuple[dict, str]] = [
        ({"type": "teleport", "user_id": "u1"}, "invalid_request"),
        ({"user_id": "u1"}, "invalid_request"),
        ({"type": 5, "user_id": "u1"}, "invalid_request"),
        ({"type": "u2i"}, "invalid_request"),
        ({"type": "i2i"}, "invalid_request"),
        ({"type": "rank", "user_id": "u1"}, "invalid_request"),
        ({**u, "k": "ten"}, "invalid_request"),
        ({**u, "k": True}, "invalid_request"),
        ({**u, "k": 0}, "invalid_request"),
        ({**u, "k": -3}, "invalid_request"),
        ({**u, "k": 1.5}, "invalid_request"),
        ({**u, "k": 10**18}, "invalid_request"),
        ({**u, "k": s.max_k + 1}, "invalid_request"),
        ({"type": "u2i", "user_id": "   "}, "invalid_request"),
        ({"type": "u2i", "user_id": True}, "invalid_request"),
        ({"type": "i2i", "item_id": ["i1"]}, "invalid_request"),
        ({"type": "rank", "user_id": "u1", "item_ids": "i1"}, "invalid_request"),
        ({"type": "rank", "user_id": "u1", "item_ids": [True]}, "invalid_request"),
        ({"type": "rank", "user_id": "u1", "item_ids": []}, "invalid_request"),
        ({"type": "rank", "user_id": "u1", "item_ids": [{"i": 1}]}, "invalid_request"),
        ({"type": "rank", "user_id": "u1", "item_ids": [f"i{n}" for n in range(100_000)]},
         "invalid_request"),  # ~1 MB
        ({"type": "u2i", "user_id": 17}, OK),  # an integer id is its decimal text
        ({"type": "u2i", "user_id": ["u1"]}, "invalid_request"),
        ({**u, "context": {"hour": [["1"]]}}, "invalid_request"),
        ({**u, "context": {"unknown_field": "v"}}, OK),  # a field the schema lacks: ignored
        ({**u, "reply_to": s.topic_requests}, "invalid_request"),  # its own input
        ({**u, "reply_to": s.topic_users}, "invalid_request"),
        ({**u, "exclude_item_ids": [f"i{n}" for n in range(10_001)]}, "invalid_request"),
        ({**u, "exclude_item_ids": [" "]}, "invalid_request"),
        ({**u, "context": "x"}, "invalid_request"),
        ({**u, "context": {"hour": True}}, "invalid_request"),
        ({**u, "context": {"hour": {"a": 1}}}, "invalid_request"),
        ({**u, "context": {"hour": ["1", "2"]}}, "invalid_request"),  # refused by the model
        ({**u, "context": {f"f{n}": "v" for n in range(65)}}, "invalid_request"),
        ({**u, "deadline_ms": True}, "invalid_request"),
        ({**u, "deadline_ms": -5}, "invalid_request"),
        ({**u, "deadline_ms": 1000.0}, "deadline_exceeded"),
        ({"type": "i2i", "item_id": "i1", "source": "psychic"}, "invalid_request"),
        ({**u, "exclude_seen": "maybe"}, "invalid_request"),
        # strings are not numbers or booleans, even when they read as one (no lax coercion)
        ({**u, "k": "10"}, "invalid_request"),
        ({**u, "deadline_ms": "4102444800000"}, "invalid_request"),
        ({**u, "exclude_seen": "yes"}, "invalid_request"),
        ({**u, "exclude_seen": 1}, "invalid_request"),
        ({**u, "k": 10.0}, OK),  # JSON has one number type: 10.0 is the integer 10
        ({**u, "reply_to": "bad topic!"}, "invalid_request"),
        ({**u, "reply_to": "."}, "invalid_request"),
        ({**u, "reply_to": ".."}, "invalid_request"),
        ({**u, "reply_to": "__consumer_offsets"}, "invalid_request"),
        ({**u, "reply_to": s.topic_events}, "invalid_request"),
        ({**u, "reply_to": s.topic_dlq}, "invalid_request"),
        ({**u, "reply_to": "x" * 250}, "invalid_request"),
        ({**u, "reply_to": ""}, "invalid_request"),
        ({**u, "reply_to": 5}, "invalid_request"),
        ({**u, "exclude_item_ids": ["i1"] * 150_000}, "invalid_request"),  # ~1 MB with an id
        ({"type": "i2i", "item_id": "no-such-item"}, "unknown_item"),
        ({"type": "rank", "user_id": "nobody", "item_ids": ["i1"]}, "unknown_user"),
        ({"type": "u2i", "user_id": "ü🙂\u200b"}, OK),
        ({**u, "evil": {"nested": [[[{"x": None}]]]}, "k": 3}, OK),
        ({"type": "i2i", "item_id": "i3", "k": 2, "exclude_item_ids": ["zz", "i9"]}, OK),
    ]
    out: list[tuple[str, bytes | None, bytes | None, str]] = [
        (label, b"k", value, want) for label, value, want in cases
    ]
    for n, (fields, want) in enumerate(answered):
        rid = f"h{n}"
        out.append((rid, rid.encode(), j({"request_id": rid, **fields}), want))
    # ids that need a closer look: padded, unicode, integer, a null key, a cut oversized request
    out += [
        ("h-pad", b"h-pad", j({"request_id": "  h-pad\t", **u}), OK),
        ("h-ü🙂", "h-ü🙂".encode(), j({"request_id": "h-ü🙂", **u}), OK),
        ("4242", b"4242", j({"request_id": 4242, "type": "nope"}), "invalid_request"),
        ("h-nullkey", None, j({"request_id": "h-nullkey", **u}), OK),
        ("h-cut", b"h-cut", b'{"request_id": "h-cut", "type": "u2i", "pad": "'
         + b"x" * 80_000, "invalid_request"),
    ]
    return out


def expected_request(value: bytes | None, s: Settings) -> tuple[str, str | None]:
    """What the pure decoder says of ``value``: (``dead``, None) or (``answered``, request id)."""
    out = decode_request(value, s.serving_config())
    return ("answered", out.request_id) if isinstance(out, Pending) else (DEAD, None)


# --- a served model and running workers --------------------------------------------------------


def publish(settings: Settings, redis_client: redis.Redis) -> VectorStore:
    model = OnlineFM(FeatureSchema.load(SCHEMA), TrainConfig(dim=8, seed=3))
    events = list(STREAM.events(1500))
    model.learn_many([e["user_id"] for e in events], [e["item_id"] for e in events],
                     contexts=[e["context"] for e in events])
    writer = StoreWriter(redis_client, settings.redis_keys(), settings.keep_versions)
    Publisher(settings.publish_config(), writer, model).publish_all()
    return VectorStore(redis_client, settings.redis_keys())


def start_workers(settings: Settings, store: VectorStore, n: int) -> list[RunningWorker]:
    running = [launch_worker(settings, store, f"hostile-{k}") for k in range(n)]
    for r in running:
        r.wait_ready(90)
    wait_for(lambda: all(r.worker.state is not None for r in running), 60, "the index")
    return running


@pytest.fixture
def store(settings: Settings, redis_client: redis.Redis) -> VectorStore:
    return publish(settings, redis_client)


# --- rounds of requests -------------------------------------------------------------------------


def _since(records: list, start: dict[TopicPartition, int]) -> list:
    return [r for r in records if r.offset >= start.get(TopicPartition(r.topic, r.partition), 0)]


def _all_committed(s: Settings, kafka_io: KafkaIO) -> bool:
    """Has the serving group committed every request sent so far?

    A request answered but not yet committed when its worker leaves (or the group rebalances
    under load) is redelivered to the next owner: at-least-once. A round waits for this
    before it starts, so a redelivery from an earlier round cannot count as one of its answers.
    """
    return all(p.lag == 0 for p in group_lag(kafka_io.kafka, s.serving_group, [s.topic_requests]))


def request_round(s: Settings, kafka_io: KafkaIO, messages: list[tuple[bytes | None, bytes | None]],
                  expected: list[tuple[str, str | None]], codes: list[str | None] | None = None,
                  *, exactly_once: bool = True) -> dict[str, dict]:
    """Send ``messages`` then one valid probe per partition; check every verdict and count.
    Returns the answers by request id."""
    wait_for(lambda: _all_committed(s, kafka_io), 90, "the earlier requests committed", poll_s=0.5)
    resp_start = kafka_io.end_offsets(s.topic_responses)
    dlq_start = kafka_io.end_offsets(s.topic_dlq)
    meta = kafka_io.produce(s.topic_requests, messages, timeout_s=60)
    parts = sorted({tp.partition for tp in kafka_io.end_offsets(s.topic_requests)})
    tag = f"{time.monotonic_ns()}"
    probes = {f"probe-{tag}-{p}": p for p in parts}
    for rid, p in probes.items():
        kafka_io.produce(s.topic_requests, [(rid, j({"request_id": rid, "type": "i2i",
                                                     "item_id": "i1", "k": 2}))], partition=p)
    want_answers = {rid for verdict, rid in expected if verdict == "answered"} | set(probes)
    want_dead = {f"{s.topic_requests}/{m.partition}/{m.offset}"
                 for m, (verdict, _) in zip(meta, expected, strict=True) if verdict == DEAD}

    def answers() -> list:
        return _since(kafka_io.consume_all(s.topic_responses, timeout_s=30), resp_start)

    def letters() -> list:
        return _since(kafka_io.consume_all(s.topic_dlq, timeout_s=30), dlq_start)

    wait_for(lambda: want_answers <= {r.key.decode() for r in answers()}, 90,
             "every answer", poll_s=0.5)
    wait_for(lambda: want_dead <= {orjson.loads(r.value)["id"] for r in letters()}, 60,
             "every dead letter", poll_s=0.5)
    got = answers()
    by_id = {}
    counts = Counter()
    for r in got:
        body = orjson.loads(r.value)
        counts[body["request_id"]] += 1
        by_id[body["request_id"]] = body
    dead = [orjson.loads(r.value) for r in letters()]
    dead_ids = Counter(d["id"] for d in dead)
    for rid in probes:
        assert by_id[rid]["error"] is None, by_id[rid]
    hostile_answers = set(counts) - set(probes)
    assert hostile_answers == want_answers - set(probes)
    assert set(dead_ids) == want_dead
    assert len(hostile_answers) + len(dead_ids) == len(messages)
    if exactly_once:
        assert all(counts[rid] == 1 for rid in want_answers), counts.most_common(3)
        assert all(c == 1 for c in dead_ids.values())
    for d in dead:
        assert len(orjson.dumps(d)) < 100_000 and d["reason"] and d["value_sha256"]
    if codes is not None:
        for (verdict, rid), want in zip(expected, codes, strict=True):
            if verdict != "answered":
                continue
            error = by_id[rid]["error"]
            if want == OK:
                assert error is None, (rid, error)
            else:
                assert error is not None and error["code"] == want, (rid, by_id[rid])
    return by_id


def catalogue_round(s: Settings, kafka_io: KafkaIO, *, exactly_once: bool = True) -> int:
    catalogue = request_catalogue(s)
    expected = []
    for label, _key, value, want in catalogue:
        verdict, rid = expected_request(value, s)
        assert (verdict == DEAD) == (want == DEAD), (label, verdict)
        assert want == DEAD or rid == label, (label, rid)
        expected.append((verdict, rid))
    request_round(s, kafka_io, [(k, v) for _, k, v, _ in catalogue], expected,
                  [w for *_, w in catalogue], exactly_once=exactly_once)
    return len(catalogue)


_ids = st.one_of(st.text(max_size=12), st.integers(-(2**53), 2**53), st.booleans(), st.none(),
                 st.sampled_from(["   ", "\t", "u1", "i1", "ü"]),
                 st.lists(st.integers(), max_size=2))
_requests = st.fixed_dictionaries(
    {},
    optional={
        "request_id": _ids,
        "type": st.one_of(st.sampled_from(["u2i", "i2i", "i2i_history", "rank"]),
                          st.text(max_size=5), st.integers()),
        "user_id": _ids,
        "item_id": _ids,
        "item_ids": st.one_of(st.lists(_ids, max_size=4), _ids),
        "k": st.one_of(st.integers(-5, 2000), st.booleans(), st.floats(allow_nan=False),
                       st.text(max_size=3)),
        "exclude_seen": st.one_of(st.booleans(), st.integers(), st.text(max_size=3)),
        "exclude_item_ids": st.one_of(st.lists(_ids, max_size=3), _ids),
        "context": st.one_of(
            st.dictionaries(st.sampled_from(["hour", "x", ""]),
                            st.one_of(st.text(max_size=4), st.integers(), st.booleans(),
                                      st.none(), st.lists(st.text(max_size=2), max_size=2)),
                            max_size=3),
            _ids),
        "source": st.sampled_from(["online", "offline", "?"]),
        "reply_to": st.one_of(st.sampled_from(["fm.responses", "__x", ".", "a b", ""]),
                              st.text(max_size=8)),
        "deadline_ms": st.one_of(st.floats(allow_nan=False), st.booleans(), st.none()),
    },
)
_request_bytes = st.one_of(_requests.map(j), st.binary(max_size=40), st.none())


@given(data=st.data())
@HYPOTHESIS
def test_one_worker_answers_or_dead_letters_every_hostile_request(
    settings: Settings, store: VectorStore, kafka_io: KafkaIO, data: st.DataObject
) -> None:
    workers = start_workers(settings, store, 1)
    try:
        sent = catalogue_round(settings, kafka_io)
        assert workers[0].thread.is_alive()
        # a generated batch: verdicts from the pure decoder; usable ids made unique
        raw = data.draw(st.lists(_request_bytes, min_size=60, max_size=60), label="requests")
        messages, expected, seen = [], [], set()
        for value in raw:
            verdict, rid = expected_request(value, settings)
            if verdict == "answered" and (rid in seen or rid.startswith(("h", "probe"))):
                continue
            seen.add(rid)
            messages.append((None, value))
            expected.append((verdict, rid))
        request_round(settings, kafka_io, messages, expected)
        sent += len(messages)
        assert sent >= 100 and workers[0].thread.is_alive()
    finally:
        for w in workers:
            w.close()


def test_a_string_k_is_answered_invalid_request_and_the_next_request_is_answered(
    settings: Settings, store: VectorStore, kafka_io: KafkaIO
) -> None:
    """``"k": "10"`` (a string, which lax decoding read as 10) gets an ``invalid_request`` answer
    naming the field, the expected type and what came; the valid request behind it on the same
    partition is answered."""
    workers = start_workers(settings, store, 1)
    try:
        bad = {"request_id": "k-text", "type": "u2i", "user_id": "u1", "k": "10"}
        good = {"request_id": "k-after", "type": "u2i", "user_id": "u1", "k": 10}
        by_id = request_round(settings, kafka_io, [(b"same", j(bad)), (b"same", j(good))],
                              [("answered", "k-text"), ("answered", "k-after")],
                              ["invalid_request", OK])
        message = by_id["k-text"]["error"]["message"]
        assert message.startswith("k: ") and "expected a JSON number, got a string" in message
        assert "'10'" in message
        assert len(by_id["k-after"]["items"]) == 10 and workers[0].thread.is_alive()
    finally:
        for w in workers:
            w.close()


def test_a_three_worker_group_survives_every_hostile_request(
    settings: Settings, store: VectorStore, kafka_io: KafkaIO
) -> None:
    workers = start_workers(settings, store, 3)
    try:
        catalogue_round(settings, kafka_io, exactly_once=False)
        assert all(w.thread.is_alive() for w in workers)
        assert sum(w.worker.answered for w in workers) > 0
    finally:
        for w in workers:
            w.close()


# --- rounds of events ---------------------------------------------------------------------------


def event_catalogue(s: Settings) -> list[tuple[str, bytes | None, str]]:
    """``(label, value, expected stage or "applied")``."""
    e = {"user_id": "u1", "item_id": "i1"}
    return [
        ("null value", None, "decode"),
        ("empty bytes", b"", "decode"),
        ("not json", b"garbage", "decode"),
        ("binary", bytes(range(256)), "decode"),
        ("a list", b"[1, 2]", "decode"),
        ("a string", b'"u1"', "decode"),
        ("json null", b"null", "decode"),
        ("a number", b"7", "decode"),
        ("NaN literal", b'{"user_id": "u1", "item_id": "i1", "ts": NaN}', "decode"),
        ("infinity", b'{"user_id": "u1", "item_id": "i1", "ts": 1e999}', "decode"),
        ("lone surrogate", b'{"user_id": "\\ud800", "item_id": "i1"}', "decode"),
        ("bad utf-8", b'{"user_id": "\xff", "item_id": "i1"}', "decode"),
        ("1 MB", j({**e, "pad": "x" * MB}), "decode"),
        ("70 kB", j({**e, "pad": "x" * 70_000}), "decode"),
        ("deep nesting", b"[" * 5000 + b"]" * 5000, "decode"),
        ("empty object", b"{}", "validate"),
        ("no item", j({"user_id": "u1"}), "validate"),
        ("no user", j({"item_id": "i1"}), "validate"),
        ("whitespace user", j({"user_id": "   ", "item_id": "i1"}), "validate"),
        ("whitespace item", j({"user_id": "u1", "item_id": "\t\n"}), "validate"),
        ("empty user", j({"user_id": "", "item_id": "i1"}), "validate"),
        ("boolean user", j({"user_id": True, "item_id": "i1"}), "validate"),
        ("null user", j({"user_id": None, "item_id": "i1"}), "validate"),
        ("list user", j({"user_id": ["u1"], "item_id": "i1"}), "validate"),
        ("object item", j({"user_id": "u1", "item_id": {"i": 1}}), "validate"),
        ("float user", j({"user_id": 1.5, "item_id": "i1"}), "validate"),
        ("300-char user", j({"user_id": "u" * 300, "item_id": "i1"}), "validate"),
        ("boolean label", j({**e, "label": True}), "validate"),
        ("label 2", j({**e, "label": 2}), "validate"),
        ("label -1", j({**e, "label": -1}), "validate"),
        ("label 0.5", j({**e, "label": 0.5}), "validate"),
        ("label yes", j({**e, "label": "yes"}), "validate"),
        ("boolean ts", j({**e, "ts": False}), "validate"),
        ("ts text", j({**e, "ts": "yesterday"}), "validate"),
        ("ts as numeric text", j({**e, "ts": "881250949.0"}), "validate"),
        ("label as numeric text", j({**e, "label": "1"}), "validate"),
        ("ts negative", j({**e, "ts": -5}), "validate"),
        ("ts far future", j({**e, "ts": 1e12}), "validate"),
        # within the wire's range but from the future: it would move the trainer's newest event
        # time (event-time lag) for good
        ("ts in 3998 AD", j({**e, "ts": 6.4e10}), "validate"),
        ("ts in two hours", j({**e, "ts": time.time() + 2 * 3600}), "validate"),
        ("ts in 1970", j({**e, "ts": 1.0}), "applied"),
        # a key given twice: the last one counts, on the fast (msgspec) path as on the general one
        ("user twice, last blank", b'{"user_id": "u1", "user_id": " ", "item_id": "i1"}',
         "validate"),
        ("label twice, last valid", b'{"user_id": "u1", "item_id": "i1", "label": 7, "label": 0}',
         "applied"),
        ("context text", j({**e, "context": "x"}), "validate"),
        ("boolean context", j({**e, "context": {"hour": True}}), "validate"),
        ("boolean in a list", j({**e, "context": {"hour": [False, "1"]}}), "validate"),
        ("nested context", j({**e, "context": {"hour": {"a": [1]}}}), "validate"),
        ("null context value", j({**e, "context": {"hour": None}}), "validate"),
        ("65 features", j({**e, "context": {f"f{n}": "v" for n in range(65)}}), "validate"),
        ("257 list values", j({**e, "context": {"hour": ["1"] * 257}}), "validate"),
        ("profile text", j({**e, "user": "segment"}), "validate"),
        ("boolean profile", j({**e, "item": {"category": True}}), "validate"),
        ("list for a categorical", j({**e, "context": {"hour": ["1", "2"]}}), "apply"),
        ("list profile", j({"user_id": "u2", "item_id": "i2", "user": {"segment": ["a", "b"]}}),
         "apply"),
        # odd but valid: applied
        ("padded ids", j({"user_id": " u3 ", "item_id": "i3\n"}), "applied"),
        ("integer ids", j({"user_id": 17, "item_id": 23}), "applied"),
        ("unicode ids", j({"user_id": "ü🙂", "item_id": "日本"}), "applied"),
        ("extra fields", j({**e, "junk": [[[None]]], "label": 0}), "applied"),
        ("numbers", j({**e, "ts": 1_700_000_000, "context": {"x": 1.5, "hour": 7}}), "applied"),
    ]


def expected_event(value: bytes | None, s: Settings) -> str:
    """The stage a message fails at by the wire rules (``applied`` if it passes them)."""
    if value is None or len(value) > s.max_message_bytes:
        return "decode"
    try:
        check_event_time(parse_event(loads_object(value)).ts, time.time())
    except DecodeError:
        return "decode"
    except MessageInvalid:
        return "validate"
    return "applied"


@dataclass
class TrainerRun:
    thread: threading.Thread
    stop: threading.Event


def checkpoint_meta(s: Settings) -> dict[str, Any] | None:
    for _ in range(20):
        try:
            newest = latest_checkpoint(s.checkpoint_dir)
            return None if newest is None else newest[1]
        except (CheckpointError, OSError):
            time.sleep(0.05)
    return None


def wait_checkpoint_past_all(
    s: Settings, kafka_io: KafkaIO, trainer: threading.Thread,
    probe: Callable[[int], tuple[bytes, bytes]], what: str,
) -> int:
    """Send ``probe(p)`` (key, value) to every partition ``p`` of the events topic and wait until
    a checkpoint covers every partition's end (the trainer went past everything sent before);
    the ``trainer`` thread must still run. Returns how many probes were sent."""
    parts = sorted({tp.partition for tp in kafka_io.end_offsets(s.topic_events)})
    for p in parts:
        kafka_io.produce(s.topic_events, [probe(p)], partition=p)
    ends = {f"{tp.topic}|{tp.partition}": o
            for tp, o in kafka_io.end_offsets(s.topic_events).items()}

    def covered() -> bool:
        m = checkpoint_meta(s)
        return m is not None and all(m["positions"].get(k, 0) >= o for k, o in ends.items())

    wait_for(covered, 120, what, poll_s=0.5)
    assert trainer.is_alive()
    return len(parts)


def event_round(s: Settings, kafka_io: KafkaIO, trainer: TrainerRun,
                messages: list[tuple[bytes | None, bytes | None]], stages: list[str]) -> None:
    """Send ``messages`` then a valid event on every partition; wait until the trainer's
    checkpoint covers them; check ``applied + dead-lettered == sent`` and every stage."""
    before = checkpoint_meta(s)
    applied_before = 0 if before is None else int(before["events_applied"])
    dlq_start = kafka_io.end_offsets(s.topic_dlq)
    meta = kafka_io.produce(s.topic_events, messages, timeout_s=60)
    probes = wait_checkpoint_past_all(s, kafka_io, trainer.thread,
                                      lambda p: (b"u1", j({"user_id": f"u{p}", "item_id": "i1"})),
                                      "a checkpoint covering the round")
    after = checkpoint_meta(s)
    applied = int(after["events_applied"]) - applied_before
    letters = [orjson.loads(r.value) for r in
               _since(kafka_io.consume_all(s.topic_dlq, timeout_s=30), dlq_start)]
    by_id = {d["id"]: d for d in letters}
    assert len(by_id) == len(letters), "a message was dead-lettered twice"
    for m, stage in zip(meta, stages, strict=True):
        letter = by_id.get(f"{s.topic_events}/{m.partition}/{m.offset}")
        if stage == "applied":
            assert letter is None, letter
        else:
            assert letter is not None and letter["stage"] == stage, (stage, letter)
    assert applied - probes + len(letters) == len(messages)
    assert applied - probes == sum(stage == "applied" for stage in stages)
    newest = after.get("newest_event_ts")  # the event-time lag's reference: never the future
    assert newest is not None and newest <= time.time() + MAX_EVENT_AHEAD_S, newest


_events = st.fixed_dictionaries(
    {},
    optional={
        "user_id": _ids,
        "item_id": _ids,
        "label": st.one_of(st.sampled_from([0, 1]), st.integers(-2, 3), st.booleans(),
                           st.floats(allow_nan=False), st.text(max_size=2)),
        "ts": st.one_of(st.floats(allow_nan=False), st.integers(-10, 2 * 10**11), st.booleans(),
                        st.none(), st.text(max_size=3)),
        "context": st.one_of(
            st.dictionaries(st.sampled_from(["weather", "x", ""]),
                            st.one_of(st.text(max_size=4), st.integers(-10, 10), st.booleans(),
                                      st.none(), st.floats(allow_nan=False),
                                      st.lists(st.text(max_size=2), max_size=2)),
                            max_size=3),
            _ids),
    },
)
_event_bytes = st.one_of(_events.map(j), st.binary(max_size=40), st.none())


@given(data=st.data())
@HYPOTHESIS
def test_the_trainer_applies_or_dead_letters_every_hostile_event(
    settings: Settings, kafka_io: KafkaIO, data: st.DataObject
) -> None:
    s = settings.model_copy(update={
        "schema_path": SCHEMA, "dim": 8, "checkpoint_every_s": 0.5,
        "checkpoint_every_events": 1_000_000, "publish_items_s": 5.0,
    })
    producer = make_producer(s.kafka_config())
    produce_profiles(producer, s.topics(), STREAM.user_profiles(), STREAM.item_profiles())
    producer.close()
    stop = threading.Event()
    thread = threading.Thread(target=run_trainer, args=(s, stop), daemon=True, name="trainer")
    thread.start()
    trainer = TrainerRun(thread, stop)
    try:
        catalogue = event_catalogue(s)
        for label, value, stage in catalogue:
            wire = expected_event(value, s)
            assert wire == stage or (stage == "apply" and wire == "applied"), (label, wire)
        valid = [(e["user_id"].encode(), j(e)) for e in STREAM.events(300)]
        mixed = valid[:150] + [(b"k", v) for _, v, _ in catalogue] + valid[150:]
        stages = ["applied"] * 150 + [st_ for *_, st_ in catalogue] + ["applied"] * 150
        event_round(s, kafka_io, trainer, mixed, stages)
        raw = data.draw(st.lists(_event_bytes, min_size=60, max_size=60), label="events")
        event_round(s, kafka_io, trainer, [(None, v) for v in raw],
                    [expected_event(v, s) for v in raw])
        assert len(catalogue) + len(raw) >= 100
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive(), "the trainer did not stop"


@pytest.fixture(autouse=True)
def _quiet_kafka(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level("ERROR", logger="kafka")
    yield
