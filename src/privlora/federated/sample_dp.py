"""Sample-level DP inside each client (``dp.level: sample``): DP-SGD on the client's own data, and the
client's own ε ledger over every round it takes part in.

The unit of privacy is *one training sample of one client*: neighbouring runs differ by one sample added
to or removed from one client's data. Each client runs :class:`privlora.train.dp.PrivateTraining` — the
same Opacus wrapper central DP-SGD uses (Poisson batches, per-sample clipping, Gaussian noise on the
tensors the rule trains: B and the head for FFA-LoRA, A too for FedIT/FLoRA) — for ``client.local_steps``
steps per round. Whatever leaves the client afterwards (difference, int8 codec, SecAgg+ masking and
weighting) is post-processing of DP-SGD's output, so it costs no ε.

A client's ε composes over *its* rounds only: the ledger holds one ``(σ, q, steps)`` segment per round
the client trained, and ε is :func:`privlora.privacy.epsilon` of that history (no second RDP sum). The
client checks before training that the round keeps it within ``dp.budget`` (default ``dp.target_epsilon``,
for which each client calibrates its own σ: :func:`client_sigma`); otherwise it refuses
(:class:`BudgetExhausted`) and spends nothing. The ledger is the client's, kept in Flower's per-node
``Context.state`` (it persists across the rounds of a run), not the server's: a server that lost an
upload would otherwise under-count what that client spent.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from privlora import privacy
from privlora.config import FederatedConfig
from privlora.errors import UserError

#: the unit every figure of a sample-level privacy.json is stated for
UNIT = "one training sample of one client"
#: where a client keeps its ledger in Flower's per-node Context.state
STATE_KEY = "privlora-sample-ledger"
#: the metric a client's reply carries when it refuses the round (no upload, no ε spent)
REFUSED_KEY = "dp_refused"


class BudgetExhausted(RuntimeError):
    """A client refuses a round that would take its ε past ``dp.budget``. The client answers with a
    refusal (:data:`REFUSED_KEY`, no upload) that the server drops and remembers; under SecAgg+, where a
    reply without a masked vector cannot be summed, the refusal is a dropout instead."""


@dataclass
class ClientLedger:
    """One client's DP-SGD history: a ``(σ, q, steps)`` segment per round it trained, in order."""

    segments: list[tuple[float, float, int]] = field(default_factory=list)

    def history(self) -> privacy.History:
        return privacy.History.of(self.segments, neighbouring=privacy.ADD_REMOVE)

    @property
    def rounds(self) -> int:
        return len(self.segments)

    @property
    def steps(self) -> int:
        return sum(k for _, _, k in self.segments)

    def epsilon(self, delta: float) -> float:
        """ε spent so far (0 before the first round), Opacus' RDP accountant."""
        return privacy.epsilon(self.history(), delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """ε this client would have spent after one more round of ``steps`` steps at (σ, q)."""
        return privacy.epsilon(self.history().then(noise_multiplier, sample_rate, steps), delta)

    def admit(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
              budget: float | None) -> float:
        """The ε after the round, or :class:`BudgetExhausted` if that exceeds ``budget`` (None: no cap)."""
        after = self.epsilon_after(noise_multiplier, sample_rate, steps, delta)
        if budget is not None and after > budget:
            raise BudgetExhausted(f"round refused: ε would reach {after:.4g} > budget {budget:g} "
                                  f"(spent {self.epsilon(delta):.4g} in {self.rounds} rounds)")
        return after

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        seg = privacy.Segment(noise_multiplier, sample_rate, steps)  # validates
        self.segments.append(seg.as_opacus())

    # --- Flower Context.state ---------------------------------------------------------------------
    def to_record(self) -> dict[str, list]:
        return {"noise_multipliers": [float(s) for s, _, _ in self.segments],
                "sample_rates": [float(q) for _, q, _ in self.segments],
                "steps": [int(k) for _, _, k in self.segments]}

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> ClientLedger:
        if not record:
            return cls()
        sigmas, rates, steps = (list(record[k]) for k in ("noise_multipliers", "sample_rates", "steps"))
        if not len(sigmas) == len(rates) == len(steps):
            raise UserError("a client's privacy ledger is corrupt: its columns differ in length")
        return cls([(float(s), float(q), int(k)) for s, q, k in zip(sigmas, rates, steps, strict=True)])


def load_ledger(state: Any) -> ClientLedger:
    """The client's ledger from its Flower ``Context.state`` (a RecordDict; None: a fresh ledger)."""
    if state is None or STATE_KEY not in state:
        return ClientLedger()
    return ClientLedger.from_record(state.config_records[STATE_KEY])


def save_ledger(state: Any, ledger: ClientLedger) -> None:
    if state is None or not ledger.segments:
        return
    from flwr.app import ConfigRecord

    state[STATE_KEY] = ConfigRecord(ledger.to_record())


def sample_rate(config: FederatedConfig, n: int) -> float:
    """q of this client's Poisson batches: ``batch_size / n`` (its expected batch is ``batch_size``)."""
    if n < 1:
        raise UserError("a client with no training samples cannot run DP-SGD")
    return min(1.0, config.client.batch_size / n)


def budget(config: FederatedConfig) -> float | None:
    """The ε a client may not pass: ``dp.budget``, else ``dp.target_epsilon`` (None: no cap)."""
    dp = config.dp
    return dp.budget if dp.budget is not None else dp.target_epsilon


@functools.lru_cache(maxsize=64)
def _own_sigma(target: float, q: float, steps: int, delta: float) -> float:
    try:
        return privacy.noise_multiplier(target, sample_rate=q, steps=steps, delta=delta)
    except privacy.TargetUnreachable as e:
        raise UserError(f"{e} in {steps} DP-SGD steps at q = {q:.4g}: raise dp.target_epsilon or lower "
                        "client.batch_size") from None


def client_sigma(config: FederatedConfig, n: int) -> float:
    """σ of this client's DP-SGD: ``dp.noise_multiplier``, or — with ``dp.target_epsilon`` — the σ at which
    a client of ``n`` samples that trains every one of ``rounds`` rounds ends exactly at the target. One σ
    for all would have to be set for some client: the small ones (large q = B/n) then run out of budget
    after a few rounds, the large ones spend less than they could. Computed by the client from its own
    ``n`` (which its reported q reveals anyway)."""
    dp = config.dp  # FedDPOptions guarantees one of the two at level sample
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier)
    return _own_sigma(float(dp.target_epsilon), sample_rate(config, n), config.rounds * config.client.local_steps,
                      float(dp.delta))


def dp_parameters(config: FederatedConfig, n: int) -> Any:
    """The client's DP-SGD mechanism for one round (:class:`privlora.train.dp.DPParameters`)."""
    from privlora.train.accounting import DPParameters

    return DPParameters(noise_multiplier=client_sigma(config, n), max_grad_norm=float(config.dp.clip),
                        sample_rate=sample_rate(config, n), delta=float(config.dp.delta),
                        steps=config.client.local_steps, accountant="rdp")


def dp_local_train(task: Any, data: Any, config: FederatedConfig, params: Any) -> float:
    """``client.local_steps`` DP-SGD steps on Poisson batches of ``data``; the mean loss of the
    non-empty batches. Batches and noise come from OS entropy: a seeded stream would let anyone with
    the config recompute them. An empty Poisson batch still takes its (noise-only) step, as the
    accountant assumes. The task is unwrapped afterwards (it is cached across rounds)."""
    from privlora.train.dp import PrivateTraining

    optimizer = torch.optim.AdamW(task.trainable_parameters(), lr=config.client.lr, weight_decay=0.0)
    private = PrivateTraining(task, optimizer, params, n=len(data), seed=secrets.randbits(62))
    batches = torch.Generator().manual_seed(secrets.randbits(62))
    task.train()
    losses: list[float] = []
    try:
        for _ in range(config.client.local_steps):
            idx = private.poisson_batch(batches)
            private.zero_grad()
            if not idx:
                private.step(empty_batch=True)
                continue
            loss = task.per_sample_loss(data.batch(idx))
            private.backward(loss)  # per-sample gradients, then clip + noise in step()
            if not private.checked:
                private.check_grad_samples()
            private.step()
            losses.append(float(loss.detach().mean()))
    finally:
        private.zero_grad()
        private.unwrap()
    if private.steps_taken != params.steps:
        raise RuntimeError(f"DP-SGD took {private.steps_taken} steps, the ledger counts {params.steps}")
    return float(np.mean(losses)) if losses else math.nan


def train_round(task: Any, data: Any, config: FederatedConfig, state: Any) -> tuple[float, dict[str, float]]:
    """One round of sample-level DP on this client: check the budget, train, record; returns the loss
    and the metrics the client reports (its ε so far and the round's mechanism)."""
    params = dp_parameters(config, len(data))
    ledger = load_ledger(state)
    ledger.admit(params.noise_multiplier, params.sample_rate, params.steps, params.delta, budget(config))
    loss = dp_local_train(task, data, config, params)
    ledger.record(params.noise_multiplier, params.sample_rate, params.steps)
    save_ledger(state, ledger)
    return loss, {"dp_epsilon": ledger.epsilon(params.delta), "dp_rounds": ledger.rounds,
                  "dp_steps": params.steps, "dp_sample_rate": params.sample_rate,
                  "dp_noise_multiplier": params.noise_multiplier}
