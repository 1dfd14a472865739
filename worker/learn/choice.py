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
KINDS: tuple[ServingKind, ...] = ("zero_shot", "shared", "adapter")
"""In order of preference at a tie: the simpler model serves."""


@dataclass(frozen=True)
class ChoiceRules:
    z: float
    delta: float
    prior_sd: float
    reps: int
    seed: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ChoiceRules:
        return cls(
            settings.gate_z,
            settings.serving_delta,
            settings.serving_prior_sd,
            settings.serving_bootstrap,
            settings.seed,
        )

    def on(self, prior: ServingPrior | None) -> ChoiceRules:
        """These rules with the spread of a shared promotion's prior (`judge_promotion`)."""
        return self if prior is None else replace(self, prior_sd=prior.sd)


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
    choice: ServingKind | None, shared_serves: bool, has_adapter: bool, held_back: bool = False
) -> ServingKind:
    """What serves a segment now, from its last choice (None: none made yet): zero-shot until a shared
    model serves; a zero-shot choice holds across shared promotions until the segment's own evidence
    moves it; `held_back`: the shared model's promotion found it worse than zero-shot on the segment's
    pooled pairs (`held_back`) and the segment made no choice on it since; an adapter serves only while
    the segment has one on the shared model that serves."""
    if not shared_serves or choice == "zero_shot" or held_back:
        return "zero_shot"
    if has_adapter and choice in (None, "adapter"):
        return "adapter"
    return "shared"


def resolve_recorded(
    choice: ServingChoice | None, shared_version: int, has_adapter: bool, held_back: bool
) -> ServingKind:
    """`resolve` from what the registry records, as the learner serves and `models list` shows it:
    `choice` the segment's last one (None: none, or choosing is off), `shared_version` the shared
    champion's (0: none), `has_adapter` its champion was gated on that version, `held_back` that
    version's promotion held it back; a choice made on that version ends the hold-back."""
    kind, chosen_on = (None, None) if choice is None else (choice.kind, choice.shared_version)
    held = still_held_back(held_back, chosen_on, shared_version)
    return resolve(kind, shared_version > 0, has_adapter, held)


def still_held_back(held_back: bool, chosen_on: int | None, shared_version: int | None) -> bool:
    """A shared promotion's hold-back of a segment lasts until the segment makes a choice of its own on
    that shared version (`chosen_on`: the version its last choice was made on)."""
    return held_back and chosen_on != shared_version


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
    labels: np.ndarray, served: np.ndarray, candidate: np.ndarray, prior: float, rules: ChoiceRules
) -> Comparison:
    """The candidate's gain over what serves, own evidence shrunk toward the prior gain `prior`."""
    own = bootstrap_auc_difference(labels, candidate, served, rules.reps, rules.seed)
    tau2 = rules.prior_sd**2
    if own is None:
        return Comparison(None, None, prior, rules.prior_sd)
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
        c = compare(labels, probs[served], probs[kind], gain_prior, rules)
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
    gain = prior_gain(auc(labels, shared), auc(labels, zero_shot))
    names = np.asarray(segments, dtype=object)
    masks = {segment: names == segment for segment in sorted(set(segments))}
    own = [
        d
        for mask in masks.values()
        if (
            d := bootstrap_auc_difference(labels[mask], shared[mask], zero_shot[mask], rules.reps, rules.seed)
        )
    ]
    prior = ServingPrior(gain=gain, sd=prior_spread(own, rules.prior_sd), segments=len(own))
    on_prior = rules.on(prior)
    out: dict[str, Choice] = {}
    for segment, mask in masks.items():
        probs: dict[ServingKind, np.ndarray] = {"zero_shot": zero_shot[mask], "shared": shared[mask]}
        out[segment] = choose("zero_shot", labels[mask], probs, {"shared": gain}, on_prior)
    return prior, out


def kept_on_zero_shot(choices: Mapping[str, Choice]) -> dict[str, Choice]:
    """The segments a shared promotion's choices keep on zero-shot."""
    return {segment: c for segment, c in choices.items() if c.kind == "zero_shot"}
