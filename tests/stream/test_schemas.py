"""The wire contract: examples from DESIGN.md validate, bad input is refused with a reason."""

from __future__ import annotations

import math
import time

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from stream.schemas import (
    DecodeError,
    Event,
    ItemProfile,
    MessageInvalid,
    Request,
    Response,
    UserProfile,
    dumps,
    loads_object,
    parse_event,
    parse_event_values,
)


def test_design_examples_validate() -> None:
    e = parse_event(loads_object(
        b'{"user_id": "196", "item_id": "242", "label": 1, "ts": 881250949.0,'
        b' "context": {"hour": "14"}}'))
    assert (e.user_id, e.item_id, e.label, e.context) == ("196", "242", 1, {"hour": "14"})
    u = UserProfile.model_validate({"user_id": "196",
                                    "features": {"gender": "M", "age": 49}})
    assert u.features["age"] == 49
    i = ItemProfile.model_validate({"item_id": "242",
                                    "features": {"genres": ["Comedy"], "year": 1997}})
    assert i.features["genres"] == ["Comedy"]
    r = Request.model_validate({"request_id": "r1", "type": "u2i", "user_id": "196", "k": 10,
                                "exclude_seen": True})
    assert r.missing_field() is None


def test_label_defaults_to_click_and_integer_ids_become_text() -> None:
    e = parse_event({"user_id": 196, "item_id": 242})
    assert (e.user_id, e.item_id, e.label) == ("196", "242", 1)


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"item_id": "1"}, "user_id"),
        ({"user_id": "1", "item_id": "2", "label": 3}, "label"),
        ({"user_id": "1", "item_id": "2", "ts": "yesterday"}, "ts"),
        ({"user_id": True, "item_id": "2"}, "user_id"),
        ({"user_id": "", "item_id": "2"}, "user_id"),
        ({"user_id": "1", "item_id": "2", "context": {"hour": {"nested": 1}}}, "context"),
        ({"user_id": "1", "item_id": "2", "ts": float("inf")}, "ts"),
    ],
)
def test_bad_events_name_the_field(payload: dict, field: str) -> None:
    with pytest.raises(MessageInvalid, match=field):
        parse_event(payload)


def test_nan_feature_is_refused() -> None:
    with pytest.raises(ValidationError, match="finite"):
        UserProfile.model_validate({"user_id": "1", "features": {"age": math.nan}})


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'"text"', None, b"\xff\xfe"])
def test_not_an_object_is_a_decode_error(raw: bytes | None) -> None:
    with pytest.raises(DecodeError):
        loads_object(raw)


def test_request_type_needs_its_fields() -> None:
    assert Request(request_id="r", type="rank", user_id="u").missing_field() == "item_ids"
    assert Request(request_id="r", type="i2i").missing_field() == "item_id"
    with pytest.raises(ValidationError):
        Request.model_validate({"request_id": "r", "type": "u2i", "user_id": "u", "k": 0})


ids = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Zs", "Cc")),
              min_size=1, max_size=20)
values = st.one_of(ids, st.integers(-10**6, 10**6),
                   st.floats(allow_nan=False, allow_infinity=False, width=32),
                   st.lists(ids, max_size=4))


@given(user=ids, item=ids, label=st.sampled_from([0, 1]),
       context=st.dictionaries(ids, values, max_size=4))
def test_events_round_trip_through_the_codec(user, item, label, context) -> None:
    e = Event(user_id=user, item_id=item, label=label, context=context)
    assert parse_event(loads_object(dumps(e))) == e


def test_response_carries_null_error_as_in_the_contract() -> None:
    body = loads_object(dumps(Response(request_id="r1", model_version=3)))
    assert body == {"request_id": "r1", "items": [], "model_version": 3, "item_version": None,
                    "i2i_version": None, "error": None, "fallback": None}
    # additive: a response of before item_version / i2i_version (an older worker) still reads
    old = Response.model_validate({"request_id": "r1", "model_version": 3, "error": None})
    assert old.item_version is None and old.i2i_version is None


# The event rules, case by case (the schema's rules as they stood when the pydantic model and the
# hand-written fast path were merged into parse_event; checked then against the model on 20,000
# generated messages).
_E = {"user_id": "u", "item_id": "i"}


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({}, Event("u", "i", 1, None, {})),
        ({"user_id": " a ", "label": 0}, Event("a", "i", 0)),  # stripped
        ({"user_id": "a\u2003"}, Event("a", "i")),  # Unicode whitespace too
        ({"user_id": "a\x1f"}, Event("a\x1f", "i")),  # not whitespace to the schema
        ({"user_id": -5}, Event("-5", "i")),  # integer ids as their text
        ({"label": 0.0}, Event("u", "i", 0)),
        ({"ts": 5}, Event("u", "i", 1, 5.0)),
        ({"ts": None}, Event("u", "i")),
        ({"context": {"x": 1, "y": [0, "a", 2.5]}},
         Event("u", "i", context={"x": 1, "y": [0, "a", 2.5]})),
        ({"user_id": " " + "u" * 256}, Event("u" * 256, "i")),  # the length counts once stripped
        ({"user": {}, "item": None}, Event("u", "i", user={})),
        ({"unknown": [1]}, Event("u", "i")),
    ],
)
def test_event_rules_accept(extra: dict, expected: Event) -> None:
    got = parse_event({**_E, **extra})
    assert got == expected
    assert [type(a) for a in got] == [type(b) for b in expected]


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"user_id": 1.0}, "user_id"),
        ({"item_id": None}, "item_id"),
        ({"user_id": "u" * 257}, "user_id"),
        ({"user_id": "   "}, "user_id"),  # whitespace only (issue 9)
        ({"item_id": "\t\u2003"}, "item_id"),
        ({"user_id": ""}, "user_id"),
        ({"label": True}, "label"),  # booleans are not numbers (issue 9)
        ({"ts": True}, "ts"),
        ({"context": {"x": True}}, "context.x"),
        ({"context": {"y": ["a", False]}}, "context.y"),
        ({"user": {"x": True}}, "user.x"),
        ({"label": "1"}, "label"),
        ({"label": 1.5}, "label"),
        ({"label": None}, "label"),
        ({"ts": "nan"}, "ts"),
        ({"ts": "12.5"}, "ts"),  # a string is not a number: no coercion (audit 2026-12-01)
        ({"ts": "881250949"}, "ts"),
        ({"ts": "\u0661"}, "ts"),  # a non-ASCII digit
        ({"ts": -1}, "ts"),
        ({"ts": 10**12}, "ts"),
        ({"ts": [1]}, "ts"),
        ({"context": None}, "context"),
        ({"context": {"x": None}}, "context.x"),
        ({"context": {"x": [[1]]}}, "context.x"),
        ({"context": {"x": math.inf}}, "context.x"),
        ({"context": {str(i): i for i in range(65)}}, "context"),
        ({"context": {"x": list(range(257))}}, "context.x"),
        ({"user": 3}, "user"),
        ({"item": {"x": {"y": 1}}}, "item.x"),
    ],
)
def test_event_rules_refuse_naming_the_field(extra: dict, field: str) -> None:
    with pytest.raises(MessageInvalid) as info:
        parse_event({**_E, **extra})
    assert str(info.value).startswith(field)


def test_event_decoder_refuses_what_is_not_an_object() -> None:
    with pytest.raises(DecodeError):
        parse_event([1, 2])


# --- the batch decoder: the same events and dead letters as the one-by-one decoder ----------

_hostile_ids = st.one_of(st.text(max_size=6), st.integers(-5, 5), st.booleans(), st.none(),
                         st.just(" \u3000 "), st.just("x" * 257), st.just(" u1 "))
_event_dicts = st.fixed_dictionaries(
    {},
    optional={
        "user_id": st.one_of(st.sampled_from(["u1", "u2", "u3"]), _hostile_ids),
        "item_id": st.one_of(st.sampled_from(["i1", "i2"]), _hostile_ids),
        "label": st.one_of(st.sampled_from([0, 1]), st.integers(-2, 3), st.booleans(),
                           st.floats(allow_nan=False), st.none()),
        "ts": st.one_of(st.floats(0, 2e9), st.floats(allow_nan=False), st.integers(-1, 10**12),
                        st.none(), st.text(max_size=4), st.just(1e11)),
        "context": st.one_of(
            st.dictionaries(st.sampled_from(["hour", "x"]),
                            st.one_of(st.text(max_size=3), st.integers(-3, 3), st.booleans(),
                                      st.none(), st.floats(allow_nan=False),
                                      st.lists(st.text(max_size=2), max_size=2)),
                            max_size=2),
            st.none(), st.text(max_size=2)),
        "user": st.one_of(st.none(), st.dictionaries(st.just("age"), st.integers(0, 99),
                                                     max_size=1), st.integers(-(2**63), 2**63 - 1)),
        "item": st.one_of(st.none(), st.dictionaries(st.just("genre"), st.text(max_size=3),
                                                     max_size=1)),
    },
)
_good_event = st.builds(
    lambda u, i, y, t, h: {"user_id": u, "item_id": i, "label": y, "ts": t,
                           "context": {"hour": h}},
    st.sampled_from(["u1", " u2", "u3"]), st.sampled_from(["i1", "i2"]),
    st.sampled_from([0, 1]), st.floats(0, 2e9), st.sampled_from(["1", "23"]),
)
_values = st.one_of(_good_event.map(dumps), _event_dicts.map(dumps), st.binary(max_size=20),
                    st.none(), st.just(b"[1]"), st.just(b'{"user_id": "u", "item_id": "i"} '))


class _Letters:
    def __init__(self) -> None:
        self.sent: list[tuple[int, str, str, str]] = []

    def send(self, record, stage: str, error: BaseException, reason: str) -> None:
        self.sent.append((record.offset, stage, type(error).__name__, reason))


def _records(values: list[bytes | None]) -> list:
    from stream.fetcher import ConsumerRecord

    return [ConsumerRecord("fm.events", 0, -1, j, 0, 0, None, v, [], None, -1,
                           -1 if v is None else len(v), 0) for j, v in enumerate(values)]


@given(st.one_of(st.lists(_good_event.map(dumps), min_size=1, max_size=30),
                 st.lists(_values, max_size=30)))
def test_batch_decoder_matches_the_one_by_one_decoder(values: list[bytes | None]) -> None:
    from stream.consume import decode_event_columns, decode_events

    records = _records(values)
    one, batch = _Letters(), _Letters()
    expected = decode_events(records, one, max_bytes=200)  # type: ignore[arg-type]
    columns = decode_event_columns(records, batch, max_bytes=200)  # type: ignore[arg-type]
    assert list(columns) == [d.message for d in expected]
    assert columns.rows.tolist() == [d.record.offset for d in expected]
    assert batch.sent == one.sent


def test_batch_decoder_keeps_the_common_shape_as_columns() -> None:
    from stream.consume import decode_event_columns

    values = [dumps({"user_id": f" u{j} ", "item_id": "i1", "label": j % 2,
                     "ts": 1e9 + j, "context": {"hour": "3"}}) for j in range(4)]
    values.append(dumps({"user_id": "u9", "item_id": "i2"}))  # no label, ts or context
    columns = decode_event_columns(_records(values), _Letters(), max_bytes=1000)  # type: ignore[arg-type]
    assert columns.user_ids == ["u0", "u1", "u2", "u3", "u9"]
    assert columns.labels.tolist() == [0, 1, 0, 1, 1]
    assert columns.ts[:4].tolist() == [1e9, 1e9 + 1, 1e9 + 2, 1e9 + 3]
    assert math.isnan(columns.ts[4]) and list(columns)[4].ts is None
    assert columns.contexts[4] == {} and columns.users is None and columns.items is None


# --- the typed fast path (msgspec) accepts exactly what the rules accept ----------------------

def _one_by_one(value: bytes) -> Event | None:
    """What the general path makes of one value: its event, or None (a dead letter)."""
    try:
        return parse_event(loads_object(value))
    except (DecodeError, MessageInvalid):
        return None


_B = b'{"user_id": "u1", "item_id": "i1"'
_EDGE_VALUES = [
    _B + b"}", _B + b', "label": 0, "ts": 5, "context": {}}', _B + b', "ts": -0.0}',
    _B + b', "ts": 1e-400}', _B + b', "ts": 99999999999.99999}', _B + b', "ts": 1e11}',
    _B + b', "ts": 1e400}', _B + b', "ts": 123456789012345678901234567890}', _B + b', "ts": "5"}',
    _B + b', "ts": NaN}', _B + b', "ts": -1}', _B + b', "ts": 01}', _B + b', "ts": 1.}',
    _B + b', "ts": .5}', _B + b', "ts": +1}', _B + b', "label": 1.0}', _B + b', "label": -0}',
    _B + b', "label": true}', _B + b', "label": 1e0}', _B + b', "label": 1, "label": 0}',
    _B + b', "x": 1e999}', _B + b', "x": ' + b"[" * 1100 + b"]" * 1100 + b"}",
    _B + b', "x": 1}', _B + b', "user": null, "item": null}', _B + b', "user": {}}',
    _B + b', "context": null}', _B + b', "context": {"a": "b", "a": 1}}',
    _B + b', "context": {"a": 1, "a": "b"}}', _B + b', "context": {"h": "\\u0000"}}',
    _B + b', "context": {"h": "\x01"}}', _B + b', "context": {"h": "\\ud800"}}',
    _B + b', "context": {"h": "\\ud83d\\ude00"}}', _B + b', "context": {"h": "\xff"}}',
    b'{"user_id": "\\u3000u\\t", "item_id": " i "}', b'{"user_id": "", "item_id": "i"}',
    b'{"user_id": 7, "item_id": "i"}', b'{"user_id": "' + b"x" * 257 + b'", "item_id": "i"}',
    b"\xef\xbb\xbf" + _B + b"}", b" " + _B + b"} \n", _B + b"} x", _B + b"}}", b"[1]", b"1",
    b'{"user_id": "u1", "item_id": "i1", "context": {' + b",".join(
        b'"k%d": "v"' % j for j in range(65)) + b"}}",
]


@pytest.mark.parametrize("value", _EDGE_VALUES)
def test_fast_path_accepts_exactly_what_the_rules_accept(value: bytes) -> None:
    from stream.schemas import parse_event_values

    columns = parse_event_values([value])
    expected = _one_by_one(value)
    if columns is None:  # the general path decides (and gives the reason)
        return
    assert expected is not None, f"fast path took {value!r}, the rules refuse it"
    assert list(columns) == [expected]


_texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=8)


@given(st.lists(st.one_of(
    _good_event.map(dumps), _event_dicts.map(dumps),
    st.builds(lambda u, i, t, c: dumps({"user_id": u, "item_id": i, "ts": t, "context": c}),
              _texts, _texts, st.one_of(st.none(), st.floats(0, 1.2e11), st.integers(0, 10**12)),
              st.dictionaries(_texts, _texts, max_size=3)),
    st.binary(max_size=30).map(lambda b: _B + b"," + b + b"}"),
), min_size=1, max_size=12))
def test_fast_path_rows_equal_the_rules(values: list[bytes]) -> None:
    from stream.schemas import parse_event_values

    columns = parse_event_values(values)
    if columns is not None:  # else the general path decides each message (and says why)
        assert list(columns) == [_one_by_one(v) for v in values]
        assert columns.rows.tolist() == list(range(len(values)))


@given(st.lists(_good_event.map(dumps), min_size=1, max_size=12))
def test_fast_path_takes_every_poll_of_the_common_shape(values: list[bytes]) -> None:
    from stream.schemas import parse_event_values

    columns = parse_event_values(values)
    assert columns is not None
    assert list(columns) == [_one_by_one(v) for v in values]


def test_fast_path_takes_the_common_shape() -> None:
    from stream.schemas import parse_event_values

    values = [dumps({"user_id": f" u{j} ", "item_id": "i1", "label": j % 2, "ts": 1e9 + j,
                     "context": {"hour": "3"}}) for j in range(3)]
    values.append(b'{"user_id": "u9", "item_id": "i2"}')
    columns = parse_event_values(values)
    assert columns is not None
    assert columns.user_ids == ["u0", "u1", "u2", "u9"] and columns.labels.tolist() == [0, 1, 0, 1]
    assert math.isnan(columns.ts[3]) and columns.contexts[3] == {}
    assert parse_event_values(values + [b'{"user_id": "u9", "item_id": "i2", "x": 1}']) is None
    assert parse_event_values([]) is None


def test_an_event_from_the_future_is_invalid_in_both_decoders() -> None:
    """A ``ts`` more than MAX_EVENT_AHEAD_S after the consumer's clock is dead-lettered (stage
    ``validate``, naming ts and its date) by the batch and the one-by-one decoder alike; one
    within the bound, one without ts and one from 1970 are kept."""
    from stream.consume import decode_event_columns, decode_events
    from stream.schemas import MAX_EVENT_AHEAD_S

    now = time.time()
    values = [dumps({"user_id": "u1", "item_id": "i1", "ts": ts})
              for ts in (now + MAX_EVENT_AHEAD_S / 2, now + 2 * MAX_EVENT_AHEAD_S, 6.4e10, 1.0)]
    values.append(dumps({"user_id": "u2", "item_id": "i2"}))
    for shape in ("common", "mixed"):
        if shape == "mixed":  # a poll outside the fast path takes the general one
            values.append(b"not json")
        one, batch = _Letters(), _Letters()
        expected = decode_events(_records(values), one, max_bytes=1000)  # type: ignore[arg-type]
        columns = decode_event_columns(_records(values), batch, max_bytes=1000)  # type: ignore[arg-type]
        assert columns.rows.tolist() == [d.record.offset for d in expected] == [0, 3, 4]
        assert batch.sent == one.sent
        future = [(offset, stage) for offset, stage, *_ in batch.sent if stage == "validate"]
        assert future == [(1, "validate"), (2, "validate")]
        assert batch.sent[1][3].startswith("ts: 64000000000.0 (3998-")


def test_a_key_given_twice_counts_once_the_last_time_on_both_paths() -> None:
    """JSON leaves duplicate keys to the parser: msgspec (the fast path) and orjson (the rules)
    both keep the last, so a poll's verdicts do not depend on which path decoded it (msgspec
    checks every occurrence, so an invalid first one sends the poll to the general path)."""
    from stream.consume import decode_event_columns, decode_events

    values = [b'{"user_id": "u1", "user_id": "u2", "item_id": "i1"}',
              b'{"user_id": "u1", "item_id": "i1", "ts": 5.0, "ts": 6.0}',
              b'{"user_id": "u1", "item_id": "i1", "label": 7, "label": 0}',
              b'{"user_id": "u1", "user_id": " ", "item_id": "i1"}']
    slow = [parse_event(orjson.loads(v)) for v in values[:3]]
    assert [(e.user_id, e.label, e.ts) for e in slow] == [("u2", 1, None), ("u1", 1, 6.0),
                                                         ("u1", 0, None)]
    fast = parse_event_values(values[:2])
    assert fast is not None and list(fast) == slow[:2]
    one, batch = _Letters(), _Letters()
    expected = decode_events(_records(values), one, max_bytes=1000)  # type: ignore[arg-type]
    columns = decode_event_columns(_records(values), batch, max_bytes=1000)  # type: ignore[arg-type]
    assert list(columns) == [d.message for d in expected] == slow
    assert batch.sent == one.sent and [(o, st_) for o, st_, *_ in one.sent] == [(3, "validate")]


# --- strict wire types: a string where a number is required is refused, on every decode path ---

_STRING_NUMBERS = [
    (b'{"user_id": "u1", "item_id": "i1", "ts": "881250949.0"}', "ts"),
    (b'{"user_id": "u1", "item_id": "i1", "ts": "5"}', "ts"),
    (b'{"user_id": "u1", "item_id": "i1", "ts": "1e2"}', "ts"),
    (b'{"user_id": "u1", "item_id": "i1", "label": "1"}', "label"),
    (b'{"user_id": "u1", "item_id": "i1", "label": "0"}', "label"),
    (b'{"user_id": "u1", "item_id": "i1", "ts": {"s": 5}}', "ts"),
]


@pytest.mark.parametrize(("value", "field"), _STRING_NUMBERS)
def test_a_string_number_in_an_event_is_invalid_on_every_path(value: bytes, field: str) -> None:
    """The rules (:func:`parse_event`), the column checks of a poll (``parse_events``) and the
    typed fast path (``parse_event_values``) all refuse it; the reason names the field, the
    expected type and what came. Alone and beside valid events, in both consumers' decoders."""
    from stream.consume import decode_event_columns, decode_events
    from stream.schemas import parse_events

    with pytest.raises(MessageInvalid) as info:
        parse_event(orjson.loads(value))
    reason = str(info.value)
    assert reason.startswith(f"{field}: expected") and "number" in reason
    assert "got a string" in reason or "got an object" in reason
    assert parse_event_values([value]) is None
    good = dumps({"user_id": "u2", "item_id": "i2", "ts": 5.0})
    assert parse_event_values([good, value]) is None
    columns, errors = parse_events([orjson.loads(good), orjson.loads(value)])
    assert columns.user_ids == ["u2"] and [(j, str(e)) for j, e in errors] == [(1, reason)]
    one, batch = _Letters(), _Letters()
    kept = decode_events(_records([good, value, good]), one, max_bytes=1000)  # type: ignore[arg-type]
    cols = decode_event_columns(_records([good, value, good]), batch, max_bytes=1000)  # type: ignore[arg-type]
    assert [d.record.offset for d in kept] == cols.rows.tolist() == [0, 2]
    assert one.sent == batch.sent == [(1, "validate", "MessageInvalid", reason)]


def test_numbers_in_events_stay_numbers_on_every_path() -> None:
    """What the contract allows is kept: an integer ``ts``, a ``label`` of 1.0, integer ids."""
    values = [b'{"user_id": "u1", "item_id": "i1", "ts": 5}',
              b'{"user_id": 7, "item_id": "i1", "ts": 5.5, "label": 1.0}']
    expected = [Event("u1", "i1", 1, 5.0), Event("7", "i1", 1, 5.5)]
    assert [parse_event(orjson.loads(v)) for v in values] == expected
    fast = parse_event_values(values[:1])
    assert fast is not None and list(fast) == expected[:1]


# --- tombstones on the compacted profile topics -------------------------------------------------


def test_a_profile_tombstone_decodes_to_its_key_and_a_keyless_one_is_a_dead_letter() -> None:
    """A null value on ``fm.users`` / ``fm.items`` is a compacted topic's "delete this key": it
    decodes to a tombstone naming the id of its key (stripped as ids are); with no key, a key
    that is not UTF-8 or not an id, it is a dead letter naming why. Without ``tombstone`` (the
    events topic) a null value stays a dead letter."""
    from stream.consume import decode_records
    from stream.fetcher import ConsumerRecord
    from stream.schemas import ItemTombstone, UserProfile, UserTombstone, tombstone_id

    def rec(key: bytes | None, value: bytes | None, offset: int) -> ConsumerRecord:
        return ConsumerRecord("fm.users", 0, -1, offset, 0, 0, key, value, [], None,
                              -1 if key is None else len(key), -1, 0)

    records = [rec(b" u1 ", None, 0), rec(None, None, 1), rec(b"\xff", None, 2),
               rec(b"   ", None, 3), rec(b"u2", b'{"user_id": "u2", "features": {}}', 4),
               rec(b"u3", None, 5)]
    letters = _Letters()
    out = decode_records(records, UserProfile, letters, max_bytes=1000,  # type: ignore[arg-type]
                         tombstone=lambda key: UserTombstone(tombstone_id(key, "user_id")))
    assert [d.message for d in out] == [UserTombstone("u1"), UserProfile(user_id="u2"),
                                        UserTombstone("u3")]
    assert [(o, stage) for o, stage, *_ in letters.sent] == [(1, "decode"), (2, "decode"),
                                                             (3, "validate")]
    assert "no key" in letters.sent[0][3] and "not UTF-8" in letters.sent[1][3]
    assert letters.sent[2][3].startswith("a tombstone (null value) whose key is not a user_id")
    plain = _Letters()
    assert decode_records(records[:1], UserProfile, plain, max_bytes=1000) == []  # type: ignore[arg-type]
    assert plain.sent[0][1:3] == ("decode", "DecodeError")
    assert ItemTombstone(tombstone_id(b"242", "item_id")).item_id == "242"
