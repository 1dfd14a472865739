"""The live evaluation against real worker processes, Kafka and Redis, on a tiny slice of real data: the
JSON it reports, that its answers are the workers' (checkpoint 0 repeats the local zero-shot exactly), and
that it can fail (a base model of noise measures about 0.5, live and offline alike)."""

from __future__ import annotations

import argparse
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from worker.config import Settings
from worker.learn.backbone import load_backbone
from worker.learn.encoder import base_model_path
from worker.learn.train import score_segment
from worker.learn.training_data import labels_of, pairs_of
from worker.ops.quality import auc
from worker.state.registry import SHARED_SEGMENT, Registry
from worker.tools.datasets import Dataset, load_homedepot, load_jsonl
from worker.tools.evaluation import cli
from worker.tools.evaluation.live import LiveOptions, run_live
from worker.tools.evaluation.live_fleet import SETTLE_S, WorkerLoad, is_idle, parse_load
from worker.tools.evaluation.plan import EvalPlan, checkpoint_positions, eval_slice
from worker.tools.run_settings import isolated

SEGMENTS = ["Delta", "Everbilt"]
"""Two brands whose held-out pairs zero-shot already ranks well above chance: a broken model shows."""

TINY: dict[str, object] = {
    "max_seq_len": 32,
    "min_new_events": 16,
    "min_positives": 2,
    "min_negatives": 2,
    "adapter_epochs": 1,
    "shared_every": 100_000,
    "shared_bootstrap_min_events": 64,
    "shared_holdout_frac": 0.2,
    "shared_min_holdout": 16,
    "gate_min_holdout": 8,
    "gate_auc_tolerance": 1.0,
    "gate_logloss_margin": 1000.0,
    "serving_choice": False,
    "drain_grace_s": 60.0,
    "torch_threads": 1,
}
"""Small and fast on 2 cores, the gate opened so a shared model and adapters do serve (one shared model,
so the adapters trained on it still serve at the end): these tests measure the measurement, the gate's
decisions are tested in test_gate.py / test_train.py."""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """The first 200 events of each of SEGMENTS and a thin sample of other brands, stamped now."""
    events = load_homedepot().events
    taken = dict.fromkeys(SEGMENTS, 0)
    keep = []
    for i, e in enumerate(events):
        if e.segment in taken:
            if taken[e.segment] < 200:
                taken[e.segment] += 1
                keep.append(e)
        elif e.segment not in {"unknown", "Unbranded"} and i % 500 == 0:
            keep.append(e)
    now = datetime.now(UTC)
    path = tmp_path_factory.mktemp("live") / "slice.jsonl"
    path.write_text("".join(e.model_copy(update={"ts": now}).to_json().decode() + "\n" for e in keep))
    data = load_jsonl(path, holdout_frac=0.3, min_rows=150)
    assert data.eval_segments == SEGMENTS
    return data


def plan(**overrides: object) -> EvalPlan:
    return EvalPlan(segments=2, holdout_cap=48, overrides={**TINY, **overrides})


def noise_model(target: Path) -> Path:
    """The base model directory with every float weight replaced by unit Gaussian noise (same shapes,
    same tokenizer and config)."""
    source = base_model_path(Settings())
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    tensors = load_file(str(source / "model.safetensors"))
    noisy = {
        k: torch.randn(v.shape, generator=generator) if v.dtype.is_floating_point else v
        for k, v in tensors.items()
    }
    save_file(noisy, str(target / "model.safetensors"))
    return target


# ------------------------------------------------------------------ units


def test_checkpoints_every_k_events_and_the_end() -> None:
    assert checkpoint_positions(379, 180) == [0, 180, 360, 379]
    assert checkpoint_positions(360, 180) == [0, 180, 360]
    assert checkpoint_positions(0, 10) == [0]
    with pytest.raises(ValueError, match="checkpoint-every"):
        checkpoint_positions(10, 0)


def test_idle_needs_every_event_accounted_and_nothing_pending() -> None:
    text = "\n".join(
        [
            "ctr_worker_events_buffered_total 90.0",
            "ctr_worker_events_deduplicated_total 4.0",
            'ctr_worker_events_dead_lettered_total{reason="schema"} 5.0',
            'ctr_worker_events_dead_lettered_total{reason="too_old"} 1.0',
            "ctr_worker_trainings_pending 0.0",
            "ctr_worker_train_queue_depth 0.0",
            'ctr_worker_trainings_started_total{scope="segment"} 3.0',
            'ctr_worker_trainings_started_total{scope="shared"} 1.0',
            'ctr_worker_trainings_promoted_total{scope="segment"} 2.0',
            'ctr_worker_trainings_rejected_total{scope="shared"} 1.0',
            'ctr_worker_trainings_failed_total{scope="segment"} 1.0',
        ]
    )
    load = parse_load(text)
    assert load == WorkerLoad(accounted=100, dead_lettered=6, pending=0, queue_depth=0, started=4, finished=4)
    assert is_idle([load], 100)
    assert not is_idle([load], 101)
    running = WorkerLoad(accounted=0, dead_lettered=0, pending=0, queue_depth=0, started=1, finished=0)
    assert is_idle([load, WorkerLoad(0, 0, 0, 0, 0, 0)], 100)
    assert not is_idle([load, running], 100)
    assert not is_idle([load, WorkerLoad(0, 0, 1, 0, 0, 0)], 100)
    with pytest.raises(RuntimeError, match="trainings_pending"):
        parse_load("ctr_worker_events_buffered_total 1.0")


def test_live_only_flags_need_live(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.cli_main(parser.parse_args(["--workers", "2", "--limit", "5"])) == 2
    assert "--workers, --limit only with --live" in capsys.readouterr().err


def test_the_held_out_set_follows_data_and_seed(dataset: Dataset) -> None:
    first = eval_slice(dataset, plan(), seed=0)
    assert first.digest() == eval_slice(dataset, plan(), seed=0).digest()
    assert first.digest() != eval_slice(dataset, plan(), seed=1).digest()
    assert [len(first.holdout[s]) for s in SEGMENTS] == [48, 48]
    held = {e.event_id for s in SEGMENTS for e in first.holdout[s]}
    assert not held & {e.event_id for e in first.stream}
    assert len(eval_slice(dataset, plan(), seed=0, limit=50).stream) == 50


# ------------------------------------------------------------------ real workers


@pytest.mark.integration
def test_live_run_with_two_workers_reports_what_they_serve(dataset: Dataset, settings: Settings) -> None:
    lines: list[str] = []
    result = run_live(
        dataset, settings, False, LiveOptions(workers=2, checkpoint_every=180), say=lines.append, plan=plan()
    )

    n = result["stream_events"]
    assert result["workers"] == 2 and result["exit_codes"] == [0, 0]
    assert result["segments"] == SEGMENTS
    assert [c["events"] for c in result["live"]] == checkpoint_positions(n, 180) == result["checkpoints"]
    assert result["holdout_digest"] == eval_slice(dataset, plan(), settings.seed).digest()
    assert 0 <= result["zero_shot_mean_auc"] <= 1
    assert result["dead_lettered"] == 0
    previous = dict.fromkeys(SEGMENTS, -1)
    for point in result["live"]:
        assert 0 <= point["mean_auc"] <= 1 and point["mean_logloss"] > 0
        assert set(point["per_segment"]) == set(SEGMENTS)
        for s, cell in point["per_segment"].items():
            assert {"auc", "logloss", "labelled", "segment_version", "shared_version"} <= set(cell)
            assert 0 <= cell["auc"] <= 1 and cell["pairs"] == 48 and not cell["mixed_versions"]
            assert cell["labelled"] >= previous[s]
            previous[s] = cell["labelled"]
            assert cell["answered_by"]
    assert [previous[s] for s in SEGMENTS] == [
        sum(1 for e in eval_slice(dataset, plan(), 0).stream if e.segment == s) for s in SEGMENTS
    ]

    start, end = result["live"][0], result["live"][-1]
    assert {c["answered_by"] for c in start["per_segment"].values()} == {"zero-shot"}
    assert start["mean_auc"] == pytest.approx(result["zero_shot_mean_auc"], abs=1e-6)
    registry = Registry.from_settings(isolated(settings, result["run_id"]))
    shared = registry.shared().champion_version(SHARED_SEGMENT)
    assert shared is not None and shared >= 1
    for s, cell in end["per_segment"].items():
        assert cell["shared_version"] == shared
        champion = registry.champion(s)
        serving = champion is not None and champion.shared_version == shared
        assert cell["segment_version"] == (champion.version if champion and serving else 0), (
            "an adapter serves only on the shared version it was gated on"
        )
        expected = (
            f"segment v{cell['segment_version']} on shared v{shared}"
            if cell["segment_version"]
            else (f"shared v{shared}")
        )
        assert cell["answered_by"] == expected
    assert any(c["segment_version"] > 0 for c in end["per_segment"].values())
    assert any("checkpoint 1/" in line for line in lines)


@pytest.mark.integration
def test_a_noise_base_model_measures_about_one_half_live_and_offline(
    dataset: Dataset, settings: Settings, tmp_path: Path
) -> None:
    sl = eval_slice(dataset, plan(), settings.seed)
    backbone = load_backbone(settings.model_copy(update={"max_seq_len": 32}))
    healthy = [
        auc(labels_of(sl.holdout[s]), score_segment(backbone, None, None, pairs_of(sl.holdout[s])))
        for s in SEGMENTS
    ]
    assert all(a is not None and a > 0.62 for a in healthy), healthy

    broken = settings.model_copy(
        update={
            "base_model": noise_model(tmp_path / "noise"),
            "match_features": False,
            "query_history": False,
        }
    )
    lines: list[str] = []
    result = run_live(
        dataset,
        broken,
        False,
        LiveOptions(checkpoint_every=250, compare_offline=True),
        say=lines.append,
        plan=plan(min_new_events=64, shared_every=200),
    )

    assert result["exit_codes"] == [0]
    live_end, offline_end = result["live"][-1], result["offline"][-1]
    assert offline_end["events"] == live_end["events"] == result["stream_events"]
    assert live_end["per_segment"]["Delta"]["shared_version"] is not None
    assert abs(live_end["mean_auc"] - 0.5) < 0.15, lines
    assert abs(offline_end["mean_auc"] - 0.5) < 0.15, offline_end
    assert abs(result["zero_shot_mean_auc"] - 0.5) < 0.15


def test_a_checkpoint_settles_longer_than_the_shared_trainer_takes_to_count_new_events() -> None:
    """Otherwise a checkpoint can be measured between a due shared run's events and its start."""
    from worker.jobs.shared_job import SHARED_CHECK_S

    assert SETTLE_S > SHARED_CHECK_S
