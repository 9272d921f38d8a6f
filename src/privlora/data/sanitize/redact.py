"""Redaction operators: what happens to the pixels inside a detected box.

``fill`` (default) replaces them with a solid colour and is the only one that removes everything.
``pixelate`` keeps one mean colour per block: coarse, but low-frequency structure survives and
recognisers trained on pixelated faces or text can still re-identify some (McPherson et al. 2016,
"Defeating Image Obfuscation with Deep Learning"). ``blur`` is the weakest: a Gaussian blur is a known
linear low-pass filter, so deconvolution (e.g. Wiener filtering) recovers much of what it smeared, and
blurred text can be matched by blurring candidate strings the same way. Use ``blur`` only where the
picture must still look natural and the content is not worth an attacker's effort.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from privlora.errors import UserError

Redactor = Callable[[np.ndarray], np.ndarray]  # region H×W×C uint8 → same shape, redacted


def _fill(region: np.ndarray) -> np.ndarray:
    return np.zeros_like(region)


def _pixelate(region: np.ndarray, blocks: int = 6) -> np.ndarray:
    """``blocks`` mean-colour blocks along the longer side (few blocks: little is left to recognise)."""
    h, w = region.shape[:2]
    size = max(1, int(np.ceil(max(h, w) / blocks)))
    out = region.copy()
    for y in range(0, h, size):
        for x in range(0, w, size):
            block = region[y:y + size, x:x + size]
            out[y:y + size, x:x + size] = block.reshape(-1, block.shape[-1]).mean(axis=0).round().astype(region.dtype)
    return out


def _blur(region: np.ndarray) -> np.ndarray:
    import cv2

    h, w = region.shape[:2]
    sigma = max(h, w) / 4.0  # a wide kernel: narrower blurs are trivially readable
    return cv2.GaussianBlur(region, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)


REDACTORS: dict[str, Redactor] = {"fill": _fill, "pixelate": _pixelate, "blur": _blur}


def get_redactor(name: str) -> Redactor:
    if name not in REDACTORS:
        raise UserError(f"unknown redaction {name!r}; choose from {', '.join(REDACTORS)}")
    return REDACTORS[name]


def padded(box: tuple[int, int, int, int], margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """``box`` grown by ``margin`` × its size on every side (detectors draw boxes tight), clipped."""
    x0, y0, x1, y1 = box
    dx, dy = int(round((x1 - x0) * margin)), int(round((y1 - y0) * margin))
    return max(0, x0 - dx), max(0, y0 - dy), min(width, x1 + dx), min(height, y1 + dy)


def redact(pixels: np.ndarray, boxes: Sequence[tuple[int, int, int, int]], redactor: Redactor) -> np.ndarray:
    """A copy of ``pixels`` (H×W or H×W×C) with every box redacted; an alpha channel is left as it was."""
    out = pixels.copy()
    squeeze = out.ndim == 2
    if squeeze:
        out = out[:, :, None]
    colour = slice(0, 3) if out.shape[2] == 4 else slice(None)
    for x0, y0, x1, y1 in boxes:
        if x1 > x0 and y1 > y0:
            out[y0:y1, x0:x1, colour] = redactor(np.ascontiguousarray(out[y0:y1, x0:x1, colour]))
    return out[:, :, 0] if squeeze else out
