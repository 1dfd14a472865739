"""One incremental fine-tune and its gate decision, as pure functions of data in → result out.

Two levels, because pooled knowledge is what carries quality on few-shot segments (DATA.md):
- `train_shared`: full fine-tune of encoder + head on new events of all segments plus a replay sample,
  warm-up then linear decay, AdamW. Gated on a pooled slice of events that no model trains on.
- `train_segment_adapter`: LoRA on the shared encoder plus a (scale, bias) calibration of the shared
  head's logit, warm-started from the segment's champion adapter, gated on the segment's holdout slice.

A training of several epochs stops early on the same holdout slice and keeps its best epoch. The shared
model also carries the query history (`worker.learn.history`) counted from the run's events.
Both train a copy and never mutate their inputs. A non-finite loss or any exception yields a
`failed` result (never promoted) instead of raising, its traceback logged. Seeded: the same inputs give the
same result on CPU. Holdout numbers come from `worker.ops.quality`, the same code `/metrics` uses.
See docs/learning.md for the measurements behind the defaults.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import structlog
import torch

from worker.config import Settings
from worker.events import ClickEvent
from worker.learn.history import QueryHistory, fold_of
from worker.learn.model import (
    Backbone,
    ClickModel,
    Pair,
    SegmentAdapter,
    attach_lora,
    extract_adapter,
    new_click_model,
    pretrained_encoder,
    score_pairs,
    with_adapter,
    zero_shot_scores,
)
from worker.ops.quality import HoldoutScore, holdout_score

log = structlog.get_logger(__name__)

Decision = Literal["promoted", "rejected", "failed"]
AUC_TIE = 1e-9


@dataclass(kw_only=True)
class TrainResult:
    """What one training produced; `adapter` (segment) or `shared` is set unless it failed."""

    decision: Decision
    reason: str
    challenger: HoldoutScore | None
    champion: HoldoutScore | None
    train_seconds: float
    device: str
    losses: list[float] = field(default_factory=list)
    n_train: int = 0
    adapter: SegmentAdapter | None = None
    shared: ClickModel | None = None
    kept_epoch: int = 0

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"


class NonFiniteLoss(FloatingPointError):
    pass


def pairs_of(events: Sequence[ClickEvent]) -> list[Pair]:
    return [(e.query or None, e.item_text) for e in events]


def folds_of(events: Sequence[ClickEvent]) -> list[int | None]:
    return [fold_of(e.event_id) for e in events]


def labels_of(events: Sequence[ClickEvent]) -> np.ndarray:
    return np.array([e.clicked for e in events], dtype=np.float64)


def gate(
    challenger: HoldoutScore | None,
    champion: HoldoutScore | None,
    margin: float,
    auc_tolerance: float = 0.0,
) -> tuple[bool, str]:
    """Promote only if holdout AUC is not lower and log loss not worse than the champion's by > margin."""
    if challenger is None or challenger.n == 0:
        return False, "no holdout events to judge the challenger"
    if not math.isfinite(challenger.logloss):
        return False, "challenger log loss is not finite"
    if champion is None or champion.n == 0 or not math.isfinite(champion.logloss):
        return True, "no comparable champion"
    floor = None if champion.auc is None else champion.auc - AUC_TIE - auc_tolerance
    if challenger.auc is not None and floor is not None and challenger.auc < floor:
        return False, f"holdout AUC {challenger.auc:.4f} < champion {champion.auc:.4f}"
    if challenger.logloss > champion.logloss + margin:
        return False, (
            f"holdout log loss {challenger.logloss:.4f} > champion {champion.logloss:.4f} + margin {margin:g}"
        )
    auc_note = "" if challenger.auc is None else f"AUC {challenger.auc:.4f}, "
    return True, f"{auc_note}log loss {challenger.logloss:.4f} within the gate"


def is_holdout(event_id: str, frac: float) -> bool:
    """Stable membership: an event is in the holdout slice forever, so it is never trained on."""
    digest = hashlib.blake2b(event_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < frac


def split_holdout(events: Sequence[ClickEvent], frac: float) -> tuple[list[ClickEvent], list[ClickEvent]]:
    train = [e for e in events if not is_holdout(e.event_id, frac)]
    held = [e for e in events if is_holdout(e.event_id, frac)]
    return train, held


def sample_replay(events: Sequence[ClickEvent], n: int, seed: int) -> list[ClickEvent]:
    """A seeded uniform sample without replacement, kept in stream order."""
    if n >= len(events):
        return list(events)
    if n <= 0:
        return []
    idx = np.sort(np.random.default_rng(seed).choice(len(events), size=n, replace=False))
    return [events[int(i)] for i in idx]


@dataclass(frozen=True)
class TrainingData:
    """`counted`: every event the run knows of, holdout included, for the shared model's query history
    (out-of-fold features keep each event's own label out of its own feature)."""

    new: list[ClickEvent]
    replay: list[ClickEvent]
    holdout: list[ClickEvent]
    counted: list[ClickEvent] = field(default_factory=list)


def segment_training_data(
    new: Sequence[ClickEvent], older: Sequence[ClickEvent], settings: Settings, run: int
) -> TrainingData:
    """New events minus the segment's holdout slice, a replay sample of its older events, and the holdout.

    Holdout membership is a hash of the event id, so an event is held out in every run and never trained on.
    """
    frac = settings.holdout_frac
    train_new = [e for e in new if not is_holdout(e.event_id, frac)]
    old = [e for e in older if not is_holdout(e.event_id, frac)]
    holdout = [e for e in (*older, *new) if is_holdout(e.event_id, frac)]
    replay = sample_replay(old, round(len(train_new) * settings.replay_frac), settings.seed + run)
    return TrainingData(train_new, replay, holdout)


def shared_training_data(
    new: Sequence[ClickEvent], older: Sequence[ClickEvent], settings: Settings, run: int
) -> TrainingData:
    """All segments' new events and a replay of older ones, minus the pooled holdout no model trains on."""
    frac = settings.shared_holdout_frac
    train_new = [e for e in new if not is_holdout(e.event_id, frac)]
    old = [e for e in older if not is_holdout(e.event_id, frac)]
    held = [e for e in (*older, *new) if is_holdout(e.event_id, frac)]
    replay = sample_replay(old, round(len(train_new) * settings.shared_replay_frac), settings.seed + run)
    holdout = sample_replay(held, settings.shared_holdout_cap, settings.seed)
    return TrainingData(train_new, replay, holdout, [*older, *new])


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


def evaluate_model(backbone: Backbone, model: ClickModel, events: Sequence[ClickEvent]) -> HoldoutScore:
    if not events:
        return holdout_score([], [])
    return holdout_score(
        labels_of(events), score_pairs(backbone, model, pairs_of(events), folds=folds_of(events))
    )


@dataclass
class _Attempt:
    """One training as it goes: what it measured so far, so a failure at any step still reports the
    champion's score and the losses of a finished `fit`, and both trainers end the same way."""

    scope: Literal["segment", "shared"]
    backbone: Backbone
    settings: Settings
    started: float = field(default_factory=time.perf_counter)
    champion: HoldoutScore | None = None
    losses: list[float] = field(default_factory=list)

    def failed(self, exc: Exception) -> TrainResult:
        """Never raises: the caller records a failed version and backs off; the traceback goes to the log."""
        reason = f"{type(exc).__name__}: {exc}"
        log.error("training failed", scope=self.scope, error=reason, exc_info=exc)
        return TrainResult(
            decision="failed",
            reason=reason,
            challenger=None,
            champion=self.champion,
            train_seconds=time.perf_counter() - self.started,
            device=str(self.backbone.device),
            losses=self.losses,
        )

    def judged(
        self,
        challenger: HoldoutScore,
        fitted: Fitted,
        n_train: int,
        *,
        adapter: SegmentAdapter | None = None,
        shared: ClickModel | None = None,
    ) -> TrainResult:
        s = self.settings
        ok, reason = gate(challenger, self.champion, s.gate_logloss_margin, s.gate_auc_tolerance)
        return TrainResult(
            decision="promoted" if ok else "rejected",
            reason=reason,
            challenger=challenger,
            champion=self.champion,
            train_seconds=time.perf_counter() - self.started,
            device=str(self.backbone.device),
            losses=self.losses,
            n_train=n_train,
            adapter=adapter,
            shared=shared,
            kept_epoch=fitted.kept_epoch,
        )


class _Same:
    """Marker: gate the shared challenger against the model it started from."""


SAME = _Same()


def train_shared(
    backbone: Backbone,
    model: ClickModel | None,
    new_events: Sequence[ClickEvent],
    replay_events: Sequence[ClickEvent],
    holdout_events: Sequence[ClickEvent],
    settings: Settings,
    champion: ClickModel | _Same | None = SAME,
    counted: Sequence[ClickEvent] | None = None,
) -> TrainResult:
    """Fine-tune a copy of the shared model (encoder + head) on new + replayed events, then gate it.

    `model` is where training continues from (None: the pretrained encoder with a fresh head).
    `champion` is what serves now: by default `model`; None means no shared model serves yet, so the
    challenger must beat zero-shot cosine on the holdout. A rejected challenger is still returned in
    `shared`, so a caller may keep training from it while the champion keeps serving.
    With `settings.query_history` the challenger gets a new query history table counted from `counted`
    (default: the new, replayed and holdout events), and is gated with it against the champion's own.
    """
    attempt = _Attempt("shared", backbone, settings)
    events = [*new_events, *replay_events]
    try:
        serving = model if isinstance(champion, _Same) else champion
        if serving is None:
            labels = labels_of(holdout_events)
            probs = zero_shot_scores(backbone, pretrained_encoder(backbone), pairs_of(holdout_events))
            attempt.champion = holdout_score(labels, probs) if holdout_events else None
        else:
            attempt.champion = evaluate_model(backbone, serving, holdout_events)
        challenger_model = new_click_model(backbone, settings.seed) if model is None else copy.deepcopy(model)
        for param in challenger_model.parameters():
            param.requires_grad = True
        challenger_model.calibration.requires_grad = False
        challenger_model.query_history = (
            QueryHistory.from_events(
                [*new_events, *replay_events, *holdout_events] if counted is None else counted
            )
            if settings.query_history
            else None
        )
        fitted = fit(
            backbone, challenger_model, events, FitOptions.for_shared(settings), holdout=holdout_events
        )
        attempt.losses = fitted.losses
        challenger = evaluate_model(backbone, challenger_model, holdout_events)
    except Exception as exc:
        return attempt.failed(exc)
    return attempt.judged(challenger, fitted, len(events), shared=challenger_model)


def train_segment_adapter(
    backbone: Backbone,
    shared: ClickModel,
    champion_adapter: SegmentAdapter | None,
    new_events: Sequence[ClickEvent],
    replay_events: Sequence[ClickEvent],
    holdout_events: Sequence[ClickEvent],
    settings: Settings,
) -> TrainResult:
    """Train the segment's LoRA + calibration on the shared model, warm-started from its champion.

    The champion is measured as it would be served now: current shared model plus champion adapter
    (or the shared model alone when the segment has none yet).
    """
    attempt = _Attempt("segment", backbone, settings)
    events = [*new_events, *replay_events]
    try:
        serving = with_adapter(shared, champion_adapter, settings.seed)
        attempt.champion = evaluate_model(backbone, serving, holdout_events)
        del serving
        if champion_adapter is None:
            seg = attach_lora(
                shared, settings.lora_rank, settings.lora_alpha, settings.lora_dropout, settings.seed
            )
        else:
            seg = with_adapter(shared, champion_adapter, settings.seed)
        fitted = fit(backbone, seg, events, FitOptions.for_segment(settings), holdout=holdout_events)
        attempt.losses = fitted.losses
        challenger = evaluate_model(backbone, seg, holdout_events)
        adapter = extract_adapter(seg)
    except Exception as exc:
        return attempt.failed(exc)
    return attempt.judged(challenger, fitted, len(events), adapter=adapter)


def score_segment(
    backbone: Backbone,
    shared: ClickModel | None,
    adapter: SegmentAdapter | None,
    pairs: Sequence[Pair],
    folds: Sequence[int | None] | None = None,
) -> np.ndarray:
    """Probabilities under shared + the segment's adapter, shared alone, or zero-shot cosine if no shared.
    `folds` when the pairs are events (see `ClickModel.history_features`)."""
    if shared is None:
        return zero_shot_scores(backbone, pretrained_encoder(backbone), pairs)
    model = shared if adapter is None else with_adapter(shared, adapter)
    return score_pairs(backbone, model, pairs, folds=folds)
