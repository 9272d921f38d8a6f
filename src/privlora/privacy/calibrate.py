"""σ for a target ε: the smallest noise multiplier (to a tolerance) whose history stays within the target.

One bisection for every caller. The bracket grows by doubling from ``start`` until ε(σ) ≤ target, then
halves towards the boundary, always returning the upper end (a σ that meets the target, never one
that misses it). Two stopping rules exist because two callers shipped with them and their σ — hence
every published ε — must not move:

* :data:`OPACUS` — Opacus' ``get_noise_multiplier`` (first σ tried 20, from 0, stop once the target is
  within 0.01 of ε): DP-SGD's ``dp.target_epsilon``;
* :data:`LEDGER` — the federated ledger's search (first σ tried 1, from 0.05, stop once the bracket is
  within 0.1 % of σ): client-level ``dp.target_epsilon``.

Both are checked against the σ they returned before this module existed (tests/test_privacy_package.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from privlora.errors import UserError
from privlora.privacy.epsilon import check_accountant, check_delta, epsilon
from privlora.privacy.history import ADD_REMOVE, POISSON, History


class TargetUnreachable(UserError):
    """No σ up to the search's maximum reaches the target ε (callers add what to change)."""


@dataclass(frozen=True)
class Bisection:
    """How the search runs: exactly one of ``epsilon_tolerance`` / ``sigma_rtol`` ends it."""

    start: float  # the first σ tried as the bracket's upper end (doubled until it meets the target)
    floor: float  # the bracket's lower end once the upper end meets the target
    max_sigma: float  # give up once the doubled upper end passes this
    epsilon_tolerance: float | None = None  # stop when target − ε(upper end) ≤ this
    sigma_rtol: float | None = None  # stop when upper − lower ≤ this · upper

    def __post_init__(self) -> None:
        if (self.epsilon_tolerance is None) == (self.sigma_rtol is None):
            raise ValueError("a Bisection takes exactly one of epsilon_tolerance and sigma_rtol")

    def done(self, lo: float, hi: float, eps_hi: float, target: float) -> bool:
        if self.epsilon_tolerance is not None:
            return target - eps_hi <= self.epsilon_tolerance
        assert self.sigma_rtol is not None
        return hi - lo <= self.sigma_rtol * hi


#: Opacus' get_noise_multiplier (sigma_high = 10, doubled before its first ε; MAX_SIGMA 1e6; tolerance 0.01)
OPACUS = Bisection(start=20.0, floor=0.0, max_sigma=1e6, epsilon_tolerance=0.01)
#: the federated ledger's search (1e-3 relative on σ)
LEDGER = Bisection(start=1.0, floor=0.05, max_sigma=1e4, sigma_rtol=1e-3)


def smallest_sigma(epsilon_of: Callable[[float], float], target_epsilon: float, search: Bisection) -> float:
    """The bisection itself, on any ε(σ) that falls as σ grows (an ε equal to the target meets it)."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise UserError(f"the target ε must be a positive number, got {target_epsilon}")
    hi = search.start
    eps_hi = epsilon_of(hi)
    while eps_hi > target_epsilon:
        hi *= 2
        if hi > search.max_sigma:
            raise TargetUnreachable(f"no noise multiplier up to {search.max_sigma:g} reaches ε = {target_epsilon}")
        eps_hi = epsilon_of(hi)
    lo = search.floor
    while not search.done(lo, hi, eps_hi, target_epsilon):
        mid = (lo + hi) / 2
        eps_mid = epsilon_of(mid)
        if eps_mid > target_epsilon:
            lo = mid
        else:
            hi, eps_hi = mid, eps_mid
    return hi


def noise_multiplier(target_epsilon: float, *, sample_rate: float, steps: int, delta: float,
                     accountant: str = "rdp", search: Bisection = OPACUS, sampling: str = POISSON,
                     neighbouring: str = ADD_REMOVE) -> float:
    """Smallest σ (to ``search``'s tolerance) with ε ≤ ``target_epsilon`` after ``steps`` steps at rate q."""
    delta, accountant = check_delta(delta), check_accountant(accountant)
    History.uniform(1.0, sample_rate, steps, sampling=sampling, neighbouring=neighbouring)  # checks q, steps
    if steps < 1:
        raise UserError(f"no σ to calibrate for {steps} steps: they spend ε = 0 at any noise level")

    def epsilon_of(sigma: float) -> float:
        return epsilon(History.uniform(sigma, sample_rate, steps, sampling=sampling, neighbouring=neighbouring),
                       delta, accountant)

    return smallest_sigma(epsilon_of, target_epsilon, search)
