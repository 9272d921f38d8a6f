"""The server's privacy plan for client-level DP with adaptive clipping (``dp.clipping: adaptive``):
:class:`~privlora.federated.privacy_plan.PrivacyPlan`'s Poisson sampling and RDP ledger, with a clip
that moves after every round (:mod:`privlora.federated.adaptive_clip` holds the paper's equations).

What changes against the fixed clip:

* ``dp.noise_multiplier`` (or the σ found for ``dp.target_epsilon``) is the *effective* ``z`` of
  Andrew et al.'s Theorem 1, the one the ledger counts; the updates get ``z_Δ > z`` and the bits ``σ_b``;
* each round's instructions carry the current clip ``C_t``, the update noise ``z_Δ·C_t`` and ``σ_b``;
* the upload bound follows ``C_t`` (the inner strategy checks uploads before the clip moves);
* after the round is in the ledger, ``C`` takes the geometric step from the clients' noisy bits;
* privacy.json records the mode, ``C`` per round, the noisy unclipped fractions, ``σ_b``, ``z_Δ`` and ``z``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from privlora.config import FederatedConfig
from privlora.federated import adaptive_clip
from privlora.federated.privacy_plan import NOISE_NORM_SLACK, PrivacyPlan

if TYPE_CHECKING:
    from flwr.common import FitRes, Scalar

CITATION = "Andrew, Thakkar, McMahan & Ramaswamy 2021, Differentially Private Learning with Adaptive Clipping"


class AdaptiveClippingPlan(PrivacyPlan):
    """Client-level Gaussian DP whose clip tracks the ``dp.target_quantile`` of the update norms."""

    def __init__(self, config: FederatedConfig) -> None:
        super().__init__(config)  # self.sigma: the effective z (given, or calibrated to dp.target_epsilon)
        dp = config.dp
        self.expected_clients = float(config.per_round())  # = q·clients, the paper's m
        self.count_stddev = dp.clipped_count_stddev if dp.clipped_count_stddev is not None \
            else adaptive_clip.default_count_stddev(self.expected_clients)
        self.update_sigma = adaptive_clip.update_noise_multiplier(self.sigma, self.count_stddev)
        self.clip = float(dp.clip)  # C for the next round
        self.clips: list[float] = []  # C each recorded round used
        self.fractions: list[float | None] = []  # the noisy unclipped fraction b̄ each round (None: no reply)
        self._bits: list[float] = []  # this round's reports, until the round is recorded

    def instructions(self, round_number: int, group: int = 1) -> dict[str, Scalar]:
        """Clip to the current ``C``, noise ``z_Δ·C``, report the bit with ``σ_b`` (local placement only)."""
        return {"mechanism": "gaussian", "clip": self.clip, "noise_std": self.update_sigma * self.clip,
                "placement": "local", adaptive_clip.COUNT_STD_KEY: self.count_stddev}

    def max_norm(self, dims: int) -> float | None:
        return self.clip + self.update_sigma * self.clip * (math.sqrt(dims) + NOISE_NORM_SLACK)

    def observe(self, results: Sequence[tuple[Any, FitRes]]) -> None:
        """Keep this round's noisy bits (every reply that carries one, before any rejection)."""
        self._bits.extend(float(res.metrics[adaptive_clip.BIT_KEY]) for _, res in results
                          if adaptive_clip.BIT_KEY in res.metrics)

    def record(self, round_number: int, survivors: int, planned: int | None = None,
               groups: Sequence[tuple[int, int]] | None = None) -> float | None:
        """The round in the ledger (at the effective z), then the clip's geometric step, once per round.
        A round without a reported bit (nobody sampled, everybody failed) leaves ``C`` where it was."""
        first = round_number not in self.recorded
        spent = super().record(round_number, survivors, planned, groups)
        if first:
            self.clips.append(self.clip)
            fraction = adaptive_clip.unclipped_fraction(self._bits, self.expected_clients, self.count_stddev) \
                if self._bits else None
            self.fractions.append(fraction)
            if fraction is not None:
                dp = self.config.dp
                self.clip = adaptive_clip.geometric_update(self.clip, fraction, dp.target_quantile, dp.clip_lr)
            self._bits = []
        return spent

    def report(self) -> dict[str, Any]:
        dp = self.config.dp
        return {**super().report(), "clipping": "adaptive", "clip": self.clips[-1] if self.clips else self.clip,
                "clip_initial": dp.clip, "clip_per_round": self.clips, "clip_next": self.clip,
                "unclipped_fraction_per_round": self.fractions, "target_quantile": dp.target_quantile,
                "clip_lr": dp.clip_lr, "clipped_count_stddev": self.count_stddev,
                "update_noise_multiplier": self.update_sigma, "noise_multiplier": self.sigma,
                "adaptive_accounting": f"{CITATION}, Theorem 1: updates noised with z_Δ·C and the clients' "
                                       "(b − ½) bits with σ_b are accounted as one Gaussian mechanism with "
                                       "effective z = (z_Δ⁻² + (2σ_b)⁻²)^(-1/2) = noise_multiplier, the σ of "
                                       "effective_noise_multipliers",
                "count_noise": "each client adds N(0, σ_b²) to its own 1[‖Δ‖ ≤ C] − ½ (local placement); "
                               "b̄ = Σ/m + ½ with m = clients_per_round (expected), clamped reports"}
