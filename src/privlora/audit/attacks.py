"""Membership-inference scorers: higher score = more likely a training member.

Each attack goes through the Task interface only, so it works for every diffusion base. This is the
first of the issue-4 attacks; SecMI, PIA, SimA and reference-model attacks (RMIA/LiRA) register here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from privlora.data.imageset import ImageSet
from privlora.tasks.diffusion import DiffusionTask

BATCH = 64


@torch.no_grad()
def loss_attack(task: DiffusionTask, data: ImageSet, *, seed: int, timestep: int = 100) -> np.ndarray:
    """Loss threshold (Matsumoto et al. 2023; Carlini et al. 2023): −‖ε − ε_θ(x_t, t)‖² at one fixed t.

    One query per image. Noise comes from a generator seeded per call and batches are fixed, so the
    adapter and the base model (the control) are scored on identical noisy inputs.
    """
    scores = []
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(data), BATCH):
        sub = data.subset(list(range(start, min(start + BATCH, len(data)))))
        t = torch.full((len(sub),), timestep, dtype=torch.long)
        errors = task.squared_error({"pixels": sub.pixels, "captions": sub.captions}, gen, timesteps=t)
        scores.append(-errors.flatten(1).mean(1).double().cpu().numpy())
    return np.concatenate(scores)


ATTACKS: dict[str, Callable[..., np.ndarray]] = {"loss": loss_attack}
