"""Diffusion Tasks: the denoising objective, shared by the pixel-space UNet and Stable Diffusion.

A subclass says how to turn a batch into the clean input ``x0`` (pixels, or VAE latents) and how to
call its denoiser; everything else — loss, attack features, sampling — is written once here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from privlora.tasks.lora import LoraSpec, add_lora, load_lora, lora_bypassed, save_lora


class DiffusionTask(ABC):
    """Base model + LoRA with the DDPM ε-prediction objective ``‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t)‖²``."""

    model: nn.Module  # the unwrapped denoiser: LoRA is injected here and saved from here
    denoiser: nn.Module  # what forward passes call: ``model`` itself, or DP's per-sample-grad wrapper
    scheduler: DDPMScheduler
    needs_captions = False
    base_name: str
    diffusers_prefix = "unet"

    def __init__(self, lora: LoraSpec | None, *, seed: int) -> None:
        self.lora = lora
        self._lora_params = add_lora(self.model, lora, seed=seed) if lora is not None else []
        self._bank: _NoiseBank | None = None

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' activation recomputation in the UNet's blocks (``--gradient-checkpointing``)."""
        self.model.enable_gradient_checkpointing()

    @contextmanager
    def logical_batch(self, size: int, generator: torch.Generator, start: int = 0) -> Iterator[None]:
        """Inside, the training draws of timesteps and noise (``generator``, no given timesteps) come from
        one draw for ``size`` samples, handed out in order: a logical batch processed in chunks
        (gradient accumulation) then sees exactly the numbers one batch of ``size`` would, and a single
        chunk sees what it always did. ``start``: hand out from that sample on (a data-parallel process's
        shard of the global batch, :mod:`privlora.train.distributed`)."""
        self._bank = _NoiseBank(size, generator, int(self.scheduler.config.num_train_timesteps))
        self._bank.position = start
        try:
            yield
        finally:
            self._bank = None

    # --- what a subclass provides -------------------------------------------------------------
    @abstractmethod
    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        """Clean model input ``x0`` for the batch (pixels or latents)."""

    @abstractmethod
    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """ε_θ(x_t, t | batch conditioning)."""

    # --- Task protocol ------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.lora is None:  # full fine-tuning (benchmark baseline)
            return [p for p in self.model.parameters() if p.requires_grad]
        return list(self._lora_params)

    def sample_t_noise(self, x0: torch.Tensor, generator: torch.Generator | None,
                       timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random (or given) timesteps and Gaussian noise for ``x0``; drawn on CPU so seeds match."""
        n = x0.shape[0]
        if self._bank is not None and timesteps is None and generator is self._bank.generator:
            return self._bank.take(x0)
        if timesteps is None:
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return timesteps.to(x0.device), noise.to(x0.device)

    def predict_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                      batch: dict[str, Any] | None = None) -> torch.Tensor:
        """ε_θ at ``x_t = add_noise(x0, noise, t)`` — used by training and the loss-based attacks."""
        x_t = self.scheduler.add_noise(x0, noise, t)
        return self._denoise(x_t, t, batch or {})

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, Any] | None = None) -> torch.Tensor:
        """ε_θ(x_t, t) at a given model input — for attacks that query off the forward-noising path
        (SecMI's DDIM inversion, PIA's ε_θ(x0, 0), SimA's ε_θ(x0, t))."""
        return self._denoise(x_t, t.to(x_t.device), batch or {})

    def squared_error(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                      timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """Per-element squared error map ``[B, C, H, W]`` of one denoising step."""
        x0 = self.encode(batch)
        t, noise = self.sample_t_noise(x0, generator, timesteps)
        pred = self.predict_noise(x0, t, noise, batch)
        return (pred.float() - noise.float()) ** 2

    def per_sample_loss(self, batch: dict[str, Any],
                        generator: torch.Generator | None = None) -> torch.Tensor:
        return self.squared_error(batch, generator).flatten(1).mean(1)

    def attack_features(self, batch: dict[str, Any],
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """The flattened per-element error map: what SMP-LoRA's proxy attacker sees (Luo et al. 2024)."""
        return self.squared_error(batch, generator).flatten(1)

    def adaptation_and_features(self, batch: dict[str, Any],
                                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass for MP/SMP: the mean denoising loss and the attacker's features, sharing the graph."""
        errors = self.squared_error(batch, generator).flatten(1)
        return errors.mean(), errors

    def calibrated_errors(self, batch: dict[str, Any], generator: torch.Generator,
                          timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample mean squared error ``[B]`` of the adapted model and of the base alone at the same
        ``x0``, noise and (per-sample) timestep — for the calibrated proxy attacker
        (:mod:`privlora.train.calibrated`).

        One noise draw feeds both passes, so the draw's luck and the image's own difficulty cancel in their
        comparison; ``x0`` is encoded once (a VAE pass on Stable Diffusion). The base pass runs without grad
        (it does not depend on the LoRA): gradients reach the adapter through the first tensor only.
        """
        x0 = self.encode(batch)
        t, noise = self.sample_t_noise(x0, generator, timesteps)

        def error() -> torch.Tensor:
            return (self.predict_noise(x0, t, noise, batch).float() - noise.float()).pow(2).flatten(1).mean(1)

        adapted = error()
        with torch.no_grad(), self.adapter_disabled():
            base = error()
        return adapted, base

    # --- adapters -----------------------------------------------------------------------------
    def save_adapter(self, path: str | Path) -> None:
        if self.lora is None:
            raise ValueError("full fine-tuning has no adapter to save")
        save_lora(self.model, self.lora, Path(path), diffusers_prefix=self.diffusers_prefix,
                  base_model=self.base_name)

    def load_adapter(self, path: str | Path) -> None:
        load_lora(self.model, Path(path))

    # --- sampling -----------------------------------------------------------------------------
    def ddim_scheduler(self, steps: int) -> DDIMScheduler:
        """The DDIM schedule :meth:`ddim` walks: this base's noise schedule at ``steps`` inference steps
        (``.timesteps`` are the states it visits, noisiest first)."""
        ddim = DDIMScheduler.from_config(self.scheduler.config)
        ddim.set_timesteps(steps)
        return ddim

    @torch.no_grad()
    def ddim(self, noise: torch.Tensor, steps: int, *, batch: dict[str, Any] | None = None,
             until: int | None = None, guidance_scale: float = 1.0,
             callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
        """DDIM (η = 0) from ``noise`` = x_T: the one sampling loop of privlora (generation, validation
        grids, utility, extraction, synthesis, concept erasure), in model space.

        Taking x_T as an argument lets a caller seed each image on its own (extraction, synthesis).
        ``batch``: the conditioning (SD: ``{"captions": [...]}``; none: unconditional, SD's empty prompt).
        ``until``: stop after that many of the ``steps`` steps and return x at ``timesteps[until]`` (ESD's
        x_t). ``guidance_scale`` ≠ 1 with captions: classifier-free guidance, ε(∅) + s·(ε(c) − ε(∅)) from one
        batched pass over the captions and as many empty ones. ``callback(i, t, x)`` sees each state before
        its step (concept erasure records the trajectory)."""
        ddim = self.ddim_scheduler(steps)
        x = noise.to(self.device)
        n = x.shape[0]
        cond = batch or {}
        captions = list(cond.get("captions") or [])
        guided = guidance_scale != 1.0 and any(captions)
        for i, t in enumerate(ddim.timesteps[:until]):
            if callback is not None:
                callback(i, t, x)
            if guided:  # the conditioned and the unconditioned pass as one batch of 2n
                both = self._denoise(torch.cat([x, x]), t.expand(2 * n).to(self.device),
                                     {"captions": captions + [""] * n})
                eps_c, eps_u = both[:n], both[n:]
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            else:
                eps = self._denoise(x, t.expand(n).to(self.device), cond)
            x = ddim.step(eps, t, x).prev_sample
        return x

    def sample(self, n: int, *, generator: torch.Generator, steps: int = 50,
               batch: dict[str, Any] | None = None) -> torch.Tensor:
        """DDIM sampling (η=0) of ``n`` model inputs, returned in model space ``[-1, 1]``: x_T for the whole
        batch from ``generator``, then :meth:`ddim`."""
        return self.ddim(torch.randn((n, *self.sample_shape()), generator=generator), steps, batch=batch)

    @abstractmethod
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of one model input ``(C, H, W)``."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Run the base model alone (LoRA layers bypassed), e.g. to compare against the base."""
        with lora_bypassed(self.model):
            yield

    @abstractmethod
    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model space (pixels or latents) → pixels in ``[-1, 1]``."""


class _NoiseBank:
    """Timesteps and noise for a logical batch, drawn once (as :meth:`DiffusionTask.sample_t_noise` would
    for the whole batch) when the first chunk asks, then sliced chunk by chunk."""

    def __init__(self, size: int, generator: torch.Generator, timesteps: int) -> None:
        self.size, self.generator, self.timesteps = size, generator, timesteps
        self.t: torch.Tensor | None = None
        self.noise: torch.Tensor | None = None
        self.position = 0

    def take(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.t is None:
            self.t = torch.randint(0, self.timesteps, (self.size,), generator=self.generator)
            self.noise = torch.randn((self.size, *x0.shape[1:]), generator=self.generator, dtype=x0.dtype)
        assert self.noise is not None
        n, start = x0.shape[0], self.position
        if start + n > self.size:
            raise RuntimeError(f"logical batch of {self.size} asked for samples {start}..{start + n}")
        self.position += n
        return self.t[start:start + n].to(x0.device), self.noise[start:start + n].to(x0.device, x0.dtype)
