"""ε of a :class:`~privlora.privacy.history.History`, by one of Opacus' accountants.

* ``"rdp"`` — Rényi DP of the Poisson-subsampled Gaussian at Opacus' default orders, converted to
  (ε, δ) as ``RDPAccountant`` does. Each distinct (σ, q) is analysed once per process (cached): a
  federated ledger asks for the same round every round, a σ search for the same q at many σ, and at
  small q the fractional orders take Opacus ~0.5 s. The sum is taken in the accountant's order with the
  accountant's ``rdp·steps``, so the numbers are Opacus' own, bit for bit (tested).
* ``"prv"`` — Opacus' PRV accountant (numerical privacy-loss distribution; its upper bound).
* ``"gdp"`` — Opacus' Gaussian-DP (CLT) accountant: one (σ, q) only; experimental in Opacus, it can
  understate ε (Opacus warns).

All three bound Poisson sampling under add/remove; any other history is refused rather than
accounted as if it were Poisson.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from privlora.errors import UserError
from privlora.privacy.history import ADD_REMOVE, POISSON, History

if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

# Opacus is imported where it is used, not here: it imports torch (~5 s), and the federated ledger,
# the registry and the accounting cross-check import privacy without needing torch.


def _rdp_accountant() -> IAccountant:
    from opacus.accountants import RDPAccountant

    return RDPAccountant()


def _prv_accountant() -> IAccountant:
    from opacus.accountants import PRVAccountant

    return PRVAccountant()


def _gdp_accountant() -> IAccountant:
    from opacus.accountants import GaussianAccountant

    return GaussianAccountant()


ACCOUNTANTS: dict[str, Callable[[], IAccountant]] = {"rdp": _rdp_accountant, "prv": _prv_accountant,
                                                     "gdp": _gdp_accountant}

#: the RDP orders: Opacus' ``RDPAccountant.DEFAULT_ALPHAS``, written out so importing privacy stays
#: torch-free (tests/test_privacy_package.py checks they are Opacus' own)
ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


def check_delta(delta: float) -> float:
    """δ as a float, or a UserError: δ ≥ 1 says nothing, δ ≤ 0 is pure DP (no Gaussian bound)."""
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not (math.isfinite(delta) and 0 < delta < 1):
        raise UserError(f"delta must lie strictly between 0 and 1 (typically below 1/N), got {delta}")
    return float(delta)


def check_accountant(name: str) -> str:
    """``name`` if it is one of :data:`ACCOUNTANTS`, else a UserError naming them."""
    if name not in ACCOUNTANTS:
        raise UserError(f"unknown accountant {name!r}; choose one of {', '.join(sorted(ACCOUNTANTS))}")
    return name


def _check_mechanism(history: History) -> None:
    """Opacus' accountants are bounds for the Poisson-subsampled Gaussian under add/remove only."""
    if history.sampling != POISSON or history.neighbouring != ADD_REMOVE:
        raise UserError(f"no accountant here for {history.sampling} sampling under {history.neighbouring} "
                        f"neighbours: Opacus bounds {POISSON} sampling under {ADD_REMOVE} only, and accounting "
                        "another mechanism as if it were that one understates ε; sample Poisson")


@lru_cache(maxsize=1024)
def _rdp_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one Poisson-subsampled Gaussian step at :data:`ORDERS` (Opacus' analysis, cached)."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    return tuple(float(v) for v in np.atleast_1d(rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(ORDERS))))


def _rdp_segment(noise_multiplier: float, sample_rate: float, steps: int) -> np.ndarray:
    # compute_rdp(steps=k) is compute_rdp(steps=1) · k: the same floats, from the cache
    return np.asarray(_rdp_step(noise_multiplier, sample_rate), dtype=np.float64) * steps


def _rdp_to_epsilon(total: np.ndarray, delta: float) -> float:
    from opacus.accountants.analysis import rdp as rdp_analysis

    eps, _ = rdp_analysis.get_privacy_spent(orders=list(ORDERS), rdp=total, delta=delta)
    return float(eps)


def rdp(history: History) -> np.ndarray:
    """The history's total RDP at :data:`ORDERS` (summed in order, as ``RDPAccountant`` does)."""
    _check_mechanism(history)
    total = np.zeros(len(ORDERS))
    for s, q, k in history.as_opacus():
        total = total + _rdp_segment(s, q, k)
    return total


def epsilon(history: History, delta: float, accountant: str = "rdp") -> float:
    """ε spent by ``history`` at ``delta`` (0 for a history that took no step)."""
    _check_mechanism(history)
    delta, accountant = check_delta(delta), check_accountant(accountant)
    entries = history.as_opacus()
    if not entries:
        return 0.0
    if accountant == "rdp":
        return _rdp_to_epsilon(rdp(history), delta)
    acc = ACCOUNTANTS[accountant]()
    if accountant == "gdp":
        if len({(s, q) for s, q, _ in entries}) > 1:
            raise UserError("the gdp accountant takes one noise multiplier and one sample rate; "
                            "use rdp or prv for a history that changes them")
        acc.history = [(entries[0][0], entries[0][1], sum(k for _, _, k in entries))]
    else:
        acc.history = entries
    return float(acc.get_epsilon(delta=delta))


def running_epsilons(history: History, delta: float) -> list[float]:
    """RDP ε after each step of ``history``, in order (a ledger's ε per round): one conversion per
    step, one RDP analysis per distinct (σ, q)."""
    _check_mechanism(history)
    delta = check_delta(delta)
    base, out = np.zeros(len(ORDERS)), []
    for s, q, k in history.as_opacus():
        step = np.asarray(_rdp_step(s, q), dtype=np.float64)
        out.extend(_rdp_to_epsilon(base + step * j, delta) for j in range(1, k + 1))
        base = base + step * k
    return out
