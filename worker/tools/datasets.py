"""Real data as click events: the Home Depot relevance set (conventions of its DATA.md) and JSONL files.

The data stays where it is (`../shared/data/`); nothing here copies it.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson

from worker.events import ClickEvent
from worker.tools.paths import SHARED_DATA

DEFAULT_HOMEDEPOT = SHARED_DATA / "homedepot" / "train_with_brand.csv.gz"
EVAL_MIN_ROWS = 500
HOLDOUT_QUERY_FRAC = 0.3
HOLDOUT_SEED = 7
NOT_EVAL_SEGMENTS = frozenset({"unknown", "Unbranded"})
_EPOCH = datetime(2016, 1, 1, tzinfo=UTC)


@dataclass
class Dataset:
    """Events in stream order, and the held-out pairs per evaluation segment (never replayed)."""

    events: list[ClickEvent]
    holdout: dict[str, list[ClickEvent]] = field(default_factory=dict)

    @property
    def eval_segments(self) -> list[str]:
        return sorted(self.holdout)

    def stream(self) -> list[ClickEvent]:
        """The events a replay produces: everything except the held-out pairs, in order."""
        held = {e.event_id for pairs in self.holdout.values() for e in pairs}
        return [e for e in self.events if e.event_id not in held]


def default_homedepot_path() -> Path:
    return DEFAULT_HOMEDEPOT


def read_homedepot(path: Path | None = None) -> list[ClickEvent]:
    """All rows as events, ordered by `id`: label `relevance >= 2.5`, segment `brand` or `unknown`."""
    path = path or DEFAULT_HOMEDEPOT
    if not path.exists():
        raise FileNotFoundError(f"Home Depot data not found at {path} (set DATA= or pass a path)")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            rows.append(row)
    rows.sort(key=lambda r: int(r["id"]))
    events = []
    for row in rows:
        row_id = int(row["id"])
        events.append(
            ClickEvent(
                event_id=f"homedepot-{row_id}",
                ts=_EPOCH + timedelta(seconds=row_id),
                segment=row["brand"].strip() or "unknown",
                query=row["search_term"],
                item_id=row["product_uid"],
                item_text=row["product_title"],
                clicked=1 if float(row["relevance"]) >= 2.5 else 0,
            )
        )
    return events


def holdout_split(
    events: list[ClickEvent], segments: list[str], frac: float, seed: int
) -> dict[str, list[ClickEvent]]:
    """Per segment, the pairs of a `frac` share of its distinct queries (first-appearance order, shuffled)."""
    out: dict[str, list[ClickEvent]] = {}
    for segment in segments:
        seg_events = [e for e in events if e.segment == segment]
        queries = list(dict.fromkeys(e.query or "" for e in seg_events))
        order = np.random.default_rng(seed).permutation(len(queries))
        held = {queries[i] for i in order[: int(len(queries) * frac)]}
        out[segment] = [e for e in seg_events if (e.query or "") in held]
    return out


def homedepot_eval_segments(events: list[ClickEvent]) -> list[str]:
    counts: dict[str, int] = {}
    for e in events:
        counts[e.segment] = counts.get(e.segment, 0) + 1
    return sorted(s for s, n in counts.items() if n >= EVAL_MIN_ROWS and s not in NOT_EVAL_SEGMENTS)


def load_homedepot(path: Path | None = None) -> Dataset:
    events = read_homedepot(path)
    segments = homedepot_eval_segments(events)
    return Dataset(events, holdout_split(events, segments, HOLDOUT_QUERY_FRAC, HOLDOUT_SEED))


def iter_jsonl(path: Path) -> Iterator[ClickEvent]:
    """Click events from a JSONL file, one per line; a bad line raises with its line number."""
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield ClickEvent.model_validate(orjson.loads(line))
            except (ValueError, orjson.JSONDecodeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a valid click event: {exc}") from exc


def load_jsonl(path: Path, holdout_frac: float = 0.0, seed: int = HOLDOUT_SEED, min_rows: int = 0) -> Dataset:
    """A JSONL data set; with `holdout_frac` > 0, every segment of `min_rows`+ events gets a query holdout."""
    events = list(iter_jsonl(path))
    if holdout_frac <= 0:
        return Dataset(events)
    counts: dict[str, int] = {}
    for e in events:
        counts[e.segment] = counts.get(e.segment, 0) + 1
    segments = sorted(s for s, n in counts.items() if n >= min_rows)
    return Dataset(events, holdout_split(events, segments, holdout_frac, seed))


def load_dataset(spec: str, holdout_frac: float = 0.3) -> Dataset:
    """`homedepot`, a `.csv.gz` in the Home Depot layout, or a `.jsonl` path."""
    if spec == "homedepot":
        return load_homedepot()
    path = Path(spec)
    if path.suffix == ".jsonl":
        return load_jsonl(path, holdout_frac=holdout_frac)
    return load_homedepot(path)
