"""The evaluation on a tiny JSONL slice of real data: the JSON shape, the plot and the CLI contract."""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker.config import Settings
from worker.learn.backbone import load_backbone
from worker.learn.click_model import new_click_model
from worker.learn.fit import FitOptions, fit
from worker.learn.history import QueryHistory
from worker.learn.train import score_segment
from worker.learn.training_data import is_unseen_query, labels_of, pairs_of, sample_replay
from worker.ops.quality import holdout_score
from worker.tools.datasets import Dataset, load_homedepot, load_jsonl
from worker.tools.evaluation import offline_command
from worker.tools.evaluation.cli import add_arguments, cli_main
from worker.tools.evaluation.offline import batch_positions, run_evaluation
from worker.tools.evaluation.options import add_offline_arguments
from worker.tools.evaluation.plan import (
    CHECKPOINT_NAMES,
    PROCEDURES,
    SMALL_SHOP_EVENTS,
    EvalPlan,
    quick_plan,
    quick_plan_for,
)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    events = load_homedepot().events
    wanted = {"GE": 0, "Delta": 0}
    keep = []
    for i, e in enumerate(events):
        if e.segment in wanted and wanted[e.segment] < 32:
            wanted[e.segment] += 1
            keep.append(e)
        elif e.segment not in wanted and e.segment not in {"unknown", "Unbranded"} and i % 1000 == 0:
            keep.append(e)
    path = tmp_path_factory.mktemp("data") / "slice.jsonl"
    path.write_text("".join(e.to_json().decode() + "\n" for e in keep))
    return path


def tiny_plan() -> EvalPlan:
    return EvalPlan(
        segments=2,
        holdout_cap=12,
        batch_spacing=1.5,
        naive_epochs=1,
        overrides={
            "shared_every": 40,
            "shared_bootstrap_min_events": 40,
            "min_new_events": 8,
            "min_positives": 1,
            "min_negatives": 1,
            "adapter_epochs": 1,
            "shared_holdout_frac": 0.2,
            "shared_lr": 2e-4,
            "shared_min_holdout": 8,
            "gate_min_holdout": 4,
        },
        notes=("tiny test plan",),
    )


def test_cli_runs_the_evaluation_and_prints_json_last(
    jsonl: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = load_jsonl(jsonl, holdout_frac=0.3, min_rows=20)
    assert dataset.eval_segments == ["Delta", "GE"]
    monkeypatch.setattr(offline_command, "quick_plan_for", lambda data: tiny_plan())
    phases: list[tuple[str, bool]] = []
    original = offline_command.run_evaluation

    def recording(*args: Any, on_phase: Any, **kwargs: Any) -> dict[str, Any]:
        def record(partial: dict[str, Any]) -> None:
            on_phase(partial)
            written = json.loads(out.read_text()) == json.loads(json.dumps(partial))
            phases.append((partial["partial"], written))

        return original(*args, on_phase=record, **kwargs)

    monkeypatch.setattr(offline_command, "run_evaluation", recording)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    png = tmp_path / "curve.png"
    out = tmp_path / "eval.json"
    argv = ["--data", str(jsonl), "--holdout-frac", "0.3", "--quick", "--json", "--plot", str(png)]
    argv += ["--batch-spacing", "2"]
    args = parser.parse_args([*argv, "--out", str(out)])
    assert (
        cli_main(args, settings=Settings(device="cpu", max_seq_len=32, batch_size=16, shared_batch_size=16))
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert result["quick"] is True
    assert result["segments"] == ["Delta", "GE"]
    assert set(result["mean"]) == set(PROCEDURES)
    for proc in PROCEDURES:
        assert set(result["mean"][proc]) == set(CHECKPOINT_NAMES)
        for seg in result["segments"]:
            assert set(result["per_segment"][seg][proc]) == set(CHECKPOINT_NAMES)
            for name in ("0", "16", "end"):
                cell = result["per_segment"][seg][proc][name]
                assert cell is not None and set(cell) == {"auc", "logloss"}
            assert result["per_segment"][seg][proc]["256"] is None
        assert result["mean"][proc]["end"]["logloss"] is not None
    assert result["mean"]["naive"]["0"] == result["mean"]["zero_shot"]["0"]
    assert result["worker"]["promoted_worse_than_parent"] == 0
    assert sum(result["worker"]["decisions"]["shared"].values()) >= 2
    runs = result["worker"]["shared_runs"]
    stream = load_jsonl(jsonl, holdout_frac=0.3, min_rows=20).stream()
    frac = Settings().unseen_query_frac
    counted = [sum(not is_unseen_query(e.query, frac) for e in stream[: r["events"]]) for r in runs]
    assert [r["history_events"] for r in runs] == counted, "replayed events of seen queries only"
    assert counted != [r["events"] for r in runs], "the slice holds unseen queries"
    assert result["settings"]["query_history"] is True
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(out.read_text()) == result
    names = [name for name, _ in phases]
    assert names[-2:] == ["worker", "batch"] and set(names[:-2]) == {"replay"}
    assert all(written for _, written in phases)
    assert result["plan"]["batch_spacing"] == 2.0
    positions = result["checkpoint_positions"]
    for seg in result["segments"]:
        for name, used in result["batch_trained_on"][seg].items():
            pos = positions[seg][name]
            assert used <= pos and used * 2.0 >= pos, (seg, name, used, pos)
        assert result["batch_trained_on"][seg]["end"] == result["stream_events"]


def test_batch_positions_keep_every_distinct_one_at_spacing_1_and_bound_the_lag_otherwise() -> None:
    positions = [0, 3, 3, 10, 11, 12, 40, 100, 100, 101]
    assert batch_positions(positions, 1.0) == [3, 10, 11, 12, 40, 100, 101]
    kept = batch_positions(positions, 1.25)
    assert kept == [3, 10, 40, 100, 101], "11 and 12 use 10; the last is always kept"
    rng = np.random.default_rng(0)
    for spacing in (1.0, 1.1, 1.5, 3.0):
        drawn = [int(x) for x in rng.integers(0, 5000, 60)]
        kept = batch_positions(drawn, spacing)
        assert kept == sorted(set(kept)) and kept[-1] == max(drawn)
        for p in drawn:
            if p == 0:
                continue
            used = kept[bisect.bisect_right(kept, p) - 1]
            assert used <= p <= used * spacing
    with pytest.raises(ValueError, match=r"at least 1\.0"):
        batch_positions(positions, 0.9)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch-spacing", "0.9"])


def test_batch_at_spacing_1_is_a_model_trained_from_scratch_on_the_stream_up_to_the_checkpoint(
    jsonl: Path,
) -> None:
    dataset = load_jsonl(jsonl, holdout_frac=0.3, min_rows=20)
    settings = Settings(device="cpu", max_seq_len=32, batch_size=16, shared_batch_size=16)
    plan = dataclasses.replace(tiny_plan(), batch_spacing=1.0)
    result = run_evaluation(
        dataset, settings, quick=True, progress=False, plan=plan, procedures=["worker", "batch"]
    )
    seg = result["segments"][0]
    pos = result["checkpoint_positions"][seg]["16"]
    assert result["batch_trained_on"][seg]["16"] == pos
    s = settings.model_copy(update=plan.overrides)
    backbone = load_backbone(s)
    stream = dataset.stream()[:pos]
    model = new_click_model(backbone, s.seed)
    model.query_history = QueryHistory.from_events(stream)
    fit(backbone, model, stream, dataclasses.replace(FitOptions.for_shared(s), epochs=plan.batch_epochs))
    holdout = sample_replay(dataset.holdout[seg], plan.holdout_cap or 0, s.seed)
    expected = holdout_score(labels_of(holdout), score_segment(backbone, model, None, pairs_of(holdout)))
    assert expected is not None and expected.auc is not None
    assert result["per_segment"][seg]["batch"]["16"]["auc"] == pytest.approx(expected.auc, abs=1e-6)


def test_quick_plan_is_cpu_sized() -> None:
    plan = quick_plan()
    assert plan.segments is not None and plan.segments <= 3
    assert plan.notes and all("quick" in n for n in plan.notes)


def test_leaving_out_batch_and_naive_keeps_the_shape_with_nulls(jsonl: Path) -> None:
    dataset = load_jsonl(jsonl, holdout_frac=0.3, min_rows=20)
    settings = Settings(device="cpu", max_seq_len=32, batch_size=16, shared_batch_size=16)
    n = len(dataset.stream())
    result = run_evaluation(
        dataset,
        settings,
        quick=True,
        progress=False,
        plan=tiny_plan(),
        procedures=["worker"],
        stream_checkpoints=[n, 0, 50, n + 5],
    )

    assert result["procedures"] == ["worker", "zero_shot"]
    stream = result["stream"]
    assert [c["events"] for c in stream] == [0, 50, n], "sorted, past the end dropped"
    first, last = stream[0], stream[-1]
    for seg in result["segments"]:
        assert first["per_segment"][seg]["shared_version"] is None
        assert first["per_segment"][seg]["auc"] == result["per_segment"][seg]["zero_shot"]["0"]["auc"]
        assert set(last["per_segment"][seg]) == {
            "auc",
            "logloss",
            "segment_version",
            "shared_version",
            "served",
        }
    runs = result["worker"]["shared_runs"]
    promoted = [
        i + 1 for i, r in enumerate(runs) if r["decision"] == "promoted" and r["stream_position"] <= 50
    ]
    serving_at_50 = (promoted or [None])[-1]
    assert {c["shared_version"] for c in stream[1]["per_segment"].values()} == {serving_at_50}
    for seg in result["segments"]:
        cells = result["per_segment"][seg]
        assert all(cells[p][name] is None for p in ("batch", "naive") for name in CHECKPOINT_NAMES)
        assert cells["worker"]["end"] is not None and cells["zero_shot"]["0"] is not None
    assert result["mean"]["batch"]["end"] == {"auc": None, "logloss": None}
    with pytest.raises(ValueError, match="unknown procedures"):
        run_evaluation(dataset, settings, quick=True, progress=False, plan=tiny_plan(), procedures=["bogus"])


def test_per_query_segments_evaluate_without_an_empty_set(jsonl: Path, tmp_path: Path) -> None:
    """A one-query segment (CTR per query) has no query-disjoint holdout: it used to reach zero-shot
    scoring as an empty set and die with IndexError. Now it is held out by pair, and says so."""
    events = load_jsonl(jsonl).events[:80]
    path = tmp_path / "per-query.jsonl"
    path.write_bytes(
        b"".join(
            e.model_copy(update={"segment": "one-query", "query": "cordless drill"}).to_json() + b"\n"
            for e in events
        )
    )
    dataset = load_jsonl(path, holdout_frac=0.3)
    assert dataset.pair_level == ["one-query"] and dataset.holdout["one-query"]
    settings = Settings(device="cpu", max_seq_len=32, batch_size=16, shared_batch_size=16)
    result = run_evaluation(
        dataset, settings, quick=True, progress=False, plan=tiny_plan(), procedures=["worker"]
    )
    assert result["pair_level_holdout"] == ["one-query"]
    assert any("held out by pair" in n for n in result["notes"])
    assert result["per_segment"]["one-query"]["worker"]["end"] is not None


def test_quick_replays_a_small_shop_whole_and_slices_a_large_one() -> None:
    stream = load_homedepot().stream()
    small = quick_plan_for(Dataset(events=stream[:SMALL_SHOP_EVENTS]))
    assert (small.segments, small.segment_cap, small.other_events) == (None, None, None)
    assert small.overrides == {} and "whole shop" in small.notes[0]
    assert quick_plan_for(Dataset(events=stream[: SMALL_SHOP_EVENTS + 1])) == quick_plan()


def test_eval_lists_every_option_and_the_offline_command_only_the_offline_ones() -> None:
    """`python -m worker eval` takes both groups; the offline command alone (the GPU check's entry, no
    Kafka client) takes the offline options and refuses the live ones."""
    offline = {
        "--data",
        "--holdout-frac",
        "--quick",
        "--json",
        "--plot",
        "--out",
        "--procedures",
        "--batch-spacing",
        "--no-progress",
    }
    live = {"--live", "--workers", "--limit", "--checkpoint-every", "--compare-offline"}
    shown = subprocess.run(
        [sys.executable, "-m", "worker", "eval", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert all(option in shown for option in offline | live), shown
    parser = argparse.ArgumentParser()
    add_offline_arguments(parser)
    assert {o for action in parser._actions for o in action.option_strings} == offline | {"-h", "--help"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--live"])
