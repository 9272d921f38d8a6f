"""Privacy accounting as pure functions of (σ, q, steps, δ), on Opacus' real accountants (RDP, PRV)."""

from __future__ import annotations

from collections.abc import Callable

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

from privlora.errors import UserError

ACCOUNTANTS: dict[str, Callable[[], IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}


def default_delta(n: int) -> float:
    """δ = 1/(10·N): well below 1/N, so the mechanism cannot simply publish one record."""
    return 1.0 / (10.0 * max(n, 1))


def epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """ε spent by ``steps`` Poisson-subsampled Gaussian steps, from Opacus' accountant."""
    if steps == 0:
        return 0.0
    acc = ACCOUNTANTS[accountant]()
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def noise_for_epsilon(*, target_epsilon: float, sample_rate: float, steps: int, delta: float,
                      accountant: str = "rdp") -> float:
    """Smallest σ that keeps ε ≤ ``target_epsilon`` after ``steps`` steps (binary search in Opacus)."""
    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant,
                                          epsilon_tolerance=0.01))
    except ValueError as e:
        raise UserError(f"target ε={target_epsilon} is impossible with δ={delta:g}, q={sample_rate:.4g} and "
                        f"{steps} steps ({e}); raise dp.target_epsilon, lower the steps or the batch size"
                        ) from None
