"""Attack metrics against independent computations (sklearn, scipy's exact binomial test, brute force)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score, roc_curve

from privlora.audit import metrics
from privlora.errors import UserError


def _data(seed: int, n_pos: int = 200, n_neg: int = 300, shift: float = 0.7, ties: bool = False):
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(shift, 1, n_pos), rng.normal(0, 1, n_neg)]
    if ties:
        scores = np.round(scores, 1)  # many exact ties
    return scores, np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_auc_equals_sklearn(seed, ties):
    scores, labels = _data(seed, ties=ties)
    assert metrics.auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_balanced_accuracy_and_tpr_at_fpr_match_brute_force_and_sklearn_curve():
    scores, labels = _data(3, n_pos=150, n_neg=1000, ties=True)
    best = max(((scores[labels == 1] >= t).mean() + (scores[labels == 0] < t).mean()) / 2
               for t in np.r_[np.unique(scores), np.inf])
    assert metrics.balanced_accuracy(scores, labels) == pytest.approx(best, abs=1e-12)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    for target in (0.01, 0.001, 0.1):
        expected = tpr[fpr <= target].max()
        assert metrics.tpr_at_fpr(scores, labels, target) == pytest.approx(expected, abs=1e-12)


def test_tpr_at_fpr_refuses_what_the_data_cannot_resolve():
    scores, labels = _data(4, n_pos=50, n_neg=50)
    with pytest.raises(UserError, match="at least 1000 non-members"):
        metrics.tpr_at_fpr(scores, labels, 0.001)
    summary = metrics.summarize(scores, labels)
    assert summary["tpr_at_0.01_fpr"] is None and summary["tpr_at_0.001_fpr"] is None


@pytest.mark.parametrize("k,n", [(0, 20), (3, 20), (20, 20), (37, 1000)])
def test_clopper_pearson_matches_scipy_exact_interval(k, n):
    lo, hi = metrics.clopper_pearson(k, n)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert float(lo) == pytest.approx(ci.low, abs=1e-10)
    assert float(hi) == pytest.approx(ci.high, abs=1e-10)


def test_epsilon_lower_bound_perfect_attack_and_random_scores():
    n = 1000
    labels = np.r_[np.ones(n, int), np.zeros(n, int)]
    perfect = np.r_[np.ones(n), np.zeros(n)]
    # all members flagged, no non-member: TPR_lo = 0.025^(1/n), FPR_hi = 1 − 0.025^(1/n)
    lo = 0.025 ** (1 / n)
    assert metrics.epsilon_lower_bound(perfect, labels) == pytest.approx(math.log(lo / (1 - lo)), rel=1e-9)
    rng = np.random.default_rng(5)
    assert metrics.epsilon_lower_bound(rng.normal(size=2 * n), labels) < 0.3
    assert metrics.epsilon_lower_bound(perfect, labels, delta=0.5) < metrics.epsilon_lower_bound(perfect, labels)


def test_summary_is_consistent_and_bootstrap_brackets_the_auc():
    scores, labels = _data(6)
    s = metrics.summarize(scores, labels)
    assert s["auc_ci_low"] < s["auc"] < s["auc_ci_high"]
    assert s["empirical_privacy"] == pytest.approx(1 - s["balanced_accuracy"])
    # a better attack (larger shift) gives a higher AUC and a larger proven ε
    stronger = metrics.summarize(*_data(6, shift=2.0), fprs=())
    assert stronger["auc"] > s["auc"] and stronger["epsilon_lower_bound"] > s["epsilon_lower_bound"]


@pytest.mark.parametrize("scores,labels,needle", [
    ([0.1, 0.2], [1, 1], "both members and non-members"),
    ([0.1, 0.2, 0.3], [1, 0], "3 scores but 2"),
    ([0.1, float("nan")], [1, 0], "NaN"),
    ([0.1, 0.2], [1, 2], "0 (non-member) or 1"),
])
def test_bad_scores_are_user_errors(scores, labels, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        metrics.auc(np.array(scores), np.array(labels))


def test_paired_strongest_auc_gap_sees_what_overlapping_intervals_hide() -> None:
    """Run b leaks a little more than run a on the same samples: their separate AUC intervals overlap, the
    paired interval of the gap lies below 0. The point estimate is sklearn's strongest AUC minus sklearn's."""
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(500), np.zeros(500)]
    shared = rng.normal(size=y.size) + 0.3 * y
    a = {"loss": shared, "weak": rng.normal(size=y.size)}
    b = {"loss": shared + 0.1 * y}
    lo_a, hi_a = metrics.bootstrap_auc(a["loss"], y)
    lo_b, hi_b = metrics.bootstrap_auc(b["loss"], y)
    assert lo_b < hi_a  # the runs' own intervals overlap
    gap, lo, hi = metrics.bootstrap_strongest_auc_gap(a, b, y, rounds=300)
    strongest_a = max(roc_auc_score(y, v) for v in a.values())
    assert gap == pytest.approx(strongest_a - roc_auc_score(y, b["loss"]), abs=1e-12)
    assert lo <= gap <= hi < 0
    assert metrics.bootstrap_strongest_auc_gap(b, b, y, rounds=50) == (0.0, 0.0, 0.0)  # a run against itself
    gap_ba, lo_ba, hi_ba = metrics.bootstrap_strongest_auc_gap(b, a, y, rounds=300)
    assert gap_ba == pytest.approx(-gap) and lo_ba > 0
    with pytest.raises(UserError):
        metrics.bootstrap_strongest_auc_gap({}, b, y)
