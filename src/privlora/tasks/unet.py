"""Pixel-space unconditional UNet Task: the embedded demo base model (diffusers ``UNet2DModel``)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from privlora.tasks.diffusion import DiffusionTask
from privlora.tasks.lora import LoraSpec


class UNetTask(DiffusionTask):
    """``UNet2DModel`` + LoRA on pixels; batches carry ``pixels`` ``[B, C, H, W]`` in ``[-1, 1]``."""

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, lora: LoraSpec | None, *,
                 base_name: str, seed: int = 0) -> None:
        self.model = unet
        self.denoiser = unet
        self.scheduler = scheduler
        self.base_name = base_name
        super().__init__(lora, seed=seed)

    @property
    def channels(self) -> int:
        return int(self.model.config.in_channels)

    @property
    def resolution(self) -> int:
        return int(self.model.config.sample_size)

    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["pixels"].to(self.device)

    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return self.denoiser(x_t, t).sample

    def sample_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.resolution, self.resolution)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model space → pixels in ``[-1, 1]`` (identity for a pixel-space model)."""
        return x.clamp(-1, 1)
