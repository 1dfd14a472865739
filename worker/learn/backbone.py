"""The backbone: tokenizer, device and sequence length shared by every model, and the encoded pairs it
caches (token ids plus the lexical match features of `worker.learn.match`), packed into batches."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from worker.config import Settings
from worker.learn import match
from worker.learn.encoder import apply_threads, base_model_path, offline_hub, select_device

Pair = tuple[str | None, str]


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
    offline_hub()
    from transformers import AutoTokenizer

    apply_threads(settings)
    path = base_model_path(settings)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return Backbone(tokenizer, path, select_device(settings), settings.max_seq_len, settings.match_features)
