"""Real data as click events: the Home Depot relevance set (conventions of its DATA.md) and JSONL files.

The data stays where it is (`../shared/data/`); nothing here copies it.
"""

from __future__ import annotations

import csv
import gzip
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson

from worker.events import ClickEvent
from worker.learn.history import query_key
from worker.tools.paths import SHARED_DATA

DEFAULT_HOMEDEPOT = SHARED_DATA / "homedepot" / "train_with_brand.csv.gz"
EVAL_MIN_ROWS = 500
HOLDOUT_QUERY_FRAC = 0.3
HOLDOUT_SEED = 7
NOT_EVAL_SEGMENTS = frozenset({"unknown", "Unbranded"})
_EPOCH = datetime(2016, 1, 1, tzinfo=UTC)


@dataclass
class Dataset:
    """Events in stream order, and the held-out pairs per evaluation segment (never replayed).

    `pair_level`: segments too small in distinct queries for a query-disjoint holdout, held out by pair
    instead; `notes`: what the loader decided, for the evaluation's output."""

    events: list[ClickEvent]
    holdout: dict[str, list[ClickEvent]] = field(default_factory=dict)
    pair_level: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

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
    """Per segment, the pairs of a `frac` share of its distinct queries (first-appearance order, shuffled).

    A segment with too few distinct queries for that (a per-query segment has one) gets an empty list;
    `split_dataset` decides what to do with it."""
    out: dict[str, list[ClickEvent]] = {}
    for segment in segments:
        seg_events = [e for e in events if e.segment == segment]
        queries = list(dict.fromkeys(e.query or "" for e in seg_events))
        order = np.random.default_rng(seed).permutation(len(queries))
        held = {queries[i] for i in order[: int(len(queries) * frac)]}
        out[segment] = [e for e in seg_events if (e.query or "") in held]
    return out


def split_dataset(events: list[ClickEvent], segments: list[str], frac: float, seed: int) -> Dataset:
    """A query-disjoint holdout per segment where the segment has the queries for one; otherwise a
    pair-level holdout (said in `notes`), and a segment that cannot give both classes on either side
    is left out with a message: an empty or one-class set never reaches a model."""
    holdout = holdout_split(events, segments, frac, seed)
    dataset = Dataset(events)
    rng = np.random.default_rng(seed)
    for segment in segments:
        held = holdout[segment]
        seg_events = [e for e in events if e.segment == segment]
        if not held:
            picked = rng.permutation(len(seg_events))[: int(len(seg_events) * frac)]
            held = [seg_events[int(i)] for i in sorted(picked)]
            dataset.pair_level.append(segment)
        rest = len(seg_events) - len(held)
        if len({e.clicked for e in held}) < 2 or rest == 0:
            dataset.notes.append(
                f"segment {segment!r} left out: {len(held)} held-out pairs of "
                f"{len({e.clicked for e in held})} class(es), {rest} to replay"
            )
            continue
        dataset.holdout[segment] = held
    if dataset.pair_level:
        names = ", ".join(repr(s) for s in dataset.pair_level[:5])
        more = " ..." if len(dataset.pair_level) > 5 else ""
        dataset.notes.append(
            f"{len(dataset.pair_level)} segment(s) with fewer than {math.ceil(1 / frac)} distinct queries "
            f"held out by pair, not by query (their held-out queries also occur in the stream): {names}{more}"
        )
    return dataset


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
    return split_dataset(events, segments, holdout_frac, seed)


SMALL_SHOPS: dict[str, tuple[int, int]] = {"hd-5k": (5_000, 3), "hd-10k": (10_000, 6)}
"""Named small shops cut from Home Depot: name -> (events, evaluation segments)."""


def small_shop(events: list[ClickEvent], n_events: int, n_segments: int, seed: int = HOLDOUT_SEED) -> Dataset:
    """A small shop cut from the Home Depot stream, for the case this project exists for: the
    `n_segments` largest evaluation brands whole, the other events evenly thinned to `n_events` in all,
    and per segment a held-out 30 % of its queries that occur nowhere in the stream (a shop's new
    queries), so the held-out pairs measure what a model does on queries it never saw."""
    segments = homedepot_eval_segments(events)
    counts: dict[str, int] = {}
    for e in events:
        counts[e.segment] = counts.get(e.segment, 0) + 1
    chosen = sorted(sorted(segments, key=lambda s: (-counts[s], s))[:n_segments])
    wanted = set(chosen)
    mine = [e for e in events if e.segment in wanted]
    others = [e for e in events if e.segment not in wanted]
    room = max(0, n_events - len(mine))
    step = max(1, math.ceil(len(others) / max(1, room)))
    kept = {e.event_id for e in [*mine, *others[::step][:room]]}
    sliced = [e for e in events if e.event_id in kept]
    held = holdout_split(sliced, chosen, HOLDOUT_QUERY_FRAC, seed)
    held_ids = {e.event_id for pairs in held.values() for e in pairs}
    new_queries = {query_key(e.query) for pairs in held.values() for e in pairs}
    stream = [e for e in sliced if e.event_id in held_ids or query_key(e.query) not in new_queries]
    return Dataset(stream, held)


SHOP = "shop"
"""The generated shop (`worker.tools.shop`) at its default size and seed: the demo's default data set."""


def load_shop() -> Dataset:
    """The generated shop, built in memory in about a second (synthetic: docs/generated-shop.md), with a
    seeded share of each segment's events held out (never replayed)."""
    from worker.tools import shop

    events = shop.generate()
    return Dataset(events, shop.holdout(events))


def load_dataset(spec: str, holdout_frac: float = 0.3) -> Dataset:
    """`homedepot`, a small shop cut from it (`SMALL_SHOPS`), a `.csv.gz` in the Home Depot layout, or a
    `.jsonl` path."""
    if spec == SHOP:
        return load_shop()
    if spec == "homedepot":
        return load_homedepot()
    if spec in SMALL_SHOPS:
        return small_shop(read_homedepot(), *SMALL_SHOPS[spec])
    path = Path(spec)
    if path.suffix == ".jsonl":
        return load_jsonl(path, holdout_frac=holdout_frac)
    return load_homedepot(path)
