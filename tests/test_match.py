"""Lexical match features: what each number means on pairs whose answer is known."""

from __future__ import annotations

import pytest

from worker.learn import match


def named(query: str | None, title: str) -> dict[str, float]:
    return dict(zip(match.NAMES, match.features(query, title), strict=True))


def test_every_query_word_in_the_title() -> None:
    f = named("cordless drills", "DEWALT 20-Volt Cordless Drill Kit")
    assert f["query_hit"] == 1.0
    assert f["query_prefix_hit"] == 1.0
    assert f["query_in_title"] == 1.0
    assert f["title_hit"] == pytest.approx(2 / 6)
    assert f["no_query"] == 0.0


def test_no_word_in_common() -> None:
    f = named("ceiling fan", "toilet seat white")
    assert f["query_hit"] == f["query_prefix_hit"] == f["title_hit"] == f["query_in_title"] == 0.0


def test_prefix_counts_what_exact_match_misses() -> None:
    f = named("insulated tape", "Insulation Tape")
    assert f["query_hit"] == 0.5
    assert f["query_prefix_hit"] == 1.0


def test_numbers_in_the_query_are_checked_against_the_title() -> None:
    assert named("2 in. pvc pipe", "2 in. x 10 ft. PVC Pipe")["number_hit"] == 1.0
    assert named("3 in. pvc pipe", "2 in. x 10 ft. PVC Pipe")["number_hit"] == 0.0
    assert named("pvc pipe", "2 in. x 10 ft. PVC Pipe")["number_hit"] == 0.5


def test_a_pair_without_query_sets_only_no_query() -> None:
    for query in (None, "", "  ", "!!"):
        assert match.features(query, "Any Title 3") == [0.0] * (match.SIZE - 1) + [1.0]


def test_values_stay_in_a_small_range() -> None:
    long = " ".join(f"w{i}" for i in range(200))
    for query, title in (("a", "b"), (long, long), ("x" * 500, "")):
        values = match.features(query, title)
        assert len(values) == match.SIZE
        assert all(0.0 <= v <= 2.0 for v in values)
