"""The server's side: a plain Flower ``Strategy`` that samples clients, checks and merges their LoRA
uploads (FedIT / FFA-LoRA / FLoRA through one rule object) and evaluates the global adapter on the
server's held-out set. It holds no privacy code: DP is a wrapper around it
(:mod:`privlora.federated.dp_strategy`, chosen by ``dp.level``), the way Flower's
``DifferentialPrivacyServerSideFixedClipping`` wraps any strategy. A wrapper changes this strategy only
through its two seams — ``sampler`` (who joins a round) and ``upload_bound`` (the largest norm an honest
upload can have) — and by adding its keys to the FitIns it returns and to ``round_log``.

It is a legacy-API ``Strategy`` on purpose: Flower's SecAgg+ lives in the workflow API
(``SecAggPlusWorkflow``), which drives exactly this interface — with SecAgg+ on, ``aggregate_fit``
receives only the securely computed weighted mean, never one client's upload.

What the server does not trust: sample counts (capped at ``sample_cap``), shapes (checked against the
global state), values (NaN/inf rejected), norms (over ``upload_bound(dims)``: ``max_update_norm``, or
what a DP wrapper sets — the clip plus a bound on the noise's norm that fails with probability < 1e-8 —
rejected). Rejections are logged per round in ``metrics.jsonl`` and the round goes on with the rest.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
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
from privlora.federated import aggregation
from privlora.federated.client import fresh_task, task_for
from privlora.federated.client_privacy import l2_norm
from privlora.federated.compression import get_codec
from privlora.federated.data import federated_data
from privlora.federated.partition import sample_clients
from privlora.federated.rules import Rule, weighted_mean
from privlora.federated.tasks import federated_task, rule_for

#: who joins a round: (connected node ids, sorted; round number) → the chosen node ids
Sampler = Callable[[Sequence[int], int], list[int]]
#: the largest L2 norm an honest upload of ``dims`` values can have (None: no bound)
UploadBound = Callable[[int], float | None]


class LoraStrategy(Strategy):
    """Flower strategy for FedIT / FFA-LoRA / FLoRA with compression and hierarchy (no privacy: wrap it)."""

    def __init__(self, config: FederatedConfig, workdir: Path) -> None:
        super().__init__()
        self.config = config
        self.workdir = Path(workdir)
        self.kind = federated_task(config)  # what is trained and how the server scores it (federated/tasks.py)
        self.rule: Rule = rule_for(config)
        self.codec = get_codec(config.compression)
        self.sampler: Sampler = self.fixed_size_sample  # a DP wrapper replaces it (its accountant's sampling)
        self.upload_bound: UploadBound = lambda dims: config.max_update_norm
        self.data = federated_data(config)
        self.num_labels: int | None = None  # the classifier's size is the data's (a causal LM has none)
        self.state: list[np.ndarray] = []
        self.rank = self._scheduled_rank(1)
        self.round_log: dict[str, Any] = {}
        self.edge: int | None = None  # set by EdgeSecAggWorkflow while it runs one edge's SecAgg+
        self.edge_means: list[tuple[list[np.ndarray], float, int, int]] = []
        self._round_sample: tuple[dict, list[int]] | None = None
        self._edge_sizes: dict[int, int] = {}  # sampled clients per edge in this round
        self.started = time.perf_counter()

    # --- helpers -------------------------------------------------------------------------------------
    def fixed_size_sample(self, node_ids: Sequence[int], round_number: int) -> list[int]:
        """Exactly ``min(clients_per_round, connected)`` nodes, seeded by (seed, round)."""
        ids = sorted(int(n) for n in node_ids)
        return sample_clients(ids, min(self.config.per_round(), len(ids)), seed=self.config.seed,
                              round_number=round_number) if ids else []

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
        """This round's sampled clients and what they receive (possibly nobody: a DP wrapper's sampler
        may draw no one). With secure aggregation inside edges (:class:`EdgeSecAggWorkflow`) it is called once per
        edge and returns that edge's share of one sample drawn at the round's first call."""
        edges = self.config.hierarchy.edges
        if self.edge is not None and self.edge > 0 and self._round_sample:
            by_node, chosen = self._round_sample
            return self._edge_share(server_round, by_node, chosen, self.edge)
        rank = self._scheduled_rank(server_round)
        if rank != self.rank:
            self.state = self.rule.resize(self.state, rank, seed=self.config.seed + server_round)
            self.rank = rank
        client_manager.wait_for(min(self.config.per_round(), self.config.clients),
                                timeout=int(self.config.round_timeout))
        by_node = {p.node_id: p for p in client_manager.all().values()}
        chosen = self.sampler(sorted(by_node), server_round)
        ins = self.fit_ins(server_round, len(chosen))
        self.round_log = {"round": server_round, "rank": self.rank, "sampled": len(chosen), "accepted": 0,
                          "failures": 0, "bytes_down_per_client": sum(len(t) for t in ins.parameters.tensors),
                          "round_started": time.perf_counter()}
        if self.edge is not None:
            self._round_sample = (by_node, chosen)
            self._edge_sizes = {e: sum(1 for n in chosen if edge_of(n, by_node, edges) == e) for e in range(edges)}
            return self._edge_share(server_round, by_node, chosen, 0)
        return [(by_node[n], ins) for n in chosen]

    def _edge_share(self, server_round: int, by_node: dict, chosen: list[int],
                    edge: int) -> list[tuple[ClientProxy, FitIns]]:
        """The sampled clients of one edge; their distributed noise adds up to σC within the edge."""
        mine = [n for n in chosen if edge_of(n, by_node, self.config.hierarchy.edges) == edge]
        ins = self.fit_ins(server_round, len(mine))
        return [(by_node[n], ins) for n in mine]

    def fit_ins(self, server_round: int, group: int = 1) -> FitIns:
        """What every client of this round receives: the global state, the round and the rank
        (``group``: how many clients share the sum this one is part of — unused here, a DP wrapper sizes
        distributed noise by it)."""
        instructions: dict[str, Scalar] = {"round": server_round, "rank": self.rank}
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
        bound = self.upload_bound(sum(a.size for a in upload))
        norm = l2_norm(upload)
        if bound is not None and norm > bound:
            return f"update norm {norm:.4g} exceeds the bound {bound:.4g}"
        return None

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Merge the round's checked uploads. Metrics: ``accepted``; ``partial`` when this was one edge's
        secure mean (the round is complete only after :meth:`merge_edges`)."""
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
                                        len(results), self.edge))
            return ndarrays_to_parameters(self.state), {"accepted": len(results), "partial": True}
        if self.config.secagg.enabled:
            accepted = len(results)
            if results:  # every FitRes carries the same securely aggregated mean
                mean = parameters_to_ndarrays(results[0][1].parameters)
                self.state = self.rule.apply_mean(self.state, mean)
            log.update(accepted=accepted, rejected=[])
        else:
            accepted = self._merge_checked(results, log)
        return ndarrays_to_parameters(self.state), {"accepted": accepted}

    def merge_edges(self, server_round: int) -> tuple[int, list[tuple[int, int]]]:
        """The cloud's step after every edge ran SecAgg+: the edges' means weighted by their (capped)
        sample totals. The cloud never sees a client's upload, only one mean per edge. Returns the
        accepted count and (sampled, survived) per edge's released sum, for a DP wrapper's ledger."""
        log = self.round_log
        accepted = sum(n for _, _, n, _ in self.edge_means)
        if self.edge_means:
            w = torch.tensor([weight for _, weight, _, _ in self.edge_means], dtype=torch.float64)
            means = [m for m, _, _, _ in self.edge_means]
            self.state = self.rule.apply_mean(self.state, weighted_mean(means, w / w.sum()))
        log.update(accepted=accepted, rejected=[], edges=len(self.edge_means))
        groups = [(self._edge_sizes.get(edge, n), n) for _, _, n, edge in self.edge_means]
        self.edge_means = []
        self._round_sample = None
        return accepted, groups

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
        scores = self.kind.evaluate(self._model(self.state), self.data.test)  # text: accuracy, loss; LM: ppl too
        line = {"round": server_round, **scores}
        if server_round > 0:
            line.update({k: v for k, v in self.round_log.items() if k != "round_started"})
            line["round_seconds"] = time.perf_counter() - self.round_log.get("round_started", self.started)
            line.update(scores)
        else:
            line.update(self.round_log)  # before round 1: only what a wrapper put there (its ledger's ε)
        with (self.workdir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")
        if server_round == self.config.rounds:
            self.finish()
        return scores["loss"], {k: v for k, v in scores.items() if k != "loss"}

    def finish(self) -> None:
        """Write the global adapter (the last round's evaluation calls this; a DP wrapper then writes
        privacy.json)."""
        from privlora.federated.adapter import save_global_adapter

        save_global_adapter(self.rule, self.state, self.config, self.num_labels, self.workdir / "adapter")


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
