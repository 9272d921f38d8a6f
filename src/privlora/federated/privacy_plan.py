"""The server's privacy plan for client-level DP: who is sampled each round, the noise instructions, and
the ledger written to ``privacy.json``.

Sampling and accounting live together on purpose: an accountant's ε is only valid for the sampling it
assumes. The Gaussian ledger is Opacus' RDP for the Poisson-subsampled Gaussian, so DP runs sample
Poisson (:func:`~privlora.federated.partition.poisson_clients`: every client joins a round independently
with probability ``q = clients_per_round / clients``). Drawing exactly ``m`` clients and accounting it as
Poisson understates ε (20 clients, 4 per round, 5 rounds, σ 0.73: 7.99 claimed, 9.67 by dp-accounting's
sampled-without-replacement bound), which is what this module replaced. Runs without DP keep
fixed-size rounds (``sample_clients``): no accountant depends on them.

A Poisson round may be empty or smaller than planned. Empty rounds keep the global state and are still
counted (the mechanism ran). Distributed noise is split over the clients actually sampled (``σC/√n``
each, so the secure sum carries ``σC`` whatever ``n`` is); when some of them drop out the round is
counted with the noise that really reached the sum (``effective_noise_multiplier``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from privlora import privacy
from privlora.config import FederatedConfig
from privlora.errors import UserError
from privlora.federated import client_privacy, secagg
from privlora.federated.partition import poisson_clients, sample_clients

if TYPE_CHECKING:
    from flwr.common import Scalar

#: P(‖N(0, s²I_d)‖ > s(√d + t)) ≤ exp(-t²/2): t = 6 gives < 1e-8 per honest upload
NOISE_NORM_SLACK = 6.0

#: the neighbouring relation every figure in a federated privacy.json is stated for (privacy's, re-exported)
CLIENT_NEIGHBOURS = privacy.CLIENT_NEIGHBOURS


class PrivacyPlan:
    """Client sampling, σ or the per-round ε schedule, and the running ledger written to ``privacy.json``."""

    def __init__(self, config: FederatedConfig) -> None:
        self.config = config
        dp = config.dp
        self.mechanism = dp.mechanism
        self.sample_rate = config.per_round() / config.clients
        self.history: list[tuple[float, float]] = []  # (effective σ, sample rate) per round with DP
        self.laplace_eps: list[float] = []
        self.recorded: set[int] = set()  # rounds already in the ledger (each is counted once)
        self.round_sizes: dict[int, int] = {}  # clients sampled per round
        self.sigma = 0.0
        if self.mechanism == "gaussian":
            self.sigma = dp.noise_multiplier if dp.noise_multiplier is not None else self._solve_sigma()
        self.schedule = (client_privacy.epsilon_schedule(dp.schedule, dp.epsilon_start, dp.epsilon_end,
                                                         config.rounds) if self.mechanism == "laplace" else [])

    @property
    def poisson(self) -> bool:
        """DP runs sample Poisson, the sampling the Gaussian accountant assumes (Laplace claims no
        amplification, so any sampling is valid for it; one rule keeps the two alike)."""
        return self.mechanism != "none"

    def _solve_sigma(self) -> float:
        """The smallest σ (bisection, 1e-3 relative: :data:`privlora.privacy.LEDGER`) whose ε after all
        rounds is ≤ the target."""
        dp, rounds = self.config.dp, self.config.rounds
        try:
            return privacy.noise_multiplier(dp.target_epsilon, sample_rate=self.sample_rate, steps=rounds,
                                            delta=dp.delta, search=privacy.LEDGER)
        except privacy.TargetUnreachable:
            raise UserError(f"no noise level reaches ε = {dp.target_epsilon} in {rounds} rounds") from None

    def sample(self, node_ids: Sequence[int], round_number: int) -> list[int]:
        """This round's participants among the connected ``node_ids`` (sorted), seeded by the round.

        DP: each node joins with probability ``q`` (possibly none). A client that is not connected
        simply cannot join, which only lowers its chance below ``q``. Without DP: exactly
        ``min(clients_per_round, connected)`` nodes.
        """
        ids = sorted(int(n) for n in node_ids)
        if self.poisson:
            chosen = poisson_clients(ids, self.sample_rate, seed=self.config.seed, round_number=round_number)
        else:
            chosen = sample_clients(ids, min(self.config.per_round(), len(ids)), seed=self.config.seed,
                                    round_number=round_number) if ids else []
        self.round_sizes[round_number] = len(chosen)
        return chosen

    def instructions(self, round_number: int, group: int = 1) -> dict[str, Scalar]:
        """What the round's clients are told to do; ``group`` is how many sampled clients' noise adds up
        in one released sum (the round's clients, or one edge's), for distributed noise."""
        dp = self.config.dp
        if self.mechanism == "gaussian":
            std = client_privacy.noise_std(self.sigma, dp.clip, max(1, group), dp.placement)
            # placement travels so a client under SecAgg+ knows to undo the mod's weighting of distributed noise
            return {"mechanism": "gaussian", "clip": dp.clip, "noise_std": std, "placement": dp.placement}
        if self.mechanism == "laplace":
            eps = self.schedule[round_number - 1]
            return {"mechanism": "laplace", "clip": dp.clip, "laplace_scale": dp.clip / eps, "epsilon": eps}
        return {"mechanism": "none"}

    def max_norm(self, dims: int) -> float | None:
        """The largest L2 norm an honest upload can have (None: no bound). Distributed noise is largest
        for a group of one, so the bound holds for every round size."""
        if self.mechanism == "gaussian":
            std = client_privacy.noise_std(self.sigma, self.config.dp.clip, 1, self.config.dp.placement)
            return self.config.dp.clip + std * (math.sqrt(dims) + NOISE_NORM_SLACK)
        return self.config.max_update_norm  # none; Laplace noise has no tight L2 bound worth enforcing

    def observe(self, results: Sequence[Any]) -> None:
        """Client-level DP learns nothing from a round's replies (sample-level DP reads ledgers here)."""

    def record(self, round_number: int, survivors: int, planned: int | None = None,
               groups: Sequence[tuple[int, int]] | None = None) -> float | None:
        """Add a round to the ledger once (later calls for the same round change nothing); returns ε so
        far (None without DP). ``groups``: (sampled, survived) per released sum — one for a flat round,
        one per edge; default one group of ``planned`` (the round's sampled count) and ``survivors``.

        Every DP round counts, also one with no client or no survivor: counting a round that released
        nothing only overstates ε, never understates it. With distributed noise the round is counted at
        the smallest noise multiplier any released sum carried."""
        if self.mechanism == "none" or round_number in self.recorded:
            return self.spent()
        self.recorded.add(round_number)
        if self.mechanism == "laplace":
            self.laplace_eps.append(self.schedule[round_number - 1])
            return self.spent()
        if groups is None:
            groups = [(planned if planned is not None else self.round_sizes.get(round_number, survivors), survivors)]
        sigmas = [client_privacy.effective_noise_multiplier(self.sigma, self.config.dp.placement, n, min(s, n))
                  for n, s in groups if n >= 1 and s >= 1]
        self.history.append((min(sigmas, default=self.sigma), self.sample_rate))
        return self.spent()

    def secagg_clipping_range(self) -> float:
        """SecAgg+'s per-value range: wide enough under Gaussian DP that the mod never clips a noisy value
        (:func:`privlora.federated.secagg.clipping_range`)."""
        return secagg.clipping_range(self.config, self.sigma)

    def _secagg_range(self) -> dict[str, Any]:
        """What SecAgg+'s ±range and weighting do to the accounted mechanism, stated in privacy.json."""
        return {"clipping_range": self.secagg_clipping_range(),
                "covers": f"clip·(1 + {secagg.RANGE_SIGMAS:g}σ) per coordinate",
                "per_value_overflow_probability": secagg.overflow_probability(),
                "note": "SecAgg+ clips each client's noisy value to ±clipping_range before the secure sum, which "
                        "is not post-processing of the accounted Gaussian sum. The range covers a clipped "
                        f"coordinate plus {secagg.RANGE_SIGMAS:g} noise stds, so a run clips nothing except with "
                        "probability ≤ V·p (V = coordinates × uploads, p above); that adds at most "
                        "(1 + e^ε)·V·p to δ. Distributed noise is divided by each client's SecAgg+ weight, so "
                        "the weighted sum carries σ·clip against a per-client contribution ≤ clip."}

    def spent(self) -> float | None:
        if self.mechanism == "gaussian":
            return client_privacy.gaussian_epsilon(self.history, self.config.dp.delta)
        if self.mechanism == "laplace":
            return client_privacy.laplace_composed(self.laplace_eps, self.config.dp.delta)["basic"]["epsilon"] \
                if self.laplace_eps else 0.0
        return None

    def _sampling(self) -> str:
        q = self.sample_rate
        if q >= 1:
            return "every client every round (q=1, no subsampling)"
        used = "used by the accountant" if self.mechanism == "gaussian" else \
            "not used by the accountant: no amplification by sampling is claimed"
        return f"poisson, q={q:.6g} (each client joins a round independently; {used})"

    def report(self) -> dict[str, Any]:
        dp = self.config.dp
        if self.mechanism == "none":
            return {"mechanism": "none", "unit": "client", "epsilon": None,
                    "note": "no differential privacy: uploads are neither clipped nor noised"}
        sizes = [self.round_sizes[r] for r in sorted(self.round_sizes)]
        base = {"unit": "client (all of one client's data)", "neighbouring": CLIENT_NEIGHBOURS,
                "clip": dp.clip, "delta": dp.delta, "rounds": len(self.recorded), "clients": self.config.clients,
                "clients_per_round": self.config.per_round(), "sample_rate": self.sample_rate,
                "sampling": self._sampling(), "sampled_per_round": sizes,
                "empty_rounds": sum(1 for n in sizes if n == 0),
                "placement": dp.placement, "secagg": self.config.secagg.enabled}
        if self.mechanism == "gaussian":
            per_round = client_privacy.gaussian_epsilons(self.history, dp.delta) if self.history else []
            if self.config.secagg.enabled:
                base["secagg_range"] = self._secagg_range()
            return {**base, "mechanism": "gaussian",
                    "accountant": "opacus RDP, Poisson-subsampled Gaussian, one step per round",
                    "noise_multiplier": self.sigma, "effective_noise_multipliers": [h[0] for h in self.history],
                    "epsilon_per_round": per_round, "epsilon": per_round[-1] if per_round else 0.0}
        composed = client_privacy.laplace_composed(self.laplace_eps, dp.delta) if self.laplace_eps else \
            {"basic": {"epsilon": 0.0}, "advanced": {"epsilon": 0.0}}
        return {**base, "mechanism": "laplace", "schedule": dp.schedule, "sensitivity": "L1 clip",
                "epsilon_per_round": self.laplace_eps, "epsilon": composed["basic"]["epsilon"],
                "epsilon_advanced": composed["advanced"]["epsilon"], "delta_advanced": dp.delta,
                "accountant": "basic composition (pure ε) and heterogeneous advanced composition"}
