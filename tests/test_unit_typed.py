"""xray/typed.py: strict dataclass <-> JSON conversion, and the errors it names."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from xray.entity.config_entity import PipelineConfig
from xray.pipeline.store import RunManifest, StageRecord
from xray.typed import SchemaError, from_mapping, to_jsonable


@dataclass(frozen=True)
class Inner:
    count: int
    ratio: float = 0.5


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner
    tags: tuple[str, ...] = ()
    size: int | str = "auto"
    note: str | None = None
    flag: bool = False
    table: dict[str, Inner] = field(default_factory=dict)
    extra: Any = None


def test_round_trip_through_json_is_exact() -> None:
    value = Outer(
        name="x", inner=Inner(3, 0.25), tags=("a", "b"), size=64, note=None, flag=True,
        table={"k": Inner(1)}, extra={"free": [1, 2]},
    )
    plain = json.loads(json.dumps(to_jsonable(value)))
    assert plain["tags"] == ["a", "b"] and plain["table"] == {"k": {"count": 1, "ratio": 0.5}}
    assert from_mapping(Outer, plain) == value


def test_real_schemas_round_trip() -> None:
    config = PipelineConfig()
    assert from_mapping(PipelineConfig, json.loads(json.dumps(to_jsonable(config)))) == config
    manifest = RunManifest(
        run_id="r", status="running", created_at="t", data_uri="demo", config={"a": 1}, code={}, environment={},
        stages={"data_ingestion": StageRecord(status="succeeded", started_at="t", seconds=1.5)},
    )
    assert from_mapping(RunManifest, json.loads(json.dumps(to_jsonable(manifest)))) == manifest


def test_coercions_that_are_allowed() -> None:
    value = from_mapping(Outer, {"name": "x", "inner": {"count": 2, "ratio": 1}, "tags": "a, b,", "size": "auto"})
    assert value.inner.ratio == 1.0 and isinstance(value.inner.ratio, float)  # an integer is a valid number
    assert value.tags == ("a", "b")  # a comma-separated string is a list (what --set gives)
    assert value.size == "auto"
    assert from_mapping(Outer, {"name": "x", "inner": {"count": 2}, "size": 32}).size == 32


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "inner": {"count": 1}, "colour": 1}, "unknown key colour (known keys: extra, flag, inner"),
        ({"name": "x", "inner": {"count": 1, "cnt": 1}}, "unknown key inner.cnt"),
        ({"name": "x", "inner": {"count": True}}, "inner.count: expected an integer, got True"),
        ({"name": "x", "inner": {"count": "3"}}, "inner.count: expected an integer, got '3'"),
        ({"name": "x", "inner": {"count": 1, "ratio": "high"}}, "inner.ratio: expected a number"),
        ({"name": "x", "inner": {"count": 1}, "flag": "yes"}, "flag: expected true or false, got 'yes'"),
        ({"name": 5, "inner": {"count": 1}}, "name: expected a string, got 5"),
        ({"name": "x", "inner": [1]}, "inner: expected a mapping, got list"),
        ({"name": "x", "inner": {"count": 1}, "tags": 7}, "tags: expected a list, got 7"),
        ({"name": "x", "inner": {"count": 1}, "tags": ["a", 2]}, "tags[1]: expected a string, got 2"),
        ({"name": "x", "inner": {"count": 1}, "table": {"k": {"count": "n"}}}, "table.k.count: expected an integer"),
        ({"name": "x", "inner": {"count": 1}, "size": 1.5}, "size: expected an integer, got 1.5"),
        ({"name": "x", "inner": {"ratio": 1.0}}, "inner: "),  # a required field is missing
    ],
)
def test_bad_data_names_the_dotted_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaError) as info:
        from_mapping(Outer, data)
    assert message in str(info.value)


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(SchemaError, match="top level: expected a mapping, got list"):
        from_mapping(Outer, [])


def test_none_only_where_the_type_allows_it() -> None:
    assert from_mapping(Outer, {"name": "x", "inner": {"count": 1}, "note": None}).note is None
    with pytest.raises(SchemaError, match="name: expected a string, got None"):
        from_mapping(Outer, {"name": None, "inner": {"count": 1}})
