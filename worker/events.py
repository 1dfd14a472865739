"""Wire types: what comes in on `clicks` and `score-requests`, what goes out on `scores` and `model-versions`.

Every message carries `schema_version`; a consumer rejects versions it does not know instead of guessing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

SchemaVersion = Literal[1]
SCHEMA_VERSION: Final[SchemaVersion] = 1

# The limits of the wire strings, in characters, and of `clicked`: one copy, read by these pydantic types
# and by the msgspec fast path of `worker.stream.decode`, which must accept nothing these reject.
MIN_CHARS: Final = 1
ID_MAX_CHARS: Final = 256
SEGMENT_MAX_CHARS: Final = 16_384
QUERY_MAX_CHARS: Final = 2_048
ITEM_TEXT_MAX_CHARS: Final = 8_192
CONTROL_CHARS: Final = r"\x00-\x1f\x7f"
"""A regex character range: what a segment name may not contain."""
NOT_CLICKED: Final = 0
CLICKED: Final = 1

Text = Annotated[str, Field(min_length=MIN_CHARS)]
SegmentName = Annotated[
    str, Field(min_length=MIN_CHARS, max_length=SEGMENT_MAX_CHARS, pattern=rf"^[^{CONTROL_CHARS}]+$")
]
EventId = Annotated[str, Field(min_length=MIN_CHARS, max_length=ID_MAX_CHARS)]
ItemId = Annotated[str, Field(min_length=MIN_CHARS, max_length=ID_MAX_CHARS)]
QueryText = Annotated[str, Field(max_length=QUERY_MAX_CHARS)]
ItemText = Annotated[str, Field(min_length=MIN_CHARS, max_length=ITEM_TEXT_MAX_CHARS)]
Clicked = Annotated[int, Field(strict=True, ge=NOT_CLICKED, le=CLICKED)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


def _utc(value: datetime) -> datetime:
    """Naive times are UTC; an aware time whose UTC form falls outside datetime's range is invalid."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("timestamp outside the representable range") from None


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)

    @field_validator("schema_version", mode="before", check_fields=False)
    @classmethod
    def _exact_version(cls, value: object) -> object:
        """`true` or `1.0` would pass `Literal[1]`; a version is the integer itself or it is unknown."""
        if type(value) is not int:
            raise ValueError("schema_version must be an integer")
        return value

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))


class ClickEvent(_Wire):
    """One impression and whether it was clicked. Producers key it by `segment`."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", title="ClickEvent", json_schema_extra={"$id": "click-event.v1"}
    )

    schema_version: SchemaVersion = SCHEMA_VERSION
    event_id: EventId
    ts: datetime = Field(description="Event time, ISO 8601; naive times are read as UTC.")
    segment: SegmentName = Field(
        description="Category, brand, locale or cohort: any text without control characters."
    )
    query: QueryText | None = Field(None, description="Search query or context text; optional.")
    item_id: ItemId
    item_text: ItemText
    clicked: Clicked = Field(description="1 clicked, 0 not.")

    @field_validator("ts")
    @classmethod
    def _normalise_ts(cls, value: datetime) -> datetime:
        return _utc(value)


ServingKind = Literal["zero_shot", "blend", "shared", "adapter"]


class ScorePair(_Wire):
    model_config = ConfigDict(frozen=True, extra="forbid", title="ScorePair")

    query: QueryText | None = None
    item_id: ItemId
    item_text: ItemText


class ScoreRequest(_Wire):
    """Asks for scores of given pairs under a segment's champion; answered on `scores` with `request_id`."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", title="ScoreRequest", json_schema_extra={"$id": "score-request.v1"}
    )

    schema_version: SchemaVersion = SCHEMA_VERSION
    request_id: Annotated[str, Field(min_length=MIN_CHARS, max_length=ID_MAX_CHARS)]
    segment: SegmentName
    pairs: Annotated[list[ScorePair], Field(min_length=1, max_length=10_000)]


class ScoreUpdate(_Wire):
    """One refreshed score; `request_id` is set only when it answers a score request."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", title="ScoreUpdate", json_schema_extra={"$id": "score-update.v1"}
    )

    schema_version: SchemaVersion = SCHEMA_VERSION
    segment: SegmentName
    query: QueryText | None
    item_id: ItemId
    score: Probability
    model_version: int = Field(
        ge=0, description="0 means the shared model (the segment has no champion yet)."
    )
    shared_version: int | None = Field(
        default=None, ge=0, description="The shared model version it was computed with; 0: zero-shot."
    )
    served_by: ServingKind | None = Field(
        default=None,
        description="What scored it (`ServingChoice.kind`): tells a blend from the shared model alone, "
        "which carry the same versions; null from workers before 2026-12-07.",
    )
    scored_at: datetime
    request_id: str | None = None


class HoldoutMetrics(_Wire):
    model_config = ConfigDict(frozen=True, extra="forbid", title="HoldoutMetrics")

    auc: float | None = Field(description="ROC AUC; null when the holdout has one class only.")
    logloss: float
    n: int = Field(ge=0)


class ServingChoice(_Wire):
    """What serves a segment after a decision, and the evidence it was chosen on (`learn.choice`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="ServingChoice")

    kind: ServingKind = Field(
        description="zero_shot: the pretrained encoder's cosine; blend: the shared model's and zero-shot's "
        "logits mixed (`WORKER_SERVING_BLEND_WEIGHT` on the shared model); shared: the shared model alone; "
        "adapter: the shared model with the segment's champion adapter."
    )
    shared_version: int = Field(ge=0, description="The shared model version the choice was made on.")
    n: int = Field(ge=0, description="The segment's held-out pairs the choice was made on.")
    auc: dict[str, float | None] = Field(
        default_factory=dict, description="Each candidate's AUC on those pairs (null: one class only)."
    )
    reason: str = ""


class ServingPrior(_Wire):
    """What the pool says about every segment's serving choice (`learn.choice`): the shared model's AUC
    gain over zero-shot on the pooled unseen queries' pairs, and how much that gain varies from segment to
    segment (estimated across the segments, never below `WORKER_SERVING_PRIOR_SD`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="ServingPrior")

    gain: float
    sd: float = Field(ge=0)
    segments: int = Field(default=0, ge=0, description="Segments the spread was estimated on.")
    blend_gain: float | None = Field(
        default=None, description="With `WORKER_SERVING_BLEND`: the blend's pooled AUC gain over zero-shot."
    )
    blend_sd: float | None = Field(
        default=None, ge=0, description="With `WORKER_SERVING_BLEND`: how much the blend's gain varies."
    )


class ServingPin(_Wire):
    """An operator's pin (`python -m worker models pin`): what serves the segment, whatever its serving
    choice or a later promotion says, until it is unpinned."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="ServingPin")

    kind: ServingKind
    version: int = Field(0, ge=0, description="adapter: the segment's adapter version; 0 otherwise.")
    shared_version: int = Field(
        0, ge=0, description="shared, adapter: the shared model version it is served on; 0: zero-shot."
    )
    reason: str = ""
    pinned_at: datetime


class ModelVersionEvent(_Wire):
    """Every training decision, promoted or not, and every pin and unpin, with the registry's record."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        title="ModelVersionEvent",
        json_schema_extra={"$id": "model-version.v1"},
    )

    schema_version: SchemaVersion = SCHEMA_VERSION
    scope: Literal["segment", "shared"] = Field(
        "segment", description="`shared`: the model all segments share."
    )
    segment: SegmentName
    version: int = Field(ge=1)
    parent_version: int | None
    decision: Literal["promoted", "rejected", "failed", "pinned", "unpinned"] = Field(
        description="A training's verdict, or an operator's `pinned` / `unpinned` (no model trained)."
    )
    reason: str = ""
    base_model: str
    events_from: int = Field(ge=0, description="First buffer sequence number trained on.")
    events_to: int = Field(ge=0, description="Last buffer sequence number trained on.")
    shared_version: int | None = Field(
        default=None, ge=0, description="A segment version: the shared version it was trained and gated on."
    )
    challenger: HoldoutMetrics | None
    champion: HoldoutMetrics | None
    device: str
    train_seconds: float = Field(ge=0)
    created_at: datetime
    serving: ServingChoice | None = Field(
        default=None, description="A segment version: what serves the segment after this decision."
    )
    zero_shot: HoldoutMetrics | None = Field(
        default=None,
        description="A shared version: zero-shot on the same pooled holdout, the prior of every "
        "segment's serving choice.",
    )
    held_back: dict[SegmentName, ServingChoice] = Field(
        default_factory=dict,
        description="A promoted shared version: the segments it does not serve, their pooled held-out "
        "pairs not clearing it against zero-shot; each stays on zero-shot until its own training's choice.",
    )
    serves: dict[SegmentName, ServingChoice] = Field(
        default_factory=dict,
        description="A promoted shared version: the segments of its pooled holdout it serves, on their "
        "held-out pairs' evidence (`held_back`: those it does not); a segment with no pairs there follows "
        "the pool.",
    )
    prior: ServingPrior | None = Field(
        default=None, description="A shared version: the prior of every segment's serving choice on it."
    )
    pinned: ServingPin | None = Field(
        default=None, description="decision `pinned`: what the operator pinned the segment to."
    )


WIRE_TYPES: dict[str, type[_Wire]] = {
    "click-event": ClickEvent,
    "score-request": ScoreRequest,
    "score-update": ScoreUpdate,
    "model-version": ModelVersionEvent,
}


def json_schema(model: type[_Wire]) -> dict[str, Any]:
    return model.model_json_schema(mode="validation")


def write_schemas(directory: Path) -> list[Path]:
    """Write one `<name>.v<version>.json` per wire type; the committed copies are checked against these."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in WIRE_TYPES.items():
        path = directory / f"{name}.v{SCHEMA_VERSION}.json"
        path.write_bytes(
            orjson.dumps(json_schema(model), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        )
        written.append(path)
    return written


def now_utc() -> datetime:
    return datetime.now(UTC)
