"""What Flower's SecAgg+ does to an upload's numbers, computed where the privacy figures depend on it.

Flower 1.42's ``secaggplus_mod`` (``_collect_masked_vectors``) does three things to a client's upload
before masking it: it multiplies every value by ``w = round(samples/max_weight · T)/T`` (``T`` the
quantization range), clips every product to ``±clipping_range`` and quantises it stochastically over
``T`` levels. ``SecAggPlusWorkflow`` then decodes ``Σ w_i·x_i / Σ w_i``. Both steps bear on distributed
Gaussian noise, where each client adds only ``σC/√n`` and the privacy lives in the *sum*:

* **Weighting.** The mod multiplies the noise too: the weighted sum carried ``σC·RMS(w)`` while the
  client with ``w = 1`` contributes ``C`` (the 5-client benchmark's "ε = 8" was ε 14.3 for its largest
  client). The fix is on the client: under distributed noise it divides its *noise* (not its clipped
  update) by its own ``w`` (:func:`upload_factor`), so each ``w_i·n_i`` has std ``σC/√n`` and the sum
  ``σC`` whatever the weights; its contribution to the sum is ``w_i·clip(u_i)``, of norm ``≤ w_i·C ≤ C``
  since an honest client's samples never exceed ``max_weight``. So the sum is the Gaussian mechanism
  with sensitivity ``C`` and noise ``σC`` — what the accountant assumes — for every weighting, and the
  weighted mean is kept (dividing the update as well would turn it into a plain sum). The alternative,
  noise for the largest ``w·C`` with every client's noise unscaled, needs every client to know every
  other client's weight; this needs only its own. Local noise needs nothing: each upload is private on
  its own and the weighting is post-processing of it.
* **Clipping.** The mod clips each client's *noisy* value before the sum. That is not post-processing
  of the noisy sum the accountant analyses, so the range must make it never happen in practice:
  :func:`clipping_range` is at least ``C·(1 + 10σ)`` per coordinate under Gaussian DP (a coordinate of a
  clipped update is ``≤ C``, the noise a client adds is ``≤ σC`` per coordinate before the weighting
  and, under distributed noise, ``σC/√n`` after it; under local noise the weighting ``w ≤ 1`` only
  shrinks it). A value then exceeds the range with probability ``≤ erfc(10/√2) ≈ 1.5e-23``; over all
  ``V`` values of a run the mechanism differs from the accounted one with probability ``≤ V·1.5e-23``,
  which adds at most ``(1 + e^ε)`` times that to δ (privacy.json states it). Under Laplace the noise is
  local: the mod's clip is post-processing of each client's private upload (utility only).
"""

from __future__ import annotations

import math

from privlora.config import FederatedConfig
from privlora.errors import UserError

#: the clipping range covers this many noise stds beyond the clip, per coordinate
RANGE_SIGMAS = 10.0


def max_weight(config: FederatedConfig) -> float:
    """The ``max_weight`` the server gives SecAgg+: the sample cap, else the largest partition. It is
    also what every honest client divides by, so both ends must use this one function. A larger value
    than the real counts would quantise the updates to nothing."""
    if config.sample_cap:
        return float(config.sample_cap)
    from privlora.federated.data import federated_data

    return float(max(len(p) for p in federated_data(config).parts))


def upload_factor(samples: int, weight_cap: float, quantization_range: int) -> float:
    """The factor ``secaggplus_mod`` multiplies this client's upload by: ``samples / max_weight``
    rounded to a multiple of ``1/quantization_range`` exactly as the mod rounds it (Flower 1.42,
    ``_collect_masked_vectors``: ``round(ratio · T) / T``). Refuses what would break the noise
    calibration: a count above ``max_weight`` (its sensitivity would exceed ``C``) or one rounded to 0
    (it would add neither update nor noise while the ledger counts it)."""
    if samples > weight_cap:
        raise UserError(f"{samples} samples exceed SecAgg+'s max_weight {weight_cap:g}: cap the count (sample_cap)")
    q = round(samples / weight_cap * quantization_range)
    if q <= 0:
        raise UserError(f"{samples} samples round to weight 0 under max_weight {weight_cap:g} and quantization_range "
                        f"{quantization_range}: raise secagg.quantization_range or lower sample_cap")
    return q / quantization_range


def clipping_range(config: FederatedConfig, sigma: float) -> float:
    """The ``clipping_range`` for SecAgg+: the configured one, widened under Gaussian DP to
    ``C·(1 + RANGE_SIGMAS·σ)`` so a noisy value is (essentially) never clipped before the secure sum."""
    configured = float(config.secagg.clipping_range)
    if config.dp.mechanism != "gaussian":
        return configured
    return max(configured, float(config.dp.clip) * (1.0 + RANGE_SIGMAS * sigma))


def overflow_probability() -> float:
    """P(one noisy value falls outside :func:`clipping_range`) ≤ P(|N(0,1)| > RANGE_SIGMAS)."""
    return math.erfc(RANGE_SIGMAS / math.sqrt(2))
