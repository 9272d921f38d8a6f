"""Who holds which samples: the server's test set and each client's non-IID partition.

What the samples are and how they are dealt is the run task's (:mod:`privlora.federated.tasks`): text
records split by Dirichlet label skew, instruction records (no label) by Dirichlet size skew or IID.

Server and clients compute the same split independently from the config (seeded), so nothing about a
client's data — not even its sample ids — needs to travel. In a real deployment each client would
load its own file instead (``data.source`` on that machine); the partition id then only names it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from privlora.config import FederatedConfig
from privlora.errors import UserError
from privlora.federated.tasks import FEDERATED_TASKS, federated_task


@dataclass(frozen=True)
class FederatedData:
    train: Any  # TextSet | InstructionSet: the union of every client's data (clients see only their part)
    test: Any  # held by the server, never trained on
    parts: list[list[int]]  # client partition id → indices into ``train``

    def client(self, partition: int) -> Any:
        if not 0 <= partition < len(self.parts):
            raise UserError(f"partition {partition} does not exist (the run has {len(self.parts)} clients)")
        return self.train.subset(self.parts[partition])

    def record(self, config: FederatedConfig) -> dict[str, object]:
        """What ``splits.json`` of a federated run holds: each client's sample ids and the server's held-out
        ids, so ``privlora audit`` reads who trained on what instead of trusting a recomputation. The keys
        ``members`` (every client's), ``aux_nonmembers`` and ``eval_nonmembers`` are those of
        :class:`privlora.data.splits.Splits`; ``clients`` adds the per-client lists."""
        clients = [[self.train.ids[i] for i in sorted(part)] for part in self.parts]
        return {"source": config.data.source, "seed": config.seed,
                "partitioner": federated_task(config).partitioner,
                "alpha": config.data.alpha, "members": [i for part in clients for i in part], "aux_nonmembers": [],
                "eval_nonmembers": list(self.test.ids), "clients": clients}


def _key(config: FederatedConfig) -> tuple:
    d = config.data
    return (federated_task(config).name, d.source, d.limit, d.test, d.alpha, config.clients, config.seed)


@lru_cache(maxsize=4)
def _load(key: tuple) -> FederatedData:
    task, source, limit, test_fraction, alpha, clients, seed = key
    kind = FEDERATED_TASKS[task]
    data = kind.load(source, limit)
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(test_fraction * len(data)))
    test, train = sorted(order[:n_test]), sorted(order[n_test:])
    train_set = data.subset(train)
    if len(train_set) < clients:
        raise UserError(f"{len(train_set)} training samples cannot be split over {clients} clients")
    parts = kind.partition(train_set, clients, alpha, seed)
    return FederatedData(train_set, data.subset(test), parts)


def federated_data(config: FederatedConfig) -> FederatedData:
    """The run's split (cached per process: every simulated client in a worker shares one copy)."""
    return _load(_key(config))
