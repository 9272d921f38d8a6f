"""Training objectives, chosen by name from a registry: ``plain``, ``mp`` and ``smp``.

MP-LoRA and SMP-LoRA follow Luo et al. 2024 ("Privacy-Preserving Low-Rank Adaptation for Latent
Diffusion Models", arXiv 2402.11989) and the authors' code (WilliamLUO0/StablePrivateLoRA):

* a proxy attacker — MLP ``F → 512 → 256 → 2`` with ReLU and dropout 0.5 — reads the per-sample,
  per-element squared-error map and is trained with cross-entropy to tell members (label 1) from
  auxiliary non-members (label 0); Adam, lr 1e-5, weight decay 1e-4; ``k`` attacker steps per LoRA step;
* ``L_att`` is the attacker's cross-entropy on the member batch labelled *member*: the LoRA wants it high;
* MP-LoRA minimises ``L_ada − α·L_att``; SMP-LoRA minimises ``L_ada / (β + α·L_att + 1e-5)``,
  whose local smoothness is bounded by the gradient norm, hence stabler (the paper's Theorem).

Deviation from the authors' code, on purpose: ``L_ada`` and the attacker's view of the training batch
come from one forward pass (their code runs the UNet twice with fresh noise); same objective in
expectation, half the cost.

``mp.attacker: calibrated`` swaps what the attacker reads (the paper's raw map is ``paper``, the
default): the adapter's error relative to the base model's on the same input, see
:mod:`privlora.train.calibrated`. The min-max game itself is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from privlora.config import MPOptions
from privlora.data.imageset import ImageSet
from privlora.tasks.diffusion import DiffusionTask
from privlora.train.calibrated import VIEWS

Batch = dict[str, Any]


@dataclass(frozen=True)
class StepLoss:
    """The loss to back-propagate (scalar) and the figures to log."""

    loss: torch.Tensor
    logs: dict[str, float]


class Objective:
    """Plain LoRA: the mean denoising loss. Subclasses add a privacy term."""

    #: per-sample objectives can run under DP-SGD (each sample's loss only depends on itself)
    per_sample = True

    def __init__(self, task: DiffusionTask, *, members: ImageSet, aux: ImageSet, options: MPOptions,
                 batch_size: int) -> None:
        self.task = task

    def per_sample_loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        return self.task.per_sample_loss(batch, generator)

    def step_loss(self, batch: Batch, generator: torch.Generator) -> StepLoss:
        losses = self.per_sample_loss(batch, generator)
        return StepLoss(losses.mean(), {"loss": losses.mean().item()})

    def after_step(self, generator: torch.Generator) -> dict[str, float]:
        """Work after each LoRA update (the proxy attacker's turn); returns figures to log."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class ProxyAttacker(nn.Module):
    """The MLP membership attacker of Luo et al. 2024 on flattened squared-error maps."""

    def __init__(self, features: int, hidden: tuple[int, int]) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden[0]), nn.ReLU(), nn.Dropout(0.5),
                                 nn.Linear(hidden[0], hidden[1]), nn.ReLU(), nn.Dropout(0.5),
                                 nn.Linear(hidden[1], 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _batch_of(data: ImageSet, batch_size: int, generator: torch.Generator) -> Batch:
    idx = torch.randint(0, len(data), (batch_size,), generator=generator).tolist()
    return data.batch(idx)


class MinMaxObjective(Objective):
    """Shared machinery of MP and SMP: the proxy attacker and its training step."""

    per_sample = False  # the attacker couples samples through its own training; no DP here

    def __init__(self, task: DiffusionTask, *, members: ImageSet, aux: ImageSet, options: MPOptions,
                 batch_size: int) -> None:
        super().__init__(task, members=members, aux=aux, options=options, batch_size=batch_size)
        if len(aux) == 0:
            from privlora.errors import UserError

            raise UserError("MP/SMP need auxiliary non-members: set data.aux > 0")
        self.options = options
        self.members, self.aux, self.batch_size = members, aux, batch_size
        self.view = VIEWS[options.attacker](task)
        self.attacker = ProxyAttacker(self.view.size(members), options.hidden).to(task.device)
        self.attacker_opt = torch.optim.Adam(self.attacker.parameters(), lr=options.attacker_lr,
                                             weight_decay=options.attacker_weight_decay)

    def combine(self, adaptation: torch.Tensor, attack: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step_loss(self, batch: Batch, generator: torch.Generator) -> StepLoss:
        adaptation, features = self.view.training(batch, generator)
        member = torch.ones(features.shape[0], dtype=torch.long, device=features.device)
        attack = F.cross_entropy(self.attacker(features), member)
        loss = self.combine(adaptation, attack)
        return StepLoss(loss, {"loss": adaptation.item(), "attacker_loss_members": attack.item(),
                               "objective": loss.item()})

    def after_step(self, generator: torch.Generator) -> dict[str, float]:
        self.attacker.train()
        logs: dict[str, float] = {}
        for _ in range(self.options.attacker_steps):
            half = max(1, self.batch_size // 2)
            member_batch = _batch_of(self.members, half, generator)
            aux_batch = _batch_of(self.aux, half, generator)
            with torch.no_grad():
                feats = torch.cat([self.view.features(member_batch, generator),
                                   self.view.features(aux_batch, generator)])
                self.view.observe(feats)
                feats = self.view.standardize(feats)
            labels = torch.cat([torch.ones(half), torch.zeros(half)]).long().to(feats.device)
            logits = self.attacker(feats)
            loss = F.cross_entropy(logits, labels)
            self.attacker_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.attacker_opt.step()
            logs = {"attacker_loss": loss.item(),
                    "attacker_acc": (logits.argmax(1) == labels).float().mean().item()}
        return logs

    def state_dict(self) -> dict[str, Any]:
        state = {"attacker": self.attacker.state_dict(), "attacker_opt": self.attacker_opt.state_dict()}
        view = self.view.state_dict()  # the calibrated view's running statistics; the paper's has none
        return {**state, "view": view} if view else state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.attacker.load_state_dict(state["attacker"])
        self.attacker_opt.load_state_dict(state["attacker_opt"])
        if "view" in state:
            self.view.load_state_dict(state["view"])


class MPObjective(MinMaxObjective):
    """MP-LoRA: ``L_ada − α·L_att`` (unstable: unbounded below as the attacker's loss grows)."""

    def combine(self, adaptation: torch.Tensor, attack: torch.Tensor) -> torch.Tensor:
        return adaptation - self.options.alpha * attack


class SMPObjective(MinMaxObjective):
    """SMP-LoRA: ``L_ada / (β + α·L_att + 1e-5)``."""

    def combine(self, adaptation: torch.Tensor, attack: torch.Tensor) -> torch.Tensor:
        return adaptation / (self.options.beta + self.options.alpha * attack + 1e-5)


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "plain": Objective,
    "dp": Objective,  # DP is a wrapper around the plain objective's optimizer, see train/dp.py
    "mp": MPObjective,
    "smp": SMPObjective,
}
