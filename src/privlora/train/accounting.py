"""Privacy accounting as pure functions of (σ, q, steps, δ), on Opacus' real accountants (RDP, PRV), and
:func:`resolve`, which fixes a DP-SGD run's mechanism from its options (torch-free, so the accounting
cross-check in the tests imports it in a second)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

from privlora.config import DPOptions
from privlora.errors import UserError

ACCOUNTANTS: dict[str, Callable[[], IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}

#: the neighbouring relation of DP-SGD's figures (what the Poisson-subsampled Gaussian bound is for)
SAMPLE_NEIGHBOURS = "add/remove one training sample"


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


@dataclass(frozen=True)
class DPParameters:
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    delta: float
    steps: int
    accountant: str


def resolve(options: DPOptions, *, n: int, batch_size: int, steps: int) -> DPParameters:
    """Fix σ (given, or calibrated to the target ε) and δ for ``n`` samples and ``steps`` steps."""
    q = min(1.0, batch_size / n)
    delta = options.delta if options.delta is not None else default_delta(n)
    if options.target_epsilon is not None:
        sigma = noise_for_epsilon(target_epsilon=options.target_epsilon, sample_rate=q, steps=steps,
                                  delta=delta, accountant=options.accountant)
    else:
        sigma = options.noise_multiplier if options.noise_multiplier is not None else 1.0
    return DPParameters(noise_multiplier=sigma, max_grad_norm=options.max_grad_norm, sample_rate=q,
                        delta=delta, steps=steps, accountant=options.accountant)
