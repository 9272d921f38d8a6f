"""Client-level differential privacy for federated updates: clip each client's whole update, add noise,
and account for what the rounds spend.

The unit of privacy here is a *client* (McMahan et al. 2018): neighbouring runs differ by one client's
entire data set. Clipping a client's update (all its arrays together) to a norm ``C`` bounds how much
that client can move the aggregate, and noise calibrated to ``C`` hides whether it took part.

Two mechanisms:

* **Gaussian** (L2 clipping): noise ``N(0, (σC)²)``. Where the noise is added is a *placement*:
  ``"local"`` — every client adds ``σC`` to its own update, so each update is private on its own, even
  to the server; ``"distributed"`` — every one of the ``m`` clients adds ``σC/√m``, so only the *sum*
  carries ``σC``. Distributed noise is only private if the server never sees an individual update, i.e.
  with secure aggregation; and if clients drop out, the sum carries less noise than planned
  (:func:`effective_noise_multiplier`). Accounting is Opacus's RDP accountant over rounds, one step
  per round with the client sampling rate (:func:`gaussian_epsilons`, on :mod:`privlora.privacy`).
* **Laplace** (L1 clipping): noise ``Laplace(C₁/ε_r)`` per coordinate gives ``ε_r``-DP in round ``r``
  (the L1 sensitivity of one client's clipped update under add/remove is ``C₁``). A dynamic schedule
  spends more ε early, when updates are large and noise hurts most, and less late
  (:func:`epsilon_schedule`); the rounds compose by :func:`laplace_composed`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from privlora import privacy
from privlora.errors import UserError

# ---------------------------------------------------------------------------------------------- clipping


def _check_finite(arrays: Sequence[np.ndarray]) -> None:
    for i, a in enumerate(arrays):
        if not np.isfinite(a).all():
            raise UserError(f"update array {i} holds NaN or infinite values; fix the training step before clipping")


def _positive(value: float, what: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{what} must be a positive number, got {value}")
    return float(value)


def _non_negative(value: float, what: str) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"{what} must be a non-negative number, got {value}")
    return float(value)


def _delta(delta: float) -> float:
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise UserError(f"delta must lie strictly between 0 and 1 (typically below 1/number of clients), got {delta}")
    return float(delta)


def l2_norm(arrays: Sequence[np.ndarray]) -> float:
    """Global L2 norm of all the arrays taken together (as one flattened vector)."""
    return math.sqrt(sum(float(np.square(np.asarray(a, dtype=np.float64)).sum()) for a in arrays))


def l1_norm(arrays: Sequence[np.ndarray]) -> float:
    """Global L1 norm of all the arrays taken together."""
    return sum(float(np.abs(np.asarray(a, dtype=np.float64)).sum()) for a in arrays)


def _clip(arrays: Sequence[np.ndarray], max_norm: float, norm: Callable[[Sequence[np.ndarray]], float],
          what: str) -> tuple[list[np.ndarray], float]:
    max_norm = _positive(max_norm, f"the {what} clipping norm")
    _check_finite(arrays)
    before = norm(arrays)
    factor = min(1.0, max_norm / before) if before > 0 else 1.0
    out = [(np.asarray(a, dtype=np.float64) * factor).astype(np.float32) for a in arrays]
    # float32 rounding can leave the norm a hair above the bound; the privacy guarantee needs ≤
    for _ in range(8):
        if norm(out) <= max_norm:
            break
        out = [a * np.float32(1 - 1e-6) for a in out]
    return out, before


def clip_l2(arrays: Sequence[np.ndarray], max_norm: float) -> tuple[list[np.ndarray], float]:
    """Float32 copies scaled so their global L2 norm is at most ``max_norm``, and the norm before clipping."""
    return _clip(arrays, max_norm, l2_norm, "L2")


def clip_l1(arrays: Sequence[np.ndarray], max_norm: float) -> tuple[list[np.ndarray], float]:
    """Float32 copies scaled so their global L1 norm is at most ``max_norm``, and the norm before clipping."""
    return _clip(arrays, max_norm, l1_norm, "L1")


# ---------------------------------------------------------------------------------------------- noise


def add_gaussian(arrays: Sequence[np.ndarray], std: float, rng: np.random.Generator) -> list[np.ndarray]:
    """New float32 arrays: each element plus independent ``N(0, std²)`` noise."""
    std = _non_negative(std, "the Gaussian noise std")
    return [(np.asarray(a, dtype=np.float64) + rng.normal(0.0, std, np.shape(a))).astype(np.float32) for a in arrays]


def add_laplace(arrays: Sequence[np.ndarray], scale: float, rng: np.random.Generator) -> list[np.ndarray]:
    """New float32 arrays: each element plus independent ``Laplace(0, scale)`` noise (std ``√2·scale``)."""
    scale = _non_negative(scale, "the Laplace noise scale")
    return [(np.asarray(a, dtype=np.float64) + rng.laplace(0.0, scale, np.shape(a))).astype(np.float32)
            for a in arrays]


# ---------------------------------------------------------------------------------------------- Gaussian


@dataclass(frozen=True)
class Placement:
    """Where the Gaussian noise is added: the std each client adds, and the noise multiplier the
    aggregate actually carries when only ``survivors`` of ``planned`` clients report."""

    description: str
    std: Callable[[float, float, int], float]
    effective: Callable[[float, int, int], float]


PLACEMENTS: dict[str, Placement] = {
    "local": Placement(
        "every client adds σ·C to its own update; each update is private on its own, even to the server",
        lambda sigma, clip, m: sigma * clip,
        lambda sigma, planned, survivors: sigma,
    ),
    "distributed": Placement(
        "every client adds σ·C/√m so the sum of m updates carries σ·C; private only under secure aggregation",
        lambda sigma, clip, m: sigma * clip / math.sqrt(m),
        lambda sigma, planned, survivors: sigma * math.sqrt(survivors / planned),
    ),
}


def _placement(name: str) -> Placement:
    try:
        return PLACEMENTS[name]
    except KeyError:
        raise UserError(f"unknown noise placement {name!r}; choose one of {', '.join(sorted(PLACEMENTS))}") from None


def noise_std(noise_multiplier: float, clip: float, clients_per_round: int, placement: str) -> float:
    """Std of the Gaussian noise *each client* adds to its clipped update.

    ``"local"``: ``σ·C``. ``"distributed"``: ``σ·C/√m`` with ``m = clients_per_round``, so the sum of the
    ``m`` clients' noise has std ``σ·C`` — only valid when the server sees nothing but that sum (secure
    aggregation); a server that sees one update sees it with ``√m`` times too little noise.
    """
    p = _placement(placement)
    sigma = _positive(noise_multiplier, "the noise multiplier")
    clip = _positive(clip, "the L2 clipping norm")
    if clients_per_round < 1:
        raise UserError(f"clients_per_round must be at least 1, got {clients_per_round}")
    return p.std(sigma, clip, clients_per_round)


def effective_noise_multiplier(noise_multiplier: float, placement: str, planned: int, survivors: int) -> float:
    """The noise multiplier the round's aggregate really carries: ``σ`` for ``"local"``;
    ``σ·√(survivors/planned)`` for ``"distributed"``, since each survivor added only ``σC/√planned``.
    Account the round with this value, not the planned one."""
    p = _placement(placement)
    sigma = _positive(noise_multiplier, "the noise multiplier")
    if not 1 <= survivors <= planned:
        raise UserError(f"survivors must be between 1 and planned ({planned}), got {survivors}")
    return p.effective(sigma, planned, survivors)


def gaussian_history(history: Sequence[tuple[float, float]]) -> privacy.History:
    """The ledger's rounds as a :class:`privlora.privacy.History`: one Poisson step per round, one
    ``(noise_multiplier, sample_rate)`` each (``sample_rate``: the rate at which clients join a round),
    neighbours differing by one client added or removed."""
    segments = []
    for r, (sigma, q) in enumerate(history):
        sigma = _positive(sigma, f"round {r}: the noise multiplier")
        if not (math.isfinite(q) and 0 < q <= 1):
            raise UserError(f"round {r}: the sample rate must lie in (0, 1], got {q}")
        segments.append(privacy.Segment(float(sigma), float(q), 1))
    return privacy.History(tuple(segments))


def gaussian_epsilons(history: Sequence[tuple[float, float]], delta: float) -> list[float]:
    """Cumulative ε after each round, by Opacus's RDP accountant, for ``history`` = one
    ``(noise_multiplier, sample_rate)`` per round (:func:`privlora.privacy.running_epsilons`: a running
    RDP total, each distinct ``(σ, q)`` analysed once)."""
    return privacy.running_epsilons(gaussian_history(history), _delta(delta))


def gaussian_epsilon(history: Sequence[tuple[float, float]], delta: float) -> float:
    """ε after all the rounds of ``history`` (the last of :func:`gaussian_epsilons`, without the others)."""
    return privacy.epsilon(gaussian_history(history), _delta(delta))


# ---------------------------------------------------------------------------------------------- Laplace


def _constant(start: float, end: float, rounds: int) -> list[float]:
    return [start] * rounds


def _linear(start: float, end: float, rounds: int) -> list[float]:
    if rounds == 1:
        return [start]
    return [start + (end - start) * r / (rounds - 1) for r in range(rounds)]


def _exponential(start: float, end: float, rounds: int) -> list[float]:
    if rounds == 1:
        return [start]
    return [start * (end / start) ** (r / (rounds - 1)) for r in range(rounds)]


SCHEDULES: dict[str, Callable[[float, float, int], list[float]]] = {
    "constant": _constant,  # ε_start every round (ε_end is ignored)
    "linear": _linear,  # ε_start → ε_end in equal steps
    "exponential": _exponential,  # ε_start → ε_end by a constant ratio per round
}


def epsilon_schedule(name: str, start: float, end: float, rounds: int) -> list[float]:
    """Per-round Laplace ε: first round ``start``, last round ``end`` (``"constant"``: ``start`` throughout).
    With one round the schedule is ``[start]``."""
    try:
        schedule = SCHEDULES[name]
    except KeyError:
        raise UserError(f"unknown ε schedule {name!r}; choose one of {', '.join(sorted(SCHEDULES))}") from None
    start = _positive(start, "the starting ε")
    end = _positive(end, "the final ε")
    if rounds < 1:
        raise UserError(f"an ε schedule needs at least 1 round, got {rounds}")
    return schedule(start, end, rounds)


def laplace_scale(clip_l1: float, epsilon: float) -> float:
    """Laplace scale giving ``epsilon``-DP to a round: ``clip_l1 / epsilon`` (``clip_l1`` is the L1
    sensitivity of one client's clipped update under adding or removing that client)."""
    return _positive(clip_l1, "the L1 clipping norm") / _positive(epsilon, "ε")


def laplace_composed(epsilons: Sequence[float], delta: float) -> dict[str, dict[str, float]]:
    """Total privacy of rounds that were ``ε_i``-DP each (pure DP, e.g. Laplace).

    ``"basic"``: ``(Σ ε_i, 0)``. ``"advanced"``: heterogeneous advanced composition (Kairouz, Oh &
    Viswanath 2015, Thm 3.5) at ``delta``:
    ``min(Σ ε_i, Σ ε_i (e^{ε_i} − 1)/(e^{ε_i} + 1) + √(2 ln(1/δ) Σ ε_i²))``.
    """
    delta = _delta(delta)
    eps = [_positive(e, f"round {i}: ε") for i, e in enumerate(epsilons)]
    basic = math.fsum(eps)
    # (e^ε − 1)/(e^ε + 1) = tanh(ε/2), which does not overflow for large ε
    drift = math.fsum(e * math.tanh(e / 2) for e in eps)
    spread = math.sqrt(2 * math.log(1 / delta) * math.fsum(e * e for e in eps))
    return {"basic": {"epsilon": basic, "delta": 0.0},
            "advanced": {"epsilon": min(basic, drift + spread), "delta": delta}}
