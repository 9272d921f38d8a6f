"""Image file kinds and pixel depths, shared by the training loader and the sanitizer (no torch here)."""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale → 8-bit 'L'; any other mode is returned as it is.

    16-bit modes always span 0..65535 (a dark 16-bit image must stay dark, not be stretched); plain
    32-bit 'I' carries no depth, so values beyond 8 bits are taken as 16-bit; float images in [0, 1]
    are scaled to 0..255.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(arr * 255.0 if arr.max() <= 1 else arr, 0, 255).astype(np.uint8))
    return img
