"""A segment's delta on the shared model: a LoRA adapter on the encoder plus the head's calibration, made
(`attach_lora`), read back (`extract_adapter`) and applied (`with_adapter`) through PEFT."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.learn.click_model import ClickModel
from worker.learn.encoder import offline_hub

LORA_TARGETS = ("query", "key", "value", "dense")


@dataclass
class SegmentAdapter:
    """A segment's delta on the shared model: LoRA weights (PEFT's key names) and calibration."""

    lora: dict[str, torch.Tensor]
    calibration: torch.Tensor
    rank: int
    alpha: int
    target_modules: list[str]
    dropout: float = 0.0

    def lora_config(self, base_path: Path | str = "") -> Any:
        offline_hub()
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
            base_model_name_or_path=str(base_path) or None,
        )


def attach_lora(model: ClickModel, rank: int, alpha: int, dropout: float, seed: int) -> ClickModel:
    """A copy of `model` whose encoder carries a fresh LoRA; only LoRA and calibration are trainable."""
    offline_hub()
    from peft import LoraConfig, get_peft_model

    seg = copy.deepcopy(model)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(LORA_TARGETS), bias="none"
    )
    seg.encoder = get_peft_model(seg.encoder, config)
    for param in seg.parameters():
        param.requires_grad = False
    for name, param in seg.encoder.named_parameters():
        if "lora_" in name:
            param.requires_grad = True
    seg.calibration.requires_grad = True
    return seg


def with_adapter(model: ClickModel, adapter: SegmentAdapter | None, seed: int = 0) -> ClickModel:
    """The segment's model: shared weights plus its adapter, or a copy of the shared model if none."""
    offline_hub()
    from peft import set_peft_model_state_dict

    if adapter is None:
        return copy.deepcopy(model)
    seg = attach_lora(model, adapter.rank, adapter.alpha, adapter.dropout, seed)
    result = set_peft_model_state_dict(seg.encoder, {k: v for k, v in adapter.lora.items()})
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter does not fit the model: unexpected keys {unexpected[:3]}")
    with torch.no_grad():
        seg.calibration.copy_(adapter.calibration.to(seg.calibration.device))
    return seg


def extract_adapter(seg: ClickModel) -> SegmentAdapter:
    offline_hub()
    from peft import get_peft_model_state_dict

    config: Any = seg.encoder.peft_config["default"]
    state = {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(seg.encoder).items()}
    return SegmentAdapter(
        lora=state,
        calibration=seg.calibration.detach().float().cpu().clone(),
        rank=int(config.r),
        alpha=int(config.lora_alpha),
        target_modules=sorted(config.target_modules),
        dropout=float(config.lora_dropout),
    )
