"""The embedded base model: a small attention UNet pre-trained by privlora on public images.

Shipped as ``assets/base_unet.safetensors`` (fp16, < 10 MB) with ``assets/base_unet.json`` (UNet and
scheduler configs plus how it was made). ``privlora base pretrain`` reproduces it.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

EMBEDDED = "embedded"
WEIGHTS = "base_unet.safetensors"
META = "base_unet.json"

#: attention blocks so LoRA targets ``to_q/to_k/to_v/to_out.0`` exactly as on Stable Diffusion
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "beta_schedule": "linear",
                                    "beta_start": 1e-4, "beta_end": 0.02, "clip_sample": True}


def assets_dir() -> Path:
    return Path(str(resources.files("privlora") / "assets"))


def new_unet() -> UNet2DModel:
    """A randomly initialised UNet with the embedded architecture."""
    return UNet2DModel(**UNET_CONFIG)


def new_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULER_CONFIG)


def load_embedded(folder: Path | None = None) -> tuple[UNet2DModel, DDPMScheduler, dict[str, Any]]:
    """Load the shipped (or a re-made) base: UNet in fp32, its scheduler, and its provenance."""
    folder = folder or assets_dir()
    meta = json.loads((folder / META).read_text())
    unet = UNet2DModel(**meta["unet"])
    state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()}
    unet.load_state_dict(state)
    unet.eval()
    return unet, DDPMScheduler(**meta["scheduler"]), meta


def unet_fp16_state(unet: UNet2DModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
