"""The server's privacy plan under sample-level DP (``dp.level: sample``): who is sampled, and the
per-client ledgers written to ``privacy.json``.

The server adds and asks for no noise: each client's DP-SGD (:mod:`privlora.federated.sample_dp`) does.
Client sampling is a fixed-size draw and claims no amplification: every client's ε is accounted over
the rounds it actually trained, as if it had been certain to take part. Clients whose reports show
that one more round would pass ``dp.budget`` are no longer sampled (they would refuse anyway, and
under SecAgg+ a refusal after key sharing halts the round for everyone). The ``clients`` list in
privacy.json is rebuilt from what each client reported with its upload — the (σ, q, steps) of every
round it trained, composed by :func:`privlora.privacy.epsilon` — and each entry carries the ε the client
itself reported, so a mismatch is visible. A round whose upload never reached the server (crash, lost
reply) is in the client's own ledger, not here: the client's ledger is the one that enforces its budget.

It has the interface of :class:`~privlora.federated.privacy_plan.PrivacyPlan`, so the strategy does not
care which one it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from privlora import privacy
from privlora.config import FederatedConfig
from privlora.federated.partition import sample_clients
from privlora.federated.sample_dp import REFUSED_KEY, UNIT, ClientLedger, budget

if TYPE_CHECKING:
    from flwr.common import FitRes, Scalar


class SampleLevelPlan:
    """Fixed-size client rounds, no server-side noise, one ledger per client from its reports."""

    mechanism = "gaussian"

    def __init__(self, config: FederatedConfig) -> None:
        self.config = config
        self.ledgers: dict[int, ClientLedger] = {}
        self.reported: dict[int, float] = {}  # the ε each client last reported of itself
        self.round_sizes: dict[int, int] = {}
        self.recorded: set[int] = set()
        self.partitions: dict[int, int] = {}  # node id → the partition it reported (for the budget check)
        self.refusals: set[int] = set()  # nodes that refused a round: never sampled again

    def exhausted(self, node_id: int) -> bool:
        """Would one more round take this node's client past ``dp.budget``, by what it has reported? (A
        courtesy that keeps refusals out of SecAgg+ rounds, where a refusal halts the round for all;
        the client's own ledger is what enforces the budget.)"""
        if node_id in self.refusals:
            return True
        cap, who = budget(self.config), self.partitions.get(node_id)
        if cap is None or who is None:
            return False
        ledger = self.ledgers[who]
        s, q, k = ledger.segments[-1]
        return ledger.epsilon_after(s, q, k, self.config.dp.delta) > cap

    def sample(self, node_ids: Sequence[int], round_number: int) -> list[int]:
        ids = [n for n in sorted(int(n) for n in node_ids) if not self.exhausted(n)]
        chosen = sample_clients(ids, min(self.config.per_round(), len(ids)), seed=self.config.seed,
                                round_number=round_number) if ids else []
        self.round_sizes[round_number] = len(chosen)
        return chosen

    def instructions(self, round_number: int, group: int = 1) -> dict[str, Scalar]:
        """Nothing to clip or noise on the upload: DP-SGD already ran inside the client."""
        return {"mechanism": "none", "level": "sample"}

    def max_norm(self, dims: int) -> float | None:
        return self.config.max_update_norm  # DP-SGD bounds samples' gradients, not the round's update

    def drop_refusals(self, results: Sequence[tuple[Any, FitRes]]) -> list[tuple[Any, FitRes]]:
        """The replies that did not refuse the round, for :meth:`observe` and the merge; the refusing nodes
        are remembered and not sampled again. A refusal spends nothing: no ledger entry."""
        kept = []
        for proxy, res in results:
            node = getattr(proxy, "node_id", None)
            if not res.metrics.get(REFUSED_KEY):
                kept.append((proxy, res))
            elif node is not None:
                self.refusals.add(int(node))
                self.partitions[int(node)] = int(res.metrics["partition"])
        return kept

    def observe(self, results: Sequence[tuple[Any, FitRes]]) -> None:
        """Add each reporting client's round to its ledger (results without DP metrics are ignored)."""
        for proxy, res in results:
            m = res.metrics
            if "dp_noise_multiplier" not in m or "partition" not in m:
                continue
            who = int(m["partition"])
            node = getattr(proxy, "node_id", None)
            if node is not None:
                self.partitions[int(node)] = who
            ledger = self.ledgers.setdefault(who, ClientLedger())
            ledger.record(float(m["dp_noise_multiplier"]), float(m["dp_sample_rate"]), int(m["dp_steps"]))
            self.reported[who] = float(m["dp_epsilon"])

    def record(self, round_number: int, survivors: int, planned: int | None = None,
               groups: Sequence[tuple[int, int]] | None = None) -> float | None:
        self.recorded.add(round_number)
        return self.spent()

    def secagg_clipping_range(self) -> float:
        """The configured range: uploads are post-processed DP-SGD outputs, no server-side noise to fit."""
        return float(self.config.secagg.clipping_range)

    def spent(self) -> float | None:
        """The largest ε any client has spent (the run's worst case for one sample)."""
        delta = self.config.dp.delta
        return max((ledger.epsilon(delta) for ledger in self.ledgers.values()), default=0.0)

    def clients(self) -> list[dict[str, Any]]:
        delta, cap = self.config.dp.delta, budget(self.config)
        out = []
        for who in range(self.config.clients):
            ledger = self.ledgers.get(who, ClientLedger())
            nodes = [n for n, k in self.partitions.items() if k == who]
            out.append({"client": who, "epsilon": ledger.epsilon(delta), "epsilon_reported": self.reported.get(who),
                        "rounds": ledger.rounds, "steps": ledger.steps,
                        "exhausted": any(self.exhausted(n) for n in nodes),
                        "sample_rates": sorted({q for _, q, _ in ledger.segments}),
                        "noise_multipliers": sorted({s for s, _, _ in ledger.segments}), "budget": cap})
        return out

    def report(self) -> dict[str, Any]:
        dp = self.config.dp
        clients = self.clients()
        return {"mechanism": "gaussian", "level": "sample", "unit": UNIT, "neighbouring": privacy.SAMPLE_NEIGHBOURS,
                "training": "DP-SGD in each client (opacus: Poisson batches, per-sample clipping, Gaussian noise "
                            "on the tensors the strategy trains)",
                "accountant": "opacus RDP, Poisson-subsampled Gaussian, per client over the rounds it trained",
                "noise_multiplier": dp.noise_multiplier, "target_epsilon": dp.target_epsilon,
                "calibration": "one σ for every client" if dp.noise_multiplier is not None else
                               "each client its own σ: the target ε after every round at its own q",
                "max_grad_norm": dp.clip, "delta": dp.delta, "budget": budget(self.config),
                "local_steps": self.config.client.local_steps,
                "rounds": len(self.recorded), "secagg": self.config.secagg.enabled,
                "compression": self.config.compression,
                "client_sampling": "fixed-size rounds; no amplification by client sampling is claimed",
                "epsilon": max((c["epsilon"] for c in clients), default=0.0), "clients": clients,
                "note": "each entry is rebuilt from the uploads the server received; a client's own ledger "
                        "(which enforces dp.budget) also counts rounds whose upload was lost"}
