"""Wire contract of DESIGN.md, and the one JSON codec for every topic.

Messages are validated once, here, at the edge; inside the system they become arrays. Each
message has one decoder: events :func:`parse_event` (hand-written: the trainer decodes every
event, pydantic cost about three times as much per event), profiles, requests and responses
their pydantic models. The trainer decodes a whole poll of events at once into
:class:`EventColumns` (no object per event): :func:`parse_event_values` reads the raw bytes of a
poll whose every message has the common shape in one typed C pass (msgspec), and anything else
takes :func:`parse_events` (orjson, then :func:`parse_event` per message), so the rules and the
reasons are one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain, repeat
from numbers import Real
from operator import attrgetter
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
import numpy as np
import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

MAX_ID_LEN = 256
MAX_FEATURES = 64
MAX_LIST_VALUES = 256
MAX_EVENT_AHEAD_S = 3600.0
"""How far an event's ``ts`` may lie ahead of the consumer's clock (Kafka 4's own bound on a
record's timestamp, ``log.message.timestamp.after.max.ms``, is one hour too). One event from the
far future would move the trainer's newest event time for good (``fmstream_event_time_lag_seconds``
negative, saved in every checkpoint) and, with ``expire_after_s``, expire every feature value at
once; such an event is dead-lettered (stage ``validate``) instead."""


def _id_from_json(value: Any) -> Any:
    """Ids are strings; an integer id (as kcat users often type) is accepted as its decimal text."""
    if isinstance(value, bool):
        raise ValueError("an id must be a string (or an integer), not a boolean")
    if isinstance(value, int):
        return str(value)
    return value


_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + (
    "\u2028\u2029\u202f\u205f\u3000"
)
"""Unicode White_Space: what is stripped around ids (``str.strip()`` would also strip
``\x1c``-``\x1f``)."""


def _non_blank(value: str) -> str:
    """Surrounding whitespace is dropped; nothing left is not an id."""
    value = value.strip(_WHITESPACE)
    if not value:
        raise ValueError("an id must not be empty or only whitespace")
    return value


def _json_number(value: Any) -> Any:
    """A number field takes a JSON number (or null where optional), nothing else: pydantic's lax
    mode would read ``"10"``, ``"1e2"`` as numbers and ``true`` as 1. An integer field (``k``)
    also takes an integral number such as ``10.0`` or ``1e2``: JSON has one number type, so
    ``10.0`` is the number 10 (``label`` is read the same way); ``1.5`` is refused."""
    if value is None or (isinstance(value, Real) and not isinstance(value, bool)):
        return value  # Real: also a numpy number a Python client put in its request
    raise ValueError(f"expected a JSON number, got {_kind(value)}")


def _json_bool(value: Any) -> Any:
    """A boolean field takes JSON ``true``/``false`` only (lax pydantic took ``"yes"``, ``1``,
    ``"off"``...)."""
    if type(value) is bool:
        return value
    raise ValueError(f"expected true or false, got {_kind(value)}")


Id = Annotated[
    str,
    BeforeValidator(_id_from_json),
    AfterValidator(_non_blank),
    StringConstraints(min_length=1, max_length=MAX_ID_LEN),
]
"""A user or item id: 1 to 256 characters once surrounding whitespace is stripped."""

Scalar = str | int | float
FeatureValue = Scalar | list[Scalar]
Count = Annotated[int, BeforeValidator(_json_number)]
"""An integer given as a JSON number (an integral one: ``10`` or ``10.0``); a string is refused."""
OptionalNumber = Annotated[float | None, BeforeValidator(_json_number)]
"""A JSON number or null; a string or a boolean is refused."""
Flag = Annotated[bool, BeforeValidator(_json_bool)]
"""JSON ``true`` or ``false``; nothing else."""


def _check_features(features: dict[str, Any]) -> dict[str, Any]:
    """Feature values are strings, finite numbers or lists of those; bounded in size."""
    if len(features) > MAX_FEATURES:
        raise ValueError(f"at most {MAX_FEATURES} features, got {len(features)}")
    for name, value in features.items():
        values = value if isinstance(value, list) else [value]
        if len(values) > MAX_LIST_VALUES:
            raise ValueError(f"feature {name!r}: at most {MAX_LIST_VALUES} values")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                got = type(v).__name__
                raise ValueError(f"feature {name!r}: expected string/number, got {got}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"feature {name!r}: value must be finite, got {v}")
    return features


def _no_bool_features(features: Any) -> Any:
    """Booleans are not feature values (pydantic would take them as 1/0), nor are objects,
    nulls or nested lists: refused before coercion with one reason naming the feature (the
    union's coercion would give one line per member it tried)."""
    if isinstance(features, dict):
        for name, value in features.items():
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, bool):
                    raise ValueError(f"feature {name!r}: expected string/number, got a boolean")
                if not isinstance(v, str | int | float):
                    raise ValueError(
                        f"feature {name!r}: expected a string, a number or a list of those, "
                        f"got {'a list holding ' if isinstance(value, list) else ''}"
                        f"{type(v).__name__} {_got(v)}"
                    )
    return features


Features = Annotated[
    dict[str, FeatureValue], BeforeValidator(_no_bool_features), AfterValidator(_check_features)
]
"""Named feature values, checked: finite numbers, bounded counts."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class MessageInvalid(ValueError):
    """A JSON object that is not a valid message (stage ``validate``); the text names the field."""


class Event(NamedTuple):
    """An interaction on ``fm.events`` (key = user id), as :func:`parse_event` returns it.

    Wire fields: ``user_id``, ``item_id`` (ids: 1 to 256 characters; an integer id is taken as its
    decimal text), ``label`` 0/1 (default 1), ``ts`` (seconds since epoch, optional), ``context``
    (features), ``user`` / ``item`` (inline profile features, optional). Unknown keys are ignored.
    A tuple: the trainer builds one per event, several times cheaper than a pydantic model.
    """

    user_id: str
    item_id: str
    label: int = 1
    ts: float | None = None
    context: dict[str, Any] = {}  # shared default, never mutated
    user: dict[str, Any] | None = None
    item: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The wire form (what :func:`dumps` writes)."""
        out: dict[str, Any] = {"user_id": self.user_id, "item_id": self.item_id,
                               "label": self.label, "ts": self.ts, "context": self.context}
        if self.user is not None:
            out["user"] = self.user
        if self.item is not None:
            out["item"] = self.item
        return out


# --- the event decoder: the one place the event rules live ------------------------------------


def _got(value: Any) -> str:
    return repr(value)[:60]


_JSON_KINDS = {str: "a string", bool: "a boolean", int: "a number", float: "a number",
               list: "a list", dict: "an object", type(None): "null"}


def _kind(value: Any) -> str:
    """What a decoded JSON value is, in JSON's words (``a string``, ``a boolean``, ...)."""
    return _JSON_KINDS.get(type(value), type(value).__name__)


def _check_id(obj: dict[str, Any], name: str) -> str:
    """An id field: a string (or integer, as its text) of 1 to MAX_ID_LEN characters.

    Surrounding whitespace is stripped first (as the pydantic ``Id`` does); nothing left is not
    an id.
    """
    if name not in obj:
        raise MessageInvalid(f"{name}: Field required")
    value = obj[name]
    kind = type(value)
    if kind is not str:
        if kind is bool:
            raise MessageInvalid(
                f"{name}: an id must be a string (or an integer), not a boolean (got {_got(value)})"
            )
        if kind is not int:
            raise MessageInvalid(f"{name}: Input should be a valid string (got {_got(value)})")
        value = str(value)
    value = value.strip(_WHITESPACE)
    if not value:
        raise MessageInvalid(f"{name}: an id must not be empty or only whitespace")
    if len(value) > MAX_ID_LEN:
        raise MessageInvalid(
            f"{name}: should have 1 to {MAX_ID_LEN} characters (got {len(value)})"
        )
    return value




def _check_label(obj: dict[str, Any]) -> int:
    value = obj.get("label", 1)
    kind = type(value)
    if (kind is int or kind is float) and (value == 0 or value == 1):
        return int(value)  # a boolean is not a number
    if kind is int or kind is float:
        raise MessageInvalid(f"label: Input should be 0 or 1 (got {_got(value)})")
    raise MessageInvalid(f"label: expected the JSON number 0 or 1, got {_kind(value)} "
                         f"{_got(value)}")


def _check_ts(obj: dict[str, Any]) -> float | None:
    value = obj.get("ts")
    if value is None:
        return None
    kind = type(value)
    if kind is float:
        ts = value
    elif kind is int:  # not bool: a boolean is not a number
        ts = float(value) if abs(value) < 1e300 else math.inf
    else:  # a string is not a number either, even "12.5": the wire is strict (no coercion)
        raise MessageInvalid(
            f"ts: expected a JSON number (seconds since epoch), got {_kind(value)} {_got(value)}"
        )
    if not 0.0 <= ts < 1e11:  # also False for NaN
        raise MessageInvalid(f"ts: must be finite seconds since epoch, got {ts}")
    return ts


def _check_feature_values(name: str, features: Any) -> dict[str, Any]:
    """Feature values: strings, finite numbers or lists of those (a boolean is not a number);
    at most MAX_FEATURES names and MAX_LIST_VALUES values per list. Returns ``features``."""
    if type(features) is not dict:
        raise MessageInvalid(f"{name}: Input should be a valid dictionary (got {_got(features)})")
    for key, value in features.items():
        kind = type(value)
        if kind is str or kind is int:
            continue
        if kind is float:
            if not math.isfinite(value):
                raise MessageInvalid(f"{name}.{key}: value must be finite, got {value}")
            continue
        if kind is list:
            if len(value) > MAX_LIST_VALUES:
                raise MessageInvalid(f"{name}.{key}: at most {MAX_LIST_VALUES} values")
            for v in value:
                k = type(v)
                if k is float:
                    if not math.isfinite(v):
                        raise MessageInvalid(f"{name}.{key}: value must be finite, got {v}")
                elif k is not str and k is not int:
                    raise MessageInvalid(
                        f"{name}.{key}: expected string/number, got {type(v).__name__}"
                    )
            continue
        raise MessageInvalid(f"{name}.{key}: expected string/number, got {kind.__name__}")
    if len(features) > MAX_FEATURES:
        raise MessageInvalid(f"{name}: at most {MAX_FEATURES} features, got {len(features)}")
    return features


def parse_event(obj: Any) -> Event:
    """Validate one decoded JSON value as an :class:`Event`.

    The single decoder of ``fm.events`` (trainer, tests, tools); the rules are the wire contract
    of DESIGN.md. Raises :class:`DecodeError` when ``obj`` is not a JSON object and
    :class:`MessageInvalid` (naming the field) when a field breaks a rule.
    """
    if type(obj) is not dict:
        raise DecodeError(f"expected a JSON object, got {type(obj).__name__}")
    # The common shape is checked inline (this runs once per event); anything else takes the
    # _check_* helpers, which hold the rules and write the reasons.
    get = obj.get
    user_id, item_id = get("user_id"), get("item_id")
    if type(user_id) is str and type(item_id) is str:
        user_id, item_id = user_id.strip(_WHITESPACE), item_id.strip(_WHITESPACE)
        if not (0 < len(user_id) <= MAX_ID_LEN and 0 < len(item_id) <= MAX_ID_LEN):
            user_id, item_id = _check_id(obj, "user_id"), _check_id(obj, "item_id")  # raises
    else:
        user_id, item_id = _check_id(obj, "user_id"), _check_id(obj, "item_id")
    label = get("label", 1)
    if type(label) is not int or (label != 1 and label != 0):
        label = _check_label(obj)
    ts = get("ts")
    if type(ts) is not float or not 0.0 <= ts < 1e11:
        ts = _check_ts(obj)
    context = get("context", _EMPTY)
    if context is not _EMPTY:
        if type(context) is dict and len(context) <= MAX_FEATURES:
            for value in context.values():
                if type(value) is not str:
                    context = _check_feature_values("context", context)
                    break
        else:
            context = _check_feature_values("context", context)
    user = obj.get("user")
    if user is not None:
        user = _check_feature_values("user", user)
    item = obj.get("item")
    if item is not None:
        item = _check_feature_values("item", item)
    return Event(user_id, item_id, label, ts, context, user, item)


_EMPTY: dict[str, Any] = Event._field_defaults["context"]


def check_event_time(ts: float | None, now: float) -> None:
    """Raise :class:`MessageInvalid` when an event's ``ts`` lies more than
    :data:`MAX_EVENT_AHEAD_S` after ``now`` (the consumer's clock, seconds since epoch).

    Not part of :func:`parse_event`, which judges a message by its bytes alone: this rule also
    reads the clock (the consumers apply it where they decode, :mod:`stream.consume`).
    """
    if ts is not None and ts > now + MAX_EVENT_AHEAD_S:
        when = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        raise MessageInvalid(
            f"ts: {ts} ({when}) lies more than {MAX_EVENT_AHEAD_S:.0f} s after the consumer's "
            "clock; an event cannot come from the future: send its event time as seconds "
            "since epoch (UTC) from a producer whose clock is set"
        )


@dataclass(frozen=True, slots=True)
class EventColumns:
    """Events as columns (one poll's worth): what :func:`parse_events` returns and the trainer
    learns from, without a Python object per event.

    Row ``j`` is the event :func:`parse_event` would return for source message ``rows[j]``
    (iterating yields those :class:`Event` tuples, for callers that want them).
    """

    user_ids: list[str]
    item_ids: list[str]
    labels: np.ndarray  # float32, 0 or 1
    ts: np.ndarray  # float64 seconds since epoch; NaN where the event gave none
    contexts: list[dict[str, Any]]  # {} (shared, never mutated) where none
    rows: np.ndarray  # int64: the index of each event's message in the decoded input
    users: list[dict[str, Any] | None] | None = None  # inline profiles; None: no event has one
    items: list[dict[str, Any] | None] | None = None

    def __len__(self) -> int:
        return len(self.user_ids)

    def __iter__(self):
        users, items = self.users, self.items
        columns = zip(self.user_ids, self.item_ids, self.labels.tolist(), self.ts.tolist(),
                      self.contexts, strict=True)
        for j, (u, i, y, t, c) in enumerate(columns):
            yield Event(u, i, int(y), None if t != t else t, c,
                        None if users is None else users[j], None if items is None else items[j])

    def select(self, keep: np.ndarray) -> EventColumns:
        """The events where the boolean mask ``keep`` is True, as columns."""
        idx = np.flatnonzero(keep).tolist()

        def pick(values: list) -> list:
            return [values[j] for j in idx]

        return EventColumns(
            pick(self.user_ids), pick(self.item_ids), self.labels[keep], self.ts[keep],
            pick(self.contexts), self.rows[keep],
            None if self.users is None else pick(self.users),
            None if self.items is None else pick(self.items),
        )

    def take(self, where: slice) -> EventColumns:
        """The events of ``where`` (a slice), as columns."""
        return EventColumns(
            self.user_ids[where], self.item_ids[where], self.labels[where], self.ts[where],
            self.contexts[where], self.rows[where],
            None if self.users is None else self.users[where],
            None if self.items is None else self.items[where],
        )

    @classmethod
    def from_events(cls, events: Sequence[Event], rows: Sequence[int] | None = None
                    ) -> EventColumns:
        """Columns of ``events`` (``rows`` default: 0..n-1)."""
        n = len(events)
        users = [e.user for e in events]
        items = [e.item for e in events]
        return cls(
            [e.user_id for e in events],
            [e.item_id for e in events],
            np.array([e.label for e in events], dtype=np.float32),
            np.array([math.nan if e.ts is None else e.ts for e in events], dtype=np.float64),
            [e.context for e in events],
            np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64),
            None if users.count(None) == n else users,
            None if items.count(None) == n else items,
        )

    @classmethod
    def concat(cls, parts: Sequence[EventColumns]) -> EventColumns:
        """One block of ``parts`` in order (``rows`` are kept as they are)."""
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls.from_events([])

        def side(name: str) -> list[dict[str, Any] | None] | None:
            if all(getattr(p, name) is None for p in parts):
                return None
            return [x for p in parts for x in (getattr(p, name) or [None] * len(p))]

        return cls(
            [u for p in parts for u in p.user_ids],
            [i for p in parts for i in p.item_ids],
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.ts for p in parts]),
            [c for p in parts for c in p.contexts],
            np.concatenate([p.rows for p in parts]),
            side("users"),
            side("items"),
        )


def parse_events(objs: Sequence[Any]) -> tuple[EventColumns, list[tuple[int, ValueError]]]:
    """Validate decoded JSON values as events, all at once: :func:`parse_event` on each.

    Returns the valid ones as columns (``rows``: their index in ``objs``, in order) and, for
    each invalid one, its index and the error :func:`parse_event` raises for it
    (:class:`DecodeError` or :class:`MessageInvalid`, same reason).

    The common shape (string ids, 0/1 label, float or no ``ts``, a context of strings, no inline
    profiles) is checked a column at a time; a poll with anything else goes through
    :func:`parse_event` message by message.
    """
    columns = _common_shape(objs)
    if columns is not None:
        return columns, []
    events: list[Event] = []
    rows: list[int] = []
    errors: list[tuple[int, ValueError]] = []
    for j, obj in enumerate(objs):
        try:
            events.append(parse_event(obj))
        except (DecodeError, MessageInvalid) as exc:
            errors.append((j, exc))
        else:
            rows.append(j)
    return EventColumns.from_events(events, rows), errors


_FLOAT_OR_NONE = {float, type(None)}


def _common_shape(objs: Sequence[Any]) -> EventColumns | None:
    """Columns of ``objs`` when every one has the common shape (then each row is exactly what
    :func:`parse_event` returns), else None. C-level passes over the batch, no per-event code
    beyond the string strip."""
    n = len(objs)
    if n == 0 or set(map(type, objs)) != {dict}:
        return None
    get = dict.get
    uids = list(map(get, objs, repeat("user_id", n)))
    iids = list(map(get, objs, repeat("item_id", n)))
    if set(map(type, uids)) != {str} or set(map(type, iids)) != {str}:
        return None
    uids = list(map(str.strip, uids, repeat(_WHITESPACE, n)))
    iids = list(map(str.strip, iids, repeat(_WHITESPACE, n)))
    lens = list(map(len, uids))
    lens.extend(map(len, iids))
    if min(lens) < 1 or max(lens) > MAX_ID_LEN:
        return None
    labels = list(map(get, objs, repeat("label", n), repeat(1, n)))
    if set(map(type, labels)) != {int} or not set(labels) <= {0, 1}:
        return None
    ts_values = list(map(get, objs, repeat("ts", n)))
    kinds = set(map(type, ts_values))
    if kinds == {float}:
        ts = given = np.array(ts_values, dtype=np.float64)
    elif kinds <= _FLOAT_OR_NONE:  # an event without ts: NaN in the column (never a given ts)
        given = np.array([t for t in ts_values if t is not None], dtype=np.float64)
        ts = np.array([math.nan if t is None else t for t in ts_values], dtype=np.float64)
    else:
        return None
    if given.size and not ((given >= 0.0) & (given < 1e11)).all():  # NaN fails too
        return None
    contexts = list(map(get, objs, repeat("context", n), repeat(_EMPTY, n)))
    if set(map(type, contexts)) != {dict} or max(map(len, contexts)) > MAX_FEATURES:
        return None
    if not set(map(type, chain.from_iterable(map(dict.values, contexts)))) <= {str}:
        return None
    if (list(map(get, objs, repeat("user", n))).count(None) != n
            or list(map(get, objs, repeat("item", n))).count(None) != n):
        return None
    return EventColumns(uids, iids, np.array(labels, dtype=np.float32), ts, contexts,
                        np.arange(n, dtype=np.int64))


class _CommonEvent(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The common shape of an ``fm.events`` message, typed for msgspec's C decoder: string ids,
    a 0/1 integer label, a float (or integer) ``ts`` in range or none, a context of at most
    MAX_FEATURES strings, no inline profiles, no other field. Whatever msgspec refuses here
    (a field it does not know included, so nothing unread can hide a JSON error) is decoded again
    by the general path, which holds the rules and writes the reasons."""

    user_id: str
    item_id: str
    label: Literal[0, 1] = 1
    ts: Annotated[float, msgspec.Meta(ge=0.0, lt=1e11)] | None = None
    context: (Annotated[dict[str, str], msgspec.Meta(max_length=MAX_FEATURES)]
              | msgspec.UnsetType) = msgspec.UNSET
    user: None = None
    item: None = None


_COMMON_DECODER = msgspec.json.Decoder(_CommonEvent)
_USER_ID, _ITEM_ID, _LABEL, _TS, _CONTEXT = map(
    attrgetter, ("user_id", "item_id", "label", "ts", "context"))


def parse_event_values(values: Sequence[bytes]) -> EventColumns | None:
    """Columns of raw ``fm.events`` values when every one has the common shape, else None.

    Row ``j`` is exactly what ``parse_event(orjson.loads(values[j]))`` returns (ids stripped and
    checked the same way); one message outside the common shape, or not valid JSON, makes it
    return None: the caller then decodes the poll with :func:`parse_events`, which judges each
    message and gives the reason. One C-level decode per message (no dict per message), ~3x
    less CPU than orjson plus the column checks of :func:`parse_events`.
    """
    n = len(values)
    if n == 0:
        return None
    try:
        decoded = list(map(_COMMON_DECODER.decode, values))
    except (msgspec.MsgspecError, ValueError):  # ValueError: e.g. bytes that are not UTF-8
        return None
    uids = list(map(str.strip, map(_USER_ID, decoded), repeat(_WHITESPACE, n)))
    iids = list(map(str.strip, map(_ITEM_ID, decoded), repeat(_WHITESPACE, n)))
    lens = list(map(len, uids))
    lens.extend(map(len, iids))
    if min(lens) < 1 or max(lens) > MAX_ID_LEN:
        return None
    labels, ts = list(map(_LABEL, decoded)), list(map(_TS, decoded))
    contexts = list(map(_CONTEXT, decoded))
    if msgspec.UNSET in contexts:
        contexts = [_EMPTY if c is msgspec.UNSET else c for c in contexts]
    return EventColumns(uids, iids, np.array(labels, dtype=np.float32),
                        np.array(ts, dtype=np.float64),  # None (no ts) reads NaN
                        contexts, np.arange(n, dtype=np.int64))


def decode_event(raw: bytes | None) -> Event:
    """Parse and validate one ``fm.events`` message.

    Raises:
        DecodeError: not a JSON object. MessageInvalid: a field breaks a rule.
    """
    return parse_event(loads_object(raw))


class UserProfile(_Message):
    """An upsert on ``fm.users`` (key = user id)."""

    user_id: Id
    features: Features = Field(default_factory=dict)


class ItemProfile(_Message):
    """An upsert on ``fm.items`` (key = item id)."""

    item_id: Id
    features: Features = Field(default_factory=dict)


class UserTombstone(NamedTuple):
    """A null value on ``fm.users`` keyed by a user id: on a compacted topic, "delete this key".
    The trainer removes the user's profile (the user keeps its id row and history)."""

    user_id: str


class ItemTombstone(NamedTuple):
    """A null value on ``fm.items`` keyed by an item id: the item's profile is removed."""

    item_id: str


def tombstone_id(key: bytes | None, name: str) -> str:
    """The id a profile tombstone (null value) deletes: its key, read as an id (``name`` is
    ``user_id`` or ``item_id``).

    Raises:
        DecodeError: no key, or a key that is not UTF-8. MessageInvalid: not a usable id.
    """
    if key is None:
        raise DecodeError("a tombstone (null value) with no key: it names no profile to remove")
    try:
        text = bytes(key).decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(f"a tombstone (null value) whose key is not UTF-8: {bytes(key)[:60]!r}"
                          ) from None
    try:
        return _check_id({name: text}, name)
    except MessageInvalid as exc:
        raise MessageInvalid(f"a tombstone (null value) whose key is not a {name}: {exc}"
                             ) from None


RequestType = Literal["u2i", "i2i", "i2i_history", "rank"]


class Request(_Message):
    """A question on ``fm.requests`` (key = request id)."""

    request_id: Id
    type: RequestType
    user_id: Id | None = None
    item_id: Id | None = None
    item_ids: list[Id] | None = Field(None, min_length=1, max_length=10_000)
    k: Count = Field(10, ge=1)
    exclude_seen: Flag = False
    exclude_item_ids: list[Id] = Field(default_factory=list, max_length=10_000)
    context: Features = Field(default_factory=dict)
    source: Literal["online", "offline"] = "online"
    reply_to: Annotated[str, StringConstraints(min_length=1, max_length=249)] | None = None
    deadline_ms: OptionalNumber = Field(None, gt=0, allow_inf_nan=False,
                                       description="epoch ms after which to give up")

    def missing_field(self) -> str | None:
        """Name of the field this request type needs but lacks, or None."""
        needs = {
            "u2i": ("user_id",),
            "i2i": ("item_id",),
            "i2i_history": ("user_id",),
            "rank": ("user_id", "item_ids"),
        }[self.type]
        for name in needs:
            if getattr(self, name) is None:
                return name
        return None


class ScoredItem(BaseModel):
    item_id: str
    score: float


ErrorCode = Literal[
    "invalid_request",
    "unknown_user",
    "unknown_item",
    "deadline_exceeded",
    "not_ready",
    "internal",
]


class ErrorInfo(BaseModel):
    code: ErrorCode
    message: str


class Response(BaseModel):
    """An answer on ``fm.responses`` (or the request's ``reply_to``), key = request id."""

    request_id: str
    items: list[ScoredItem] = Field(default_factory=list)
    model_version: int | None = None
    item_version: int | None = None
    """The item version whose items answered (<= ``model_version``; below it when the answer
    came from a shared-rows version). "Everything learned before event e" holds once it is
    >= the version stamped on e's user record. None: an older worker."""
    i2i_version: int | None = None
    """Offline i2i answers (``"source": "offline"``) only: the version of the precomputed
    table the items came from (a table is refreshed in place and keeps the number of the
    version it was started at, so it is no model version). None on every other answer."""
    error: ErrorInfo | None = None
    fallback: Literal["popular"] | None = None


class DeadLetter(BaseModel):
    """A message that could not be used, on ``fm.dlq``, with why and where it came from.

    ``id`` (``topic/partition/offset`` of the source) is stable: the topic is at least once (a
    consumer that dies before its commit dead-letters the same message again), so readers
    deduplicate by ``id``. The original bytes are kept up to a bound (``value_b64`` is their
    first bytes, ``value_truncated`` says whether that is all of them), with their full
    length and sha256, so a letter never exceeds what the broker accepts.
    """

    id: str = Field(description="source topic/partition/offset: the same for a repeat")
    source_topic: str
    source_partition: int
    source_offset: int
    source_timestamp_ms: int | None = None
    stage: Literal["decode", "validate", "apply", "reply"]
    error_class: str
    reason: str
    key: str | None = Field(None, description="the source key (UTF-8, bounded)")
    value_b64: str = Field(description="the original bytes (up to a bound), base64")
    value_length: int = Field(0, description="length of the original value in bytes")
    value_sha256: str = Field("", description="sha256 (hex) of the whole original value")
    value_truncated: bool = Field(False, description="value_b64 holds only a prefix")


# --- codec ---------------------------------------------------------------------------------


class DecodeError(ValueError):
    """The bytes are not a JSON object (stage ``decode``)."""


class UnreadableBatch(DecodeError):
    """A record batch the Kafka client could not read (a codec it lacks, a corrupt payload);
    stands for all of the batch's records that were not read (stage ``decode``)."""


def dumps(message: BaseModel | Event | dict[str, Any]) -> bytes:
    """Encode a message (or a plain dict) as compact UTF-8 JSON."""
    if isinstance(message, BaseModel):
        message = message.model_dump(mode="json")
    elif isinstance(message, Event):
        message = message.to_json()
    return orjson.dumps(message)


def loads_object(raw: bytes | None) -> dict[str, Any]:
    """Parse bytes into a JSON object, or raise :class:`DecodeError` saying why not."""
    if raw is None:
        raise DecodeError("empty message (null value)")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise DecodeError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def describe_validation_error(exc: ValidationError) -> str:
    """A one-line reason naming each bad field, what was expected and what arrived."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "<message>"
        got = repr(err.get("input"))[:60]
        parts.append(f"{where}: {err['msg']} (got {got})")
    return "; ".join(parts)
