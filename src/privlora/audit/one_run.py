"""The statistics of a one-run DP audit (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1)
Training Run", NeurIPS 2023, Theorem 3.1 and its appendix procedure).

The experiment: m canaries, each included in the training set independently with probability ½
(S ∈ {−1, +1}^m uniform); one training run; the auditor looks at the model and guesses "in" (+1),
"out" (−1) or abstains (0) for every canary. With r guesses of which v are right, the paper shows that
if training is (ε, δ)-DP then

    P[W ≥ v] ≤ P[Binomial(r, p_ε) ≥ v] + 2·m·δ · max_{1 ≤ i ≤ v} P[v − i ≤ Binomial(r, p_ε) < v] / i,

with p_ε = e^ε / (1 + e^ε), the accuracy of ε-DP randomized response — as if every guess were an
independent coin of bias p_ε, which is what avoids group privacy: no (mε)-blow-up. The right-hand side
is a p-value for the hypothesis "(ε, δ)-DP"; the ε lower bound at confidence 1 − β is the largest ε
whose p-value is still < β (the p-value grows with ε, so a bisection finds it).

Choosing how many guesses to make after looking at the scores would be a data-dependent choice of
test; :func:`audit_bound` therefore either takes one fixed guess count or a small grid fixed in
advance with a Bonferroni correction (each candidate tested at β / |grid|) — a valid union bound.

Everything here is pure (numbers in, numbers out): it is checked against scipy's binomial tail,
brute-force sums and a Monte-Carlo randomized-response mechanism in tests/test_dp_one_run.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from privlora.errors import UserError

#: default guess counts, as fractions of m, tried with a Bonferroni correction (fixed before any score)
DEFAULT_GUESS_FRACTIONS = (0.1, 0.2, 0.5, 1.0)


def _check_counts(m: int, r: int, v: int) -> None:
    if not (isinstance(m, int | np.integer) and isinstance(r, int | np.integer) and isinstance(v, int | np.integer)):
        raise UserError(f"m, r and v must be integers, got {m!r}, {r!r}, {v!r}")
    if not 0 <= v <= r <= m:
        raise UserError(f"need 0 ≤ correct ({v}) ≤ guesses ({r}) ≤ canaries ({m})")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """P[≥ v correct of r guesses] allowed by (ε, δ)-DP with m canaries (Theorem 3.1's bound, capped at 1)."""
    _check_counts(m, r, v)
    if epsilon < 0 or not 0 <= delta <= 1:
        raise UserError(f"need ε ≥ 0 and 0 ≤ δ ≤ 1, got ε={epsilon}, δ={delta}")
    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))  # randomized response's accuracy at ε
    tail = float(stats.binom.sf(v - 1, r, p))  # P[Binomial(r, p) ≥ v]
    if delta > 0:
        # P[v − i ≤ B < v] for i = 1..v is the cumulative sum of pmf(v−1), pmf(v−2), …, pmf(0)
        below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, p))
        tail += 2.0 * m * delta * float(np.max(below / np.arange(1, v + 1)))
    return min(tail, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float = 0.0, beta: float = 0.05,
                        tolerance: float = 1e-6) -> float:
    """Largest ε that ``v`` correct of ``r`` guesses rejects at confidence 1 − β (0 when none is rejected).

    The p-value is non-decreasing in ε, so we bracket the boundary by doubling and bisect; the answer is
    the lower end of the final bracket (an ε that *is* rejected), never rounded up.
    """
    _check_counts(m, r, v)
    if not 0 < beta < 1:
        raise UserError(f"β must be in (0, 1), got {beta}")
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:  # finite: p → P[B ≥ v] → 1 as ε → ∞ when v ≤ r
        lo, hi = hi, 2.0 * hi
        if hi > 1e3:
            return lo
    while hi - lo > tolerance:
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class Guesses:
    """The auditor's guesses for one guess count: ``k_in`` top-scored "in", ``k_out`` bottom-scored "out"."""

    k_in: int
    k_out: int
    guesses: int
    correct: int
    beta: float  # the level this candidate was tested at (β / |grid|)
    epsilon_lower_bound: float


def guess(scores: np.ndarray, included: np.ndarray, k_in: int, k_out: int) -> tuple[int, int]:
    """(guesses, correct) when the ``k_in`` highest scores are guessed in and the ``k_out`` lowest out.

    Ties are broken by canary order (a stable sort), which does not look at ``included``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = scores.size
    if k_in < 0 or k_out < 0 or k_in + k_out > m:
        raise UserError(f"need k_in, k_out ≥ 0 and k_in + k_out ≤ {m} canaries, got {k_in}, {k_out}")
    order = np.argsort(-scores, kind="stable")
    top, bottom = order[:k_in], order[m - k_out:] if k_out else order[:0]
    return k_in + k_out, int(included[top].sum() + (~included[bottom]).sum())


def split_guesses(total: int) -> tuple[int, int]:
    """``total`` guesses as (in, out): half each, the odd one an "in" (members carry the signal)."""
    return (total + 1) // 2, total // 2


def guess_grid(m: int, fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS) -> list[int]:
    """Distinct total guess counts ``max(1, round(f·m))`` for each fraction, in increasing order."""
    return sorted({min(m, max(1, round(f * m))) for f in fractions})


def audit_bound(scores: np.ndarray, included: np.ndarray, *, delta: float, beta: float = 0.05,
                guesses: Sequence[int] | None = None) -> dict[str, object]:
    """The ε lower bound of one run's canary scores (higher score = more likely "in").

    ``guesses``: total guess counts fixed in advance (default :func:`guess_grid`); each is split half
    in / half out and tested at β / len(guesses) (Bonferroni), and the best bound is reported — valid
    at confidence 1 − β for the whole grid. One count → no correction.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    included = np.asarray(included).ravel()
    m = scores.size
    if m < 2:
        raise UserError(f"a one-run audit needs at least 2 canaries, got {m}")
    if included.shape != scores.shape or not np.isin(included, (0, 1)).all():
        raise UserError(f"need one 0/1 inclusion flag per canary ({m}), got {included.shape}")
    if not np.isfinite(scores).all():
        raise UserError(f"{int((~np.isfinite(scores)).sum())} canary scores are NaN or infinite")
    grid = list(guesses) if guesses is not None else guess_grid(m)
    if not grid or any(not 1 <= int(g) <= m for g in grid):
        raise UserError(f"guess counts must be between 1 and the number of canaries ({m}), got {grid}")
    level = beta / len(grid)
    candidates = []
    for total in grid:
        k_in, k_out = split_guesses(int(total))
        r, v = guess(scores, included.astype(bool), k_in, k_out)
        candidates.append(Guesses(k_in=k_in, k_out=k_out, guesses=r, correct=v, beta=level,
                                  epsilon_lower_bound=epsilon_lower_bound(m, r, v, delta=delta, beta=level)))
    best = max(candidates, key=lambda c: (c.epsilon_lower_bound, -c.guesses))
    return {"m": m, "included": int(included.sum()), "beta": beta, "delta": delta,
            "correction": "bonferroni" if len(grid) > 1 else "none",
            "epsilon_lower_bound": best.epsilon_lower_bound, "guesses": best.guesses,
            "correct": best.correct, "k_in": best.k_in, "k_out": best.k_out,
            "candidates": [asdict(c) for c in candidates]}
