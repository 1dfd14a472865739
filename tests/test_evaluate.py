"""The evaluation on a tiny JSONL slice of real data: the JSON shape, the plot and the CLI contract."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from worker.config import Settings
from worker.learn.train import is_unseen_query
from worker.tools.datasets import load_homedepot, load_jsonl
from worker.tools.evaluate import (
    CHECKPOINT_NAMES,
    PROCEDURES,
    EvalPlan,
    add_arguments,
    cli_main,
    quick_plan,
    run_evaluation,
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
        batch_snapshots=2,
        naive_epochs=1,
        overrides={
            "shared_every": 40,
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
    import worker.tools.evaluate as evaluate

    dataset = load_jsonl(jsonl, holdout_frac=0.3, min_rows=20)
    assert dataset.eval_segments == ["Delta", "GE"]
    monkeypatch.setattr(evaluate, "quick_plan", tiny_plan)
    phases: list[tuple[str, bool]] = []
    original = evaluate.run_evaluation

    def recording(*args: Any, on_phase: Any, **kwargs: Any) -> dict[str, Any]:
        def record(partial: dict[str, Any]) -> None:
            on_phase(partial)
            written = json.loads(out.read_text()) == json.loads(json.dumps(partial))
            phases.append((partial["partial"], written))

        return original(*args, on_phase=record, **kwargs)

    monkeypatch.setattr(evaluate, "run_evaluation", recording)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    png = tmp_path / "curve.png"
    out = tmp_path / "eval.json"
    argv = ["--data", str(jsonl), "--holdout-frac", "0.3", "--quick", "--json", "--plot", str(png)]
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
        assert set(last["per_segment"][seg]) == {"auc", "logloss", "segment_version", "shared_version"}
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
