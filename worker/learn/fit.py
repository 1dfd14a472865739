"""`fit`: one model trained in place on events, and the probabilities it gives them.

AdamW with linear warm-up then linear decay, seeded, with early stopping on a holdout that keeps the best
epoch's weights. `FitOptions` is built from the settings once per training level (shared, segment).
Holdout numbers come from `worker.ops.quality`, the same code `/metrics` uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from worker.config import Settings
from worker.events import ClickEvent
from worker.learn.backbone import Backbone
from worker.learn.click_model import ClickModel
from worker.learn.scoring import score_pairs
from worker.learn.training_data import folds_of, labels_of, pairs_of
from worker.ops.quality import HoldoutScore, holdout_score


class NonFiniteLoss(FloatingPointError):
    """A diverging run: `fit` raises it at the first NaN/inf loss so the run never reaches the gate."""


@dataclass(frozen=True)
class FitOptions:
    """How `fit` trains: the optimiser's rates and schedule, batches, seed and early stopping.

    Built once per training from the settings (`for_shared`, `for_segment`), so a knob is written out
    in one place; `dataclasses.replace` makes the variants the evaluation's reference procedures need.
    """

    lr: float
    epochs: int
    batch_size: int
    weight_decay: float
    seed: int
    warmup_frac: float = 0.1
    calibration_lr: float = 1e-2
    match_lr: float = 1e-2
    patience: int = 0

    @classmethod
    def for_shared(cls, settings: Settings) -> FitOptions:
        """A shared run's: encoder and head at `shared_lr`, the match and history weights at `match_lr`."""
        return cls(
            lr=settings.shared_lr,
            epochs=settings.shared_epochs,
            batch_size=settings.shared_batch_size,
            weight_decay=settings.weight_decay,
            seed=settings.seed,
            warmup_frac=settings.warmup_frac,
            match_lr=settings.match_lr,
            patience=settings.early_stopping_patience,
        )

    @classmethod
    def for_segment(cls, settings: Settings) -> FitOptions:
        """A segment run's: LoRA at `adapter_lr`, the calibration at `calibration_lr`."""
        return cls(
            lr=settings.adapter_lr,
            epochs=settings.adapter_epochs,
            batch_size=settings.batch_size,
            weight_decay=settings.weight_decay,
            seed=settings.seed,
            warmup_frac=settings.warmup_frac,
            calibration_lr=settings.calibration_lr,
            patience=settings.early_stopping_patience,
        )


def _param_groups(model: ClickModel, options: FitOptions) -> list[dict[str, Any]]:
    """The few head-side numbers learn at their own, larger rates: from zero they must reach weights of
    order 1 within a run, where the encoder's weights move by 1e-4 per step."""
    lr, weight_decay = options.lr, options.weight_decay
    decay, no_decay, calib, wide = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name == "calibration":
            calib.append(param)
        elif name.startswith(("match.", "history.")):
            wide.append(param)
        elif param.ndim < 2 or "LayerNorm" in name or name.endswith("bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"params": calib, "lr": options.calibration_lr, "weight_decay": 0.0},
        {"params": wide, "lr": options.match_lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


@dataclass
class Fitted:
    """What `fit` did: per-step losses, epochs run, and which epoch's weights it kept (1-based), with
    the holdout log loss after each epoch when it stopped early on one."""

    losses: list[float]
    epochs: int = 0
    kept_epoch: int = 0
    holdout_logloss: list[float] = field(default_factory=list)


def fit(
    backbone: Backbone,
    model: ClickModel,
    events: Sequence[ClickEvent],
    options: FitOptions,
    holdout: Sequence[ClickEvent] = (),
) -> Fitted:
    """Train `model` in place with AdamW, linear warm-up then linear decay over `options.epochs`.

    Early stopping (`options.patience` > 0, a `holdout` and more than one epoch): after each epoch the
    holdout log loss is measured; training stops once `patience` epochs in a row did not improve on the
    best, and the trainable weights of the best epoch are put back.
    Raises NonFiniteLoss at the first NaN/inf loss so that a diverging run never reaches the gate.
    """
    if not events:
        return Fitted([])
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    pairs = pairs_of(events)
    rows = backbone.encode(pairs)
    hist = model.history_features(pairs, folds_of(events))
    labels = torch.tensor([e.clicked for e in events], dtype=torch.float32)
    batch_size, epochs, patience = options.batch_size, options.epochs, options.patience
    steps_per_epoch = math.ceil(len(rows) / batch_size)
    total = steps_per_epoch * epochs
    warmup = max(1, int(total * options.warmup_frac))
    optimizer = torch.optim.AdamW(_param_groups(model, options))
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    stopping = patience > 0 and bool(holdout) and epochs > 1
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    done = Fitted([])
    model.train()
    step = 0
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(rows))
        for start in range(0, len(rows), batch_size):
            idx = order[start : start + batch_size]
            factor = (
                (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))
            )
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * factor
            batch = backbone.collate([rows[int(i)] for i in idx], None if hist is None else hist[idx])
            target = labels[idx].to(backbone.device)
            with backbone.autocast():
                logits = model(batch)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLoss(f"loss became {value} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
            optimizer.step()
            done.losses.append(value)
            step += 1
        done.epochs = done.kept_epoch = epoch
        if not stopping:
            continue
        logloss = evaluate_model(backbone, model, holdout).logloss
        done.holdout_logloss.append(logloss)
        if best is None or logloss < best[0]:
            trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            best = (logloss, epoch, trainable)
        elif epoch - best[1] >= patience:
            break
    if best is not None and best[1] != done.epochs:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, saved in best[2].items():
                params[name].copy_(saved)
        done.kept_epoch = best[1]
    model.eval()
    return done


def probabilities(backbone: Backbone, model: ClickModel, events: Sequence[ClickEvent]) -> np.ndarray:
    """The model's probabilities for events, each scored out of its own history fold."""
    if not events:
        return np.empty(0, dtype=np.float64)
    return score_pairs(backbone, model, pairs_of(events), folds=folds_of(events))


def evaluate_model(backbone: Backbone, model: ClickModel, events: Sequence[ClickEvent]) -> HoldoutScore:
    return holdout_score(labels_of(events), probabilities(backbone, model, events))
