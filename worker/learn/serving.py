"""Copies of a model to score with, never to train: a segment's LoRA merged into the weights, bf16 linear
layers on CUDA, int8 dynamically quantised ones on a CPU."""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from worker.learn.adapters import SegmentAdapter
from worker.learn.click_model import ClickModel

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$")


def _lora_factors(model: ClickModel, adapter: SegmentAdapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`(B, A)` per linear layer of the encoder that the adapter targets, checked against its shape."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapter.lora.items():
        found = _LORA_KEY.match(key)
        if found is None:
            raise ValueError(f"adapter does not fit the model: unexpected key {key!r}")
        parts.setdefault(found["module"], {})[found["part"]] = value
    modules = dict(model.encoder.named_modules())
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, ab in parts.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear) or set(ab) != {"A", "B"}:
            raise ValueError(f"adapter does not fit the model: {name!r} is not a linear layer with A and B")
        a, b = ab["A"], ab["B"]
        if tuple(a.shape) != (adapter.rank, linear.in_features) or tuple(b.shape) != (
            linear.out_features,
            adapter.rank,
        ):
            raise ValueError(f"adapter does not fit the model: {name!r} has shapes {a.shape}, {b.shape}")
        device = linear.weight.device
        factors[name] = (b.float().to(device), a.float().to(device))
    return factors


def serving_copy(model: ClickModel, adapter: SegmentAdapter | None = None) -> ClickModel:
    """The model to score with, never to train: `adapter`'s LoRA merged into the weights it targets
    (`W + alpha/rank * B @ A`, once per champion, instead of a deep copy, a PEFT injection and a LoRA pass
    per scoring call) and its calibration; on CUDA the encoder's linear layers in bf16, the rounding
    autocast applies to them on every call anyway. Every other tensor is shared with `model`, which is
    left as it was, so a copy costs only the weights it changes. With no adapter on a CPU: `model`."""
    cuda = model.calibration.device.type == "cuda"
    if adapter is None and not cuda:
        return model
    factors = {} if adapter is None else _lora_factors(model, adapter)
    scale = 0.0 if adapter is None else adapter.alpha / adapter.rank
    linears = {n: m for n, m in model.encoder.named_modules() if isinstance(m, nn.Linear)}
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    served = copy.deepcopy(model, memo)
    targets = dict(served.encoder.named_modules())
    with torch.no_grad():
        for name in sorted(set(factors) | (set(linears) if cuda else set())):
            source, target = linears[name], targets[name]
            weight = source.weight.detach()
            if name in factors:
                weight = torch.addmm(weight.float(), *factors[name], alpha=scale)  # PEFT's merge
            dtype = torch.bfloat16 if cuda else source.weight.dtype
            target.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
            if cuda and source.bias is not None:
                target.bias = nn.Parameter(source.bias.detach().to(dtype), requires_grad=False)
        if adapter is not None:
            calibration = adapter.calibration.detach().float().to(model.calibration.device).clone()
            served.calibration = nn.Parameter(calibration, requires_grad=False)
    return served.eval()


def quantized_copy(model: ClickModel) -> ClickModel:
    """`model` for int8 scoring on a CPU: the encoder's linear layers dynamically quantised (int8 weights,
    activations quantised per batch, `torch.ao.quantization.quantize_dynamic`). Merge an adapter first
    (`serving_copy`): its LoRA is then part of the weights, quantised once per served copy. The copy
    shares every other tensor and the query history with `model`."""
    from torch.ao.quantization import quantize_dynamic

    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    if model.query_history is not None:
        memo[id(model.query_history)] = model.query_history
    served = copy.deepcopy(model, memo)
    quantize_dynamic(served.encoder, {nn.Linear}, dtype=torch.qint8, inplace=True)  # type: ignore[no-untyped-call]
    return served.eval()


def served_copy(model: ClickModel, adapter: SegmentAdapter | None, int8: bool) -> ClickModel:
    """What the worker scores with: `serving_copy`, quantised when it serves int8 on a CPU."""
    merged = serving_copy(model, adapter)
    if int8 and model.calibration.device.type == "cpu":
        return quantized_copy(merged)
    return merged
