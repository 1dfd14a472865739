"""`bench score` on a few real pairs on the CPU: every side timed each round, ratios of medians, one JSON
line last. Speeds are not asserted here (the benchmark's targets are for full runs, docs/scoring.md)."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest

from worker.config import Settings
from worker.tools.bench import score


def test_bench_score_prints_raw_cold_and_warm_rates_and_ratios_as_its_last_json_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = Settings(device="cpu", max_seq_len=16, lora_rank=4, lora_alpha=8)
    parser = argparse.ArgumentParser()
    score.add_arguments(parser)
    args = parser.parse_args(
        [
            *("--pairs", "24", "--repeats", "2", "--refresh-segments", "2", "--refresh-candidates", "8"),
            *("--precision-train-events", "48", "--json"),
        ]
    )
    assert score.cli_main(args, settings) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert (result["device"], result["pairs"], result["repeats"], result["max_seq_len"]) == ("cpu", 24, 2, 16)
    runs = result["runs_s"]
    sides = ("raw", "cold", "cold_other", "warm", "host_cold", "host_warm")
    assert {k: len(v) for k, v in runs.items()} == dict.fromkeys(sides, 2)
    assert all(x > 0 for v in runs.values() for x in v)
    rates = ("raw_pairs_per_s", "cold_pairs_per_s", "warm_pairs_per_s", "cold_prefetch_pairs_per_s")
    ratios = ("cold_ratio", "warm_ratio", "cold_prefetch_ratio")
    assert all(isinstance(result[k], float) and result[k] > 0 for k in rates + ratios)
    med = {k: statistics.median(v) for k, v in runs.items()}  # runs_s are rounded to 0.1 ms
    assert result["raw_pairs_per_s"] == pytest.approx(24 / med["raw"], rel=0.05)
    assert result["warm_ratio"] == pytest.approx(med["raw"] / med["warm"], rel=0.05)
    assert result["cold_ratio"] == pytest.approx(med["raw"] / med["cold"], rel=0.05)
    assert result["host_cold_s"] == pytest.approx(med["host_cold"], abs=1e-4) and result["host_warm_s"] > 0
    assert result["prefetch"] is False and result["max_abs_diff_vs_batch_1"] < 1e-4

    refresh = result["refresh"]
    assert (refresh["segments"], refresh["candidates_per_segment"]) == (2, 8)
    assert all(refresh[k] > 0 for k in ("refresh_s", "merge_s_per_segment", "with_adapter_s_per_segment"))
    assert refresh["scoring_pairs_per_s"] > 0

    compared = result["precision"]
    routes = [f"{r}_{p}_forward" for r in ("torch", "onnx") for p in ("fp32", "int8")]
    ends = [f"torch_{p}_{k}" for p in ("fp32", "int8") for k in ("warm", "cold")]
    assert set(compared["pairs_per_s"]) == {*routes, *ends}, compared.get("onnx_error")
    assert all(v > 0 for v in compared["pairs_per_s"].values())
    assert compared["torch_int8_speedup_warm"] == pytest.approx(
        compared["pairs_per_s"]["torch_int8_warm"] / compared["pairs_per_s"]["torch_fp32_warm"], rel=0.01
    )
    assert compared["onnx_fp32_max_abs_diff_vs_torch"] < 0.1, "the exported model is the same model"
    for name in ("shop", "hd-5k"):
        quality = compared["quality"][name]
        assert quality["trained_events"] == 48 and quality["holdout_pairs"] > 100
        assert abs(quality["auc_difference"]) < 0.05 and quality["max_abs_probability_diff"] > 0


def test_bench_score_refuses_empty_runs() -> None:
    with pytest.raises(ValueError, match="--pairs"):
        score.run_bench(Settings(device="cpu"), pairs=0)
