"""fp32 against int8 CPU scoring, for `bench score`: speed on the same pairs, quality on real holdouts.

Two int8 routes are measured side by side on the same model and batches:
- **torch**: `worker.learn.serving.quantized_copy`, torch's dynamic quantisation of the encoder's linear
  layers, what `WORKER_SCORING_PRECISION=int8` serves;
- **onnx**: the same model exported to ONNX and quantised by ONNX Runtime (`quantize_dynamic`, int8
  weights), run by an ORT CPU session (needs the `onnx` and `onnxruntime` packages).

Speed: forward passes on the worker's own batches (tokenised before the clock), interleaved rounds,
medians; the torch routes also end to end (`score_pairs`, cold and warm). Quality: a shared model is
trained on the first events of each data set's stream (`shop`, `hd-5k`) and every held-out pair of its
evaluation segments is scored in fp32 and in int8: the AUC over all of them and the mean per segment.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.config import Settings
from worker.learn.backbone import Backbone, Pair
from worker.learn.click_model import ClickModel
from worker.learn.scoring import score_pairs
from worker.learn.serving import quantized_copy
from worker.learn.train import train_shared
from worker.learn.training_data import labels_of, pairs_of
from worker.ops.quality import auc
from worker.tools.datasets import load_dataset

DATASETS = ("shop", "hd-5k")
INPUTS = ("input_ids", "attention_mask", "token_type_ids", "match", "history")


def _say(msg: str) -> None:
    print(f"[bench score] {msg}", file=sys.stderr, flush=True)


class _Flat(nn.Module):
    """The model's forward on positional tensors, as ONNX exports it."""

    def __init__(self, model: ClickModel, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(dict(zip(self.names, tensors, strict=True))))


class OnnxScorer:
    """The model exported to ONNX (fp32) and ONNX Runtime's dynamically quantised copy (int8)."""

    def __init__(self, model: ClickModel, sample: dict[str, torch.Tensor], directory: Path) -> None:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        self.names = [n for n in INPUTS if n in sample]
        fp32, int8 = directory / "model.onnx", directory / "model.int8.onnx"
        dynamic = {n: {0: "batch", 1: "tokens"} if sample[n].dim() == 2 else {0: "batch"} for n in self.names}
        torch.onnx.export(
            _Flat(model.eval(), self.names),
            tuple(sample[n] for n in self.names),
            str(fp32),
            input_names=self.names,
            output_names=["probability"],
            dynamic_axes={**dynamic, "probability": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
        started = time.perf_counter()
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
        self.quantize_s = time.perf_counter() - started
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.sessions = {
            "fp32": ort.InferenceSession(str(fp32), options, providers=["CPUExecutionProvider"]),
            "int8": ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"]),
        }

    def run(self, precision: str, batches: Sequence[dict[str, torch.Tensor]]) -> np.ndarray:
        session = self.sessions[precision]
        out = [session.run(None, {n: b[n].numpy() for n in self.names})[0] for b in batches]
        return np.concatenate(out).astype(np.float64)


def _forward(model: ClickModel, batches: Sequence[dict[str, torch.Tensor]]) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([torch.sigmoid(model(b)).numpy() for b in batches]).astype(np.float64)


def _cold(clear: Callable[[], None], backbone: Backbone, model: ClickModel, pairs: Sequence[Pair]) -> None:
    clear()
    score_pairs(backbone, model, pairs)


def speed(
    backbone: Backbone,
    served: ClickModel,
    pairs: Sequence[Pair],
    batches: Sequence[dict[str, torch.Tensor]],
    repeats: int,
    clear: Callable[[], None],
) -> dict[str, Any]:
    """Pairs/s of fp32 and int8, torch and ONNX Runtime, forward only and (torch) end to end."""
    started = time.perf_counter()
    int8 = quantized_copy(served)
    quantize_s = time.perf_counter() - started
    sides: dict[str, Callable[[], object]] = {
        "torch_fp32_forward": lambda: _forward(served, batches),
        "torch_int8_forward": lambda: _forward(int8, batches),
        "torch_fp32_warm": lambda: score_pairs(backbone, served, pairs),
        "torch_int8_warm": lambda: score_pairs(backbone, int8, pairs),
        "torch_fp32_cold": lambda: _cold(clear, backbone, served, pairs),
        "torch_int8_cold": lambda: _cold(clear, backbone, int8, pairs),
    }
    onnx: OnnxScorer | None = None
    onnx_error = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            onnx = OnnxScorer(served, batches[0], Path(tmp))
        except Exception as exc:  # a missing package or an export the model does not support
            onnx_error = f"{type(exc).__name__}: {exc}"[:300]
        if onnx is not None:
            scorer = onnx
            sides["onnx_fp32_forward"] = lambda: scorer.run("fp32", batches)
            sides["onnx_int8_forward"] = lambda: scorer.run("int8", batches)
        for run in sides.values():
            run()
        runs: dict[str, list[float]] = {name: [] for name in sides}
        order = list(sides)
        for r in range(repeats):
            for name in order[r % len(order) :] + order[: r % len(order)]:
                if name.endswith("warm"):
                    score_pairs(backbone, served, pairs)
                started = time.perf_counter()
                sides[name]()
                runs[name].append(time.perf_counter() - started)
            _say(
                "precision round "
                + str(r + 1)
                + ": "
                + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in runs.items())
            )
        agree = {}
        if onnx is not None:
            torch_fp32 = _forward(served, batches)
            agree["onnx_fp32_max_abs_diff_vs_torch"] = float(
                np.abs(onnx.run("fp32", batches) - torch_fp32).max()
            )
    rate = {name: round(len(pairs) / float(np.median(v)), 1) for name, v in runs.items()}
    out: dict[str, Any] = {"pairs_per_s": rate, "torch_quantize_s": round(quantize_s, 3), **agree}
    for route in ("torch", "onnx"):
        if f"{route}_int8_forward" in rate:
            out[f"{route}_int8_speedup_forward"] = round(
                rate[f"{route}_int8_forward"] / rate[f"{route}_fp32_forward"], 3
            )
    for kind in ("warm", "cold"):
        out[f"torch_int8_speedup_{kind}"] = round(rate[f"torch_int8_{kind}"] / rate[f"torch_fp32_{kind}"], 3)
    if onnx is not None:
        out["onnx_quantize_s"] = round(onnx.quantize_s, 3)
    else:
        out["onnx_error"] = onnx_error
    return out


def quality(backbone: Backbone, settings: Settings, train_events: int) -> dict[str, Any]:
    """fp32 and int8 AUC of a shared model trained on each data set's first `train_events` events."""
    out: dict[str, Any] = {}
    for name in DATASETS:
        dataset = load_dataset(name)
        stream = dataset.stream()[:train_events]
        _say(f"{name}: training a shared model on {len(stream)} events for the quality check")
        result = train_shared(backbone, None, stream, [], [], settings)
        if result.shared is None:
            raise RuntimeError(f"{name}: the shared training failed: {result.reason}")
        model = result.shared.eval()
        int8 = quantized_copy(model)
        per_segment: dict[str, dict[str, float | None]] = {}
        labels, fp32_all, int8_all = [], [], []
        for segment, held in sorted(dataset.holdout.items()):
            y = labels_of(held)
            a = score_pairs(backbone, model, pairs_of(held))
            b = score_pairs(backbone, int8, pairs_of(held))
            per_segment[segment] = {"pairs": len(held), "fp32": auc(y, a), "int8": auc(y, b)}
            labels.append(y)
            fp32_all.append(a)
            int8_all.append(b)
        y, a, b = np.concatenate(labels), np.concatenate(fp32_all), np.concatenate(int8_all)
        means = {
            p: float(np.mean([v[p] for v in per_segment.values() if v[p] is not None]))
            for p in ("fp32", "int8")
        }
        pooled_fp32, pooled_int8 = auc(y, a), auc(y, b)
        out[name] = {
            "trained_events": len(stream),
            "holdout_pairs": len(y),
            "auc_fp32": pooled_fp32,
            "auc_int8": pooled_int8,
            "auc_difference": None
            if pooled_fp32 is None or pooled_int8 is None
            else pooled_int8 - pooled_fp32,
            "mean_segment_auc_fp32": means["fp32"],
            "mean_segment_auc_int8": means["int8"],
            "mean_segment_auc_difference": means["int8"] - means["fp32"],
            "max_abs_probability_diff": float(np.abs(a - b).max()),
            "per_segment": per_segment,
        }
    return out
