"""Stable Diffusion XL Task: the SD Task with SDXL's two text encoders and micro-conditioning.

What changes against SD 1.x/2.x, as in diffusers' ``StableDiffusionXLPipeline.encode_prompt`` and its
``train_text_to_image_lora_sdxl.py`` script:

* the caption goes through two CLIP text encoders (``text_encoder``: CLIPTextModel, ``text_encoder_2``:
  CLIPTextModelWithProjection); the UNet's cross-attention reads their penultimate hidden states,
  concatenated on the feature axis;
* the UNet (``addition_embed_type="text_time"``) also takes ``added_cond_kwargs``: ``text_embeds``, the
  second encoder's pooled projection, and ``time_ids`` = (original H, W, crop top, crop left, target H, W).
  privlora's data are resized to the training resolution and centre-cropped, so the micro-conditioning
  says "a full, uncropped image of the training size" — what SDXL's pipeline asks for by default at
  generation, so a trained adapter is sampled under the conditioning it was trained with.

Everything else — the prediction target, VAE latents, DP/SMP, the adapter's ``unet.`` keys that
``StableDiffusionXLPipeline.load_lora_weights`` reads — is the SD Task's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from privlora.tasks.lora import LoraSpec
from privlora.tasks.sd import StableDiffusionTask

SDXL_PIPELINE = "StableDiffusionXLPipeline"


def is_sdxl_index(index: dict[str, Any]) -> bool:
    """A ``model_index.json`` of an SDXL pipeline: its class, or a second text encoder."""
    return index.get("_class_name") == SDXL_PIPELINE or "text_encoder_2" in index


def is_sdxl(base: str) -> bool:
    """Whether ``base`` (a local pipeline folder, or a hub id in the local cache) is an SDXL pipeline.

    Decided from ``model_index.json`` only, before any weights load: an SDXL folder loaded as SD 1.x would
    silently drop its second text encoder and fail deep inside the UNet.
    """
    path = Path(base) / "model_index.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(base, "model_index.json") if "/" in base else None
        except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError)
            return False
        if not isinstance(cached, str):
            return False
        path = Path(cached)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # the SD loader reports the broken index as a user error
    return isinstance(index, dict) and is_sdxl_index(index)


class StableDiffusionXLTask(StableDiffusionTask):
    """Batches as for SD: ``pixels`` ``[B, 3, H, W]`` in ``[-1, 1]`` and ``captions``."""

    def __init__(self, pipe: Any, lora: LoraSpec | None, *, base_name: str, seed: int = 0) -> None:
        pipe.text_encoder_2.requires_grad_(False)
        pipe.text_encoder_2.eval()
        self._pooled_cache: dict[str, torch.Tensor] = {}
        super().__init__(pipe, lora, base_name=base_name, seed=seed)

    @staticmethod
    def _limit(tokenizer: Any, encoder: Any) -> int:
        # some tokenizers report a huge model_max_length (1e30): the text encoder's positions bound it
        return min(int(tokenizer.model_max_length), int(encoder.config.max_position_embeddings))

    @torch.no_grad()
    def _encode_missing(self, captions: list[str]) -> None:
        """Both encoders' penultimate states (concatenated) and the pooled projection, cached per caption."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if not missing:
            return
        states, pooled = [], None
        for tokenizer, encoder in ((self.pipe.tokenizer, self.pipe.text_encoder),
                                   (self.pipe.tokenizer_2, self.pipe.text_encoder_2)):
            tok = tokenizer(missing, padding="max_length", truncation=True,
                            max_length=self._limit(tokenizer, encoder), return_tensors="pt")
            out = encoder(tok.input_ids.to(self.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
        assert pooled is not None
        joined = torch.cat(states, dim=-1)
        for i, caption in enumerate(missing):
            self._text_cache[caption] = joined[i]
            self._pooled_cache[caption] = pooled[i]

    def _text_states(self, captions: list[str]) -> torch.Tensor:
        self._encode_missing(captions)
        return torch.stack([self._text_cache[c] for c in captions])

    def _pooled(self, captions: list[str]) -> torch.Tensor:
        self._encode_missing(captions)
        return torch.stack([self._pooled_cache[c] for c in captions])

    def time_ids(self, x_t: torch.Tensor) -> torch.Tensor:
        """``[B, 6]``: original (H, W) = target (H, W) = the pixel size of ``x_t``'s latents, no crop."""
        factor = int(self.pipe.vae_scale_factor)
        h, w = int(x_t.shape[-2]) * factor, int(x_t.shape[-1]) * factor
        ids = torch.tensor([h, w, 0, 0, h, w], dtype=x_t.dtype, device=x_t.device)
        return ids.repeat(x_t.shape[0], 1)

    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        captions = list(batch.get("captions") or [""] * x_t.shape[0])
        added = {"text_embeds": self._pooled(captions), "time_ids": self.time_ids(x_t)}
        return self.denoiser(x_t, t, encoder_hidden_states=self._text_states(captions),
                             added_cond_kwargs=added).sample
