"""One client's round: load the global adapter, train on local data, send a private, compact upload.

The order matters and is the point of this module: difference to what was received → clip → noise
(drawn here, on the client, from OS entropy: a seeded noise stream would be predictable from the
config) → compress → send. Nothing but the encoded upload, its sample count (which the server caps)
and a few scalar metrics leaves the client. Under ``dp.level: sample`` the noise is added during
training instead (DP-SGD, :mod:`privlora.federated.sample_dp`) and the upload is not clipped or noised again.
"""

from __future__ import annotations

import math
import secrets
import time
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.client import NumPyClient

from privlora.config import FederatedConfig
from privlora.errors import UserError
from privlora.federated import client_privacy, sample_dp, secagg
from privlora.federated.compression import get_codec, wire_bytes
from privlora.federated.data import federated_data
from privlora.federated.rules import FLoRA, get_rule


def _new_task(num_labels: int, rank: int, alpha: float, targets: tuple[str, ...], seed: int) -> Any:
    from privlora.tasks.text import TextClassificationTask, TextLora

    torch.set_num_threads(1)  # one client per core: threads inside a client only contend
    return TextClassificationTask(num_labels, lora=TextLora(rank=rank, alpha=alpha, targets=targets), seed=seed)


_task = lru_cache(maxsize=4)(_new_task)


def task_for(config: FederatedConfig, num_labels: int, rank: int) -> Any:
    """The process's cached model for this rank (MiniLM loads once per worker, not once per round).
    Its weights are whatever the last ``rule.load`` put there: load before use."""
    return _task(num_labels, rank, config.lora.alpha, tuple(config.lora.targets), config.seed)


def fresh_task(config: FederatedConfig, num_labels: int, rank: int) -> Any:
    """A newly initialised model (seeded LoRA A, zero B, seeded head): the run's starting point."""
    return _new_task(num_labels, rank, config.lora.alpha, tuple(config.lora.targets), config.seed)


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


def privatize(upload: list[np.ndarray], instructions: dict[str, Any],
              weight: float = 1.0) -> tuple[list[np.ndarray], float]:
    """Clip and noise one upload as the server's round instructions say; returns it and its raw norm.

    ``weight``: the factor secure aggregation will multiply this upload by (:func:`secagg.upload_factor`).
    Distributed noise is divided by it, so that after the multiplication this client's noise still has
    the std the server asked for and the secure sum carries σC (see :mod:`privlora.federated.secagg`).
    Local noise is not: each upload is private on its own, and the weighting is post-processing."""
    mechanism = str(instructions.get("mechanism", "none"))
    rng = np.random.default_rng(secrets.randbits(128))
    if mechanism == "gaussian":
        clipped, norm = client_privacy.clip_l2(upload, float(instructions["clip"]))
        std = float(instructions["noise_std"])
        if instructions.get("placement") == "distributed":
            if not (math.isfinite(weight) and weight > 0):
                raise UserError(f"the secure-aggregation weight must be a positive number, got {weight}")
            std /= weight
        return client_privacy.add_gaussian(clipped, std, rng), norm
    if mechanism == "laplace":
        clipped, norm = client_privacy.clip_l1(upload, float(instructions["clip"]))
        return client_privacy.add_laplace(clipped, float(instructions["laplace_scale"]), rng), norm
    return upload, client_privacy.l2_norm(upload)


class LoraClient(NumPyClient):
    """A Flower NumPyClient for one data partition."""

    def __init__(self, config: FederatedConfig, partition: int, state: Any = None) -> None:
        self.config = config
        self.partition = partition
        self.state = state  # Flower's per-node Context.state: where sample-level DP keeps the client's ledger

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
        rule = get_rule(cfg.strategy, cfg.lora.alpha)
        start = time.perf_counter()
        task = task_for(cfg, len(data.train.classes), client_rank(cfg, pid, int(config["rank"])))
        seed = hash((cfg.seed, round_number, pid)) & 0x7FFFFFFF
        if isinstance(rule, FLoRA):
            held = rule.load(task.model, parameters, seed=seed)
        else:
            held = rule.load(task.model, parameters)
        dp_metrics: dict[str, float] = {}
        if cfg.dp.level == "sample":  # DP-SGD around the same local round; refuses past the budget
            loss, dp_metrics = sample_dp.train_round(task, local, cfg, self.state)
        else:
            loss = local_train(task, local, cfg, seed)
        # the server caps counts anyway; under SecAgg+ it cannot see them, so the honest client caps its own
        samples = min(len(local), int(cfg.sample_cap)) if cfg.sample_cap else len(local)
        weight = secagg.upload_factor(samples, secagg.max_weight(cfg), cfg.secagg.quantization_range) \
            if cfg.secagg.enabled else 1.0
        upload, norm = privatize(rule.upload(task.model, held), config, weight)
        encoded = get_codec(cfg.compression).encode(upload)
        if pid in faults.corrupt_clients:  # a client that bypasses our encoder (bug or attack): NaNs on the wire
            encoded = [np.full_like(a, np.nan) if a.dtype.kind == "f" else a for a in encoded]
        metrics = {"partition": pid, "loss": loss, "update_norm": norm, "bytes_up": wire_bytes(encoded),
                   "train_seconds": time.perf_counter() - start, **dp_metrics}
        return encoded, samples, metrics

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        raise UserError("the server initialises the global adapter itself")
