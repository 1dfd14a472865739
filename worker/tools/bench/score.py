"""`python -m worker bench score --pairs N --json`: the worker's scoring against the forward pass alone.

All sides run in one process on one device, on the same real (query, item_text) pairs and the same model
(a shared model with match features and a query history, plus a segment's LoRA merged as `Learner.score`
serves it), interleaved over `repeats` rounds, medians reported:

- **raw**: the model's forward on batches tokenised, padded (the worker's own length-sorted batches) and
  moved to the device before the clock starts, probabilities left on the device: the physical limit;
- **cold**: `score_pairs` from raw pairs to probabilities with nothing cached (token cache and query keys
  emptied first), with the worker's default for the producer thread, and once with the other setting;
- **warm**: the same call once the pairs are cached, as candidates are when a refresh follows a promotion;
- **host_cold**, **host_warm**: the host side alone (encode, features, packing; no forward): what the
  worker adds to the forward at most, a steadier figure than a ratio on a busy machine.

`precision` (on a CPU) compares fp32 with int8 scoring: torch's dynamic quantisation and ONNX Runtime's,
side by side on the same batches, and their AUC on the `shop` and `hd-5k` holdouts
(`worker.tools.bench.precision`).

`refresh` then times what a shared promotion costs: every segment's served copy is rebuilt
(`serving_copy`) and its candidates, already tokenised, are scored again; `with_adapter`, the PEFT
composition the worker did per champion before, is timed on a few segments for comparison.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from worker.commands import write_result
from worker.config import Settings, load_settings
from worker.learn import history, match
from worker.learn.adapters import SegmentAdapter, attach_lora, extract_adapter, with_adapter
from worker.learn.backbone import Backbone, Pair, load_backbone
from worker.learn.click_model import ClickModel, new_click_model
from worker.learn.scoring import (
    SCORE_BATCH,
    SCORE_BATCH_TOKENS,
    prepared_batches,
    score_pairs,
    scoring_batches,
)
from worker.learn.serving import serving_copy
from worker.learn.training_data import pairs_of
from worker.tools.bench.precision import quality as precision_quality
from worker.tools.bench.precision import speed as precision_speed
from worker.tools.bench.timing import sync, timed
from worker.tools.datasets import load_dataset

COMPOSE_SAMPLES = 3


def _say(msg: str) -> None:
    print(f"[bench score] {msg}", file=sys.stderr, flush=True)


def _adapter(shared: ClickModel, seed: int, rank: int, alpha: int) -> SegmentAdapter:
    """A segment's adapter with non-zero LoRA weights (a fresh one's B is zero: it merges to nothing)."""
    seg = attach_lora(shared, rank, alpha, 0.0, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in seg.encoder.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen).to(param.device) * 0.02)
        seg.calibration.copy_(torch.tensor([1.2, -0.1]))
    return extract_adapter(seg)


def raw_batches(
    backbone: Backbone, model: ClickModel, pairs: Sequence[Pair], batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """The worker's batches (length-sorted, each padded to its longest row), built outside the clock and
    already on the device, with their match and history features."""
    rows = backbone.encode(pairs)
    hist = model.history_features(pairs)
    lengths = np.array([len(r.ids) for r in rows])
    max_tokens = SCORE_BATCH_TOKENS.get(backbone.device.type)
    return [
        backbone.collate([rows[i] for i in idx], None if hist is None else hist[idx])
        for idx in scoring_batches(lengths, batch_size, max_tokens)
    ]


def raw_forward(backbone: Backbone, model: ClickModel, batches: Sequence[dict[str, torch.Tensor]]) -> None:
    with torch.inference_mode(), backbone.autocast():
        for batch in batches:
            torch.sigmoid(model(batch))


def refresh(
    backbone: Backbone,
    shared: ClickModel,
    adapters: Sequence[SegmentAdapter],
    candidates: Sequence[Sequence[Pair]],
) -> dict[str, Any]:
    """After a shared promotion: each segment's copy merged anew, its (tokenised) candidates scored."""
    device = backbone.device
    for segment in candidates:
        backbone.encode(segment)
    merges: list[float] = []
    scoring: list[float] = []
    start = time.perf_counter()
    for adapter, segment in zip(adapters, candidates, strict=True):
        sync(device)
        t0 = time.perf_counter()
        served = serving_copy(shared, adapter)
        sync(device)
        t1 = time.perf_counter()
        score_pairs(backbone, served, segment)
        sync(device)
        merges.append(t1 - t0)
        scoring.append(time.perf_counter() - t1)
        del served
    total = time.perf_counter() - start
    compose = []
    for adapter in adapters[:COMPOSE_SAMPLES]:
        sync(device)
        t0 = time.perf_counter()
        with_adapter(shared, adapter).eval()
        sync(device)
        compose.append(time.perf_counter() - t0)
    pairs = sum(len(c) for c in candidates)
    return {
        "segments": len(adapters),
        "candidates_per_segment": len(candidates[0]) if candidates else 0,
        "refresh_s": round(total, 3),
        "merge_s_per_segment": round(float(np.median(merges)), 4),
        "scoring_pairs_per_s": round(pairs / sum(scoring), 1),
        "with_adapter_s_per_segment": round(float(np.median(compose)), 4),
    }


def run_bench(
    settings: Settings,
    pairs: int = 2048,
    repeats: int = 3,
    refresh_segments: int = 100,
    refresh_candidates: int = 2000,
    seed: int = 0,
    precision_train_events: int = 1024,
) -> dict[str, Any]:
    """Medians of `repeats` rounds, each side once per round in a rotating order, after one untimed
    warm-up of each side (first kernels, allocator growth and library handles stay out of the figures)."""
    if pairs < 1 or repeats < 1 or refresh_segments < 0 or refresh_candidates < 1:
        raise ValueError(
            "--pairs, --repeats and --refresh-candidates must be at least 1, --refresh-segments 0+"
        )
    stream = load_dataset("homedepot").stream()
    backbone = load_backbone(settings)
    shared = new_click_model(backbone, seed)
    shared.query_history = history.QueryHistory.from_events(stream[: min(len(stream), 20_000)])
    with torch.no_grad():
        shared.match.weight.copy_(torch.linspace(-1.0, 1.0, match.SIZE).unsqueeze(0))
        shared.history.weight.copy_(torch.tensor([[1.0, -0.5, 0.25]]))
    adapter = _adapter(shared, seed, settings.lora_rank, settings.lora_alpha)
    served = serving_copy(shared, adapter)
    score_set = pairs_of([stream[i % len(stream)] for i in range(len(stream) - pairs, len(stream))])
    device = backbone.device
    batch_size = SCORE_BATCH.get(device.type, SCORE_BATCH["cpu"])
    default_prefetch = device.type == "cuda"
    batches = raw_batches(backbone, served, score_set, batch_size)

    def cold(prefetch: bool) -> Callable[[], object]:
        def run() -> None:
            backbone.clear_token_cache()
            history.query_key.cache_clear()
            score_pairs(backbone, served, score_set, prefetch=prefetch)

        return run

    def host_only(empty: bool) -> Callable[[], object]:
        def run() -> None:
            if empty:
                backbone.clear_token_cache()
                history.query_key.cache_clear()
            for _ in prepared_batches(backbone, served, score_set, None, batch_size):
                pass

        return run

    sides: dict[str, Callable[[], object]] = {
        "raw": lambda: raw_forward(backbone, served, batches),
        "cold": cold(default_prefetch),
        "cold_other": cold(not default_prefetch),
        "warm": lambda: score_pairs(backbone, served, score_set),
        "host_cold": host_only(empty=True),
        "host_warm": host_only(empty=False),
    }
    _say(f"{len(score_set)} pairs on {device}, batch {batch_size}, {repeats} rounds")
    for run in sides.values():
        run()
    check = np.abs(score_pairs(backbone, served, score_set) - score_pairs(backbone, served, score_set, 1))
    runs: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for r in range(repeats):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            if name in ("warm", "host_warm"):
                score_pairs(backbone, served, score_set)  # what the previous side emptied, cached again
            runs[name].append(timed(device, sides[name]))
        _say(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in runs.items()))
    rate = {name: len(score_set) / float(np.median(v)) for name, v in runs.items()}

    refreshed: dict[str, Any] = {}
    if refresh_segments:
        _say(f"refresh: {refresh_segments} segments x {refresh_candidates} candidates")
        adapters = [
            _adapter(shared, seed + 1 + i, settings.lora_rank, settings.lora_alpha)
            for i in range(refresh_segments)
        ]
        candidates = [
            pairs_of([stream[(i * refresh_candidates + j) % len(stream)] for j in range(refresh_candidates)])
            for i in range(refresh_segments)
        ]
        promoted = new_click_model(backbone, seed + 1)
        promoted.query_history = shared.query_history
        refreshed = refresh(backbone, promoted, adapters, candidates)

    compared: dict[str, Any] = {}
    if device.type == "cpu" and precision_train_events > 0:
        _say("precision: fp32 against int8 (torch dynamic quantisation, ONNX Runtime)")

        def clear() -> None:
            backbone.clear_token_cache()
            history.query_key.cache_clear()

        compared = precision_speed(backbone, served, score_set, batches, repeats, clear)
        compared["quality"] = precision_quality(backbone, settings, precision_train_events)

    other = "cold_inline" if default_prefetch else "cold_prefetch"
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "pairs": len(score_set),
        "raw_pairs_per_s": round(rate["raw"], 1),
        "cold_pairs_per_s": round(rate["cold"], 1),
        "warm_pairs_per_s": round(rate["warm"], 1),
        "cold_ratio": round(rate["cold"] / rate["raw"], 3),
        "warm_ratio": round(rate["warm"] / rate["raw"], 3),
        f"{other}_pairs_per_s": round(rate["cold_other"], 1),
        f"{other}_ratio": round(rate["cold_other"] / rate["raw"], 3),
        "host_cold_s": round(float(np.median(runs["host_cold"])), 4),
        "host_warm_s": round(float(np.median(runs["host_warm"])), 4),
        "raw_s": round(float(np.median(runs["raw"])), 4),
        "prefetch": default_prefetch,
        "batch_size": batch_size,
        "batch_tokens": SCORE_BATCH_TOKENS.get(device.type),
        "raw_batches": len(batches),
        "max_seq_len": settings.max_seq_len,
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "runs_s": {k: [round(x, 4) for x in v] for k, v in runs.items()},
        "max_abs_diff_vs_batch_1": float(check.max()),
        "refresh": refreshed,
        "precision": compared,
        "notes": "pairs/s from medians over rounds after one warm-up of each side; ratios = side / raw "
        "(higher is better); raw = forward only on the worker's batches already on the device; "
        "host_*_s = the host side alone (encode, features, packing; no forward), cold and warm",
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pairs", type=int, default=2048, help="pairs scored per side and round (default 2048)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds (median reported, default 3)")
    parser.add_argument("--refresh-segments", type=int, default=100, help="segments refreshed (0: skip)")
    parser.add_argument(
        "--refresh-candidates", type=int, default=2000, help="candidates per refreshed segment"
    )
    parser.add_argument(
        "--precision-train-events",
        type=int,
        default=1024,
        help="events the fp32/int8 quality check trains its shared models on (0: skip the comparison)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line last")


def cli_main(args: argparse.Namespace, settings: Settings | None = None) -> int:
    settings = settings or load_settings()
    result = run_bench(
        settings,
        pairs=args.pairs,
        repeats=args.repeats,
        refresh_segments=args.refresh_segments,
        refresh_candidates=args.refresh_candidates,
        precision_train_events=args.precision_train_events,
    )
    write_result(result, args.json)
    return 0
