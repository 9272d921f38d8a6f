"""ControlNet inputs for the SD path: the ControlNet itself (safetensors only) and its condition images.

Condition images are extra inputs to generation. The adapter's (ε, δ) says nothing about them: an edge
map of a private photo carries that photo's layout, silhouette and often its identity into every image
generated from it. They are therefore recorded as *not covered* in the output's ``privacy.json``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from privlora.data.folder import load_folder
from privlora.errors import UserError
from privlora.tasks.loading import PICKLE_SUFFIXES

#: Canny hysteresis thresholds of diffusers' and the ControlNet authors' canny examples
CANNY_LOW, CANNY_HIGH = 100, 200


def load_controlnet(folder: Path, *, unet: Any) -> Any:
    """A diffusers ``ControlNetModel`` folder (``config.json`` + safetensors) that fits ``unet``."""
    from diffusers import ControlNetModel

    folder = Path(folder)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise UserError(f"--controlnet {folder} is not a diffusers ControlNetModel folder (no config.json)")
    files = [p for p in folder.iterdir() if p.is_file()]
    if not any(p.suffix == ".safetensors" for p in files):
        if any(p.suffix in PICKLE_SUFFIXES for p in files):
            raise UserError(f"--controlnet {folder} holds only pickle weights, which can execute code when "
                            "loaded; convert them to safetensors (diffusers: save_pretrained(..., "
                            "safe_serialization=True))")
        raise UserError(f"--controlnet {folder} has no .safetensors weights")
    try:
        net = ControlNetModel.from_pretrained(str(folder), use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load ControlNet from {folder}: {str(e).splitlines()[0]}") from None
    for key in ("cross_attention_dim", "in_channels"):
        if net.config.get(key) != unet.config.get(key):
            raise UserError(f"--controlnet {folder} was made for a UNet with {key}={net.config.get(key)}, "
                            f"the base's UNet has {unet.config.get(key)}: use a ControlNet for this base")
    net.requires_grad_(False)
    return net.eval()


def _to_pil(pixels: np.ndarray) -> Image.Image:
    """``[C, H, W]`` in ``[-1, 1]`` → an RGB PIL image."""
    arr = ((np.clip(pixels, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr, mode="RGB")


def condition_images(folder: Path, *, resolution: int) -> list[Image.Image]:
    """Every image of ``folder`` (sorted by path) as an RGB condition at the pipeline's resolution."""
    images, _ = load_folder(Path(folder), channels=3, resolution=resolution)
    return [_to_pil(p) for p in images.pixels.numpy()]


def canny_edges(folder: Path, *, resolution: int, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> list[Image.Image]:
    """Canny edge maps (OpenCV) of every image of ``folder``: white edges on black, RGB, at ``resolution``."""
    import cv2

    if not 0 <= low <= high:
        raise UserError(f"Canny thresholds must satisfy 0 <= low <= high, got {low}, {high}")
    images, _ = load_folder(Path(folder), channels=1, resolution=resolution)
    gray = ((images.pixels[:, 0].numpy().clip(-1, 1) + 1) * 127.5).round().astype(np.uint8)
    return [Image.fromarray(np.repeat(cv2.Canny(g, low, high)[..., None], 3, axis=2), mode="RGB") for g in gray]


def digest(images: list[Image.Image]) -> str:
    """sha256 over the condition images' pixels, in order: which conditions produced a synthetic set."""
    h = hashlib.sha256()
    for img in images:
        h.update(np.asarray(img, dtype=np.uint8).tobytes())
    return h.hexdigest()
