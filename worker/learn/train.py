"""One incremental fine-tune and its gate decision, as pure functions of data in → result out.

Two levels, because pooled knowledge is what carries quality on few-shot segments (DATA.md):
- `train_shared`: full fine-tune of encoder + head on new events of all segments plus a replay sample,
  warm-up then linear decay, AdamW. Gated on pooled events that no model trains on.
- `train_segment_adapter`: LoRA on the shared encoder plus a (scale, bias) calibration of the shared
  head's logit, warm-started from the segment's champion adapter, gated on the segment's holdout slice.

Both are judged by `worker.learn.gate` on two holdout slices: held-out events of queries the models
train on, and the events of queries no model ever trains on (`is_unseen_query`). A training of several
epochs stops early on the same holdout and keeps its best epoch. The shared
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
from worker.events import ClickEvent, ServingKind, ServingPrior
from worker.learn.adapters import SegmentAdapter, attach_lora, extract_adapter, with_adapter
from worker.learn.backbone import Backbone, Pair
from worker.learn.choice import Choice, ChoiceRules, choose, judge_promotion
from worker.learn.click_model import ClickModel, new_click_model
from worker.learn.gate import GateRules, Scored, judge
from worker.learn.history import QueryHistory, fold_of, query_key
from worker.learn.scoring import score_pairs
from worker.learn.serving import served_copy
from worker.learn.zero_shot import pretrained_encoder, zero_shot_scores
from worker.ops.quality import HoldoutScore, holdout_score

log = structlog.get_logger(__name__)

Decision = Literal["promoted", "rejected", "failed"]


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
    serving: Choice | None = None
    """A segment training: what serves the segment next (`learn.choice`); None: unchanged."""
    zero_shot: HoldoutScore | None = None
    """A shared training: zero-shot on the pooled holdout, the prior of the segments' serving choices."""
    held_back: dict[str, Choice] = field(default_factory=dict)
    """A promoted shared training: the segments it must not serve yet (`choice.judge_promotion`)."""
    prior: ServingPrior | None = None
    """A promoted shared training: the prior of every segment's serving choice on it."""

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


def is_holdout(event_id: str, frac: float) -> bool:
    """Stable membership: an event is in the holdout slice forever, so it is never trained on."""
    digest = hashlib.blake2b(event_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < frac


def is_unseen_query(query: str | None, frac: float) -> bool:
    """Stable membership of a query (as the query history keys it) in the slice no model trains on,
    so every gate can judge how a model does on queries it never saw. Events without a query never are."""
    key = query_key(query)
    if not key or frac <= 0:
        return False
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"unseen-query").digest()
    return int.from_bytes(digest, "big") / 2.0**64 < frac


def is_early_stopping(event_id: str, frac: float) -> bool:
    """Stable membership of a training event in the slice that picks a segment training's epoch: those
    pairs are never trained on and never judge the gate, whose win they would overstate."""
    digest = hashlib.blake2b(event_id.encode(), digest_size=8, person=b"early-stop").digest()
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
    """`holdout`: held-out events of seen queries; `unseen`: events of queries no model trains on (both
    judge the run). `counted`: the events the shared model's query history counts, seen holdout
    included (out-of-fold features keep each event's own label out of its own feature), unseen not."""

    new: list[ClickEvent]
    replay: list[ClickEvent]
    holdout: list[ClickEvent]
    unseen: list[ClickEvent] = field(default_factory=list)
    counted: list[ClickEvent] = field(default_factory=list)
    stop: list[ClickEvent] = field(default_factory=list)
    """A segment training's early-stopping events, apart from the gate's `holdout` and `unseen`."""


@dataclass(frozen=True)
class _Split:
    train_new: list[ClickEvent]
    train_old: list[ClickEvent]
    held: list[ClickEvent]
    unseen: list[ClickEvent]


def _split(new: Sequence[ClickEvent], older: Sequence[ClickEvent], frac: float, unseen_frac: float) -> _Split:
    """One rule for both levels: an unseen query's events are never trained on, and a held-out event id
    is held out in every run. Both memberships are hashes, so they never change between runs."""
    out = _Split([], [], [], [])
    for events, target in ((older, out.train_old), (new, out.train_new)):
        for e in events:
            if is_unseen_query(e.query, unseen_frac):
                out.unseen.append(e)
            elif is_holdout(e.event_id, frac):
                out.held.append(e)
            else:
                target.append(e)
    return out


def _event_id(event: ClickEvent) -> str:
    return event.event_id


def segment_training_data(
    new: Sequence[ClickEvent], older: Sequence[ClickEvent], settings: Settings, run: int
) -> TrainingData:
    """New events minus the segment's held-out ones, a replay sample of its older events, the two
    holdout slices (the segment's held-out events of seen queries, its events of unseen queries) and the
    early-stopping slice of its training events (`is_early_stopping`)."""
    split = _split(new, older, settings.holdout_frac, settings.unseen_query_frac)
    frac = settings.early_stopping_frac if settings.early_stopping_patience > 0 else 0.0
    stop = [e for e in (*split.train_old, *split.train_new) if is_early_stopping(e.event_id, frac)]
    stopping = {e.event_id for e in stop}
    train_new = [e for e in split.train_new if e.event_id not in stopping]
    train_old = [e for e in split.train_old if e.event_id not in stopping]
    replay = sample_replay(train_old, round(len(train_new) * settings.replay_frac), settings.seed + run)
    return TrainingData(train_new, replay, split.held, split.unseen, stop=stop)


def shared_training_data(
    new: Sequence[ClickEvent], older: Sequence[ClickEvent], settings: Settings, run: int
) -> TrainingData:
    """All segments' new events and a replay of older ones, minus the pooled holdout no model trains on:
    a sample of held-out events of seen queries and one of unseen queries' events, each capped.

    Both inputs are put in event-id order first: the shared trainer gathers them partition by partition,
    so without it the replay sample and the shuffled batches would depend on the partition layout and on
    which worker holds the lease, and would differ from the offline simulation's, which sees the stream
    in order."""
    new = sorted(new, key=_event_id)
    older = sorted(older, key=_event_id)
    split = _split(new, older, settings.shared_holdout_frac, settings.unseen_query_frac)
    replay = sample_replay(
        split.train_old, round(len(split.train_new) * settings.shared_replay_frac), settings.seed + run
    )
    cap = settings.shared_holdout_cap
    counted = [*split.train_old, *split.train_new, *split.held]
    return TrainingData(
        split.train_new,
        replay,
        sample_replay(split.held, cap, settings.seed),
        sample_replay(split.unseen, cap, settings.seed),
        counted,
    )


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


@dataclass
class _Attempt:
    """One training as it goes: what it measured so far, so a failure at any step still reports the
    champion's score and the losses of a finished `fit`, and both trainers end the same way.

    The holdout is the seen-query slice followed by the unseen-query slice; the champion's
    probabilities on it are kept for the paired gate."""

    scope: Literal["segment", "shared"]
    backbone: Backbone
    settings: Settings
    holdout: list[ClickEvent]
    n_unseen: int
    started: float = field(default_factory=time.perf_counter)
    champion: HoldoutScore | None = None
    champion_probs: np.ndarray | None = None
    losses: list[float] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return labels_of(self.holdout)

    @property
    def unseen(self) -> np.ndarray:
        """Which holdout pairs are of unseen queries: the honest part, on which serving is chosen."""
        mask = np.zeros(len(self.holdout), dtype=bool)
        mask[len(self.holdout) - self.n_unseen :] = True
        return mask

    def measure_champion(self, probs: np.ndarray | None) -> None:
        self.champion_probs = probs
        self.champion = None if probs is None or not self.holdout else holdout_score(self.labels, probs)

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
        probs: np.ndarray,
        fitted: Fitted,
        n_train: int,
        *,
        adapter: SegmentAdapter | None = None,
        shared: ClickModel | None = None,
    ) -> TrainResult:
        labels, unseen = self.labels, self.unseen
        rules = (
            GateRules.for_shared(self.settings)
            if self.scope == "shared"
            else GateRules.for_segment(self.settings)
        )
        ok, reason = judge(Scored(labels, probs, self.champion_probs, unseen), rules)
        return TrainResult(
            decision="promoted" if ok else "rejected",
            reason=reason,
            challenger=holdout_score(labels, probs),
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
    unseen: Sequence[ClickEvent] = (),
) -> TrainResult:
    """Fine-tune a copy of the shared model (encoder + head) on new + replayed events, then gate it.

    `model` is where training continues from (None: the pretrained encoder with a fresh head).
    `champion` is what serves now: by default `model`; None means no shared model serves yet, so the
    challenger must beat zero-shot cosine on the holdout. A rejected challenger is still returned in
    `shared`, so a caller may keep training from it while the champion keeps serving.
    The gate judges on `holdout_events` (seen queries) and `unseen` (queries no model trains on).
    With `settings.query_history` the challenger gets a new query history table counted from `counted`
    (default: the new, replayed and seen holdout events), and the champion is gated with that same table.
    """
    held = [*holdout_events, *unseen]
    attempt = _Attempt("shared", backbone, settings, held, len(unseen))
    events = [*new_events, *replay_events]
    try:
        serving = model if isinstance(champion, _Same) else champion
        table = (
            QueryHistory.from_events(
                [*new_events, *replay_events, *holdout_events] if counted is None else counted
            )
            if settings.query_history
            else None
        )
        zero = zero_shot_scores(backbone, pretrained_encoder(backbone), pairs_of(held)) if held else None
        if serving is None:
            attempt.measure_champion(zero)
        else:
            champion_view = _with_history(_served(serving, settings), table)
            attempt.measure_champion(probabilities(backbone, champion_view, held))
        challenger_model = new_click_model(backbone, settings.seed) if model is None else copy.deepcopy(model)
        for param in challenger_model.parameters():
            param.requires_grad = True
        challenger_model.calibration.requires_grad = False
        challenger_model.query_history = table
        fitted = fit(backbone, challenger_model, events, FitOptions.for_shared(settings), holdout=held)
        attempt.losses = fitted.losses
        probs = probabilities(backbone, _served(challenger_model, settings), held)
    except Exception as exc:
        return attempt.failed(exc)
    result = attempt.judged(probs, fitted, len(events), shared=challenger_model)
    if zero is not None:
        result.zero_shot = holdout_score(attempt.labels, zero)
        if result.promoted and settings.serving_choice:
            rules = ChoiceRules.from_settings(settings)
            unseen_only = attempt.unseen
            result.prior, result.held_back = judge_promotion(
                [e.segment for e, u in zip(held, unseen_only, strict=True) if u],
                attempt.labels[unseen_only],
                probs[unseen_only],
                zero[unseen_only],
                rules,
            )
    return result


def _int8(settings: Settings) -> bool:
    return settings.scoring_precision == "int8"


def _served(model: ClickModel, settings: Settings, adapter: SegmentAdapter | None = None) -> ClickModel:
    """The model as the worker serves it, for the gate to judge: with int8 scoring, `model` (and
    `adapter`, merged) quantised (`served_copy`); in fp32, `model` with `adapter` injected as trained."""
    if _int8(settings):
        return served_copy(model, adapter, int8=True)
    return model if adapter is None else with_adapter(model, adapter, settings.seed)


def _with_history(model: ClickModel, table: QueryHistory | None) -> ClickModel:
    """The champion as the gate scores it: its weights with the challenger's history table, so both sides
    of a gate read the same features (the champion's own table was counted from other, older events)."""
    if table is None or model.query_history is None:
        return model
    view = copy.copy(model)
    view.query_history = table
    return view


def train_segment_adapter(
    backbone: Backbone,
    shared: ClickModel,
    champion_adapter: SegmentAdapter | None,
    new_events: Sequence[ClickEvent],
    replay_events: Sequence[ClickEvent],
    holdout_events: Sequence[ClickEvent],
    settings: Settings,
    unseen: Sequence[ClickEvent] = (),
    stop: Sequence[ClickEvent] = (),
    served: ServingKind = "shared",
    prior: ServingPrior | None = None,
) -> TrainResult:
    """Train the segment's LoRA + calibration on the shared model, warm-started from its champion, gate
    it against what serves the segment now (`served`), then choose what serves it next.

    On the segment's held-out events of seen queries and its events of unseen ones, zero-shot, the shared
    model alone and the shared model with the champion adapter are scored as they are served. The gate
    compares the challenger with `served`: a promoted adapter serves. Otherwise `learn.choice` picks among
    the others on the unseen queries' pairs alone, with the shared model's promotion's `prior` (None: no
    pooled evidence, the segment's own decides). The epoch is picked on `stop`, never on the gate's pairs.
    """
    held = [*holdout_events, *unseen]
    attempt = _Attempt("segment", backbone, settings, held, len(unseen))
    events = [*new_events, *replay_events]
    if served == "adapter" and champion_adapter is None:
        served = "shared"
    options: dict[ServingKind, np.ndarray] = {}
    try:
        if held:
            options["zero_shot"] = zero_shot_scores(backbone, pretrained_encoder(backbone), pairs_of(held))
            options["shared"] = probabilities(backbone, _served(shared, settings), held)
            if champion_adapter is not None:
                serving = _served(shared, settings, champion_adapter)
                options["adapter"] = probabilities(backbone, serving, held)
                del serving
        attempt.measure_champion(options.get(served))
        if champion_adapter is None:
            seg = attach_lora(
                shared, settings.lora_rank, settings.lora_alpha, settings.lora_dropout, settings.seed
            )
        else:
            seg = with_adapter(shared, champion_adapter, settings.seed)
        fitted = fit(backbone, seg, events, FitOptions.for_segment(settings), holdout=stop)
        attempt.losses = fitted.losses
        adapter = extract_adapter(seg)
        probs = probabilities(backbone, served_copy(shared, adapter, True) if _int8(settings) else seg, held)
    except Exception as exc:
        return attempt.failed(exc)
    result = attempt.judged(probs, fitted, len(events), adapter=adapter)
    if not settings.serving_choice:
        return result
    if result.promoted:
        aucs: dict[ServingKind, float | None] = {
            k: holdout_score(attempt.labels, v).auc for k, v in options.items()
        }
        aucs["adapter"] = None if result.challenger is None else result.challenger.auc
        result.serving = Choice(
            "adapter", len(held), aucs, f"adapter promoted over {served}: {result.reason}"
        )
    elif not held:
        result.serving = Choice(served, 0, {}, f"{served} keeps serving: no held-out pairs")
    else:
        unseen_only = attempt.unseen
        gain = 0.0 if prior is None else prior.gain
        priors: dict[ServingKind, float] = {"zero_shot": 0.0, "shared": gain, "adapter": gain}
        result.serving = choose(
            served,
            attempt.labels[unseen_only],
            {k: v[unseen_only] for k, v in options.items()},
            priors,
            ChoiceRules.from_settings(settings).on(prior),
        )
    return result


def score_segment(
    backbone: Backbone,
    shared: ClickModel | None,
    adapter: SegmentAdapter | None,
    pairs: Sequence[Pair],
    folds: Sequence[int | None] | None = None,
    int8: bool = False,
) -> np.ndarray:
    """Probabilities under shared + the segment's adapter, shared alone, or zero-shot cosine if no shared;
    `int8` as the worker scores with int8 (`served_copy`). `folds` when the pairs are events (see
    `ClickModel.history_features`)."""
    if shared is None:
        return zero_shot_scores(backbone, pretrained_encoder(backbone), pairs)
    if int8:
        return score_pairs(backbone, served_copy(shared, adapter, True), pairs, folds=folds)
    model = shared if adapter is None else with_adapter(shared, adapter)
    return score_pairs(backbone, model, pairs, folds=folds)
