"""`bench ingest` on a small preloaded topic: the worker stores every offset, the ratio is what it says."""

from __future__ import annotations

import statistics

import pytest

from worker.config import Settings
from worker.tools.bench.ingest import run_bench

pytestmark = pytest.mark.integration


def test_bench_ingest_stores_every_offset_and_reports_the_median_raw_run(settings: Settings) -> None:
    result = run_bench(settings, events=3000, segments=20, raw_repeats=3)

    assert result["stored_offsets"] == 3000
    assert len(result["raw_runs_s"]) == 3
    assert result["raw_s"] == pytest.approx(statistics.median(result["raw_runs_s"]), abs=1e-3)
    assert result["events_per_s"] == pytest.approx(3000 / result["worker_s"], rel=0.01)
    assert result["ratio"] == pytest.approx(result["events_per_s"] / result["raw_events_per_s"], abs=2e-3)
    assert 0 < result["partition0_events"] < 3000
