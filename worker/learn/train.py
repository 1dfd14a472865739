"""One incremental fine-tune and its gate decision, as pure functions of data in → result out.

Two levels, because pooled knowledge is what carries quality on few-shot segments (DATA.md):
- `train_shared`: full fine-tune of encoder + head on new events of all segments plus a replay sample,
  warm-up then linear decay, AdamW. Gated on pooled events that no model trains on.
- `train_segment_adapter`: LoRA on the shared encoder plus a (scale, bias) calibration of the shared
  head's logit, warm-started from the segment's champion adapter, gated on the segment's holdout slice.

Both are judged by `worker.learn.gate` on two holdout slices: held-out events of queries the models
train on, and the events of queries no model ever trains on; which events are which is the rule of
`worker.learn.training_data`. A training of several epochs (`worker.learn.fit`) stops early and keeps its
best epoch. The shared model also carries the query history (`worker.learn.history`) counted from the
run's events. Both train a copy and never mutate their inputs. A non-finite loss or any exception yields a
`failed` result (never promoted) instead of raising, its traceback logged. Seeded: the same inputs give the
same result on CPU. Holdout numbers come from `worker.ops.quality`, the same code `/metrics` uses.
See docs/learning.md for the measurements behind the defaults.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import structlog

from worker.config import Settings
from worker.events import ClickEvent, ServingKind, ServingPrior
from worker.learn.adapters import SegmentAdapter, attach_lora, extract_adapter, with_adapter
from worker.learn.backbone import Backbone, Pair
from worker.learn.choice import Choice, ChoiceRules, blend, choose, judge_promotion
from worker.learn.click_model import ClickModel, new_click_model
from worker.learn.fit import FitOptions, Fitted, fit, probabilities
from worker.learn.gate import GateRules, Scored, judge
from worker.learn.history import QueryHistory
from worker.learn.scoring import score_pairs
from worker.learn.serving import served_copy
from worker.learn.training_data import labels_of, pairs_of
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
    judged: dict[str, Choice] = field(default_factory=dict)
    """A promoted shared training: each segment of its pooled holdout, served by it or held back on
    zero-shot (`choice.judge_promotion`), and on what evidence."""
    prior: ServingPrior | None = None
    """A promoted shared training: the prior of every segment's serving choice on it."""

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"


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
            result.prior, result.judged = judge_promotion(
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
    if (served == "adapter" and champion_adapter is None) or (
        served == "blend" and not settings.serving_blend
    ):
        served = "shared"
    options: dict[ServingKind, np.ndarray] = {}
    try:
        if held:
            options["zero_shot"] = zero_shot_scores(backbone, pretrained_encoder(backbone), pairs_of(held))
            options["shared"] = probabilities(backbone, _served(shared, settings), held)
            if settings.serving_blend:
                weight = settings.serving_blend_weight
                options["blend"] = blend(options["zero_shot"], options["shared"], weight)
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
        blend_gain = 0.0 if prior is None or prior.blend_gain is None else prior.blend_gain
        priors: dict[ServingKind, float] = {
            "zero_shot": 0.0,
            "blend": blend_gain,
            "shared": gain,
            "adapter": gain,
        }
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


def score_blend(
    backbone: Backbone, pairs: Sequence[Pair], shared_probs: np.ndarray, weight: float
) -> np.ndarray:
    """The blend (`choice.blend`) of the shared model's `shared_probs` with zero-shot's scores of the same
    pairs: what a segment served by the blend is scored with."""
    return blend(score_segment(backbone, None, None, pairs), shared_probs, weight)
