"""Membership-attack metrics, the same for every attack: higher score = more likely a member.

All figures come from one threshold sweep over the scores ("member if score ≥ threshold"):

* **AUC** — computed as the Mann–Whitney U statistic with ties counted ½ (no curve integration), so
  it equals ``sklearn.metrics.roc_auc_score`` exactly; the tests check that.
* **balanced accuracy** — the best ``(TPR + TNR) / 2`` over thresholds (the attack-success rate of
  the MIA papers); empirical privacy is ``1 − balanced accuracy``.
* **TPR at a fixed FPR** — the largest TPR among thresholds whose FPR ≤ target (Carlini et al. 2022,
  "Membership inference attacks from first principles"). Needs at least ``1/FPR`` non-members:
  with fewer, "FPR ≤ 0.1 %" can only mean FPR = 0 and the figure is meaningless, so it is refused.
* **empirical ε lower bound** — for every threshold, ``ln((TPR − δ)/FPR)`` and the symmetric
  ``ln((TNR − δ)/FNR)`` with TPR/TNR replaced by their Clopper–Pearson lower and FPR/FNR by their
  upper confidence limits, maximised over thresholds (Jagielski et al. 2020; Nasr et al. 2021). An
  (ε, δ)-DP model cannot be beaten by any attack, so this bound below the accountant's ε is a check,
  and a bound above it would be a bug.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

from privlora.errors import UserError


@dataclass(frozen=True)
class Sweep:
    """Counts at each distinct threshold, from the strictest (nothing flagged) to the loosest (all)."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    positives: int
    negatives: int

    @property
    def tpr(self) -> np.ndarray:
        return self.tp / self.positives

    @property
    def fpr(self) -> np.ndarray:
        return self.fp / self.negatives


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise UserError(f"{scores.size} scores but {labels.size} member labels")
    if not np.isin(labels, (0, 1)).all():
        raise UserError("member labels must be 0 (non-member) or 1 (member)")
    if not np.isfinite(scores).all():
        raise UserError(f"{int((~np.isfinite(scores)).sum())} attack scores are NaN or infinite")
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        raise UserError("an attack needs both members and non-members to score")
    return scores, labels


def sweep(scores: np.ndarray, labels: np.ndarray) -> Sweep:
    """Cumulative true/false positives when flagging every sample with score ≥ each distinct score."""
    scores, labels = _check(scores, labels)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp, fp = np.cumsum(y)[last_of_tie], np.cumsum(~y)[last_of_tie]
    return Sweep(thresholds=np.r_[np.inf, s[last_of_tie]], tp=np.r_[0, tp], fp=np.r_[0, fp],
                 positives=int(labels.sum()), negatives=int((~labels).sum()))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member) + ½ P(tie)."""
    scores, labels = _check(scores, labels)
    ranks = stats.rankdata(scores)  # average ranks handle ties
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def balanced_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Best ``(TPR + 1 − FPR) / 2`` over thresholds."""
    s = sweep(scores, labels)
    return float(((s.tpr + 1 - s.fpr) / 2).max())


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float) -> float:
    """Largest TPR whose FPR ≤ ``fpr``; refuses when there are too few non-members to measure it."""
    if not 0 < fpr < 1:
        raise UserError(f"FPR must be in (0, 1), got {fpr}")
    s = sweep(scores, labels)
    if s.negatives * fpr < 1:
        raise UserError(f"TPR at {fpr:.3%} FPR needs at least {math.ceil(1 / fpr)} non-members; "
                        f"there are {s.negatives}")
    return float(s.tpr[s.fpr <= fpr + 1e-12].max())


def clopper_pearson(k: np.ndarray | int, n: int, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-sided binomial confidence interval for ``k`` successes out of ``n``."""
    k = np.asarray(k, dtype=np.float64)
    a = (1 - confidence) / 2
    lo = np.where(k > 0, stats.beta.ppf(a, k, n - k + 1), 0.0)
    hi = np.where(k < n, stats.beta.ppf(1 - a, k + 1, n - k), 1.0)
    return lo, hi


def epsilon_lower_bound(scores: np.ndarray, labels: np.ndarray, *, delta: float = 0.0,
                        confidence: float = 0.95) -> float:
    """Largest ε any threshold of this attack proves at ``confidence`` (0 if none proves any)."""
    s = sweep(scores, labels)
    tpr_lo, _ = clopper_pearson(s.tp, s.positives, confidence)
    _, fpr_hi = clopper_pearson(s.fp, s.negatives, confidence)
    tnr_lo, _ = clopper_pearson(s.negatives - s.fp, s.negatives, confidence)
    _, fnr_hi = clopper_pearson(s.positives - s.tp, s.positives, confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        bounds = np.concatenate([np.log((tpr_lo - delta) / fpr_hi), np.log((tnr_lo - delta) / fnr_hi)])
    bounds = bounds[np.isfinite(bounds)]
    return float(max(0.0, bounds.max())) if bounds.size else 0.0


def bootstrap_auc(scores: np.ndarray, labels: np.ndarray, *, rounds: int = 1000, confidence: float = 0.95,
                  seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC, resampling members and non-members separately."""
    scores, labels = _check(scores, labels)
    pos, neg = scores[labels], scores[~labels]
    rng = np.random.default_rng(seed)
    values = np.empty(rounds)
    for i in range(rounds):
        p, n = rng.choice(pos, pos.size), rng.choice(neg, neg.size)
        values[i] = auc(np.r_[p, n], np.r_[np.ones(p.size), np.zeros(n.size)])
    a = (1 - confidence) / 2
    return float(np.quantile(values, a)), float(np.quantile(values, 1 - a))


def bootstrap_strongest_auc_gap(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], labels: np.ndarray, *,
                                rounds: int = 1000, confidence: float = 0.95,
                                seed: int = 0) -> tuple[float, float, float]:
    """The strongest attack's AUC against run ``a`` minus the strongest's against run ``b`` (each the
    maximum over its attacks), with a *paired* percentile-bootstrap interval: both runs' scores are of the
    same samples in the same order, and every resample draws the same members and non-members for both,
    so the sample noise they share cancels. Two runs whose separate AUC intervals overlap can still differ
    here; an interval below 0 says ``a`` leaks less than ``b`` to its strongest attack on these samples."""
    if not a or not b:
        raise UserError("a paired AUC gap needs at least one attack's scores for each run")
    labels = np.asarray(labels).astype(bool)
    runs = [[_check(v, labels)[0] for v in cols.values()] for cols in (a, b)]

    def gap(index: np.ndarray) -> float:
        y = labels[index]
        strongest_a, strongest_b = (max(auc(v[index], y) for v in run) for run in runs)
        return strongest_a - strongest_b

    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    rng = np.random.default_rng(seed)
    values = np.array([gap(np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]) for _ in range(rounds)])
    q = (1 - confidence) / 2
    return gap(np.arange(labels.size)), float(np.quantile(values, q)), float(np.quantile(values, 1 - q))


def summarize(scores: np.ndarray, labels: np.ndarray, *, delta: float = 0.0,
              fprs: tuple[float, ...] = (0.01, 0.001), seed: int = 0) -> dict[str, float | None]:
    """Every figure for one attack; TPR at an FPR the data cannot resolve is ``None``, not a guess."""
    lo, hi = bootstrap_auc(scores, labels, seed=seed)
    acc = balanced_accuracy(scores, labels)
    out: dict[str, float | None] = {"auc": auc(scores, labels), "auc_ci_low": lo, "auc_ci_high": hi,
                                    "balanced_accuracy": acc, "empirical_privacy": 1 - acc,
                                    "epsilon_lower_bound": epsilon_lower_bound(scores, labels, delta=delta)}
    negatives = int((~np.asarray(labels).astype(bool)).sum())
    for f in fprs:
        out[f"tpr_at_{f:g}_fpr"] = tpr_at_fpr(scores, labels, f) if negatives * f >= 1 else None
    return out
