"""Zero-shot scores for a segment with no labels yet: the cosine of the untouched base encoder's sentence
embeddings of query and item, mapped by a fixed logistic."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.learn.backbone import Backbone, Pair, Row
from worker.learn.encoder import load_encoder, mean_pool

ZERO_SHOT_SCALE = 10.0
ZERO_SHOT_CENTER = 0.35


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped by similar length, so little compute is spent on padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


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
