"""Asynchronous, buffered aggregation (FedBuff, Nguyen et al. 2022) on Flower's message API.

A synchronous round waits for its slowest client. Here the server keeps ``clients_per_round`` clients
busy at all times; every reply is checked and buffered, the client immediately gets fresh work, and
every ``asynchronous.buffer`` replies the buffer is merged into the global state (one "round" in the
metrics). An upload computed against version ``v`` and merged at version ``v'`` has staleness
``τ = v' − v``; its weight is multiplied by ``s(τ)`` (``constant`` 1, ``polynomial`` (1+τ)^−a, ``hinge``
1 up to ``max_staleness/2`` then 1/(1+τ)), and uploads older than ``max_staleness`` are dropped.
Weights are the capped sample counts of the buffer normalised to sum 1, times ``s(τ)``: stale uploads
shrink the server's step instead of pulling it their way.
"""

from __future__ import annotations

import time
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import torch
from flwr.common import Code, Message, MessageType
from flwr.server import Grid, LegacyContext

from privlora.config import FederatedConfig
from privlora.errors import UserError
from privlora.federated import aggregation
from privlora.federated.partition import sample_clients


def staleness_weight(tau: int, config: FederatedConfig) -> float:
    a = config.asynchronous
    if a.staleness == "constant":
        return 1.0
    if a.staleness == "hinge":
        return 1.0 if tau <= a.max_staleness / 2 else 1.0 / (1.0 + tau)
    return float((1.0 + tau) ** -a.exponent)


def _wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    end = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() > end:
            return nodes
        time.sleep(0.5)


def run_buffered(grid: Grid, context: LegacyContext, strategy: Any, config: FederatedConfig) -> None:
    """``config.rounds`` buffered merges; ends without waiting for uploads still in flight."""
    strategy.initialize_parameters(context.client_manager)
    strategy.evaluate(0, None)
    nodes = _wait_for_nodes(grid, config.clients, config.round_timeout)
    if len(nodes) < 2:
        raise UserError(f"asynchronous aggregation needs at least 2 connected clients, found {len(nodes)}")
    concurrency = min(config.per_round(), len(nodes))
    version = 0
    in_flight: dict[str, tuple[int, int]] = {}  # message id → (node, version it was computed against)
    idle = list(nodes)
    buffer: list[tuple[list, int, int, int]] = []  # (upload, samples, partition, staleness)
    log: dict[str, Any] = {}

    def dispatch(node_ids: list[int]) -> None:
        ins = strategy.fit_ins(version + 1)
        msgs = [Message(content=compat.fitins_to_recorddict(ins, True), dst_node_id=n,
                        message_type=MessageType.TRAIN, group_id=f"v{version}") for n in node_ids]
        for n, mid in zip(node_ids, grid.push_messages(msgs), strict=True):
            in_flight[mid] = (n, version)
            idle.remove(n)
        log.setdefault("bytes_down_per_client", sum(len(t) for t in ins.parameters.tensors))

    def new_log() -> dict[str, Any]:
        return {"round": version + 1, "rank": strategy.rank, "sampled": 0, "failures": 0, "rejected": [],
                "dropped_stale": 0, "staleness": [], "round_started": time.perf_counter()}

    log = new_log()
    strategy.round_log = log
    first = sample_clients(idle, concurrency, seed=config.seed, round_number=0)
    dispatch(first)
    deadline = time.monotonic() + config.round_timeout * config.rounds
    while version < config.rounds:
        if time.monotonic() > deadline:
            raise UserError(f"asynchronous run stalled: {version} of {config.rounds} merges before the deadline")
        replies = list(grid.pull_messages(list(in_flight)))
        if not replies:
            time.sleep(0.05)
            continue
        freed = []
        for msg in replies:
            node, computed_at = in_flight.pop(msg.metadata.reply_to_message_id)
            freed.append(node)
            log["sampled"] += 1
            if not msg.has_content():
                log["failures"] += 1
                continue
            res = compat.recorddict_to_fitres(msg.content, False)
            if res.status.code != Code.OK:
                log["failures"] += 1
                continue
            who = int(res.metrics.get("partition", -1))
            tau = version - computed_at
            if tau > config.asynchronous.max_staleness:
                log["dropped_stale"] += 1
                continue
            upload, reason = strategy.decode_checked(res)
            if upload is None:
                log["rejected"].append({"client": who, "node": node, "reason": reason})
                continue
            log.setdefault("bytes_up_per_client", sum(len(t) for t in res.parameters.tensors))
            buffer.append((upload, res.num_examples, who, tau))
        if len(buffer) >= config.asynchronous.buffer:
            take, buffer = buffer[:config.asynchronous.buffer], buffer[config.asynchronous.buffer:]
            p = aggregation.weights([b[1] for b in take], config.sample_cap)
            p = p * torch.tensor([staleness_weight(b[3], config) for b in take], dtype=p.dtype)
            strategy.merge_uploads([b[0] for b in take], p, [b[2] for b in take], log)
            version += 1
            log["accepted"] = len(take)
            log["staleness"] = [b[3] for b in take]
            log["clients"] = [b[2] for b in take]
            strategy.close_round(version, len(take))  # the privacy wrapper's ledger: ε into the round's log
            strategy.round_log = log
            strategy.evaluate(version, None)
            log = new_log()
            strategy.round_log = log
        idle.extend(freed)
        if version < config.rounds:
            # freed clients go straight back to work (the fast ones simply do more rounds)
            busy = len(in_flight)
            want = max(0, concurrency - busy)
            if want:
                dispatch(sample_clients(sorted(idle), min(want, len(idle)), seed=config.seed,
                                        round_number=version * 1000 + busy))
