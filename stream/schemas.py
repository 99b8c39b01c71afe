"""Wire contract of DESIGN.md as pydantic models, and the one JSON codec for every topic.

Messages are validated once, here, at the edge; inside the system they become arrays.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

MAX_ID_LEN = 256
MAX_FEATURES = 64
MAX_LIST_VALUES = 256


def _id_from_json(value: Any) -> Any:
    """Ids are strings; an integer id (as kcat users often type) is accepted as its decimal text."""
    if isinstance(value, bool):
        raise ValueError("an id must be a string (or an integer), not a boolean")
    if isinstance(value, int):
        return str(value)
    return value


Id = Annotated[
    str,
    BeforeValidator(_id_from_json),
    StringConstraints(min_length=1, max_length=MAX_ID_LEN, strip_whitespace=True),
]
"""A user or item id: 1 to 256 characters."""

Scalar = str | int | float
FeatureValue = Scalar | list[Scalar]


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


Features = Annotated[dict[str, FeatureValue], AfterValidator(_check_features)]
"""Named feature values, checked: finite numbers, bounded counts."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Event(_Message):
    """An interaction on ``fm.events`` (key = user id)."""

    user_id: Id
    item_id: Id
    label: Literal[0, 1] = 1
    ts: float | None = Field(None, description="event time, seconds since epoch")
    context: Features = Field(default_factory=dict)
    user: Features | None = None
    item: Features | None = None

    @field_validator("ts")
    @classmethod
    def _finite_ts(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and 0 <= v < 1e11):
            raise ValueError(f"ts must be finite seconds since epoch, got {v}")
        return v


class UserProfile(_Message):
    """An upsert on ``fm.users`` (key = user id)."""

    user_id: Id
    features: Features = Field(default_factory=dict)


class ItemProfile(_Message):
    """An upsert on ``fm.items`` (key = item id)."""

    item_id: Id
    features: Features = Field(default_factory=dict)


RequestType = Literal["u2i", "i2i", "i2i_history", "rank"]


class Request(_Message):
    """A question on ``fm.requests`` (key = request id)."""

    request_id: Id
    type: RequestType
    user_id: Id | None = None
    item_id: Id | None = None
    item_ids: list[Id] | None = Field(None, max_length=10_000)
    k: int = Field(10, ge=1)
    exclude_seen: bool = False
    exclude_item_ids: list[Id] = Field(default_factory=list, max_length=10_000)
    context: Features = Field(default_factory=dict)
    source: Literal["online", "offline"] = "online"
    reply_to: Annotated[str, StringConstraints(min_length=1, max_length=249)] | None = None
    deadline_ms: float | None = Field(None, gt=0, description="epoch ms after which to give up")

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
    error: ErrorInfo | None = None
    fallback: Literal["popular"] | None = None


class DeadLetter(BaseModel):
    """A message that could not be used, on ``fm.dlq``, with why and where it came from."""

    source_topic: str
    source_partition: int
    source_offset: int
    source_timestamp_ms: int | None = None
    stage: Literal["decode", "validate", "apply"]
    error_class: str
    reason: str
    key: str | None = None
    value_b64: str = Field(description="the original bytes, base64")


# --- codec ---------------------------------------------------------------------------------


class DecodeError(ValueError):
    """The bytes are not a JSON object (stage ``decode``)."""


def dumps(message: BaseModel | dict[str, Any]) -> bytes:
    """Encode a message (or a plain dict) as compact UTF-8 JSON."""
    if isinstance(message, BaseModel):
        message = message.model_dump(mode="json")
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
