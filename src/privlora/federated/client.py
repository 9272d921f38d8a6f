"""One client's round: load the global adapter, train on local data, send a private, compact upload.

The order matters and is the point of this module: train → difference to what was received → release
→ compress → send. Nothing but the encoded upload, its sample count (which the server caps) and a few
scalar metrics leaves the client. The plain round (:class:`PlainRound`) trains with seeded AdamW and
releases the difference as it is; privacy wraps it (:mod:`privlora.federated.dp_client`, chosen by
``dp.level``): client-level DP clips and noises the release, sample-level DP trains with DP-SGD.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.client import NumPyClient

from privlora.config import FederatedConfig
from privlora.errors import UserError
from privlora.federated import secagg
from privlora.federated.client_privacy import l2_norm
from privlora.federated.compression import get_codec, wire_bytes
from privlora.federated.data import federated_data
from privlora.federated.dp_client import LocalRound, wrap_round
from privlora.federated.rules import FLoRA
from privlora.federated.sample_dp import REFUSED_KEY, BudgetExhausted
from privlora.federated.tasks import FEDERATED_TASKS, federated_task, rule_for

log = logging.getLogger(__name__)


def _new_task(task: str, key: tuple, rank: int, alpha: float, targets: tuple[str, ...], seed: int) -> Any:
    torch.set_num_threads(1)  # one client per core: threads inside a client only contend
    return FEDERATED_TASKS[task].build(key, rank, alpha, targets, seed)


_task = lru_cache(maxsize=4)(_new_task)


def model_key_for(config: FederatedConfig, num_labels: int | None) -> tuple:
    return federated_task(config).model_key(config, federated_data(config).train, num_labels)


def task_for(config: FederatedConfig, num_labels: int | None, rank: int) -> Any:
    """The process's cached model for this rank (the base loads once per worker, not once per round).
    Its weights are whatever the last ``rule.load`` put there: load before use. ``num_labels``: the
    classifier's size (text; None: the data's); a causal LM has no classifier and ignores it."""
    return _task(config.task, model_key_for(config, num_labels), rank, config.lora.alpha, tuple(config.lora.targets),
                 config.seed)


def fresh_task(config: FederatedConfig, num_labels: int | None, rank: int) -> Any:
    """A newly initialised model (seeded LoRA A, zero B, seeded head): the run's starting point."""
    return _new_task(config.task, model_key_for(config, num_labels), rank, config.lora.alpha,
                     tuple(config.lora.targets), config.seed)


def client_rank(config: FederatedConfig, partition: int, round_rank: int) -> int:
    """FLoRA clients may each pick a rank (``lora.client_ranks``, cycled); otherwise the round's rank."""
    ranks = config.lora.client_ranks
    return ranks[partition % len(ranks)] if ranks else round_rank


def local_train(task: Any, data: Any, config: FederatedConfig, seed: int) -> float:
    """``client.local_steps`` AdamW steps on random mini-batches of the local data; mean loss."""
    params = task.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=config.client.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    size = min(config.client.batch_size, len(data))
    task.train()
    losses = []
    for _ in range(config.client.local_steps):
        idx = torch.randperm(len(data), generator=gen)[:size].tolist()
        loss = task.per_sample_loss(data.batch(idx)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


class PlainRound:
    """The LoRA client's own round, without privacy: :func:`local_train`, and the difference released
    as it is (its norm reported)."""

    def __init__(self, config: FederatedConfig) -> None:
        self.config = config

    def train(self, task: Any, data: Any, seed: int) -> tuple[float, dict[str, float]]:
        return local_train(task, data, self.config, seed), {}

    def release(self, upload: list[np.ndarray], instructions: dict[str, Any],
                weight: float) -> tuple[list[np.ndarray], float]:
        return upload, l2_norm(upload)

    def released_metrics(self, norm: float, loss: float) -> dict[str, float]:
        return {"update_norm": norm, "loss": loss}


class LoraClient(NumPyClient):
    """A Flower NumPyClient for one data partition. ``local_round``: the round's train and release steps
    (default: :class:`PlainRound` in the privacy wrapper the config names)."""

    def __init__(self, config: FederatedConfig, partition: int, state: Any = None,
                 local_round: LocalRound | None = None) -> None:
        self.config = config
        self.partition = partition
        self.state = state  # Flower's per-node Context.state: where sample-level DP keeps the client's ledger
        self.local_round = local_round if local_round is not None else wrap_round(config, PlainRound(config), state)

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        cfg, pid = self.config, self.partition
        round_number = int(config["round"])
        faults = cfg.simulation
        if pid in faults.crash_clients and round_number >= faults.crash_from_round:
            raise RuntimeError(f"client {pid}: simulated crash in round {round_number}")
        if pid in faults.slow_clients:
            time.sleep(faults.slow_seconds)
        data = federated_data(cfg)
        local = data.client(pid)
        rule = rule_for(cfg)
        start = time.perf_counter()
        task = task_for(cfg, None, client_rank(cfg, pid, int(config["rank"])))
        seed = hash((cfg.seed, round_number, pid)) & 0x7FFFFFFF
        if isinstance(rule, FLoRA):
            held = rule.load(task.model, parameters, seed=seed)
        else:
            held = rule.load(task.model, parameters)
        try:
            loss, dp_metrics = self.local_round.train(task, local, seed)
        except BudgetExhausted as refusal:
            if cfg.secagg.enabled:  # SecAgg+ cannot sum a reply without a masked vector: a dropout
                raise
            log.warning("client %d refuses round %d: %s", pid, round_number, refusal)
            return [], 0, {"partition": pid, REFUSED_KEY: 1}
        # the server caps counts anyway; under SecAgg+ it cannot see them, so the honest client caps its own
        samples = min(len(local), int(cfg.sample_cap)) if cfg.sample_cap else len(local)
        weight = secagg.upload_factor(samples, secagg.max_weight(cfg), cfg.secagg.quantization_range) \
            if cfg.secagg.enabled else 1.0
        upload, norm = self.local_round.release(rule.upload(task.model, held), config, weight)
        encoded = get_codec(cfg.compression).encode(upload)
        if pid in faults.corrupt_clients:  # a client that bypasses our encoder (bug or attack): NaNs on the wire
            encoded = [np.full_like(a, np.nan) if a.dtype.kind == "f" else a for a in encoded]
        metrics = {"partition": pid, "bytes_up": wire_bytes(encoded), "train_seconds": time.perf_counter() - start,
                   **self.local_round.released_metrics(norm, loss), **dp_metrics}
        return encoded, samples, metrics

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        raise UserError("the server initialises the global adapter itself")
