"""Feature schema: which user, item and context fields the FM sees, and how each is encoded.

A schema is a TOML file with one table per field, grouped by side::

    [user.gender]                 # categorical by default
    [user.age]
    kind = "numeric"
    boundaries = [18, 25, 35, 45, 50, 56]   # buckets (-inf,18) [18,25) ... [56,inf)
    [user.zip]
    hash_buckets = 1000           # stable blake2b hash into 1000 rows, no vocabulary
    [item.genres]
    kind = "multi"                # a list; each of its n values weighs 1/n
    [user.recent_items]
    kind = "history"              # kept by the model: the user's last 20 positive item ids
    history_len = 20              # (each weighs 1/n like a multi-valued field)
    [context.hour]
    [user.user_id]                # optional: tune the id fields themselves
    min_count = 2
    expire_after_s = 2592000

``user_id`` (side user) and ``item_id`` (side item) are always fields; they are added when the
file does not mention them. Field names are unique across sides.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from model.errors import SchemaError

Side = Literal["user", "item", "context"]
Kind = Literal["categorical", "multi", "numeric", "history"]

SIDES: tuple[str, ...] = ("user", "item", "context")
KINDS: tuple[str, ...] = ("categorical", "multi", "numeric", "history")
USER_ID = "user_id"
ITEM_ID = "item_id"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_SPEC_KEYS = (
    "kind",
    "boundaries",
    "hash_buckets",
    "min_count",
    "expire_after_s",
    "history_len",
    "history_decay",
)


@dataclass(frozen=True)
class FieldSpec:
    """One feature field.

    Attributes:
        name: unique field name (the key in profile / context dicts).
        side: ``user``, ``item`` or ``context``.
        kind: ``categorical`` (one value), ``multi`` (a list of values, each weighted ``1/n``),
            ``numeric`` (a number, bucketised by ``boundaries``) or ``history`` (user side
            only: the model itself keeps the ids of the user's last ``history_len`` positive
            items, appended after each training batch; weighted ``1/n`` like ``multi``; its
            rows are separate from the ``item_id`` rows, FISM/SVD++ style).
        boundaries: strictly increasing bucket edges of a numeric field; ``len+1`` buckets,
            bucket ``i`` holds ``boundaries[i-1] <= x < boundaries[i]``.
        hash_buckets: ``> 0`` hashes values (blake2b, stable across processes) into this many
            rows instead of keeping a vocabulary; collisions share a row.
        min_count: a value gets its own row after this many sightings in training events;
            until then it uses the field's learned fallback row.
        expire_after_s: a value not seen for this long (event time) loses its row, which is
            reset and reused; it must then be admitted again.
        history_len: items kept by a ``history`` field (ignored by other kinds).
        history_decay: recency weighting of a ``history`` field: the item liked ``a`` clicks
            before the newest weighs ``history_decay ** a`` (weights normalised to sum 1);
            1 = every kept item weighs ``1/n``.
    """

    name: str
    side: Side
    kind: Kind = "categorical"
    boundaries: tuple[float, ...] = ()
    hash_buckets: int = 0
    min_count: int = 1
    expire_after_s: float | None = None
    history_len: int = 20
    history_decay: float = 1.0

    def __post_init__(self) -> None:
        where = f"field {self.name!r}"
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise SchemaError(
                f"{where}: expected a name of letters, digits, '_', '.', '-' "
                "starting with a letter or '_'"
            )
        if self.side not in SIDES:
            raise SchemaError(f"{where}: side must be one of {SIDES}, got {self.side!r}")
        if self.kind not in KINDS:
            raise SchemaError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        try:
            bounds = tuple(float(b) for b in self.boundaries)
        except (TypeError, ValueError) as exc:
            raise SchemaError(
                f"{where}: boundaries must be numbers, got {self.boundaries!r}"
            ) from exc
        object.__setattr__(self, "boundaries", bounds)
        if self.kind == "numeric":
            if not bounds:
                raise SchemaError(f"{where}: a numeric field needs at least one boundary")
            if any(not math.isfinite(b) for b in bounds):
                raise SchemaError(f"{where}: boundaries must be finite, got {bounds}")
            if any(b >= c for b, c in zip(bounds, bounds[1:], strict=False)):
                raise SchemaError(f"{where}: boundaries must increase strictly, got {bounds}")
            if self.hash_buckets:
                raise SchemaError(f"{where}: a numeric field cannot be hashed")
        elif bounds:
            raise SchemaError(f"{where}: boundaries only apply to numeric fields")
        if isinstance(self.hash_buckets, bool) or not isinstance(self.hash_buckets, int):
            raise SchemaError(
                f"{where}: hash_buckets must be an integer, got {self.hash_buckets!r}"
            )
        if self.hash_buckets < 0:
            raise SchemaError(f"{where}: hash_buckets must be >= 0, got {self.hash_buckets}")
        if isinstance(self.min_count, bool) or not isinstance(self.min_count, int):
            raise SchemaError(f"{where}: min_count must be an integer, got {self.min_count!r}")
        if self.min_count < 1:
            raise SchemaError(f"{where}: min_count must be >= 1, got {self.min_count}")
        if self.expire_after_s is not None:
            try:
                exp = float(self.expire_after_s)
            except (TypeError, ValueError) as exc:
                raise SchemaError(
                    f"{where}: expire_after_s must be seconds, got {self.expire_after_s!r}"
                ) from exc
            if not exp > 0 or not math.isfinite(exp):
                raise SchemaError(f"{where}: expire_after_s must be > 0, got {exp}")
            object.__setattr__(self, "expire_after_s", exp)
        if self.has_fixed_rows and (self.min_count != 1 or self.expire_after_s is not None):
            raise SchemaError(
                f"{where}: min_count and expire_after_s need a vocabulary; "
                "hashed and numeric fields have a fixed set of rows"
            )
        if (
            isinstance(self.history_len, bool)
            or not isinstance(self.history_len, int)
            or (self.history_len < 1)
        ):
            raise SchemaError(
                f"{where}: history_len must be an integer >= 1, got {self.history_len!r}"
            )
        if not (
            isinstance(self.history_decay, int | float)
            and not isinstance(self.history_decay, bool)
            and math.isfinite(self.history_decay)
            and 0.0 < self.history_decay <= 1.0
        ):
            raise SchemaError(
                f"{where}: history_decay must be a number in (0, 1], got {self.history_decay!r}"
            )
        object.__setattr__(self, "history_decay", float(self.history_decay))
        if self.kind == "history" and self.side != "user":
            raise SchemaError(f"{where}: a history field belongs to side 'user', got {self.side!r}")
        if self.name == USER_ID and (self.side != "user" or self.kind != "categorical"):
            raise SchemaError(f"{where}: user_id must be a categorical field of side 'user'")
        if self.name == ITEM_ID and (self.side != "item" or self.kind != "categorical"):
            raise SchemaError(f"{where}: item_id must be a categorical field of side 'item'")

    @property
    def has_fixed_rows(self) -> bool:
        """Hashed and numeric fields own a fixed block of rows (no vocabulary, no admission)."""
        return self.kind == "numeric" or self.hash_buckets > 0

    @property
    def n_fixed_rows(self) -> int:
        """Rows of a fixed-rows field: buckets of a numeric field, or ``hash_buckets``."""
        if self.kind == "numeric":
            return len(self.boundaries) + 1
        return self.hash_buckets

    @property
    def is_id(self) -> bool:
        return self.name in (USER_ID, ITEM_ID)

    @property
    def is_history(self) -> bool:
        return self.kind == "history"

    @property
    def from_profile(self) -> bool:
        """Values come from profile / context dicts (not ids, not model-kept history)."""
        return not self.is_id and not self.is_history

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/TOML friendly) with every attribute."""
        return {
            "name": self.name,
            "side": self.side,
            "kind": self.kind,
            "boundaries": list(self.boundaries),
            "hash_buckets": self.hash_buckets,
            "min_count": self.min_count,
            "expire_after_s": self.expire_after_s,
            "history_len": self.history_len,
            "history_decay": self.history_decay,
        }


@dataclass(frozen=True)
class FeatureSchema:
    """The fields of the FM; ``user_id`` and ``item_id`` are always present.

    Fields are kept in a canonical order: user fields (``user_id`` first), item fields
    (``item_id`` first), then context fields, each side in the order given.
    """

    fields: tuple[FieldSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        fields = tuple(self.fields)
        for f in fields:
            if not isinstance(f, FieldSpec):
                raise SchemaError(f"expected FieldSpec objects, got {type(f).__name__}")
        names = [f.name for f in fields]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SchemaError(f"field names must be unique across sides; repeated: {dupes}")
        if ITEM_ID not in names:
            fields = (FieldSpec(ITEM_ID, "item"), *fields)
        if USER_ID not in names:
            fields = (FieldSpec(USER_ID, "user"), *fields)
        # canonical order (user, item, context; the id first on its side; otherwise as given):
        # the layout of rows follows it, so equal schemas always build identical models
        rank = {side: j for j, side in enumerate(SIDES)}
        fields = tuple(sorted(fields, key=lambda f: (rank.get(f.side, 9), not f.is_id)))
        object.__setattr__(self, "fields", fields)

    @classmethod
    def ids_only(cls) -> FeatureSchema:
        """Plain collaborative filtering: only ``user_id`` and ``item_id``."""
        return cls(())

    @classmethod
    def load(cls, path: str | Path) -> FeatureSchema:
        """Read a schema from a TOML file.

        Raises:
            SchemaError: the file is missing, not TOML, or a field is invalid; the message
                names the file and the field.
        """
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SchemaError(f"{p}: cannot read the schema file: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SchemaError(f"{p}: not valid TOML: {exc}") from exc
        try:
            return cls.from_dict(raw)
        except SchemaError as exc:
            raise SchemaError(f"{p}: {exc}") from exc

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> FeatureSchema:
        """Build from the TOML layout ``{side: {field: {attr: value}}}``."""
        if not isinstance(raw, Mapping):
            raise SchemaError(f"expected tables [user.*], [item.*], [context.*], got {raw!r}")
        unknown = [k for k in raw if k not in SIDES]
        if unknown:
            raise SchemaError(
                f"unknown top-level keys {unknown}; expected only tables named {list(SIDES)} "
                "(e.g. [user.gender])"
            )
        specs: list[FieldSpec] = []
        for side in SIDES:
            table = raw.get(side, {})
            if not isinstance(table, Mapping):
                raise SchemaError(f"[{side}] must be a table of fields, got {table!r}")
            for name, attrs in table.items():
                where = f"field '{side}.{name}'"
                if not isinstance(attrs, Mapping):
                    raise SchemaError(
                        f"{where}: expected a table such as [{side}.{name}] with kind = ..., "
                        f"got {attrs!r}"
                    )
                bad = [k for k in attrs if k not in _SPEC_KEYS]
                if bad:
                    raise SchemaError(f"{where}: unknown keys {bad}; allowed: {list(_SPEC_KEYS)}")
                kw = dict(attrs)
                if "boundaries" in kw:
                    if not isinstance(kw["boundaries"], list | tuple):
                        raise SchemaError(
                            f"{where}: boundaries must be a list, got {kw['boundaries']!r}"
                        )
                    kw["boundaries"] = tuple(kw["boundaries"])
                try:
                    specs.append(FieldSpec(name=name, side=side, **kw))  # type: ignore[arg-type]
                except SchemaError as exc:
                    raise SchemaError(f"{where}: {exc}") from exc
        return cls(tuple(specs))

    def to_dict(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The TOML layout; ``from_dict(to_dict())`` round-trips."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for f in self.fields:
            d = f.to_dict()
            attrs: dict[str, Any] = {"kind": d["kind"]}
            if f.boundaries:
                attrs["boundaries"] = d["boundaries"]
            if f.hash_buckets:
                attrs["hash_buckets"] = f.hash_buckets
            if f.min_count != 1:
                attrs["min_count"] = f.min_count
            if f.expire_after_s is not None:
                attrs["expire_after_s"] = f.expire_after_s
            if f.kind == "history":
                attrs["history_len"] = f.history_len
                if f.history_decay != 1.0:
                    attrs["history_decay"] = f.history_decay
            out.setdefault(f.side, {})[f.name] = attrs
        return out

    def to_toml(self) -> str:
        """Render as TOML that :meth:`load` reads back to an equal schema."""
        lines: list[str] = []
        for side, table in self.to_dict().items():
            for name, attrs in table.items():
                lines.append(f"[{side}.{_toml_key(name)}]")
                for k, v in attrs.items():
                    lines.append(f"{k} = {_toml_value(v)}")
                lines.append("")
        return "\n".join(lines)

    def fields_of(self, side: str) -> tuple[FieldSpec, ...]:
        """The fields of one side, in schema order (ids first)."""
        if side not in SIDES:
            raise SchemaError(f"side must be one of {SIDES}, got {side!r}")
        return tuple(f for f in self.fields if f.side == side)

    def field_named(self, name: str) -> FieldSpec:
        """The field called ``name``."""
        for f in self.fields:
            if f.name == name:
                return f
        raise SchemaError(f"no field named {name!r}; fields: {[f.name for f in self.fields]}")


def _toml_key(name: str) -> str:
    return name if re.match(r"^[A-Za-z0-9_\-]+$", name) else f'"{name}"'


def _toml_value(v: Any) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot render {v!r} as TOML")
