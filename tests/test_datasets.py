from __future__ import annotations

from pathlib import Path

import pytest

from worker.tools.datasets import load_dataset, load_homedepot, load_jsonl


@pytest.fixture(scope="module")
def homedepot():  # type: ignore[no-untyped-def]
    return load_homedepot()


def test_homedepot_counts(homedepot) -> None:  # type: ignore[no-untyped-def]
    assert len(homedepot.events) == 74_067
    rate = sum(e.clicked for e in homedepot.events) / len(homedepot.events)
    assert round(rate * 100, 1) == 46.4
    assert len(homedepot.eval_segments) == 11
    assert "Hampton Bay" in homedepot.eval_segments
    assert "unknown" not in homedepot.eval_segments and "Unbranded" not in homedepot.eval_segments


def test_homedepot_order_and_segments(homedepot) -> None:  # type: ignore[no-untyped-def]
    ids = [int(e.event_id.split("-")[1]) for e in homedepot.events]
    assert ids == sorted(ids)
    segments = {e.segment for e in homedepot.events}
    assert "unknown" in segments and "" not in segments


def test_holdout_is_query_disjoint_and_never_streamed(homedepot) -> None:  # type: ignore[no-untyped-def]
    stream_ids = {e.event_id for e in homedepot.stream()}
    for segment, held in homedepot.holdout.items():
        assert held, segment
        held_queries = {e.query for e in held}
        seg_queries = {e.query for e in homedepot.events if e.segment == segment}
        assert 0.25 < len(held_queries) / len(seg_queries) <= 0.3
        assert not stream_ids & {e.event_id for e in held}
        assert not held_queries & {e.query for e in homedepot.stream() if e.segment == segment}
    assert len(homedepot.stream()) == len(homedepot.events) - sum(map(len, homedepot.holdout.values()))


def test_jsonl_reader_and_holdout(tmp_path: Path, homedepot) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "events.jsonl"
    sample = [e for e in homedepot.events if e.segment == "GE"][:200]
    path.write_bytes(b"\n".join(e.to_json() for e in sample) + b"\n")
    assert load_jsonl(path).events == sample
    split = load_dataset(str(path), holdout_frac=0.5)
    assert list(split.holdout) == ["GE"]
    assert 0 < len(split.holdout["GE"]) < 200


def test_jsonl_bad_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"event_id": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        load_jsonl(path)


def test_per_query_segments_get_a_pair_level_holdout(tmp_path: Path, homedepot) -> None:  # type: ignore[no-untyped-def]
    """CTR per query: a one-query segment has no query-disjoint holdout, so it is held out by pair (and
    said so); one whose held-out pairs would be of one class only is left out with a message."""
    by_query: dict[str, list] = {}  # type: ignore[type-arg]
    for e in homedepot.events:
        by_query.setdefault(e.query or "", []).append(e)
    mixed = [q for q, es in by_query.items() if len(es) >= 12 and 0 < sum(e.clicked for e in es) < len(es)]
    same = next(q for q, es in by_query.items() if len(es) >= 12 and all(e.clicked for e in es))
    chosen = [*mixed[:4], same]
    events = sorted(
        (e.model_copy(update={"segment": f"q:{q}"}) for q in chosen for e in by_query[q]),
        key=lambda e: e.ts,
    )
    path = tmp_path / "per-query.jsonl"
    path.write_bytes(b"\n".join(e.to_json() for e in events) + b"\n")
    split = load_dataset(str(path), holdout_frac=0.3)
    assert f"q:{same}" not in split.holdout
    assert any(f"q:{same}" in n and "left out" in n for n in split.notes)
    assert split.holdout, "the mixed segments keep a holdout"
    for segment, held in split.holdout.items():
        assert segment in split.pair_level
        assert len({e.clicked for e in held}) == 2
        assert 0 < len(held) < len([e for e in events if e.segment == segment])
    assert any("held out by pair" in n for n in split.notes)
    assert len(split.stream()) == len(events) - sum(map(len, split.holdout.values()))


@pytest.mark.parametrize(("name", "most", "segments"), [("hd-5k", 5_000, 3), ("hd-10k", 10_000, 6)])
def test_small_shops_hold_out_queries_the_stream_never_shows(name: str, most: int, segments: int) -> None:
    from worker.learn.history import query_key

    shop = load_dataset(name)
    assert len(shop.eval_segments) == segments
    assert 0.75 * most < len(shop.events) <= most
    held_queries = {query_key(e.query) for pairs in shop.holdout.values() for e in pairs}
    assert not held_queries & {query_key(e.query) for e in shop.stream()}
    for segment, held in shop.holdout.items():
        assert len(held) >= 150 and len({e.clicked for e in held}) == 2
        assert sum(e.segment == segment for e in shop.stream()) >= 400
    assert load_dataset(name).holdout == shop.holdout, "deterministic"
