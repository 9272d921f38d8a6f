"""``privlora generate``: a PNG grid from base + adapter with a fixed seed (same seed, same image)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from privlora.errors import UserError
from privlora.runs import atomic_file
from privlora.tasks.lora import PEFT_CONFIG, read_spec


@dataclass(frozen=True)
class GenerateResult:
    out: Path
    count: int


def resolve_adapter(path: Path) -> Path:
    """Accept a run directory (uses its ``adapter/``) or an adapter directory."""
    path = Path(path)
    if (path / "adapter" / PEFT_CONFIG).exists():
        return path / "adapter"
    if (path / PEFT_CONFIG).exists():
        return path
    raise UserError(f"{path} is neither a run directory nor an adapter directory (no {PEFT_CONFIG})")


def adapter_base(adapter: Path) -> str:
    cfg = json.loads((adapter / PEFT_CONFIG).read_text())
    return str(cfg.get("base_model_name_or_path") or "embedded")


def grid_image(pixels: torch.Tensor, *, columns: int | None = None) -> Image.Image:
    """``[N, C, H, W]`` in ``[-1, 1]`` → one PIL image, tiles in rows."""
    n, c, h, w = pixels.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    canvas = np.full((rows * h, cols * w, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        canvas[r * h:(r + 1) * h, k * w:(k + 1) * w] = arr[i]
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode="L" if c == 1 else "RGB")


def generate(source: Path | None, *, out: Path, n: int = 16, seed: int = 0, steps: int = 50,
             base: str | None = None, prompt: str | None = None, trust_pickle: bool = False,
             device: str = "cpu") -> GenerateResult:
    """Sample ``n`` images from ``base`` with the adapter in ``source`` (None: the base alone)."""
    from privlora.tasks.loading import load_task

    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    adapter = resolve_adapter(source) if source is not None else None
    spec = read_spec(adapter) if adapter is not None else None
    base = base or (adapter_base(adapter) if adapter is not None else "embedded")
    task = load_task(base, spec, seed=seed, trust_pickle=trust_pickle, device=device)
    if adapter is not None:
        task.load_adapter(adapter)
    task.model.eval()
    if task.needs_captions and not prompt:
        raise UserError("this is a text-to-image model: give --prompt")
    cond = {"captions": [prompt] * n} if prompt else None
    samples = task.to_pixels(task.sample(n, generator=torch.Generator().manual_seed(seed), steps=steps,
                                         batch=cond))
    with atomic_file(out) as tmp:
        grid_image(samples.cpu()).save(tmp, format="PNG")
    return GenerateResult(out=Path(out), count=n)
