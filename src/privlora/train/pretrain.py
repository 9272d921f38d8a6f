"""Pre-train the embedded base UNet on public images only (``privlora base pretrain``).

The private demo sets (lfw faces, digits 5–9) never enter this data, so anything an adapter later
reveals about them was learnt from the private data, not from the base.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from privlora.data.demo import public
from privlora.progress import progress_bar
from privlora.runs import atomic_dir
from privlora.tasks.embedded import (
    META,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    WEIGHTS,
    new_scheduler,
    new_unet,
    unet_fp16_state,
)
from privlora.tasks.unet import UNetTask


@dataclass(frozen=True)
class PretrainResult:
    out: Path
    steps: int
    final_loss: float
    seconds: float


def pretrain_base(*, out: Path, steps: int = 6000, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                  quiet: bool = False) -> PretrainResult:
    """Train the embedded UNet architecture from scratch on :func:`privlora.data.demo.public`."""
    torch.manual_seed(seed)
    data = public(UNET_CONFIG["sample_size"], seed=seed)
    # flips double the public set; the private sets are never touched
    pixels = torch.cat([data.pixels, data.pixels.flip(-1)])
    task = UNetTask(new_unet(), new_scheduler(), None, base_name="scratch", seed=seed)
    task.denoiser.requires_grad_(True)
    opt = torch.optim.AdamW(task.trainable_parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    start, ema, loss_value = time.time(), None, float("nan")
    task.train()
    with progress_bar("pretrain base", total=steps, quiet=quiet) as bar:
        for _ in range(steps):
            idx = torch.randint(0, pixels.shape[0], (batch_size,), generator=gen)
            loss = task.per_sample_loss({"pixels": pixels[idx]}, gen).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(task.trainable_parameters(), 1.0)
            opt.step()
            sched.step()
            loss_value = loss.item()
            ema = loss_value if ema is None else 0.98 * ema + 0.02 * loss_value
            bar.advance(loss=ema)
    meta = {"unet": UNET_CONFIG, "scheduler": SCHEDULER_CONFIG,
            "provenance": {"command": f"privlora base pretrain --steps {steps} --batch-size {batch_size} "
                                      f"--lr {lr} --seed {seed}",
                           "data": "privlora.data.demo.public: sklearn digits 0-4, lfw_subset non-faces, "
                                   "crops of scikit-image photos (+ horizontal flips)",
                           "images": int(pixels.shape[0]), "final_loss_ema": ema}}
    with atomic_dir(out) as tmp:
        save_file(unet_fp16_state(task.denoiser), str(tmp / WEIGHTS))
        (tmp / META).write_text(json.dumps(meta, indent=2))
    return PretrainResult(out=out, steps=steps, final_loss=float(ema or loss_value),
                          seconds=time.time() - start)
