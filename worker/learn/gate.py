"""Whether a challenger may replace what serves: the one promotion rule, for shared models and adapters.

"A worse model is never published" has to hold where data is scarce, so the gate knows its own noise:
- it judges both models on the same held-out pairs, paired, with DeLong's standard error of the AUC
  difference (`worker.ops.quality.auc_difference`), so a win within the noise of a small holdout is
  no win, and a clear one on a few hundred pairs is;
- it judges on two slices: held-out events of queries the models trained on (*seen*) and events of
  queries no model ever trains on (*unseen*: `training_data.is_unseen_query`), because every shop gets new
  queries every day and training can help the first while it hurts the second;
- it needs `min_holdout` pairs before anything is replaced. Zero-shot is a champion like any other.

Pure: labels and probabilities in, a verdict out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.config import Settings
from worker.ops.quality import Difference, auc_difference, log_loss, logloss_gain


@dataclass(frozen=True)
class GateRules:
    """`z`: standard errors a gain must clear and a loss must exceed; `auc_tolerance`: how far a
    challenger may trail beyond that (tests and benchmarks open the gate with it)."""

    z: float
    min_holdout: int
    logloss_margin: float
    auc_tolerance: float

    @classmethod
    def for_shared(cls, settings: Settings) -> GateRules:
        return cls(
            settings.gate_z,
            settings.shared_min_holdout,
            settings.gate_logloss_margin,
            settings.gate_auc_tolerance,
        )

    @classmethod
    def for_segment(cls, settings: Settings) -> GateRules:
        return cls(
            settings.gate_z,
            settings.gate_min_holdout,
            settings.gate_logloss_margin,
            settings.gate_auc_tolerance,
        )


@dataclass(frozen=True)
class Scored:
    """One holdout as the gate reads it: labels, both models' probabilities on the same pairs (champion
    None: nothing comparable serves), and which pairs belong to unseen queries."""

    labels: np.ndarray
    challenger: np.ndarray
    champion: np.ndarray | None
    unseen: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.labels)
        if (
            len(self.challenger) != n
            or len(self.unseen) != n
            or (self.champion is not None and len(self.champion) != n)
        ):
            raise ValueError("labels, probabilities and the unseen mask must have the same length")


SLICES = ("seen", "unseen")


def _slice_mask(scored: Scored, name: str) -> np.ndarray:
    return np.asarray(scored.unseen if name == "unseen" else ~scored.unseen, dtype=bool)


def judge(scored: Scored, rules: GateRules) -> tuple[bool, str]:
    """(promote, reason). Promote only if, on enough pairs, the challenger loses on neither slice beyond
    the noise, its log loss is within the margin, and it wins beyond the noise: on AUC, or on log loss
    with an AUC that is not lower, pooled or on either slice. A calibration win alone must not let in a
    model that ranks new queries worse: zero-shot's probabilities come from a fixed mapping, so almost
    any trained head beats its log loss (on a 10,000-event shop one did by 0.16 while its AUC on unseen
    queries was 0.010 lower, and three segments' held-out new queries fell below zero-shot)."""
    n = len(scored.labels)
    if n == 0:
        return False, "no holdout events to judge the challenger"
    if not np.all(np.isfinite(scored.challenger)):
        return False, "challenger log loss is not finite"
    if n < rules.min_holdout:
        return False, f"holdout of {n} pairs < minimum {rules.min_holdout}: the champion keeps serving"
    if scored.champion is None or not np.all(np.isfinite(scored.champion)):
        return True, f"no comparable champion; {n} holdout pairs"
    z, tol = rules.z, rules.auc_tolerance
    y, a, b = scored.labels, scored.challenger, scored.champion
    per_slice: dict[str, Difference] = {}
    for name in SLICES:
        mask = _slice_mask(scored, name)
        diff = auc_difference(y[mask], a[mask], b[mask]) if mask.any() else None
        if diff is None:
            continue
        per_slice[name] = diff
        if diff.upper(z) < -tol:
            return False, f"AUC on {name} queries {diff}: a loss beyond the noise (z={z:g})"
    loss_a, loss_b = log_loss(y, a), log_loss(y, b)
    assert loss_a is not None and loss_b is not None
    if loss_a > loss_b + rules.logloss_margin:
        return False, (
            f"holdout log loss {loss_a:.4f} > champion {loss_b:.4f} + margin {rules.logloss_margin:g}"
        )
    pooled = auc_difference(y, a, b)
    gain = logloss_gain(y, a, b)
    slices = ", ".join(f"{k} {v}" for k, v in per_slice.items())
    auc_win = pooled is not None and pooled.lower(z) > -tol
    not_lower = (pooled is None or pooled.delta >= -tol) and all(d.delta >= -tol for d in per_slice.values())
    loss_win = gain is not None and gain.lower(z) > 0 and not_lower
    if auc_win or loss_win:
        won = f"AUC {pooled}" if auc_win else f"log loss {gain} lower, AUC {pooled}"
        return True, f"{won}; slices: {slices or 'one class only'}"
    return False, (
        f"AUC {pooled}, log loss gain {gain}: no gain beyond the noise of {n} pairs (z={z:g}); "
        f"slices: {slices or 'one class only'}"
    )
