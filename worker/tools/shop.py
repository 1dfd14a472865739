"""`python -m worker generate-shop`: a generated shop, the data set that ships with the project.

Synthetic, not real data: a catalogue of invented home-improvement products, the queries a shopper
types for them, and click labels drawn from a latent relevance of the pair plus a per-segment taste
that the item text reveals (one cohort likes the "Value" line, one the "Premium" line, one natural
materials, one a brand; the rest are neutral). Noise is position-free: there are no positions. The
generating model, its constants and why they are what they are: docs/generated-shop.md.

Deterministic for a seed (numpy's PCG64 and nothing else random); 8,000 events take well under a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from worker.events import ClickEvent

DEFAULT_EVENTS = 8000
DEFAULT_SEGMENTS = 6
DEFAULT_SEED = 0
DEFAULT_START = datetime(2026, 12, 1, tzinfo=UTC)
PRODUCTS = 600
HOLDOUT_FRAC = 0.2
"""Share of each segment's events held out for evaluation (never replayed)."""

BRANDS = ("Kestrel", "Hartwell", "Ironbark", "Brightway", "Tessaro", "Corvus", "Maple Lane", "Northfield")
PRICE_BANDS = ("Value", "Classic", "Premium")
COLOURS = ("Black", "White", "Brushed Nickel", "Oil-Rubbed Bronze", "Grey", "Natural")
# Product types with the materials and sizes they come in: every product's title names all three.
PRODUCT_TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "towel bar": (("Stainless Steel", "Brass", "Bamboo", "Plastic"), ("18 in.", "24 in.", "30 in.")),
    "bathroom vanity": (("Solid Wood", "Bamboo", "Vinyl", "Stainless Steel"), ("24 in.", "36 in.", "48 in.")),
    "floating shelf": (
        ("Solid Wood", "Bamboo", "Stainless Steel", "Plastic"),
        ("24 in.", "36 in.", "48 in."),
    ),
    "kitchen faucet": (("Stainless Steel", "Brass", "Plastic"), ("1-Handle", "2-Handle")),
    "ceiling fan": (("Solid Wood", "Stainless Steel", "Plastic"), ("42 in.", "52 in.", "60 in.")),
    "storage bin": (("Bamboo", "Plastic", "Vinyl", "Stainless Steel"), ("12 qt.", "32 qt.", "64 qt.")),
    "patio chair": (("Solid Wood", "Bamboo", "Aluminum", "Plastic"), ("Set of 2", "Set of 4")),
    "cabinet pull": (("Brass", "Stainless Steel", "Solid Wood", "Plastic"), ("3 in.", "5 in.", "7 in.")),
    "door mat": (("Coir", "Vinyl", "Rubber"), ("18 x 30 in.", "24 x 36 in.")),
    "garden hose": (("Rubber", "Vinyl"), ("25 ft.", "50 ft.", "100 ft.")),
    "window blind": (("Bamboo", "Vinyl", "Aluminum", "Solid Wood"), ("23 in.", "35 in.", "47 in.")),
    "cutting board": (("Bamboo", "Solid Wood", "Plastic"), ("12 in.", "18 in.")),
}
NATURAL = frozenset({"Solid Wood", "Bamboo", "Coir"})
SYNTHETIC = frozenset({"Plastic", "Vinyl"})

# The click model: logit = BASE + SLOPE * relevance + taste + noise. Relevance 0 clicks about 6 %,
# relevance 1 about 80 %; a liked item's taste (+2.2) roughly doubles the odds nine times over.
BASE = -2.8
SLOPE = 4.2
NOISE_SD = 0.5
LIKE = 2.2
DISLIKE = -2.2
QUERY_KINDS = ("type", "attribute+type", "brand+type", "misspelt", "partial", "attribute", "brand")
QUERY_KIND_P = (0.22, 0.24, 0.12, 0.14, 0.1, 0.1, 0.08)
SHOWN_TARGET_P = 0.45
"""An impression shows the product the query was made from with this chance, else another one."""
SAME_TYPE_P = 0.6
"""An impression that is not the target shows a product of the same type with this chance."""


@dataclass(frozen=True)
class Product:
    item_id: str
    brand: str
    band: str
    size: str
    colour: str
    material: str
    kind: str

    @property
    def title(self) -> str:
        return f"{self.brand} {self.band} {self.size} {self.colour} {self.material} {self.kind.title()}"


@dataclass(frozen=True)
class Taste:
    """A cohort's preference, read off the product's title words: liked attributes add `LIKE` to the
    click logit, disliked ones `DISLIKE`. A neutral cohort likes and dislikes nothing."""

    segment: str
    likes: frozenset[str] = field(default_factory=frozenset)
    dislikes: frozenset[str] = field(default_factory=frozenset)
    about: str = "neutral"

    def effect(self, product: Product) -> float:
        words = {product.brand, product.band, product.material}
        return LIKE * bool(words & self.likes) + DISLIKE * bool(words & self.dislikes)


PREFERENCE_COHORTS = (
    Taste("bargain-hunters", frozenset({"Value"}), frozenset({"Premium"}), "price band: Value"),
    Taste("trade-pros", frozenset({"Premium"}), frozenset({"Value"}), "price band: Premium"),
    Taste("natural-home", NATURAL, SYNTHETIC, "material: wood, bamboo, coir"),
    Taste("kestrel-loyal", frozenset({"Kestrel"}), frozenset({"Corvus"}), "brand: Kestrel"),
)


def cohorts(segments: int) -> list[Taste]:
    """The first `segments` cohorts: the preference cohorts first, then neutral ones (`neutral-1`, ...)."""
    if segments < 1:
        raise ValueError(f"a shop needs at least 1 segment, got {segments}")
    out = list(PREFERENCE_COHORTS[:segments])
    out += [Taste(f"neutral-{i}") for i in range(1, segments - len(out) + 1)]
    return out


def catalogue(rng: np.random.Generator, n: int = PRODUCTS) -> list[Product]:
    kinds = sorted(PRODUCT_TYPES)
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        materials, sizes = PRODUCT_TYPES[kind]
        out.append(
            Product(
                item_id=f"shop-{i:04d}",
                brand=str(rng.choice(BRANDS)),
                band=str(rng.choice(PRICE_BANDS)),
                size=str(rng.choice(sizes)),
                colour=str(rng.choice(COLOURS)),
                material=str(rng.choice(materials)),
                kind=kind,
            )
        )
    return out


@dataclass(frozen=True)
class Intent:
    """What the shopper looks for: a product type, attributes, a brand; any may be absent."""

    text: str
    kind: str | None
    attributes: frozenset[str]
    brand: str | None


def _typo(rng: np.random.Generator, word: str) -> str:
    """One dropped, doubled or swapped letter inside a word longer than 3 letters."""
    if len(word) <= 3:
        return word
    i = int(rng.integers(1, len(word) - 1))
    op = int(rng.integers(3))
    if op == 0:
        return word[:i] + word[i + 1 :]
    if op == 1:
        return word[:i] + word[i] + word[i:]
    return word[: i - 1] + word[i] + word[i - 1] + word[i + 1 :]


def make_query(rng: np.random.Generator, target: Product) -> Intent:
    kind = QUERY_KINDS[int(rng.choice(len(QUERY_KINDS), p=QUERY_KIND_P))]
    attribute = str(rng.choice([target.material, target.colour, target.size]))
    if kind == "type":
        return Intent(target.kind, target.kind, frozenset(), None)
    if kind == "attribute+type":
        return Intent(f"{attribute.lower()} {target.kind}", target.kind, frozenset({attribute}), None)
    if kind == "brand+type":
        return Intent(f"{target.brand.lower()} {target.kind}", target.kind, frozenset(), target.brand)
    if kind == "misspelt":
        words = target.kind.split()
        j = int(rng.integers(len(words)))
        words[j] = _typo(rng, words[j])
        return Intent(" ".join(words), target.kind, frozenset(), None)
    if kind == "partial":
        cut = max(3, int(len(target.kind) * rng.uniform(0.45, 0.8)))
        return Intent(target.kind[:cut], target.kind, frozenset(), None)
    if kind == "attribute":
        return Intent(target.material.lower(), None, frozenset({target.material}), None)
    return Intent(target.brand.lower(), None, frozenset(), target.brand)


def relevance(intent: Intent, product: Product) -> float:
    """In [0, 1]: the product type dominates; attributes and brand asked for refine it."""
    has = {product.material, product.colour, product.size}
    attr = len(intent.attributes & has) / len(intent.attributes) if intent.attributes else None
    brand = None if intent.brand is None else float(intent.brand == product.brand)
    if intent.kind is None:
        parts = [x for x in (attr, brand) if x is not None]
        return sum(parts) / len(parts) if parts else 0.0
    score = 0.7 * float(intent.kind == product.kind)
    extras = [x for x in (attr, brand) if x is not None]
    score += 0.3 * (sum(extras) / len(extras) if extras else float(intent.kind == product.kind))
    return score


def click_probability(intent: Intent, product: Product, taste: Taste, noise: float) -> float:
    logit = BASE + SLOPE * relevance(intent, product) + taste.effect(product) + noise
    return float(1.0 / (1.0 + np.exp(-logit)))


def _shown(
    rng: np.random.Generator, target: Product, by_kind: dict[str, list[Product]], all_: Sequence[Product]
) -> Product:
    if rng.random() < SHOWN_TARGET_P:
        return target
    pool = by_kind[target.kind] if rng.random() < SAME_TYPE_P else all_
    return pool[int(rng.integers(len(pool)))]


def generate(
    events: int = DEFAULT_EVENTS,
    segments: int = DEFAULT_SEGMENTS,
    seed: int = DEFAULT_SEED,
    start: datetime = DEFAULT_START,
) -> list[ClickEvent]:
    """`events` click events, one second apart from `start`, segments drawn uniformly."""
    if events < 0:
        raise ValueError(f"--events must be >= 0, got {events}")
    rng = np.random.default_rng(seed)
    products = catalogue(rng)
    by_kind: dict[str, list[Product]] = {}
    for p in products:
        by_kind.setdefault(p.kind, []).append(p)
    tastes = cohorts(segments)
    popularity = 1.0 / np.arange(1, len(products) + 1) ** 0.6
    popularity /= popularity.sum()
    out = []
    for i in range(events):
        taste = tastes[int(rng.integers(len(tastes)))]
        target = products[int(rng.choice(len(products), p=popularity))]
        intent = make_query(rng, target)
        item = _shown(rng, target, by_kind, products)
        prob = click_probability(intent, item, taste, float(rng.normal(0.0, NOISE_SD)))
        out.append(
            ClickEvent(
                event_id=f"shop-{seed}-{i}",
                ts=start + timedelta(seconds=i),
                segment=taste.segment,
                query=intent.text,
                item_id=item.item_id,
                item_text=item.title,
                clicked=int(rng.random() < prob),
            )
        )
    return out


def holdout(
    events: Sequence[ClickEvent], frac: float = HOLDOUT_FRAC, seed: int = DEFAULT_SEED
) -> dict[str, list[ClickEvent]]:
    """Per segment, a seeded random `frac` of its events: the pairs an evaluation scores, never replayed."""
    rng = np.random.default_rng([seed, 1])
    held = rng.random(len(events)) < frac
    out: dict[str, list[ClickEvent]] = {}
    for e, h in zip(events, held, strict=True):
        if h:
            out.setdefault(e.segment, []).append(e)
    return dict(sorted(out.items()))


def write_jsonl(events: Sequence[ClickEvent], path: Path) -> None:
    """The JSONL layout `worker.tools.datasets.iter_jsonl` reads, written to a temp file then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        for e in events:
            fh.write(e.to_json() + b"\n")
    tmp.replace(path)


def describe(segments: int) -> Iterator[str]:
    for taste in cohorts(segments):
        yield f"{taste.segment}: {taste.about}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="click events to generate")
    parser.add_argument(
        "--segments", type=int, default=DEFAULT_SEGMENTS, help="cohorts (4 with a taste, then neutral)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="the same seed gives the same file")
    parser.add_argument(
        "--start",
        type=datetime.fromisoformat,
        default=DEFAULT_START,
        help="first event's time, ISO 8601 (the worker rejects events older than WORKER_MAX_EVENT_AGE_S)",
    )
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to write")


def cli_main(args: argparse.Namespace) -> int:
    try:
        start = args.start if args.start.tzinfo else args.start.replace(tzinfo=UTC)
        events = generate(args.events, args.segments, args.seed, start)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_jsonl(events, args.out)
    clicks = sum(e.clicked for e in events)
    print(f"wrote {len(events)} events ({clicks} clicks) to {args.out}: a generated shop, synthetic data")
    for line in describe(args.segments):
        print(f"  {line}")
    return 0
