"""What serves each segment: zero-shot, the shared model, or the shared model with its adapter.

The promise "never serve worse than what you had" is per segment, so each segment is judged on its own
held-out pairs of unseen queries (pairs of queries a model trained on flatter it, and new queries are
what it must serve), and moves away from what serves it only on evidence (`../shared/DESIGN.md`):
- paired, on the same pairs, with a stratified bootstrap of the AUC difference (positives and negatives
  resampled apart), which holds better than DeLong's normal approximation at 20-200 pairs;
- shrunk toward the pooled evidence (empirical Bayes: the prior is the shared model's pooled gain over
  zero-shot, its spread estimated across the segments at each shared promotion, `prior_spread`, never
  below `serving_prior_sd`): a segment with thin evidence follows the pool, one with a lot its own;
- decided on a one-sided lower bound: a candidate replaces what serves only when the shrunk difference
  is positive and its lower bound is above `-serving_delta`;
- and never against the segment's own clear evidence: when its own bound says the candidate is worse,
  or that it is better than what serves, the pool cannot overrule it.

Pure: labels and probabilities in, a choice out. The worker's segment trainings (`train`), `eval` and
`eval --live` reach it through the same `train.train_segment_adapter`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from worker.config import Settings
from worker.events import ServingChoice, ServingKind, ServingPrior
from worker.ops.quality import auc

MIN_PER_CLASS = 5
"""Positives and negatives a segment needs for its own evidence to count; with fewer it follows the pool."""
KINDS: tuple[ServingKind, ...] = ("zero_shot", "blend", "shared", "adapter")
"""In order of preference at a tie: the simpler model serves."""


@dataclass(frozen=True)
class ChoiceRules:
    z: float
    delta: float
    prior_sd: float
    reps: int
    seed: int
    blend_weight: float | None = None
    """The shared model's weight in the blend (None: no blend is offered)."""
    blend_sd: float | None = None
    """The blend's spread (None: `prior_sd` times `blend_weight`: a blend moves a segment by part of
    what the shared model moves it, so its gain varies less from segment to segment)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> ChoiceRules:
        return cls(
            settings.gate_z,
            settings.serving_delta,
            settings.serving_prior_sd,
            settings.serving_bootstrap,
            settings.seed,
            settings.serving_blend_weight if settings.serving_blend else None,
        )

    def on(self, prior: ServingPrior | None) -> ChoiceRules:
        """These rules with the spreads of a shared promotion's prior (`judge_promotion`)."""
        if prior is None:
            return self
        return replace(self, prior_sd=prior.sd, blend_sd=prior.blend_sd)

    def spread(self, kind: ServingKind) -> float:
        """How much `kind`'s gain over zero-shot varies from segment to segment (zero-shot: none)."""
        if kind == "zero_shot":
            return 0.0
        if kind == "blend":
            floor = self.prior_sd * (self.blend_weight or 1.0)
            return floor if self.blend_sd is None else max(self.blend_sd, floor)
        return self.prior_sd


def blend(zero_shot: np.ndarray, shared: np.ndarray, weight: float) -> np.ndarray:
    """Probabilities of the blend: `weight` of the shared model's logit, the rest zero-shot's."""
    eps = 1e-7
    z, s = (np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps) for p in (zero_shot, shared))
    logit = weight * np.log(s / (1 - s)) + (1 - weight) * np.log(z / (1 - z))
    out: np.ndarray = 1.0 / (1.0 + np.exp(-logit))
    return out


@dataclass(frozen=True)
class Comparison:
    """Candidate minus served on the segment's pairs: its own estimate and spread (None: no evidence,
    one class only) and the estimate after shrinking toward the pooled prior."""

    own: float | None
    own_sd: float | None
    shrunk: float
    shrunk_sd: float

    def lower(self, z: float) -> float:
        return self.shrunk - z * self.shrunk_sd

    def own_harm(self, z: float) -> bool:
        """The segment's own pairs say the candidate is worse, beyond their noise."""
        return self.own is not None and self.own_sd is not None and self.own + z * self.own_sd < 0

    def own_win(self, z: float) -> bool:
        """The segment's own pairs say the candidate is better, beyond their noise."""
        return self.own is not None and self.own_sd is not None and self.own - z * self.own_sd > 0

    def clears(self, z: float, delta: float) -> bool:
        """Shrunk evidence of no harm, never against the segment's own clear evidence either way."""
        if self.own_harm(z):
            return False
        return self.own_win(z) or (self.shrunk > 0 and self.lower(z) > -delta)


@dataclass(frozen=True)
class Choice:
    kind: ServingKind
    n: int
    auc: dict[ServingKind, float | None]
    reason: str


def resolve(
    choice: ServingKind | None, shared_serves: bool, has_adapter: bool, verdict: ServingKind | None = None
) -> ServingKind:
    """What serves a segment now, from its last choice (None: none made yet): zero-shot until a shared
    model serves; `verdict` a standing verdict of the shared model's promotion that keeps the segment
    from the shared model alone (`kept_from_shared`: zero-shot or the blend); a zero-shot choice holds
    across shared promotions until the segment's own evidence moves it; an adapter serves only while
    the segment has one on the shared model that serves."""
    if not shared_serves:
        return "zero_shot"
    if verdict is not None:
        return verdict
    if choice == "zero_shot":
        return "zero_shot"
    if has_adapter and choice in (None, "adapter"):
        return "adapter"
    return "blend" if choice == "blend" else "shared"


def resolve_recorded(
    choice: ServingChoice | None, shared_version: int, has_adapter: bool, verdict: ServingKind | None
) -> ServingKind:
    """`resolve` from what the registry records, as the learner serves and `models list` shows it:
    `choice` the segment's last one (None: none, or choosing is off), `shared_version` the shared
    champion's (0: none), `has_adapter` its champion was gated on that version, `verdict` what that
    version's promotion kept the segment on (`kept_from_shared`)."""
    kind, chosen_on = (None, None) if choice is None else (choice.kind, choice.shared_version)
    return resolve(kind, shared_version > 0, has_adapter, standing(verdict, chosen_on, shared_version))


def standing(
    verdict: ServingKind | None, chosen_on: int | None, shared_version: int | None
) -> ServingKind | None:
    """A shared promotion's verdict on a segment stands until the segment makes a choice of its own on
    that shared version (`chosen_on`: the version its last choice was made on)."""
    return verdict if chosen_on != shared_version else None


def prior_gain(shared_auc: float | None, zero_shot_auc: float | None) -> float:
    """The shared model's pooled AUC gain over zero-shot, the prior of every segment's choice (0 when
    either is unknown: the segment's own evidence alone decides)."""
    if shared_auc is None or zero_shot_auc is None:
        return 0.0
    return shared_auc - zero_shot_auc


def bootstrap_auc_difference(
    labels: np.ndarray, a: np.ndarray, b: np.ndarray, reps: int, seed: int
) -> tuple[float, float] | None:
    """AUC(a) - AUC(b) and its stratified-bootstrap standard deviation; None with fewer than
    `MIN_PER_CLASS` positives or negatives, whose bootstrap cannot show their noise (one positive and
    one negative resample to themselves: a spread of 0)."""
    y = np.asarray(labels) > 0.5
    if min(int(y.sum()), int((~y).sum())) < MIN_PER_CLASS:
        return None
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)

    def wins(s: np.ndarray) -> np.ndarray:
        pos, neg = s[y][:, None], s[~y][None, :]
        out: np.ndarray = (pos > neg) + 0.5 * (pos == neg)
        return out

    d = wins(a) - wins(b)
    n_pos, n_neg = d.shape
    rng = np.random.default_rng(seed)
    w_pos = rng.multinomial(n_pos, np.full(n_pos, 1.0 / n_pos), size=reps).astype(np.float64)
    w_neg = rng.multinomial(n_neg, np.full(n_neg, 1.0 / n_neg), size=reps).astype(np.float64)
    diffs = np.einsum("bi,ij,bj->b", w_pos, d, w_neg) / (n_pos * n_neg)
    return float(d.mean()), float(diffs.std(ddof=1))


def compare(
    labels: np.ndarray,
    served: np.ndarray,
    candidate: np.ndarray,
    prior: float,
    rules: ChoiceRules,
    spread: float | None = None,
) -> Comparison:
    """The candidate's gain over what serves, own evidence shrunk toward the prior gain `prior`, whose
    spread across segments is `spread` (default `rules.prior_sd`)."""
    own = bootstrap_auc_difference(labels, candidate, served, rules.reps, rules.seed)
    prior_sd = rules.prior_sd if spread is None else spread
    tau2 = prior_sd**2
    if own is None:
        return Comparison(None, None, prior, prior_sd)
    d, sd = own
    var = max(sd * sd, 1e-12)
    weight = tau2 / (tau2 + var)
    return Comparison(d, sd, weight * d + (1 - weight) * prior, math.sqrt(weight * var))


def choose(
    served: ServingKind,
    labels: np.ndarray,
    probs: Mapping[ServingKind, np.ndarray],
    prior: Mapping[ServingKind, float],
    rules: ChoiceRules,
) -> Choice:
    """What serves the segment next: `served` unless a candidate in `probs` clears the rule; of those
    that do, the one with the largest shrunk gain. `prior`: each kind's pooled gain over zero-shot (the
    shared gate's; an adapter's is the shared model's, which it starts from). `served` must be in `probs`."""
    aucs: dict[ServingKind, float | None] = {k: auc(labels, p) for k, p in probs.items()}
    compared: list[tuple[float, ServingKind, Comparison]] = []
    for kind in KINDS:
        if kind == served or kind not in probs:
            continue
        gain_prior = prior.get(kind, 0.0) - prior.get(served, 0.0)
        spread = max(rules.spread(kind), rules.spread(served))
        c = compare(labels, probs[served], probs[kind], gain_prior, rules, spread)
        compared.append((c.shrunk, kind, c))
    n = len(labels)
    clearing = [x for x in compared if x[2].clears(rules.z, rules.delta)]
    if not clearing:
        best = max(compared, default=None, key=lambda x: x[0])
        why = "" if best is None else f" (best, {best[1]}: {_evidence(best[2], rules.z)})"
        return Choice(
            served, n, aucs, f"{served} keeps serving: no candidate clears the rule on {n} pairs{why}"
        )
    _, kind, c = max(clearing, key=lambda x: x[0])
    return Choice(
        kind, n, aucs, f"{kind} replaces {served}: {_evidence(c, rules.z)} > -{rules.delta:g} on {n} pairs"
    )


def _evidence(c: Comparison, z: float) -> str:
    own = "no own evidence" if c.own is None else f"own {c.own:+.3f} ± {c.own_sd:.3f}"
    return f"gain {c.shrunk:+.3f} ({own}), lower bound {c.lower(z):+.3f}"


def prior_spread(own: Sequence[tuple[float, float]], floor: float) -> float:
    """How much the true gain varies from segment to segment, from each segment's own estimate and its
    standard deviation (DerSimonian-Laird's method of moments: the spread of the estimates beyond what
    their noise explains), never below `floor`. A pool whose segments disagree lets each segment's own
    evidence weigh more."""
    if len(own) < 2:
        return floor
    d = np.array([x for x, _ in own])
    w = 1.0 / np.maximum(np.array([sd for _, sd in own]) ** 2, 1e-12)
    mean = float((w * d).sum() / w.sum())
    q = float((w * (d - mean) ** 2).sum())
    c = float(w.sum() - (w * w).sum() / w.sum())
    tau2 = max(0.0, (q - (len(own) - 1)) / c) if c > 0 else 0.0
    return max(floor, math.sqrt(tau2))


def judge_promotion(
    segments: Sequence[str],
    labels: np.ndarray,
    shared: np.ndarray,
    zero_shot: np.ndarray,
    rules: ChoiceRules,
) -> tuple[ServingPrior, dict[str, Choice]]:
    """A promoted shared model, per segment, on the pooled holdout's pairs (the caller passes those of
    unseen queries): the prior of every segment's choice on it (the pooled gain over zero-shot, and its
    spread across these segments), and each of these segments' choice, `zero_shot` for those it must
    not serve yet (`held_back`). Moving a segment off zero-shot
    is a move like any other: the shared model serves a segment only where it clears the rule against
    zero-shot on the segment's pairs, shrunk toward the pooled gain, so thin evidence follows the pool and
    a pooled win does not silently move a segment its own pairs say it may serve worse. A segment with
    no pairs here follows the pool."""
    names = np.asarray(segments, dtype=object)
    masks = {segment: names == segment for segment in sorted(set(segments))}

    def pooled(candidate: np.ndarray, floor: float) -> tuple[float, float, int]:
        own = [
            d
            for mask in masks.values()
            if (
                d := bootstrap_auc_difference(
                    labels[mask], candidate[mask], zero_shot[mask], rules.reps, rules.seed
                )
            )
        ]
        return prior_gain(auc(labels, candidate), auc(labels, zero_shot)), prior_spread(own, floor), len(own)

    gain, sd, counted = pooled(shared, rules.prior_sd)
    prior = ServingPrior(gain=gain, sd=sd, segments=counted)
    candidates: dict[ServingKind, np.ndarray] = {"zero_shot": zero_shot, "shared": shared}
    if rules.blend_weight is not None:
        candidates["blend"] = blend(zero_shot, shared, rules.blend_weight)
        blend_gain, blend_sd, _ = pooled(candidates["blend"], rules.spread("blend"))
        prior = prior.model_copy(update={"blend_gain": blend_gain, "blend_sd": blend_sd})
    gains: dict[ServingKind, float] = {"shared": gain, "blend": prior.blend_gain or 0.0}
    on_prior = rules.on(prior)
    out: dict[str, Choice] = {}
    for segment, mask in masks.items():
        probs = {kind: p[mask] for kind, p in candidates.items()}
        out[segment] = choose("zero_shot", labels[mask], probs, gains, on_prior)
    return prior, out


def kept_on_zero_shot(choices: Mapping[str, Choice]) -> dict[str, Choice]:
    """The segments a shared promotion's choices keep on zero-shot."""
    return {segment: c for segment, c in choices.items() if c.kind == "zero_shot"}


KEPT_FROM_SHARED: tuple[ServingKind, ...] = ("zero_shot", "blend")
"""The verdicts of a shared promotion that stand against a segment's older choice (`resolve`): they keep
it from the full shared model, which its own pairs did not clear."""


def kept_from_shared(kinds: Mapping[str, ServingKind]) -> dict[str, ServingKind]:
    """Of a shared promotion's verdicts per segment, those that keep a segment from the shared model alone."""
    return {segment: kind for segment, kind in kinds.items() if kind in KEPT_FROM_SHARED}


def recorded_verdicts(
    serves: Mapping[str, ServingChoice], held_back: Mapping[str, ServingChoice]
) -> dict[str, ServingKind]:
    """`kept_from_shared` of a recorded shared promotion (its event's `serves` and `held_back`)."""
    return kept_from_shared({segment: c.kind for segment, c in {**serves, **held_back}.items()})
