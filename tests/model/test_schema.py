"""Feature schema: TOML loading, validation errors that name file and field, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import FeatureSchema, FieldSpec, ModelError, SchemaError

# hypothesis settings of this module (not a global profile: other packages keep theirs)
PROPERTY = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])


def test_example_schemas_load(config_dir: Path) -> None:
    ml = FeatureSchema.load(config_dir / "movielens.toml")
    assert [f.name for f in ml.fields_of("user")][:1] == ["user_id"]
    assert ml.field_named("genres").kind == "multi"
    assert ml.field_named("age").boundaries == (18, 25, 35, 45, 50, 56)
    assert ml.field_named("zip").hash_buckets == 200
    assert [f.name for f in ml.fields_of("context")] == ["hour"]
    syn = FeatureSchema.load(config_dir / "synthetic.toml")
    assert {f.name for f in syn.fields} == {"user_id", "item_id", "segment", "category", "hour"}


def test_ids_always_present() -> None:
    s = FeatureSchema.ids_only()
    assert [(f.name, f.side) for f in s.fields] == [("user_id", "user"), ("item_id", "item")]
    s2 = FeatureSchema((FieldSpec("gender", "user"),))
    assert s2.fields_of("user")[0].name == "user_id"
    assert s2.fields_of("item")[0].name == "item_id"
    assert s2.fields_of("context") == ()


def test_id_fields_can_be_tuned(tmp_path: Path) -> None:
    p = tmp_path / "s.toml"
    p.write_text("[user.user_id]\nmin_count = 2\nexpire_after_s = 60\n")
    s = FeatureSchema.load(p)
    assert s.field_named("user_id").min_count == 2
    assert s.field_named("user_id").expire_after_s == 60.0


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[user.age]\nkind = "numeric"\n', "at least one boundary"),
        ('[user.age]\nkind = "numeric"\nboundaries = [3, 1]\n', "increase strictly"),
        ('[user.g]\nkind = "bogus"\n', "kind must be one of"),
        ("[user.g]\ncolour = 1\n", "unknown keys ['colour']"),
        ("[user.g]\nmin_count = 0\n", "min_count must be >= 1"),
        ("[user.g]\nhash_buckets = -3\n", "hash_buckets must be >= 0"),
        ("[user.g]\nhash_buckets = 4\nmin_count = 2\n", "fixed set of rows"),
        ("[user.g]\nboundaries = [1]\n", "only apply to numeric"),
        ("[user.g]\n[item.g]\n", "unique across sides"),
        ("[item.user_id]\n", "user_id must be"),
        ("[users.g]\n", "unknown top-level keys"),
        ("[user]\ng = 3\n", "expected a table"),
        ("[user.g\n", "not valid TOML"),
        ("[user.g]\nexpire_after_s = -1\n", "expire_after_s must be > 0"),
        ('[item.h]\nkind = "history"\n', "belongs to side 'user'"),
        ('[user.h]\nkind = "history"\nhistory_len = 0\n', "history_len must be"),
    ],
)
def test_bad_schema_names_file_and_field(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(SchemaError) as info:
        FeatureSchema.load(p)
    msg = str(info.value)
    assert str(p) in msg
    assert needle in msg
    assert isinstance(info.value, ModelError)


def test_field_named_in_message(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text('[user.age]\nkind = "numeric"\nboundaries = [3, 1]\n')
    with pytest.raises(SchemaError, match=r"user\.age"):
        FeatureSchema.load(p)


def test_missing_file() -> None:
    with pytest.raises(SchemaError, match="cannot read"):
        FeatureSchema.load("/nonexistent/schema.toml")


def test_fields_of_rejects_unknown_side() -> None:
    with pytest.raises(SchemaError):
        FeatureSchema.ids_only().fields_of("nobody")


_names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda n: n not in ("user_id", "item_id")
)


@st.composite
def field_specs(draw: st.DrawFn, name: str) -> FieldSpec:
    side = draw(st.sampled_from(["user", "item", "context"]))
    kind = draw(st.sampled_from(["categorical", "multi", "numeric", "history"]))
    if kind == "history":
        return FieldSpec(
            name,
            "user",
            kind,
            history_len=draw(st.integers(1, 50)),
            hash_buckets=draw(st.sampled_from([0, 8])),
        )
    if kind == "numeric":
        b = sorted(set(draw(st.lists(st.integers(-1000, 1000), min_size=1, max_size=5))))
        return FieldSpec(name, side, kind, boundaries=tuple(float(x) for x in b))
    hashed = draw(st.booleans())
    if hashed:
        return FieldSpec(name, side, kind, hash_buckets=draw(st.integers(1, 1000)))
    exp = draw(st.one_of(st.none(), st.floats(1.0, 1e7)))
    return FieldSpec(name, side, kind, min_count=draw(st.integers(1, 5)), expire_after_s=exp)


@st.composite
def schemas(draw: st.DrawFn) -> FeatureSchema:
    names = draw(st.lists(_names, unique=True, max_size=6))
    return FeatureSchema(tuple(draw(field_specs(n)) for n in names))


@PROPERTY
@given(schemas())
def test_schema_round_trips_through_toml(
    tmp_path_factory: pytest.TempPathFactory, schema: FeatureSchema
) -> None:
    p = tmp_path_factory.mktemp("s") / "schema.toml"
    p.write_text(schema.to_toml())
    back = FeatureSchema.load(p)
    assert {f.name: f for f in back.fields} == {f.name: f for f in schema.fields}
    assert FeatureSchema.from_dict(schema.to_dict()) == back
