"""Lexical match features of a (query, item text) pair: the wide part of the click model.

Shoppers' queries name words, sizes and model numbers that the title either contains or not. A small
encoder learns that slowly from few labels; these few numbers give it to the logistic head directly
(measured in docs/learning.md). Pure Python, no model: cheap next to one encoder pass.
"""

from __future__ import annotations

import math
import re

TOKEN = re.compile(r"[a-z0-9]+")
SUFFIXES = ("ing", "es", "s", "ed")
PREFIX = 4
NAMES = (
    "query_hit",
    "query_prefix_hit",
    "title_hit",
    "query_in_title",
    "number_hit",
    "query_length",
    "title_length",
    "no_query",
)
SIZE = len(NAMES)


def _stem(word: str) -> str:
    for suffix in SUFFIXES:
        if len(word) > PREFIX and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def tokens(text: str | None) -> list[str]:
    return [_stem(w) for w in TOKEN.findall((text or "").lower())]


def features(query: str | None, item_text: str) -> list[float]:
    """`SIZE` numbers in about [0, 1], in the order of `NAMES`; a pair without query sets `no_query` only."""
    q, t = tokens(query), tokens(item_text)
    if not q:
        return [0.0] * (SIZE - 1) + [1.0]
    in_title = set(t)
    prefixes = {w[:PREFIX] for w in t}
    numbers = [w for w in q if w[0].isdigit()]
    return [
        sum(w in in_title for w in q) / len(q),
        sum(w[:PREFIX] in prefixes for w in q) / len(q),
        len(set(q) & in_title) / max(1, len(in_title)),
        float(" ".join(q) in " ".join(t)),
        sum(w in in_title for w in numbers) / len(numbers) if numbers else 0.5,
        math.log1p(len(q)) / 3.0,
        math.log1p(len(t)) / 4.0,
        0.0,
    ]
