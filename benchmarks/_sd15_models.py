"""Shared by ``sd15_step.py`` and ``sd15_gpu.py``: SD-1.5-shaped models with random weights, and one
timed run of privlora's own training step on them.

The configs are SD 1.5's published ones (runwayml/stable-diffusion-v1-5 ``unet/``, ``vae/`` and
``text_encoder/config.json``), written here so nothing is downloaded; ``tiny`` shrinks every width and
depth for a seconds-long test. The tokenizer is a one-character-per-token CLIP tokenizer written to a
temporary folder (the real vocabulary would be a download); the step cost does not depend on it.
"""

from __future__ import annotations

import json
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

SD15_UNET = {
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "layers_per_block": 2, "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "norm_num_groups": 32,
}
SD15_VAE = {
    "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
    "in_channels": 3, "out_channels": 3, "sample_size": 512, "scaling_factor": 0.18215,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}
SD15_TEXT = {  # CLIP ViT-L/14's text tower
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768,
}
TINY_UNET = {**SD15_UNET, "block_out_channels": (32, 64), "cross_attention_dim": 32, "layers_per_block": 1,
             "sample_size": 8, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "attention_head_dim": 4, "norm_num_groups": 8}
TINY_VAE = {**SD15_VAE, "block_out_channels": (16, 32), "layers_per_block": 1, "sample_size": 16,
            "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
            "norm_num_groups": 8}
TINY_TEXT = {**SD15_TEXT, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 37, "max_position_embeddings": 16, "projection_dim": 32}
#: SD 1.5's training schedule (scheduler/scheduler_config.json)
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
MODES = ("full", "lora", "smp", "dp")
PRECISIONS = {"fp32": "no", "bf16": "bf16"}  # → optim.mixed_precision


def _tokenizer(folder: Path, max_length: int) -> Any:
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in (chr(i) for i in range(33, 127)):
            vocab[c + suffix] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)


def build_pipeline(tiny: bool) -> Any:
    """SD 1.5 (or the tiny stand-in) as a ``StableDiffusionPipeline`` with random weights."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
    vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
    text = TINY_TEXT if tiny else SD15_TEXT
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(Path(tmp), text["max_position_embeddings"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**text, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=DDPMScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def config_name(mode: str, precision: str, checkpointing: bool) -> str:
    return f"{mode}-{precision}" + ("-gc" if checkpointing else "")


def all_configs() -> list[str]:
    return [config_name(m, p, gc) for m in MODES for p in PRECISIONS for gc in (False, True)]


def parse_config(name: str) -> tuple[str, str, bool]:
    parts = name.split("-")
    if len(parts) not in (2, 3) or parts[0] not in MODES or parts[1] not in PRECISIONS or parts[2:] not in ([], ["gc"]):
        raise SystemExit(f"unknown config {name!r}; choose from {', '.join(all_configs())}")
    return parts[0], parts[1], len(parts) == 3


class FixedBatches:
    """Timing only: every mode gets the same batch of ``size`` samples each step (rotating through the
    members), DP included — its Poisson draw would make the work per step random. The DP step itself
    (per-sample gradients, clipping, noise) is privlora's; no ε is claimed from these runs."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size, self.position = n, size, 0

    def next(self) -> list[int]:
        batch = [(self.position + i) % self.n for i in range(self.size)]
        self.position = (self.position + self.size) % self.n
        return batch


def images(n: int, resolution: int, seed: int) -> Any:
    import torch

    from privlora.data.imageset import ImageSet

    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, resolution, resolution, generator=g) * 2 - 1
    return ImageSet(ids=[f"img{seed}-{i}" for i in range(n)], pixels=pixels,
                    captions=[f"a photo of thing {i}" for i in range(n)])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_config(name: str, *, batch: int, device: str) -> Any:
    """privlora's validated TrainConfig for config ``name``, or why privlora refuses it (a str)."""
    from privlora.config import load_config
    from privlora.errors import UserError

    mode, precision, checkpointing = parse_config(name)
    overrides: dict[str, Any] = {
        "mode": "plain" if mode in ("full", "lora") else mode, "lora.full_finetune": mode == "full",
        "lora.rank": 64, "lora.alpha": 32, "lora.targets": list(LORA_TARGETS), "quiet": True,
        "optim.batch_size": batch, "optim.mixed_precision": PRECISIONS[precision],
        "optim.gradient_checkpointing": checkpointing, "device": device}
    if mode == "dp":
        overrides["dp.noise_multiplier"] = 1.0
    try:
        return load_config(None, overrides)
    except UserError as e:  # e.g. DP with gradient checkpointing: refused by privlora's config
        why = str(e).split("Value error, ")[-1].split(" (got ")[0]
        return f"refused by privlora: {why}"


def privlora_steps(name: str, *, tiny: bool, resolution: int, batch: int, steps: int, warmup: int,
                   device: str) -> dict[str, Any]:
    """Time ``steps`` updates of privlora's own step (``loop._one_step``) in config ``name``."""
    import torch

    from privlora.tasks.sd import StableDiffusionTask
    from privlora.train import loop
    from privlora.train.augment import Augmenter
    from privlora.train.dp import PrivateTraining, resolve
    from privlora.train.objectives import OBJECTIVES
    from privlora.train.precision import Precision

    config = train_config(name, batch=batch, device=device)
    if isinstance(config, str):
        return {"config": name, "skipped": config}
    mode, precision, checkpointing = parse_config(name)
    torch.manual_seed(0)
    task = StableDiffusionTask(build_pipeline(tiny), loop._lora_spec(config), base_name="sd15-random", seed=0)
    task.pipe.to(device)
    n = 4 * batch
    members, aux = images(n, resolution, 0), images(n, resolution, 1)
    objective = OBJECTIVES[config.mode](task, members=members, aux=aux, options=config.mp, batch_size=batch)
    if checkpointing:
        task.enable_gradient_checkpointing()
    params = task.trainable_parameters()
    optimizer = loop._make_optimizer(config, params)
    private = None
    if config.mode == "dp":
        private = PrivateTraining(task, optimizer, resolve(config.dp, n=n, batch_size=batch, steps=steps),
                                  n=n, seed=0, physical_batch=batch)
    generator = torch.Generator().manual_seed(0)
    parts = loop._StepParts(task, objective, private, optimizer, params, FixedBatches(n, batch),  # type: ignore[arg-type]
                            members, generator, precision=Precision(config.optim.mixed_precision,
                                                                    torch.device(device)),
                            augment=Augmenter(config.data, seed=0), chunk=batch, grad_clip=config.optim.grad_clip)
    task.train()
    cuda = torch.device(device).type == "cuda"
    times = []
    for i in range(warmup + steps):
        if cuda and i == warmup:
            torch.cuda.reset_peak_memory_stats()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loop._one_step(parts, check=False)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"config": name, "mode": mode, "precision": precision, "gradient_checkpointing": checkpointing,
            "batch_size": batch, "resolution": resolution, "steps": steps, "warmup": warmup,
            "median_step_s": statistics.median(times), "mean_step_s": statistics.mean(times),
            "samples_per_s": batch / statistics.median(times),
            "trainable_params": sum(p.numel() for p in params), "peak_rss_mb": peak_rss_mb(),
            "cuda_max_memory_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
