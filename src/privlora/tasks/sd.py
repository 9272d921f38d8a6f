"""Stable Diffusion Task: text-to-image LoRA on the UNet of any diffusers SD pipeline.

The VAE and text encoder stay frozen; ``x0`` is the VAE latent (distribution mean × scaling factor, so
per-sample losses are deterministic) and the caption's text-encoder states condition the UNet.
The training target follows the pipeline scheduler's ``prediction_type`` (ε, or ``v_prediction`` as in
SD 2.x 768 models, or ``sample``), as diffusers' own LoRA script does; ``predict_noise`` always returns ε
so the loss-based attacks see one quantity for every base.
The adapter is written with ``unet.`` keys, which ``StableDiffusionPipeline.load_lora_weights`` reads.
Attention runs through PyTorch's fused ``scaled_dot_product_attention`` (diffusers' ``AttnProcessor2_0``);
with ``--cache-latents`` the frozen encoders' outputs come from :mod:`privlora.tasks.latent_cache`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from privlora.errors import UserError
from privlora.runs import atomic_file
from privlora.tasks.diffusion import DiffusionTask
from privlora.tasks.latent_cache import EncoderCache, module_identity, numerics
from privlora.tasks.lora import DIFFUSERS_WEIGHTS, LoraSpec

#: safetensors metadata key diffusers' ``load_lora_weights`` reads the LoraConfig from (rank, alpha, targets)
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class StableDiffusionTask(DiffusionTask):
    """Batches carry ``pixels`` ``[B, 3, H, W]`` in ``[-1, 1]`` and ``captions`` (list of str)."""

    needs_captions = True

    def __init__(self, pipe: StableDiffusionPipeline, lora: LoraSpec | None, *, base_name: str,
                 seed: int = 0) -> None:
        self.pipe = pipe
        self.model = pipe.unet
        self.denoiser = pipe.unet
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = str(self.scheduler.config.get("prediction_type", "epsilon"))
        if self.prediction_type not in PREDICTION_TYPES:
            raise UserError(f"{base_name}: scheduler prediction_type {self.prediction_type!r} is not "
                            f"supported; privlora trains {', '.join(PREDICTION_TYPES)} models")
        self.base_name = base_name
        for frozen in (pipe.vae, pipe.text_encoder):
            frozen.requires_grad_(False)
            frozen.eval()
        self._text_cache: dict[str, torch.Tensor] = {}
        self._latent_store: EncoderCache | None = None  # on-disk caches, set by enable_encoder_cache
        self._text_store: EncoderCache | None = None
        use_sdpa(pipe.unet)
        super().__init__(lora, seed=seed)

    def enable_encoder_cache(self, root: Path) -> None:
        """``--cache-latents``: VAE latents and text states from ``root`` (computed and stored on a miss).

        The encoders are identified by a checksum of their weights, read once here (a second or two for
        SD 1.5's VAE and CLIP text encoder)."""
        self._latent_store = EncoderCache(root, "latents", module_identity(self.pipe.vae))
        self._text_store = EncoderCache(root, "text", module_identity(self.pipe.text_encoder))

    @property
    def channels(self) -> int:
        return 3

    @property
    def resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)

    @torch.no_grad()
    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        if self._latent_store is None:
            return self._vae_latents(batch["pixels"])
        pixels = batch["pixels"]
        vae = self.pipe.vae
        tag = numerics(self.device, vae.dtype)
        keys = [self._latent_store.key(tag, image) for image in pixels]
        f = int(self.pipe.vae_scale_factor)
        shape = (int(vae.config.latent_channels), pixels.shape[-2] // f, pixels.shape[-1] // f)
        found = self._latent_store.lookup(keys, lambda rows: self._vae_latents(pixels[rows]), shape)
        return torch.stack([latent.to(self.device) for latent in found])  # disk hits load on the CPU

    def _vae_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.pipe.vae.encode(pixels.to(self.device, dtype=self.pipe.vae.dtype)).latent_dist.mean
        return latents * self.pipe.vae.config.scaling_factor

    @torch.no_grad()
    def _text_states(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if missing:
            # some tokenizers report a huge model_max_length (1e30): the text encoder's positions bound it
            limit = min(int(self.pipe.tokenizer.model_max_length),
                        int(self.pipe.text_encoder.config.max_position_embeddings))
            tok = self.pipe.tokenizer(missing, padding="max_length", truncation=True, max_length=limit,
                                      return_tensors="pt")
            ids = tok.input_ids
            encoder = self.pipe.text_encoder

            def run(rows: list[int]) -> torch.Tensor:
                return encoder(ids[rows].to(self.device))[0]

            if self._text_store is None:
                states = list(run(list(range(len(missing)))))
            else:  # keyed by token ids: the tokenizer's identity cannot matter beyond them
                tag = numerics(self.device, encoder.dtype)
                keys = [self._text_store.key(tag, row) for row in ids]
                states = self._text_store.lookup(keys, run, (ids.shape[1], int(encoder.config.hidden_size)))
            for caption, state in zip(missing, states, strict=True):
                self._text_cache[caption] = state.to(self.device)
        return torch.stack([self._text_cache[c] for c in captions])

    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        captions = batch.get("captions") or [""] * x_t.shape[0]
        return self.denoiser(x_t, t, encoder_hidden_states=self._text_states(list(captions))).sample

    def _alphas(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """√ᾱ_t and √(1−ᾱ_t), shaped to broadcast against ``like``."""
        abar = self.scheduler.alphas_cumprod.to(like.device)[t.to(like.device)].to(torch.float32)
        abar = abar.reshape(-1, *([1] * (like.dim() - 1)))
        return abar.sqrt(), (1 - abar).sqrt()

    def _target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to output at ``x_t``: ε, v = √ᾱ·ε − √(1−ᾱ)·x0, or x0."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            a, s = self._alphas(t, x0)
            return a * noise.float() - s * x0.float()
        return x0

    def squared_error(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                      timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """Per-element squared error of the UNet's output against its own prediction target."""
        x0 = self.encode(batch)
        t, noise = self.sample_t_noise(x0, generator, timesteps)
        out = self._denoise(self.scheduler.add_noise(x0, noise, t), t, batch)
        return (out.float() - self._target(x0, noise, t).float()) ** 2

    def predict_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                      batch: dict[str, Any] | None = None) -> torch.Tensor:
        """ε_θ at ``x_t``, converted from the UNet's v or x0 output where the base predicts those."""
        x_t = self.scheduler.add_noise(x0, noise, t)
        out = self._denoise(x_t, t, batch or {})
        if self.prediction_type == "epsilon":
            return out
        a, s = self._alphas(t, x_t)
        if self.prediction_type == "v_prediction":
            return (a * out.float() + s * x_t.float()).to(out.dtype)
        return ((x_t.float() - a * out.float()) / s).to(out.dtype)

    def sample_shape(self) -> tuple[int, int, int]:
        size = int(self.pipe.unet.config.sample_size)
        return (int(self.pipe.unet.config.in_channels), size, size)

    def save_adapter(self, path: str | Path) -> None:
        """peft + diffusers files, with the LoraConfig embedded in the diffusers file's metadata.

        Without it ``load_lora_weights`` assumes ``lora_alpha == r`` and silently rescales any adapter
        trained with another alpha.
        """
        super().save_adapter(path)
        assert self.lora is not None
        file = Path(path) / DIFFUSERS_WEIGHTS
        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = self.lora.peft_config().to_dict()
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        packed = {f"{self.diffusers_prefix}.{k}": v for k, v in config.items()}
        meta[LORA_ADAPTER_METADATA_KEY] = json.dumps(packed, sort_keys=True, default=str)
        with atomic_file(file) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @torch.no_grad()
    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Latents → pixels in ``[-1, 1]`` through the VAE decoder."""
        image = self.pipe.vae.decode(x / self.pipe.vae.config.scaling_factor).sample
        return image.clamp(-1, 1)


def use_sdpa(unet: torch.nn.Module) -> None:
    """Every plain attention processor of ``unet`` → ``AttnProcessor2_0`` (PyTorch's fused SDPA kernels).

    diffusers picks it by default on torch 2; a base saved with the classic processor set, or loaded where
    that default was switched off, gets it here. Other processors (IP-Adapter, custom) are left alone."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processors = unet.attn_processors
    if any(type(p) is AttnProcessor for p in processors.values()):
        unet.set_attn_processor({name: AttnProcessor2_0() if type(p) is AttnProcessor else p
                                 for name, p in processors.items()})
