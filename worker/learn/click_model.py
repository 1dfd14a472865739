"""The click model: a cross-encoder over `query [SEP] item_text`, mean pooling and a logistic head that
also takes the pair's lexical match features (`worker.learn.match`) and its query's click history
(`worker.learn.history`).

The shared model is a full encoder plus head. A segment's model is the shared model with a LoRA adapter
on the encoder (`worker.learn.adapters`) and a two-number calibration (scale, bias) on the shared head's
logit, so the head stays the shared one when the shared model moves on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.learn import history, match
from worker.learn.backbone import Backbone, Pair
from worker.learn.encoder import load_encoder, mean_pool


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


def new_click_model(backbone: Backbone, seed: int = 0) -> ClickModel:
    """The pretrained encoder with a fresh head: the starting point of the shared model."""
    torch.manual_seed(seed)
    encoder = load_encoder(backbone.base_path)
    hidden = int(encoder.config.hidden_size)
    model = ClickModel(encoder, hidden)
    return model.to(backbone.device)
