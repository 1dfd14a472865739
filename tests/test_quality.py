"""worker.ops.quality: the one AUC and log loss the training gate and /metrics share, checked against
scikit-learn (a dev-only dependency: the product never imports it)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from worker.ops.quality import EPS, HoldoutScore, Prequential, auc, holdout_score, log_loss

PACKAGE = Path(__file__).resolve().parent.parent / "worker"


def test_auc_and_logloss_match_sklearn() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.3 * y + rng.random(400) * 0.7, 0, 1)
    p = np.round(p, 2)  # ties, which rank AUC must average like sklearn does
    a = auc(y, p)
    assert a is not None and a == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert log_loss(y, p) == pytest.approx(sk_log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)), rel=1e-9)
    assert auc([1, 1], [0.1, 0.9]) is None


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_sklearn_on_random_data_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 2000))
    y = rng.integers(0, 2, n)
    p = rng.integers(0, 1 + int(rng.integers(1, 30)), n) / 30.0  # few distinct values: many ties
    assert len(np.unique(p)) < n
    a = auc(y, p)
    assert a is not None and a == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert log_loss(y, p) == pytest.approx(sk_log_loss(y, np.clip(p, EPS, 1 - EPS)), rel=1e-9)


def test_one_class_gives_no_auc() -> None:
    assert auc([0, 0, 0], [0.1, 0.5, 0.9]) is None
    assert auc([1], [0.3]) is None
    assert auc([], []) is None
    assert log_loss([], []) is None
    score = holdout_score(np.ones(4), np.array([0.2, 0.4, 0.6, 0.8]))
    assert (
        score.auc is None
        and score.n == 4
        and score.logloss == pytest.approx(log_loss([1] * 4, [0.2, 0.4, 0.6, 0.8]))
    )


def test_holdout_score_is_what_the_gate_reads() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300).astype(np.float64)
    p = np.round(rng.random(300) * 0.6 + 0.3 * y, 2)
    score = holdout_score(y, p)
    assert isinstance(score, HoldoutScore) and score.n == 300
    assert score.auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert score.logloss == pytest.approx(sk_log_loss(y, np.clip(p, EPS, 1 - EPS)), rel=1e-9)
    assert score.as_dict() == {"auc": score.auc, "logloss": score.logloss, "n": 300}
    empty = holdout_score(np.array([]), np.array([]))
    assert empty.auc is None and np.isnan(empty.logloss) and empty.n == 0
    broken = holdout_score(y[:3], np.array([0.5, np.nan, 0.5]))
    assert broken == HoldoutScore(None, float("inf"), 3)


def test_prequential_window_matches_sklearn_on_last_events() -> None:
    rng = np.random.default_rng(1)
    pq = Prequential(window=100)
    y = rng.integers(0, 2, 250)
    p = rng.random(250) * 0.5 + 0.5 * y
    for i in range(0, 250, 50):
        pq.record("a", p[i : i + 50], y[i : i + 50])
    a, loss, n = pq.snapshot()["a"]
    assert n == 100
    assert a == pytest.approx(roc_auc_score(y[-100:], p[-100:]))
    assert loss == pytest.approx(sk_log_loss(y[-100:], p[-100:]))


def test_prequential_skips_ids_already_recorded() -> None:
    pq = Prequential(window=10)
    assert pq.record("a", [0.1, 0.9], [0, 1], ["e1", "e2"]) == 2
    assert pq.record("a", [0.5, 0.5, 0.7], [0, 1, 1], ["e1", "e2", "e3"]) == 1
    assert pq.snapshot()["a"][2] == 3


def test_the_product_imports_no_sklearn() -> None:
    """scikit-learn is a dev dependency: no module of `worker/` may import it, not even inside a function."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            found += [f"{path.relative_to(PACKAGE)}: {n}" for n in names if n.split(".")[0] == "sklearn"]
    assert found == []
