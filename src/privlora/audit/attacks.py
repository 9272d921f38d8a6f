"""Membership-inference scorers: higher score = more likely a training member.

Every attack here needs only the model (no reference adapters) and goes through the Task interface
(``encode``, ``denoise``, ``scheduler``), so it works for the embedded UNet and for Stable Diffusion
alike. Each is called as ``attack(task, data, seed=...)`` and returns one score per image; noise is
drawn from a generator seeded per call and batches are fixed, so the adapter and the base model (the
control) are scored on identical inputs. Reference-model attacks (LiRA, RMIA) live in
:mod:`privlora.audit.references` because they need trained reference adapters.

Defaults follow the papers for DDPMs with T = 1000 steps; deviations are noted per attack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from privlora.data.imageset import ImageSet
from privlora.tasks.diffusion import DiffusionTask

BATCH = 64


def _steps(task: DiffusionTask, t: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.full((n,), t, dtype=torch.long, device=device)


def _alpha_bar(task: DiffusionTask, t: int) -> float:
    return float(task.scheduler.alphas_cumprod[t])


def _ddim_move(x: torch.Tensor, eps: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
    """Deterministic DDIM update from noise level ᾱ_from to ᾱ_to (either direction), given ε at x."""
    x0 = (x - (1 - a_from) ** 0.5 * eps) / a_from ** 0.5
    return a_to ** 0.5 * x0 + (1 - a_to) ** 0.5 * eps


@torch.no_grad()
def loss_attack(task: DiffusionTask, data: ImageSet, *, seed: int, timestep: int = 100) -> np.ndarray:
    """Loss threshold (Matsumoto et al. 2023; Carlini et al. 2023): −‖ε − ε_θ(x_t, t)‖² at one fixed t.

    One query per image. t = 100 is in the range both papers found most revealing for DDPMs.
    """
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for batch in data.batches(BATCH):
        t = torch.full((len(batch["captions"]),), timestep, dtype=torch.long)
        errors = task.squared_error(batch, gen, timesteps=t)
        scores.append(-errors.flatten(1).mean(1).double().cpu().numpy())
    return np.concatenate(scores)


@torch.no_grad()
def secmi_attack(task: DiffusionTask, data: ImageSet, *, seed: int, t_sec: int = 100,
                 interval: int = 10) -> np.ndarray:
    """SecMI-stat (Duan et al. 2023): the t-error of a deterministic DDIM round trip at ``t_sec``.

    x̃_{t_sec} comes from DDIM inversion of x0 in steps of ``interval``; one more inversion step gives
    x̃_{t_sec+k}, one denoising step brings it back to x̂_{t_sec}; score = −‖x̂ − x̃_{t_sec}‖² (members
    are reconstructed better). Defaults t_sec = 100, k = 10 are the paper's for DDPM; t_sec/k + 2 = 12
    queries per image. Deterministic: ``seed`` is unused (kept for the common signature).
    """
    del seed
    scores = []
    for batch in data.batches(BATCH):
        x = task.encode(batch)
        n = x.shape[0]
        for t in range(0, t_sec, interval):  # DDIM inversion x0 → x̃_{t_sec}
            eps = task.denoise(x, _steps(task, t, n, x.device), batch)
            x = _ddim_move(x, eps, _alpha_bar(task, t), _alpha_bar(task, t + interval))
        target = x
        eps = task.denoise(x, _steps(task, t_sec, n, x.device), batch)
        ahead = _ddim_move(x, eps, _alpha_bar(task, t_sec), _alpha_bar(task, t_sec + interval))
        eps = task.denoise(ahead, _steps(task, t_sec + interval, n, x.device), batch)
        back = _ddim_move(ahead, eps, _alpha_bar(task, t_sec + interval), _alpha_bar(task, t_sec))
        scores.append(-((back - target).float() ** 2).flatten(1).mean(1).double().cpu().numpy())
    return np.concatenate(scores)


@torch.no_grad()
def pia_attack(task: DiffusionTask, data: ImageSet, *, seed: int, timestep: int = 200,
               p: float = 4.0) -> np.ndarray:
    """PIA (Kong et al. 2024): proximal initialisation ε₀ = ε_θ(x0, 0) reused as the noise at t.

    x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε₀; score = −‖ε₀ − ε_θ(x_t, t)‖_p. Members' predictions are
    self-consistent along that deterministic path. t = 200 and p = 4 are the paper's DDPM defaults;
    two queries per image; deterministic (``seed`` unused).
    """
    del seed
    scores = []
    a = _alpha_bar(task, timestep)
    for batch in data.batches(BATCH):
        x0 = task.encode(batch)
        n = x0.shape[0]
        eps0 = task.denoise(x0, _steps(task, 0, n, x0.device), batch)
        x_t = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps0
        eps_t = task.denoise(x_t, _steps(task, timestep, n, x0.device), batch)
        scores.append(-torch.linalg.vector_norm((eps_t - eps0).float().flatten(1), ord=p, dim=1)
                      .double().cpu().numpy())
    return np.concatenate(scores)


@torch.no_grad()
def sima_attack(task: DiffusionTask, data: ImageSet, *, seed: int, timestep: int = 20,
                p: float = 4.0) -> np.ndarray:
    """SimA (Rao et al. 2025): the norm of the denoiser's output at the clean image, −‖ε_θ(x0, t)‖_p.

    The expected denoiser output points to a kernel-weighted mean of nearby training samples, so it is
    small at a training sample. One query; p = 4 as the paper's ablation recommends. The paper sweeps
    t over 0–200 and reports the best; we fix a small t = 20 (no tuning on the evaluation set).
    """
    del seed
    scores = []
    for batch in data.batches(BATCH):
        x0 = task.encode(batch)
        eps = task.denoise(x0, _steps(task, timestep, x0.shape[0], x0.device), batch)
        scores.append(-torch.linalg.vector_norm(eps.float().flatten(1), ord=p, dim=1).double().cpu().numpy())
    return np.concatenate(scores)


@dataclass(frozen=True)
class Attack:
    """A model-only attack: the scorer, its query cost per image, and where it comes from."""

    score: Callable[..., np.ndarray]
    queries: int
    paper: str


ATTACKS: dict[str, Attack] = {
    "loss": Attack(loss_attack, 1, "Matsumoto et al. 2023; Carlini et al. 2023"),
    "secmi": Attack(secmi_attack, 12, "Duan et al. 2023 (SecMI-stat)"),
    "pia": Attack(pia_attack, 2, "Kong et al. 2024 (PIA)"),
    "sima": Attack(sima_attack, 1, "Rao et al. 2025 (SimA)"),
}
