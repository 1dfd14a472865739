"""The promotion gate (`worker.learn.gate`) and the paired statistics it reads (`worker.ops.quality`):
a win within the noise of a small holdout keeps the champion, a clear one is promoted, and a loss on
unseen queries is not hidden by a gain on seen ones."""

from __future__ import annotations

import numpy as np
import pytest

from worker.config import Settings
from worker.events import ClickEvent
from worker.learn.gate import GateRules, Scored, judge
from worker.learn.history import query_key
from worker.learn.training_data import is_unseen_query, segment_training_data, shared_training_data
from worker.ops.quality import auc, auc_difference, logloss_gain
from worker.tools.datasets import load_homedepot

RULES = GateRules(z=1.645, min_holdout=30, logloss_margin=0.01, auc_tolerance=0.0)


def _brute_delong(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """DeLong's structural components straight from the definition, O(m n)."""
    comps = []
    for x in (a, b):
        pos, neg = x[y == 1], x[y == 0]
        psi = (pos[:, None] > neg[None, :]).astype(float) + 0.5 * (pos[:, None] == neg[None, :])
        comps.append((psi.mean(axis=1), psi.mean(axis=0), psi.mean()))
    m, n = int((y == 1).sum()), int((y == 0).sum())
    s10 = np.cov(np.stack([comps[0][0], comps[1][0]]))
    s01 = np.cov(np.stack([comps[0][1], comps[1][1]]))
    c = np.array([1.0, -1.0])
    return comps[0][2] - comps[1][2], float(np.sqrt(c @ s10 @ c / m + c @ s01 @ c / n))


@pytest.mark.parametrize("seed", range(5))
def test_auc_difference_is_delong(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    a = np.round(y + rng.normal(0, 1.5, n), 1)  # rounded: ties, as real probabilities have
    b = np.round(0.5 * a + y * 0.3 + rng.normal(0, 1, n), 1)
    diff = auc_difference(y, a, b)
    assert diff is not None
    delta, se = _brute_delong(y, a, b)
    auc_a, auc_b = auc(y, a), auc(y, b)
    assert auc_a is not None and auc_b is not None
    assert diff.delta == pytest.approx(auc_a - auc_b, abs=1e-12) == pytest.approx(delta, abs=1e-12)
    assert diff.se == pytest.approx(se, rel=1e-9) and diff.n == n


def test_auc_difference_edges() -> None:
    assert auc_difference([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1]) is None
    single = auc_difference([0, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    assert single is not None and single.se == float("inf") and single.delta == 1.0
    same = auc_difference([0, 1, 0, 1], [0.1, 0.7, 0.4, 0.6], [0.1, 0.7, 0.4, 0.6])
    assert same is not None and same.delta == 0.0 and same.se == 0.0


def _scores(n: int, seed: int, signal_a: float, signal_b: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two models that share most of their noise (as a challenger and the champion it came from)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(np.float64)
    shared_noise = rng.normal(0, 1, n)
    a = 1 / (1 + np.exp(-(signal_a * (2 * y - 1) + shared_noise + rng.normal(0, 0.6, n))))
    b = 1 / (1 + np.exp(-(signal_b * (2 * y - 1) + shared_noise + rng.normal(0, 0.6, n))))
    return y, a, b


def _seen(n: int) -> np.ndarray:
    return np.zeros(n, dtype=bool)


def test_a_win_within_the_noise_of_a_small_holdout_keeps_the_champion() -> None:
    y, a, b = _scores(40, 0, 0.6, 0.5)
    diff = auc_difference(y, a, b)
    assert diff is not None and diff.delta > 0, "the challenger is ahead on its point estimate"
    ok, reason = judge(Scored(y, a, b, _seen(40)), RULES)
    assert not ok and "no gain beyond the noise" in reason


def test_the_same_gain_on_a_large_holdout_is_promoted() -> None:
    y, a, b = _scores(4000, 0, 0.6, 0.5)
    ok, reason = judge(Scored(y, a, b, _seen(4000)), RULES)
    assert ok, reason
    assert reason.startswith("AUC +")


def test_a_clearly_better_challenger_is_promoted_on_a_few_hundred_pairs() -> None:
    y, a, b = _scores(300, 5, 1.5, 0.3)
    ok, reason = judge(Scored(y, a, b, _seen(300)), RULES)
    assert ok, reason


def test_better_on_seen_queries_but_worse_on_unseen_ones_is_rejected() -> None:
    ys, as_, bs = _scores(600, 11, 1.6, 0.4)
    yu, au, bu = _scores(200, 12, 0.3, 1.0)
    y, a, b = np.r_[ys, yu], np.r_[as_, au], np.r_[bs, bu]
    unseen = np.r_[np.zeros(600, dtype=bool), np.ones(200, dtype=bool)]
    pooled = auc_difference(y, a, b)
    assert pooled is not None and pooled.lower(1.645) > 0, "pooled, the challenger wins clearly"
    ok, reason = judge(Scored(y, a, b, unseen), RULES)
    assert not ok and "unseen" in reason
    ok_seen_only, _ = judge(Scored(ys, as_, bs, _seen(600)), RULES)
    assert ok_seen_only


def test_a_holdout_below_the_minimum_replaces_nothing() -> None:
    y, a, b = _scores(300, 5, 1.5, 0.3)
    ok, reason = judge(Scored(y, a, b, _seen(300)), GateRules(1.0, 301, 0.01, 0.0))
    assert not ok and "minimum 301" in reason
    ok_none, reason_none = judge(Scored(y[:20], a[:20], None, _seen(20)), RULES)
    assert not ok_none and "minimum" in reason_none


def test_no_champion_broken_and_empty() -> None:
    y, a, _ = _scores(100, 1, 1.0, 1.0)
    assert judge(Scored(y, a, None, _seen(100)), RULES)[0]
    nan = a.copy()
    nan[3] = np.nan
    assert not judge(Scored(y, nan, a, _seen(100)), RULES)[0]
    empty = np.empty(0)
    assert judge(Scored(empty, empty, empty, np.empty(0, dtype=bool)), RULES) == (
        False,
        "no holdout events to judge the challenger",
    )
    with pytest.raises(ValueError):
        Scored(y, a[:5], None, _seen(100))


def test_log_loss_rules() -> None:
    y, _, b = _scores(2000, 7, 1.0, 1.0)
    logit = np.log(b / (1 - b))
    overconfident = 1 / (1 + np.exp(-3 * logit))
    ok, reason = judge(Scored(y, overconfident, b, _seen(2000)), RULES)
    assert not ok and "log loss" in reason, "same ranking, much worse log loss"
    gain = logloss_gain(y, b, overconfident)
    assert gain is not None and gain.lower(1.645) > 0
    ok, reason = judge(Scored(y, b, overconfident, _seen(2000)), RULES)
    assert ok and reason.startswith("log loss"), "same ranking, clearly better calibrated"


def test_a_calibration_win_does_not_let_in_a_model_that_ranks_unseen_queries_lower() -> None:
    """As on the 10,000-event shop: far better log loss than zero-shot's fixed mapping, the pooled AUC a
    little higher, the unseen queries' AUC a little lower (all within the noise)."""
    ys, as_, bs = _scores(300, 34, 1.1, 1.0)
    yu, au, bu = _scores(300, 134, 0.95, 1.0)
    y, a, b = np.r_[ys, yu], np.r_[as_, au], np.r_[bs, bu]
    unseen = np.r_[np.zeros(300, dtype=bool), np.ones(300, dtype=bool)]
    logit = np.log(b / (1 - b))
    fixed_mapping = 1 / (1 + np.exp(-3 * logit))  # the champion's ranking, badly calibrated
    on_unseen = auc_difference(yu, au, fixed_mapping[300:])
    pooled = auc_difference(y, a, fixed_mapping)
    gain = logloss_gain(y, a, fixed_mapping)
    assert on_unseen is not None and on_unseen.delta < 0 and on_unseen.upper(1.645) > 0, "lower, in the noise"
    assert pooled is not None and pooled.delta > 0 and pooled.lower(1.645) < 0, "higher, in the noise"
    assert gain is not None and gain.lower(1.645) > 0, "a clear log-loss win"
    ok, reason = judge(Scored(y, a, fixed_mapping, unseen), RULES)
    assert not ok and "no gain beyond the noise" in reason
    ok, reason = judge(Scored(ys, as_, fixed_mapping[:300], _seen(300)), RULES)
    assert ok and reason.startswith("log loss"), "with no slice lower the same win promotes"


def test_the_tolerance_opens_the_gate() -> None:
    y, a, b = _scores(100, 2, 0.2, 1.5)
    assert not judge(Scored(y, a, b, _seen(100)), RULES)[0]
    assert judge(Scored(y, a, b, _seen(100)), GateRules(1.0, 1, 1000.0, 1.0))[0]


def test_rules_come_from_the_settings() -> None:
    s = Settings(gate_z=2.0, gate_min_holdout=7, shared_min_holdout=250)
    assert GateRules.for_shared(s) == GateRules(2.0, 250, s.gate_logloss_margin, s.gate_auc_tolerance)
    assert GateRules.for_segment(s).min_holdout == 7


@pytest.fixture(scope="module")
def stream() -> list[ClickEvent]:
    return load_homedepot().stream()[:3000]


def test_no_model_trains_on_an_unseen_query(stream: list[ClickEvent]) -> None:
    s = Settings()
    reserved = {query_key(e.query) for e in stream if is_unseen_query(e.query, s.unseen_query_frac)}
    share = len(reserved) / len({query_key(e.query) for e in stream})
    assert 0.05 < share < 0.15, "about unseen_query_frac of the distinct queries"
    for data in (
        segment_training_data(stream[2000:], stream[:2000], s, 0),
        shared_training_data(stream[2000:], stream[:2000], s, 0),
    ):
        trained = {query_key(e.query) for e in (*data.new, *data.replay)}
        assert not trained & reserved
        assert data.unseen and all(query_key(e.query) in reserved for e in data.unseen)
        assert not {query_key(e.query) for e in data.holdout} & reserved
        assert not {query_key(e.query) for e in data.counted} & reserved
    off = Settings(unseen_query_frac=0.0)
    assert not shared_training_data(stream, [], off, 0).unseen
    assert not is_unseen_query(None, 0.5) and not is_unseen_query("", 0.5)
    assert is_unseen_query("Drill Bits", 0.5) == is_unseen_query("drill  bits!", 0.5)
