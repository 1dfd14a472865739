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
