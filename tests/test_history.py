"""The query history table: counts, out-of-fold features (no label reaches its own feature), files."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from worker.learn import history
from worker.learn.history import FOLDS, QueryHistory, fold_of, query_key


def ev(event_id: str, query: str | None, clicked: int) -> SimpleNamespace:
    return SimpleNamespace(event_id=event_id, query=query, clicked=clicked)


def test_queries_that_differ_in_case_and_punctuation_count_together() -> None:
    table = QueryHistory.from_events(
        [ev("a", "Ceiling Fan", 1), ev("b", "ceiling  fan!", 0), ev("c", "", 1), ev("d", None, 0)]
    )
    assert query_key("Ceiling Fan") == query_key("ceiling  fan!") == "ceiling fan"
    assert list(table.index) == ["ceiling fan"]
    assert table.counts[table.index["ceiling fan"]].sum(0).tolist() == [1, 2]
    assert (table.clicks, table.events) == (1, 2)


def test_folds_are_stable_and_spread() -> None:
    folds = [fold_of(f"event-{i}") for i in range(2000)]
    assert folds == [fold_of(f"event-{i}") for i in range(2000)]
    counts = np.bincount(folds, minlength=FOLDS)
    assert len(counts) == FOLDS and counts.min() > 2000 / FOLDS * 0.8


def test_rate_feature_follows_the_clicks_and_unseen_queries_are_zero() -> None:
    events = [ev(f"good-{i}", "drill", 1) for i in range(20)] + [ev(f"bad-{i}", "hose", 0) for i in range(20)]
    table = QueryHistory.from_events(events)
    feats = table.features(["drill", "hose", "never typed", None, ""])
    rate, count, seen = feats.T
    assert rate[0] > 0.5 and rate[1] < -0.5
    assert count[0] == pytest.approx(np.log1p(20) / 4) and seen[:2].tolist() == [1.0, 1.0]
    assert feats[2:].tolist() == [[0.0] * history.SIZE] * 3


def test_an_events_own_label_never_reaches_its_own_feature() -> None:
    """Out of fold: flipping one event's label leaves that event's feature alone (its fold is left out),
    while a pair that is not an event (no fold) sees the change."""
    events = [ev(f"e{i}", "paint roller", i % 2) for i in range(30)]
    target = events[7]
    flipped = [ev(e.event_id, e.query, 1 - e.clicked) if e is target else e for e in events]
    a, b = QueryHistory.from_events(events), QueryHistory.from_events(flipped)
    fold = [fold_of(target.event_id)]
    np.testing.assert_array_equal(a.features([target.query], fold), b.features([target.query], fold))
    assert not np.array_equal(a.features([target.query]), b.features([target.query]))
    alone = QueryHistory.from_events([ev("only", "stud finder", 1)])
    assert alone.features(["stud finder"], [fold_of("only")]).tolist() == [[0.0] * history.SIZE]


def test_the_table_round_trips_through_json_and_is_never_copied(tmp_path: Path) -> None:
    table = QueryHistory.from_events([ev(f"e{i}", f"q{i % 7}", int(i % 3 == 0)) for i in range(100)])
    table.save(tmp_path)
    loaded = QueryHistory.load(tmp_path)
    assert loaded is not None
    queries = [f"q{i}" for i in range(9)]
    folds = [fold_of(f"e{i}") for i in range(9)]
    np.testing.assert_array_equal(loaded.features(queries, folds), table.features(queries, folds))
    assert (loaded.clicks, loaded.events) == (table.clicks, table.events)
    assert copy.deepcopy(table) is table
    assert QueryHistory.load(tmp_path / "nothing-here") is None
    doc = json.loads((tmp_path / history.FILE).read_text())
    doc["folds"] = FOLDS + 1
    (tmp_path / history.FILE).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="folds"):
        QueryHistory.load(tmp_path)


def test_features_equal_counts_made_by_hand() -> None:
    """Against a direct count over the events: the fold and the table's rate both leave out the fold."""
    rng = np.random.default_rng(3)
    events = [ev(f"e{i}", f"query {rng.integers(12)}", int(rng.random() < 0.4)) for i in range(400)]
    table = QueryHistory.from_events(events)
    for e in events[:60]:
        fold = fold_of(e.event_id)
        others = [x for x in events if fold_of(x.event_id) != fold]
        same = [x for x in others if x.query == e.query]
        base = (sum(x.clicked for x in others) + 1) / (len(others) + 2)
        rate = (sum(x.clicked for x in same) + history.SMOOTHING * base) / (len(same) + history.SMOOTHING)
        logit = np.log(rate / (1 - rate)) - np.log(base / (1 - base))
        expected = [logit, np.log1p(len(same)) / 4, 1.0]
        np.testing.assert_allclose(table.features([e.query], [fold])[0], expected, rtol=1e-5, atol=1e-6)
