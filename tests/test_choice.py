"""The per-segment serving choice (`worker.learn.choice`): a segment moves only on evidence, borrows the
pooled evidence when its own is thin, and is never moved against its own clear evidence."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from worker.config import Settings
from worker.learn.choice import (
    ChoiceRules,
    blend,
    bootstrap_auc_difference,
    choose,
    compare,
    judge_promotion,
    kept_from_shared,
    kept_on_zero_shot,
    prior_gain,
    prior_spread,
    resolve,
    standing,
)
from worker.ops.quality import auc

RULES = ChoiceRules(z=1.645, delta=0.02, prior_sd=0.02, reps=400, seed=0)


def _holdout(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(np.float64)
    return labels, rng.random(n)


def _ranking(labels: np.ndarray, signal: float, seed: int) -> np.ndarray:
    """Scores whose AUC grows with `signal` (0: chance)."""
    return labels * signal + np.random.default_rng(seed).random(len(labels))


def test_the_bootstrap_difference_is_the_auc_difference_and_its_spread_shrinks_with_pairs() -> None:
    labels, _ = _holdout(200)
    a, b = _ranking(labels, 0.6, 1), _ranking(labels, 0.2, 2)
    out = bootstrap_auc_difference(labels, a, b, 400, 0)
    assert out is not None
    d, sd = out
    a_auc, b_auc = auc(labels, a), auc(labels, b)
    assert a_auc is not None and b_auc is not None
    assert d == pytest.approx(a_auc - b_auc)
    small = bootstrap_auc_difference(labels[:40], a[:40], b[:40], 400, 0)
    assert small is not None and small[1] > sd > 0
    assert bootstrap_auc_difference(np.ones(10), a[:10], b[:10], 100, 0) is None


def test_thin_evidence_follows_the_pool_and_no_evidence_of_gain_keeps_what_serves() -> None:
    one_class = np.zeros(20)
    probs = {"zero_shot": np.random.default_rng(0).random(20), "shared": np.random.default_rng(1).random(20)}
    assert choose("zero_shot", one_class, probs, {"shared": 0.08}, RULES).kind == "shared"
    assert choose("zero_shot", one_class, probs, {"shared": 0.0}, RULES).kind == "zero_shot"
    assert choose("zero_shot", one_class, probs, {"shared": 0.01}, RULES).kind == "zero_shot"


def test_a_segment_is_never_moved_against_its_own_clear_evidence_of_harm() -> None:
    labels, _ = _holdout(300)
    zero = _ranking(labels, 0.8, 1)
    worse = _ranking(labels, 0.1, 2)
    c = compare(labels, zero, worse, prior=0.2, rules=RULES)
    assert c.own_harm(RULES.z) and c.shrunk > 0, "the pool alone would have moved it"
    choice = choose("zero_shot", labels, {"zero_shot": zero, "shared": worse}, {"shared": 0.2}, RULES)
    assert choice.kind == "zero_shot"
    assert choice.auc["zero_shot"] == auc(labels, zero) and choice.n == 300


def test_clear_own_evidence_moves_a_segment_off_the_pooled_choice() -> None:
    """trade-pros on `shop`: the pool says shared, the segment's own pairs say zero-shot, clearly."""
    labels, _ = _holdout(300)
    zero, shared = _ranking(labels, 0.8, 1), _ranking(labels, 0.2, 2)
    choice = choose("shared", labels, {"zero_shot": zero, "shared": shared}, {"shared": 0.07}, RULES)
    assert choice.kind == "zero_shot" and "replaces shared" in choice.reason


def test_the_best_candidate_that_clears_the_rule_serves() -> None:
    labels, _ = _holdout(400)
    probs = {
        "zero_shot": _ranking(labels, 0.1, 1),
        "shared": _ranking(labels, 0.5, 2),
        "adapter": _ranking(labels, 1.5, 3),
    }
    assert choose("zero_shot", labels, probs, {"shared": 0.05, "adapter": 0.05}, RULES).kind == "adapter"


def test_noise_does_not_move_a_segment() -> None:
    labels, _ = _holdout(60)
    same = _ranking(labels, 0.3, 1)
    noisy = same + np.random.default_rng(9).normal(0, 0.05, len(same))
    assert choose("zero_shot", labels, {"zero_shot": same, "shared": noisy}, {}, RULES).kind == "zero_shot"


@pytest.mark.parametrize(
    ("choice", "shared", "adapter", "served"),
    [
        (None, False, False, "zero_shot"),
        ("adapter", False, True, "zero_shot"),
        (None, True, False, "shared"),
        (None, True, True, "adapter"),
        ("zero_shot", True, True, "zero_shot"),
        ("shared", True, True, "shared"),
        ("adapter", True, False, "shared"),
    ],
)
def test_resolve(choice: str | None, shared: bool, adapter: bool, served: str) -> None:
    assert resolve(choice, shared, adapter) == served  # type: ignore[arg-type]


def test_prior_and_rules_from_settings() -> None:
    assert prior_gain(0.75, 0.7) == pytest.approx(0.05)
    assert prior_gain(None, 0.7) == 0.0
    rules = ChoiceRules.from_settings(Settings(serving_delta=0.05, serving_prior_sd=0.1))
    assert (rules.delta, rules.prior_sd) == (0.05, 0.1)


def test_a_pooled_win_serves_the_segments_it_clears_for_and_holds_back_the_others() -> None:
    """Moving a segment off zero-shot is a move like any other: the shared model serves a segment where
    it clears the rule on the segment's pairs, shrunk toward the pooled gain. Where the segments agree,
    thin evidence follows the pool; where one is clearly hurt, the spread grows, the pool says less about
    a thin segment, and both stay on zero-shot."""
    labels, _ = _holdout(600)
    segments = ["hurt"] * 200 + ["helped"] * 200 + ["thin"] * 4 + ["even"] * 196
    zero = _ranking(labels, 0.3, 1)
    shared = _ranking(labels, 1.2, 2)
    agree = slice(200, 600)
    prior, judged = judge_promotion(segments[agree], labels[agree], shared[agree], zero[agree], RULES)
    assert kept_on_zero_shot(judged) == {}, "every segment gains alike: the shared model serves all"
    assert {s: c.kind for s, c in judged.items()} == {"helped": "shared", "thin": "shared", "even": "shared"}
    helped = judged["helped"]
    assert helped.n == 200 and helped.auc["shared"] == pytest.approx(auc(labels[200:400], shared[200:400]))
    assert helped.auc["zero_shot"] == pytest.approx(auc(labels[200:400], zero[200:400]))
    assert prior.segments == 2 and prior.sd == RULES.prior_sd, "agreeing segments: the least spread"
    hurt = slice(0, 200)
    shared[hurt] = _ranking(labels[hurt], 0.0, 3)
    prior, judged = judge_promotion(segments, labels, shared, zero, RULES)
    back = kept_on_zero_shot(judged)
    assert set(back) == {"hurt", "thin"} and set(judged) == {"hurt", "helped", "thin", "even"}
    assert back["hurt"].kind == "zero_shot" and back["hurt"].n == 200
    assert prior.gain == pytest.approx(auc(labels, shared) - auc(labels, zero))
    assert prior.segments == 3 and prior.sd > 0.1, "the segments disagree: a wide spread"
    prior, judged = judge_promotion(["a"] * 600, labels, zero, zero, RULES)
    assert set(kept_on_zero_shot(judged)) == {"a"} and prior.gain == 0, "no gain: zero-shot keeps serving"


def test_too_few_of_a_class_is_no_evidence() -> None:
    """One positive and one negative resample to themselves: a spread of 0 would read as certainty."""
    labels = np.array([1.0] * 4 + [0.0] * 40)
    a, b = _ranking(labels, 1.0, 1), _ranking(labels, 0.0, 2)
    assert bootstrap_auc_difference(labels, a, b, 400, 0) is None
    assert bootstrap_auc_difference(np.append(labels, 1.0), np.append(a, 2.0), np.append(b, 0.0), 400, 0)
    c = compare(labels, b, a, 0.04, RULES)
    assert c.own is None and c.shrunk == 0.04, "it follows the pool"


def test_the_spread_is_what_the_segments_disagree_beyond_their_noise() -> None:
    assert prior_spread([(0.05, 0.03)], 0.02) == 0.02, "one segment: the floor"
    assert prior_spread([(0.05, 0.03), (0.051, 0.03), (0.049, 0.03)], 0.02) == 0.02, "agree: the floor"
    spread = prior_spread([(0.10, 0.01), (-0.10, 0.01), (0.0, 0.01)], 0.02)
    assert spread == pytest.approx(0.1, rel=0.05), "far apart, each precise: about their own spread"
    assert prior_spread([(0.10, 0.2), (-0.10, 0.2)], 0.02) == 0.02, "apart within their noise: the floor"


def _probs(scores: np.ndarray) -> np.ndarray:
    return np.asarray(scores / (scores.max() + 1.0), dtype=np.float64)


def test_the_blend_mixes_the_logits_and_ranks_between_the_two() -> None:
    labels, _ = _holdout(400)
    zero, shared = _probs(_ranking(labels, 0.2, 1)), _probs(_ranking(labels, 1.0, 2))
    assert np.allclose(blend(zero, shared, 1.0), shared) and np.allclose(blend(zero, shared, 0.0), zero)
    half = blend(zero, shared, 0.5)
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert np.allclose(logit(half), 0.5 * logit(zero) + 0.5 * logit(shared))
    assert auc(labels, zero) < auc(labels, half) < auc(labels, shared)


def test_a_blend_serves_only_while_the_shared_model_does_and_nothing_holds_the_segment_back() -> None:
    assert resolve("blend", True, False) == "blend"
    assert resolve("blend", True, True) == "blend", "the segment chose the blend over its adapter"
    assert resolve("blend", False, False) == "zero_shot"
    assert resolve("blend", True, False, verdict="zero_shot") == "zero_shot"
    assert resolve("adapter", True, True, verdict="blend") == "blend", "a standing blend verdict"
    assert resolve("zero_shot", True, False, verdict="blend") == "blend"


def test_with_the_blend_offered_a_promotion_judges_it_per_segment_with_its_own_narrower_spread() -> None:
    labels, _ = _holdout(600)
    segments = ["a"] * 300 + ["b"] * 300
    zero = _probs(_ranking(labels, 0.3, 1))
    shared = _probs(_ranking(labels, 1.2, 2))
    rules = replace(RULES, blend_weight=0.5)
    prior, judged = judge_promotion(segments, labels, shared, zero, rules)
    assert prior.blend_gain == pytest.approx(auc(labels, blend(zero, shared, 0.5)) - auc(labels, zero))
    assert prior.blend_sd is not None and prior.blend_sd >= RULES.prior_sd * 0.5
    assert rules.spread("blend") == RULES.prior_sd * 0.5 and rules.spread("zero_shot") == 0.0
    assert {c.kind for c in judged.values()} == {"shared"}, "a clear win everywhere: the shared model"
    assert set(judged["a"].auc) == {"zero_shot", "shared", "blend"}
    off_prior, off = judge_promotion(segments, labels, shared, zero, RULES)
    assert off_prior.blend_gain is None and all("blend" not in c.auc for c in off.values())


def test_a_promotions_verdict_stands_until_the_segment_chooses_on_that_version() -> None:
    assert kept_from_shared({"a": "zero_shot", "b": "blend", "c": "shared"}) == {
        "a": "zero_shot",
        "b": "blend",
    }
    assert standing("blend", None, 2) == "blend", "no choice of its own yet"
    assert standing("blend", 1, 2) == "blend", "its last choice was made on the older shared version"
    assert standing("blend", 2, 2) is None, "it chose on this version: its own choice serves"
