"""Stable Diffusion Task: text-to-image LoRA on the UNet of any diffusers SD pipeline.

The VAE and text encoder stay frozen; ``x0`` is the VAE latent (distribution mean × scaling factor, so
per-sample losses are deterministic) and the caption's text-encoder states condition the UNet.
The adapter is written with ``unet.`` keys, which ``StableDiffusionPipeline.load_lora_weights`` reads.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from privlora.tasks.diffusion import DiffusionTask
from privlora.tasks.lora import LoraSpec


class StableDiffusionTask(DiffusionTask):
    """Batches carry ``pixels`` ``[B, 3, H, W]`` in ``[-1, 1]`` and ``captions`` (list of str)."""

    needs_captions = True

    def __init__(self, pipe: StableDiffusionPipeline, lora: LoraSpec | None, *, base_name: str,
                 seed: int = 0) -> None:
        self.pipe = pipe
        self.model = pipe.unet
        self.denoiser = pipe.unet
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.base_name = base_name
        for frozen in (pipe.vae, pipe.text_encoder):
            frozen.requires_grad_(False)
            frozen.eval()
        self._text_cache: dict[str, torch.Tensor] = {}
        super().__init__(lora, seed=seed)

    @property
    def channels(self) -> int:
        return 3

    @property
    def resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)

    @torch.no_grad()
    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        pixels = batch["pixels"].to(self.device, dtype=self.pipe.vae.dtype)
        latents = self.pipe.vae.encode(pixels).latent_dist.mean
        return latents * self.pipe.vae.config.scaling_factor

    @torch.no_grad()
    def _text_states(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if missing:
            tok = self.pipe.tokenizer(missing, padding="max_length", truncation=True,
                                      max_length=self.pipe.tokenizer.model_max_length, return_tensors="pt")
            states = self.pipe.text_encoder(tok.input_ids.to(self.device))[0]
            for caption, state in zip(missing, states, strict=True):
                self._text_cache[caption] = state
        return torch.stack([self._text_cache[c] for c in captions])

    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        captions = batch.get("captions") or [""] * x_t.shape[0]
        return self.denoiser(x_t, t, encoder_hidden_states=self._text_states(list(captions))).sample

    def sample_shape(self) -> tuple[int, int, int]:
        size = int(self.pipe.unet.config.sample_size)
        return (int(self.pipe.unet.config.in_channels), size, size)

    @torch.no_grad()
    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Latents → pixels in ``[-1, 1]`` through the VAE decoder."""
        image = self.pipe.vae.decode(x / self.pipe.vae.config.scaling_factor).sample
        return image.clamp(-1, 1)
