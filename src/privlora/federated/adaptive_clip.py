"""Adaptive clipping for client-level DP (Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially
Private Learning with Adaptive Clipping", NeurIPS): the clip ``C`` follows a target quantile ``γ`` of the
clients' update norms instead of being tuned by hand. Pure functions (no Flower, no model), shared by
the server's plan (:mod:`privlora.federated.adaptive_plan`) and the client's wrapper
(:class:`privlora.federated.dp_client.AdaptiveClientClipping`).

Each round every sampled client clips its update to the current ``C`` and reports the bit
``b = 1[‖Δ‖ ≤ C]``. The paper sends ``b − ½`` (values ±½: the count's sensitivity is ½, not 1) and
noises the sum with ``N(0, σ_b²)``; the unclipped fraction is ``b̄ = (Σ(b − ½) + noise)/m + ½`` with
``m`` the *expected* number of clients per round (TF Privacy's ``QuantileEstimatorQuery`` does the same;
the realised count is not what the accountant assumes). The server then updates geometrically,
``C ← C·exp(−η_C (b̄ − γ))``: too many updates under ``C`` shrinks it, too few grows it.

Accounting (the paper's Theorem 1): the update with noise multiplier ``z_Δ`` and the count with std
``σ_b`` together are as private as one Gaussian mechanism with noise multiplier
``z = (z_Δ⁻² + (2σ_b)⁻²)^(-1/2)``; so a run calibrated to an *effective* ``z`` adds
``z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2)`` to the updates (Flower's ``compute_adaptive_noise_params``), which
needs ``2σ_b > z``. The recommended ``σ_b`` is ``m/20`` (paper, §4), which is small when few clients
take part in a round.

Where the count's noise is added follows the update's noise: with ``placement: local`` each client adds
``N(0, σ_b²)`` to its own ``b − ½`` (the server never sees a clear bit, as it never sees a clear update),
so the server's sum carries ``σ_b·√n`` — at least the paper's ``σ_b``: the same privacy, a noisier
``b̄`` than the paper's trusted-server sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from privlora.errors import UserError

#: instruction key (server → client): the std each client adds to its bit
COUNT_STD_KEY = "count_noise_std"
#: metrics key (client → server): the client's ``1[‖Δ‖ ≤ C] − ½ + N(0, σ_b²)``
BIT_KEY = "clip_bit"
#: the paper's recommendation (§4): σ_b = expected clients per round / 20
COUNT_STD_PER_CLIENT = 1 / 20
#: a reported bit is clamped to ±(½ + this·σ_b): a client cannot drag C with one huge value
BIT_SLACK = 6.0


def default_count_stddev(expected_clients: float) -> float:
    """σ_b when the config names none: ``m/20`` (Andrew et al. 2021, §4)."""
    return COUNT_STD_PER_CLIENT * float(expected_clients)


def update_noise_multiplier(effective: float, count_stddev: float) -> float:
    """``z_Δ`` for an effective ``z`` (Theorem 1): ``(z⁻² − (2σ_b)⁻²)^(-1/2)``; needs ``2σ_b > z``."""
    if not (math.isfinite(effective) and effective > 0):
        raise UserError(f"the effective noise multiplier must be a positive number, got {effective}")
    if not (math.isfinite(count_stddev) and 2 * count_stddev > effective):
        raise UserError(f"adaptive clipping cannot reach the effective noise multiplier z = {effective:.4g} with "
                        f"dp.clipped_count_stddev σ_b = {count_stddev:.4g}: the count's noise must satisfy "
                        f"2σ_b > z (its default is clients_per_round/20); set dp.clipped_count_stddev to at least "
                        f"{effective:.4g} (σ_b = z costs 15 % more update noise than fixed clipping), or "
                        "use dp.clipping fixed")
    return (effective ** -2 - (2 * count_stddev) ** -2) ** -0.5


def effective_noise_multiplier(update: float, count_stddev: float) -> float:
    """The effective ``z`` of update noise ``z_Δ`` and count noise ``σ_b`` (Theorem 1, the inverse of
    :func:`update_noise_multiplier`): ``(z_Δ⁻² + (2σ_b)⁻²)^(-1/2)``; σ_b = 0 would publish the count
    without noise (z = 0, no privacy)."""
    if count_stddev <= 0:
        return 0.0
    return (update ** -2 + (2 * count_stddev) ** -2) ** -0.5


def noisy_bit(norm: float, clip: float, count_stddev: float, rng: np.random.Generator) -> float:
    """What a client reports: ``1[norm ≤ clip] − ½`` plus ``N(0, count_stddev²)``."""
    bit = 1.0 if norm <= clip else 0.0
    return bit - 0.5 + (float(rng.normal(0.0, count_stddev)) if count_stddev > 0 else 0.0)


def unclipped_fraction(reports: Sequence[float], expected_clients: float, count_stddev: float) -> float:
    """``b̄ = Σ clamp(report)/m + ½`` from the clients' noisy ``b − ½`` reports (``m``: expected clients
    per round). Non-finite reports are dropped, the rest clamped to ±(½ + 6σ_b) (post-processing)."""
    bound = 0.5 + BIT_SLACK * count_stddev
    kept = [min(bound, max(-bound, float(r))) for r in reports if math.isfinite(float(r))]
    return math.fsum(kept) / float(expected_clients) + 0.5


def geometric_update(clip: float, fraction: float, target_quantile: float, lr: float) -> float:
    """The paper's geometric step: ``C·exp(−η_C (b̄ − γ))``."""
    return float(clip) * math.exp(-float(lr) * (float(fraction) - float(target_quantile)))
