"""How each kind of base turns initial noise into images, one registry keyed by kind.

* ``pixel``         — the embedded / any ``UNet2DModel`` base: the Task's DDIM loop (``DiffusionTask.ddim``,
                      η = 0), so synthetic image ``i`` of seed ``s`` is exactly generation ``i`` of
                      ``privlora audit --extraction``.
* ``sd``            — a Stable Diffusion pipeline: diffusers' own ``StableDiffusionPipeline`` around the
                      LoRA'd UNet with a DDIM scheduler and classifier-free guidance (what users run).
* ``sd+controlnet`` — ``StableDiffusionControlNetPipeline`` with the same components plus a ControlNet
                      and one condition image per generation.

Every sampler takes per-generation initial noise (drawn by the caller from (seed, index)), so images do
not depend on the batch size, and returns pixels ``[B, C, H, W]`` in ``[-1, 1]`` on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDIMScheduler
from PIL import Image

from privlora.tasks.diffusion import DiffusionTask


@dataclass
class SamplerOptions:
    steps: int
    guidance_scale: float = 7.5
    controlnet: Any = None
    conditioning_scale: float = 1.0


@dataclass
class Batch:
    """One batch to generate: x_T, one prompt per image and (ControlNet) one condition per image."""

    noise: torch.Tensor
    prompts: list[str]
    conditions: list[Image.Image] = field(default_factory=list)


Sampler = Callable[[Batch], torch.Tensor]


def _pixel(task: DiffusionTask, options: SamplerOptions) -> Sampler:
    def run(batch: Batch) -> torch.Tensor:
        return task.to_pixels(task.ddim(batch.noise, options.steps)).float().cpu()

    return run


def _sd_components(task: Any) -> dict[str, Any]:
    pipe = task.pipe
    return {"vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer, "unet": task.model,
            "scheduler": DDIMScheduler.from_config(pipe.scheduler.config), "safety_checker": None,
            "feature_extractor": None, "requires_safety_checker": False}


def _call(pipe: Any, task: Any, batch: Batch, options: SamplerOptions, **extra: Any) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    size = task.resolution
    out = pipe(prompt=batch.prompts, height=size, width=size, num_inference_steps=options.steps,
               guidance_scale=options.guidance_scale, latents=batch.noise.to(task.device), output_type="pt",
               **extra)
    return (out.images.float().cpu() * 2 - 1).clamp(-1, 1)


def _sd(task: Any, options: SamplerOptions) -> Sampler:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**_sd_components(task))

    def run(batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return _call(pipe, task, batch, options)

    return run


def _sd_controlnet(task: Any, options: SamplerOptions) -> Sampler:
    from diffusers import StableDiffusionControlNetPipeline

    controlnet = options.controlnet.to(task.device)
    pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, **_sd_components(task))

    def run(batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return _call(pipe, task, batch, options, image=batch.conditions,
                         controlnet_conditioning_scale=options.conditioning_scale)

    return run


#: kind → builder of a sampler for a loaded task
SAMPLERS: dict[str, Callable[[Any, SamplerOptions], Sampler]] = {
    "pixel": _pixel, "sd": _sd, "sd+controlnet": _sd_controlnet}


def sampler_kind(task: DiffusionTask, *, controlnet: bool) -> str:
    """``sd`` for a Stable Diffusion task (``+controlnet`` with one), ``pixel`` otherwise."""
    kind = "sd" if getattr(task, "pipe", None) is not None else "pixel"
    return f"{kind}+controlnet" if controlnet else kind
