"""The server's side: a Flower ``Strategy`` that samples clients, checks and merges their LoRA uploads,
keeps the privacy ledger and evaluates the global adapter on the server's held-out set.

It is a legacy-API ``Strategy`` on purpose: Flower's SecAgg+ lives in the workflow API
(``SecAggPlusWorkflow``), which drives exactly this interface — with SecAgg+ on, ``aggregate_fit``
receives only the securely computed weighted mean, never one client's upload.

What the server does not trust: sample counts (capped at ``sample_cap``), shapes (checked against the
global state), values (NaN/inf rejected), norms (over ``max_update_norm`` — under DP, the clip plus a
bound on the noise's norm that fails with probability < 1e-8 — rejected). Rejections are logged per
round in ``metrics.jsonl`` and the round goes on with the rest.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from privlora.config import FederatedConfig
from privlora.errors import UserError
from privlora.federated import aggregation, client_privacy
from privlora.federated.client import fresh_task, task_for
from privlora.federated.compression import get_codec
from privlora.federated.data import federated_data
from privlora.federated.partition import sample_clients
from privlora.federated.rules import Rule, get_rule, weighted_mean

#: P(‖N(0, s²I_d)‖ > s(√d + t)) ≤ exp(-t²/2): t = 6 gives < 1e-8 per honest upload
NOISE_NORM_SLACK = 6.0


class PrivacyPlan:
    """σ or the per-round ε schedule, and the running ledger written to ``privacy.json``."""

    def __init__(self, config: FederatedConfig) -> None:
        self.config = config
        dp = config.dp
        self.mechanism = dp.mechanism
        self.sample_rate = config.per_round() / config.clients
        self.history: list[tuple[float, float]] = []  # (effective σ, sample rate) per round with DP
        self.laplace_eps: list[float] = []
        self.sigma = 0.0
        if self.mechanism == "gaussian":
            self.sigma = dp.noise_multiplier if dp.noise_multiplier is not None else self._solve_sigma()
        self.schedule = (client_privacy.epsilon_schedule(dp.schedule, dp.epsilon_start, dp.epsilon_end,
                                                         config.rounds) if self.mechanism == "laplace" else [])

    def _solve_sigma(self) -> float:
        """The smallest σ (bisection, 1e-3 relative) whose ε after all rounds is ≤ the target."""
        dp, rounds = self.config.dp, self.config.rounds

        def eps(sigma: float) -> float:
            return client_privacy.gaussian_epsilons([(sigma, self.sample_rate)] * rounds, dp.delta)[-1]

        lo, hi = 0.05, 1.0
        while eps(hi) > dp.target_epsilon:
            hi *= 2
            if hi > 1e4:
                raise UserError(f"no noise level reaches ε = {dp.target_epsilon} in {rounds} rounds")
        while hi - lo > 1e-3 * hi:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if eps(mid) > dp.target_epsilon else (lo, mid)
        return hi

    def noise_group(self) -> int:
        """How many clients' distributed noise adds up in one released sum: the round's clients, or one
        edge's share of them when edges aggregate (each edge's sum must carry σC on its own)."""
        return max(1, self.config.per_round() // max(1, self.config.hierarchy.edges))

    def instructions(self, round_number: int) -> dict[str, Scalar]:
        dp = self.config.dp
        if self.mechanism == "gaussian":
            std = client_privacy.noise_std(self.sigma, dp.clip, self.noise_group(), dp.placement)
            return {"mechanism": "gaussian", "clip": dp.clip, "noise_std": std}
        if self.mechanism == "laplace":
            eps = self.schedule[round_number - 1]
            return {"mechanism": "laplace", "clip": dp.clip, "laplace_scale": dp.clip / eps, "epsilon": eps}
        return {"mechanism": "none"}

    def max_norm(self, dims: int) -> float | None:
        """The largest L2 norm an honest upload can have (None: no bound)."""
        if self.mechanism == "gaussian":
            std = client_privacy.noise_std(self.sigma, self.config.dp.clip, self.noise_group(),
                                           self.config.dp.placement)
            return self.config.dp.clip + std * (math.sqrt(dims) + NOISE_NORM_SLACK)
        return self.config.max_update_norm  # none; Laplace noise has no tight L2 bound worth enforcing

    def record(self, round_number: int, survivors: int) -> float | None:
        """Add a completed round to the ledger; returns ε spent so far (None without DP)."""
        if survivors == 0 or self.mechanism == "none":
            return self.spent()
        if self.mechanism == "gaussian":
            edges = max(1, self.config.hierarchy.edges)
            sigma = client_privacy.effective_noise_multiplier(self.sigma, self.config.dp.placement,
                                                              self.noise_group(),
                                                              max(1, min(self.noise_group(), survivors // edges)))
            self.history.append((sigma, self.sample_rate))
        else:
            self.laplace_eps.append(self.schedule[round_number - 1])
        return self.spent()

    def spent(self) -> float | None:
        if self.mechanism == "gaussian":
            return client_privacy.gaussian_epsilons(self.history, self.config.dp.delta)[-1] if self.history else 0.0
        if self.mechanism == "laplace":
            return client_privacy.laplace_composed(self.laplace_eps, self.config.dp.delta)["basic"]["epsilon"] \
                if self.laplace_eps else 0.0
        return None

    def report(self) -> dict[str, Any]:
        dp = self.config.dp
        if self.mechanism == "none":
            return {"mechanism": "none", "unit": "client", "epsilon": None,
                    "note": "no differential privacy: uploads are neither clipped nor noised"}
        base = {"unit": "client (all of one client's data)", "clip": dp.clip, "delta": dp.delta,
                "rounds": len(self.history) or len(self.laplace_eps), "clients": self.config.clients,
                "clients_per_round": self.config.per_round(), "sample_rate": self.sample_rate,
                "placement": dp.placement, "secagg": self.config.secagg.enabled}
        if self.mechanism == "gaussian":
            per_round = client_privacy.gaussian_epsilons(self.history, dp.delta) if self.history else []
            return {**base, "mechanism": "gaussian", "accountant": "opacus RDP",
                    "noise_multiplier": self.sigma, "effective_noise_multipliers": [h[0] for h in self.history],
                    "epsilon_per_round": per_round, "epsilon": per_round[-1] if per_round else 0.0,
                    "sampling": "fixed-size client sampling, accounted as Poisson with q = m/N"}
        composed = client_privacy.laplace_composed(self.laplace_eps, dp.delta) if self.laplace_eps else \
            {"basic": {"epsilon": 0.0}, "advanced": {"epsilon": 0.0}}
        return {**base, "mechanism": "laplace", "schedule": dp.schedule, "sensitivity": "L1 clip",
                "epsilon_per_round": self.laplace_eps, "epsilon": composed["basic"]["epsilon"],
                "epsilon_advanced": composed["advanced"]["epsilon"], "delta_advanced": dp.delta,
                "accountant": "basic composition (pure ε) and heterogeneous advanced composition"}


class LoraStrategy(Strategy):
    """Flower strategy for FedIT / FFA-LoRA / FLoRA with client DP, compression and hierarchy."""

    def __init__(self, config: FederatedConfig, workdir: Path) -> None:
        super().__init__()
        self.config = config
        self.workdir = Path(workdir)
        self.rule: Rule = get_rule(config.strategy, config.lora.alpha)
        self.codec = get_codec(config.compression)
        self.privacy = PrivacyPlan(config)
        self.data = federated_data(config)
        self.num_labels = len(self.data.train.classes)
        self.state: list[np.ndarray] = []
        self.rank = self._scheduled_rank(1)
        self.round_log: dict[str, Any] = {}
        self.edge: int | None = None  # set by EdgeSecAggWorkflow while it runs one edge's SecAgg+
        self.edge_means: list[tuple[list[np.ndarray], float, int]] = []
        self._round_sample: tuple[dict, list[int]] | None = None
        self.started = time.perf_counter()

    # --- helpers -------------------------------------------------------------------------------------
    def _scheduled_rank(self, round_number: int) -> int:
        schedule = self.config.lora.rank_schedule or {}
        rank = self.config.lora.rank
        for first, r in sorted(schedule.items()):
            if first <= round_number:
                rank = r
        return rank

    def _model(self, state: Sequence[np.ndarray]) -> Any:
        """The server's evaluation model carrying ``state``."""
        rank = self.rule.rank_of(state) or 1
        task = task_for(self.config, self.num_labels, rank)
        self.rule.load(task.model, state)
        return task

    # --- Strategy interface --------------------------------------------------------------------------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # a fresh model, not the process's cached one (an earlier run in this process has changed that):
        # the seeded initial A is the FFA-LoRA "shared seed", every client receives the same frozen A
        task = fresh_task(self.config, self.num_labels, self.rank)
        self.state = self.rule.initial_state(task.model)
        return ndarrays_to_parameters(self.state)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """This round's sampled clients and what they receive. With secure aggregation inside edges
        (:class:`EdgeSecAggWorkflow`) it is called once per edge and returns that edge's share of one
        sample drawn at the round's first call."""
        if self.edge is not None and self.edge > 0 and self._round_sample:
            by_node, chosen = self._round_sample
            ins = self.fit_ins(server_round)
            return [(by_node[n], ins) for n in chosen if edge_of(n, by_node, self.config.hierarchy.edges) == self.edge]
        rank = self._scheduled_rank(server_round)
        if rank != self.rank:
            self.state = self.rule.resize(self.state, rank, seed=self.config.seed + server_round)
            self.rank = rank
        wanted = self.config.per_round()
        client_manager.wait_for(min(wanted, self.config.clients), timeout=int(self.config.round_timeout))
        proxies = client_manager.all()
        by_node = {p.node_id: p for p in proxies.values()}
        if len(by_node) < wanted:
            wanted = len(by_node)
        chosen = sample_clients(sorted(by_node), wanted, seed=self.config.seed, round_number=server_round)
        ins = self.fit_ins(server_round)
        self.round_log = {"round": server_round, "rank": self.rank, "sampled": len(chosen),
                          "bytes_down_per_client": sum(len(t) for t in ins.parameters.tensors),
                          "round_started": time.perf_counter()}
        if self.edge is not None:
            self._round_sample = (by_node, chosen)
            return [(by_node[n], ins) for n in chosen if edge_of(n, by_node, self.config.hierarchy.edges) == 0]
        return [(by_node[n], ins) for n in chosen]

    def fit_ins(self, server_round: int) -> FitIns:
        """What every client of this round receives: the global state and the round's instructions."""
        instructions: dict[str, Scalar] = {"round": server_round, "rank": self.rank,
                                           **self.privacy.instructions(server_round)}
        return FitIns(ndarrays_to_parameters(self.state), instructions)

    def _check(self, upload: list[np.ndarray]) -> str | None:
        """Why this decoded upload is rejected, or None."""
        expected = self.rule.upload_shapes(self.state, upload)
        if len(upload) != len(expected):
            return f"{len(upload)} arrays, expected {len(expected)}"
        for k, (a, shape) in enumerate(zip(upload, expected, strict=True)):
            if tuple(a.shape) != shape:
                return f"array {k} has shape {tuple(a.shape)}, expected {shape}"
            if not np.isfinite(a).all():
                return f"array {k} holds NaN or infinite values"
        bound = self.privacy.max_norm(sum(a.size for a in upload))
        norm = client_privacy.l2_norm(upload)
        if bound is not None and norm > bound:
            return f"update norm {norm:.4g} exceeds the bound {bound:.4g}"
        return None

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        log = self.round_log
        log["failures"] = log.get("failures", 0) + len(failures) if self.edge else len(failures)
        if self.config.secagg.enabled:
            # the FitRes parameters all hold the secure mean; the clients' own payload size is their metric
            sizes = [float(r.metrics.get("bytes_up", math.nan)) for _, r in results]
        else:
            sizes = [float(sum(len(t) for t in r.parameters.tensors)) for _, r in results]
        log["bytes_up_per_client"] = float(np.mean(sizes)) if sizes else 0.0
        log["client_loss"] = float(np.mean([float(r.metrics.get("loss", math.nan)) for _, r in results])) \
            if results else math.nan
        if self.edge is not None:  # one edge's secure mean: kept for the cloud, state unchanged for now
            if results:
                weight = sum(min(r.num_examples, self.config.sample_cap or r.num_examples) for _, r in results)
                self.edge_means.append((parameters_to_ndarrays(results[0][1].parameters), float(weight),
                                        len(results)))
            return ndarrays_to_parameters(self.state), {"accepted": len(results)}
        if self.config.secagg.enabled:
            accepted = len(results)
            if results:  # every FitRes carries the same securely aggregated mean
                mean = parameters_to_ndarrays(results[0][1].parameters)
                self.state = self.rule.apply_mean(self.state, mean)
            log.update(accepted=accepted, rejected=[])
        else:
            accepted = self._merge_checked(results, log)
        log["epsilon"] = self.privacy.record(server_round, accepted)
        return ndarrays_to_parameters(self.state), {"accepted": accepted}

    def merge_edges(self, server_round: int) -> None:
        """The cloud's step after every edge ran SecAgg+: the edges' means weighted by their (capped)
        sample totals. The cloud never sees a client's upload, only one mean per edge."""
        log = self.round_log
        accepted = sum(n for _, _, n in self.edge_means)
        if self.edge_means:
            w = torch.tensor([weight for _, weight, _ in self.edge_means], dtype=torch.float64)
            means = [m for m, _, _ in self.edge_means]
            self.state = self.rule.apply_mean(self.state, weighted_mean(means, w / w.sum()))
        log.update(accepted=accepted, rejected=[], edges=len(self.edge_means))
        log["epsilon"] = self.privacy.record(server_round, accepted)
        self.edge_means = []
        self._round_sample = None

    def decode_checked(self, res: FitRes) -> tuple[list[np.ndarray] | None, str | None]:
        """A client's decoded upload, or None and why it is rejected."""
        try:
            upload = self.codec.decode(parameters_to_ndarrays(res.parameters))
        except (UserError, ValueError) as e:
            return None, str(e)
        reason = self._check(upload)
        return (None, reason) if reason is not None else (upload, None)

    def merge_uploads(self, uploads: list[list[np.ndarray]], p: torch.Tensor, partitions: list[int],
                      log: dict[str, Any]) -> None:
        """Fold weighted uploads (weights ``p``) into the global state, through the edges if configured."""
        edges = self.config.hierarchy.edges
        if edges and self.rule.sum_based:
            self.state = self.rule.apply_mean(self.state, hierarchical_mean(uploads, p, partitions, edges))
            log["edges"] = len({k % edges for k in partitions})
        else:
            self.state = self.rule.merge(self.state, uploads, p)

    def _merge_checked(self, results: list[tuple[ClientProxy, FitRes]], log: dict[str, Any]) -> int:
        uploads, counts, partitions, rejected = [], [], [], []
        for proxy, res in results:
            who = int(res.metrics.get("partition", -1))
            upload, reason = self.decode_checked(res)
            if upload is None:
                rejected.append({"client": who, "node": proxy.node_id, "reason": reason})
                continue
            uploads.append(upload)
            counts.append(res.num_examples)
            partitions.append(who)
        log["rejected"] = rejected
        log["accepted"] = len(uploads)
        if uploads:
            self.merge_uploads(uploads, aggregation.weights(counts, self.config.sample_cap), partitions, log)
        return len(uploads)

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list:
        return []  # the global adapter is evaluated on the server's held-out set, not by clients

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[float | None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        accuracy, loss = self._model(self.state).score(self.data.test)
        line = {"round": server_round, "accuracy": accuracy, "loss": loss}
        if server_round > 0:
            line.update({k: v for k, v in self.round_log.items() if k != "round_started"})
            line["round_seconds"] = time.perf_counter() - self.round_log.get("round_started", self.started)
            line["accuracy"], line["loss"] = accuracy, loss
        else:
            line["epsilon"] = self.privacy.spent()
        with (self.workdir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")
        if server_round == self.config.rounds:
            self.finish()
        return loss, {"accuracy": accuracy}

    def finish(self) -> None:
        """Write the global adapter and the privacy ledger (the last round's evaluation calls this)."""
        from privlora.federated.adapter import save_global_adapter

        save_global_adapter(self.rule, self.state, self.config, self.num_labels, self.workdir / "adapter")
        (self.workdir / "privacy.json").write_text(json.dumps(self.privacy.report(), indent=2) + "\n")


def edge_of(node_id: int, by_node: dict, edges: int) -> int:
    """Under secure aggregation the server knows nodes, not partitions: node ``k``-th in id order → edge
    ``k mod edges``."""
    return sorted(by_node).index(node_id) % edges


def hierarchical_mean(uploads: Sequence[Sequence[np.ndarray]], p: torch.Tensor, partitions: Sequence[int],
                      edges: int) -> list[np.ndarray]:
    """Client → edge → cloud: each edge averages its region (client ``k`` belongs to edge ``k mod edges``),
    the cloud averages the edges weighted by their regions' total weight. Equal to the flat weighted mean
    (tested) — what changes is who sees what: the cloud sees only one mean per edge."""
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(partitions):
        groups.setdefault(k % edges, []).append(i)
    edge_means, edge_weights = [], []
    for members in groups.values():
        w = p[members]
        edge_means.append(weighted_mean([uploads[i] for i in members], w / w.sum()))
        edge_weights.append(float(w.sum()))
    return weighted_mean(edge_means, torch.tensor(edge_weights, dtype=torch.float64))
