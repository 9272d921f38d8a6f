"""DP-SGD's accounting: ε and σ as functions of (σ, q, steps, δ) — thin keyword wrappers over
:mod:`privlora.privacy` for one run of equal Poisson steps — and :func:`resolve`, which fixes a DP-SGD
run's mechanism from its options (torch-free, so the accounting cross-check in the tests imports it in
a second)."""

from __future__ import annotations

from dataclasses import dataclass

from privlora import privacy
from privlora.config import DPOptions
from privlora.errors import UserError
from privlora.privacy import SAMPLE_NEIGHBOURS, default_delta

__all__ = ["ACCOUNTANTS", "SAMPLE_NEIGHBOURS", "DPParameters", "default_delta", "epsilon", "noise_for_epsilon",
           "resolve"]  # SAMPLE_NEIGHBOURS, default_delta: privlora.privacy's, re-exported

#: the accountants DP-SGD offers (``dp.accountant``; the registry recomputes claims with these). Not
#: privacy's ``gdp``: Opacus calls it experimental, it can understate ε
ACCOUNTANTS = {name: privacy.ACCOUNTANTS[name] for name in ("rdp", "prv")}


def epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """ε spent by ``steps`` Poisson-subsampled Gaussian steps (:func:`privlora.privacy.epsilon`)."""
    return privacy.epsilon(privacy.History.uniform(noise_multiplier, sample_rate, steps), delta, accountant)


def noise_for_epsilon(*, target_epsilon: float, sample_rate: float, steps: int, delta: float,
                      accountant: str = "rdp") -> float:
    """Smallest σ that keeps ε ≤ ``target_epsilon`` after ``steps`` steps (Opacus' search, in
    :func:`privlora.privacy.noise_multiplier`)."""
    try:
        return privacy.noise_multiplier(target_epsilon, sample_rate=sample_rate, steps=steps, delta=delta,
                                        accountant=accountant, search=privacy.OPACUS)
    except privacy.TargetUnreachable as e:
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
