"""`bench train` on a few real events on the CPU: both sides timed `repeats` times, ratios of medians."""

from __future__ import annotations

import statistics

import pytest

from worker.config import Settings
from worker.tools.bench.train import run_bench


def test_bench_train_times_both_sides_and_reports_median_ratios() -> None:
    settings = Settings(device="cpu", max_seq_len=32, shared_batch_size=8)
    result = run_bench(settings, events=16, epochs=1, pairs=32, repeats=3)

    runs = result["runs_s"]
    assert {k: len(v) for k, v in runs.items()} == {"train": 3, "raw_train": 3, "score": 3, "raw_score": 3}
    assert all(x > 0 for v in runs.values() for x in v)
    med = {k: statistics.median(v) for k, v in runs.items()}  # runs_s are rounded to 1 ms
    assert result["train_s"] == pytest.approx(med["train"], abs=1e-3)
    assert result["train_ratio"] == pytest.approx(med["train"] / med["raw_train"], rel=0.05)
    assert result["raw_score_pairs_per_s"] == pytest.approx(32 / med["raw_score"], rel=0.05)
    assert result["score_ratio"] == pytest.approx(med["raw_score"] / med["score"], rel=0.05)
    assert (result["events"], result["pairs"], result["repeats"], result["device"]) == (16, 32, 3, "cpu")
    assert result["match_features"] is True and result["query_history"] is True
