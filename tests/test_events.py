from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from worker.events import (
    CLICKED,
    ID_MAX_CHARS,
    ITEM_TEXT_MAX_CHARS,
    MIN_CHARS,
    NOT_CLICKED,
    QUERY_MAX_CHARS,
    SCHEMA_VERSION,
    SEGMENT_MAX_CHARS,
    WIRE_TYPES,
    ClickEvent,
    ScoreRequest,
    write_schemas,
)
from worker.stream.decode import _FastEvent, fast_decode

REPO = Path(__file__).resolve().parent.parent


def _event(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "event_id": "e1",
        "ts": "2026-01-01T00:00:00Z",
        "segment": "GE",
        "query": "led bulb",
        "item_id": "100001",
        "item_text": "GE 60W LED bulb",
        "clicked": 1,
    }
    base.update(kw)
    return base


def test_committed_schemas_match_generated(tmp_path: Path) -> None:
    write_schemas(tmp_path)
    generated = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in (REPO / "schemas").glob("*.json"))
    assert generated == committed, "schemas/ is stale: run `python -m worker schemas`"
    for name in generated:
        assert (tmp_path / name).read_bytes() == (REPO / "schemas" / name).read_bytes(), (
            f"schemas/{name} differs from the code: run `python -m worker schemas`"
        )


def test_every_schema_carries_a_version() -> None:
    for model in WIRE_TYPES.values():
        schema = model.model_json_schema()
        assert schema["properties"]["schema_version"]["const"] == 1
        assert schema["$id"].endswith(".v1")


def test_click_event_roundtrip_through_orjson() -> None:
    event = ClickEvent.model_validate(_event())
    again = ClickEvent.model_validate(orjson.loads(event.to_json()))
    assert again == event
    assert again.ts == datetime(2026, 1, 1, tzinfo=UTC)


def test_naive_timestamp_is_utc() -> None:
    assert ClickEvent.model_validate(_event(ts="2026-01-01T12:00:00")).ts.tzinfo is not None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("clicked", 2),
        ("clicked", True),
        ("clicked", "1"),
        ("event_id", ""),
        ("item_text", "x" * 10_000),
        ("segment", ""),
        ("schema_version", 2),
        ("ts", "yesterday"),
    ],
)
def test_invalid_fields_are_named(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as err:
        ClickEvent.model_validate(_event(**{field: value}))
    assert field in str(err.value)


def test_query_is_optional() -> None:
    data = _event()
    del data["query"]
    assert ClickEvent.model_validate(data).query is None


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="extra"):
        ClickEvent.model_validate(_event(colour="red"))


def test_score_request_bounds() -> None:
    pair = {"item_id": "1", "item_text": "drill"}
    assert len(ScoreRequest.model_validate({"request_id": "r", "segment": "s", "pairs": [pair]}).pairs) == 1
    with pytest.raises(ValidationError):
        ScoreRequest.model_validate({"request_id": "r", "segment": "s", "pairs": []})


_LENGTHS = {
    "event_id": (MIN_CHARS, ID_MAX_CHARS),
    "segment": (MIN_CHARS, SEGMENT_MAX_CHARS),
    "item_id": (MIN_CHARS, ID_MAX_CHARS),
    "item_text": (MIN_CHARS, ITEM_TEXT_MAX_CHARS),
    "query": (0, QUERY_MAX_CHARS),
}


def _limit_cases() -> list[object]:
    cases: list[object] = []
    for field, (lo, hi) in _LENGTHS.items():
        for n in sorted({lo - 1, lo, lo + 1, hi - 1, hi, hi + 1} - {-1}):
            for char in ("x", "é", "😀"):
                cases.append(pytest.param({field: char * n}, lo <= n <= hi, id=f"{field}-{n}-{char!a}"))
    for clicked in (NOT_CLICKED - 1, NOT_CLICKED, CLICKED, CLICKED + 1):
        cases.append(pytest.param({"clicked": clicked}, clicked in (0, 1), id=f"clicked-{clicked}"))
    for version in (SCHEMA_VERSION - 1, SCHEMA_VERSION, SCHEMA_VERSION + 1, True, 1.0):
        ok = type(version) is int and version == SCHEMA_VERSION
        cases.append(pytest.param({"schema_version": version}, ok, id=f"schema_version-{version!r}"))
    cases += [
        pytest.param({"colour": "red"}, False, id="unknown-field"),
        pytest.param({"segment": "a\n"}, False, id="segment-trailing-newline"),
        pytest.param({"segment": "a\x7f"}, False, id="segment-del"),
        pytest.param({"query": None}, True, id="query-null"),
    ]
    return cases


@pytest.mark.parametrize(("change", "valid"), _limit_cases())
def test_fast_decoder_and_click_event_agree_at_every_limit(change: dict[str, object], valid: bool) -> None:
    """The msgspec fast path and the pydantic model read the same limits; at each edge they must agree."""
    raw = orjson.dumps(_event(**change))
    try:
        ClickEvent.model_validate_json(raw)
        pydantic_ok = True
    except ValidationError:
        pydantic_ok = False
    fast_ok = fast_decode(raw, -1e13, 1e13) is not None
    assert (pydantic_ok, fast_ok) == (valid, valid)


def test_fast_decoder_has_the_fields_of_click_event() -> None:
    assert set(_FastEvent.__struct_fields__) == set(ClickEvent.model_fields)
