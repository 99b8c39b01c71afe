"""The wire contract: examples from DESIGN.md validate, bad input is refused with a reason."""

from __future__ import annotations

import math

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
    assert body == {"request_id": "r1", "items": [], "model_version": 3, "error": None,
                    "fallback": None}


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
        ({"ts": "12.5"}, Event("u", "i", 1, 12.5)),
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
