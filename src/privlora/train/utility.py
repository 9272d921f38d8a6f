"""Utility measures that work offline: held-out denoising loss and a Fréchet distance of samples.

* **Denoising loss** at fixed timesteps with fixed noise (seeded per timestep), so two adapters — or
  an adapter and its base — are compared on exactly the same noisy inputs.
* **Fréchet distance** (FID's formula) between generated and held-out images, on features of a fixed
  network that ships offline: privlora's embedded base UNet (trained only on public images). Features
  are the average-pooled outputs of its two attention down-blocks and its mid-block at t=0 (192
  numbers per image), after converting images to 32×32 grayscale. It ranks models like FID does but its
  values are not comparable with Inception-FID numbers from papers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from privlora.data.imageset import ImageSet
from privlora.tasks.diffusion import DiffusionTask

EVAL_BATCH = 64


@torch.no_grad()
def denoising_loss(task: DiffusionTask, data: ImageSet, *, timesteps: tuple[int, ...], seed: int
                   ) -> float | None:
    """Mean ε-prediction MSE over ``data`` × ``timesteps`` with noise fixed by ``seed``.

    None for an empty set (no evaluation split): utility.json must stay valid JSON, which has no NaN.
    """
    if len(data) == 0:
        return None
    total, count = 0.0, 0
    for k, t in enumerate(timesteps):
        gen = torch.Generator().manual_seed(seed * 1000 + k)
        for batch in data.batches(EVAL_BATCH):
            steps = torch.full((batch["pixels"].shape[0],), t, dtype=torch.long)
            errors = task.squared_error(batch, gen, timesteps=steps)
            total += errors.flatten(1).mean(1).sum().item()
            count += errors.shape[0]
    return total / count


class FeatureNetwork:
    """Fixed feature extractor for the Fréchet distance (the embedded public base UNet)."""

    def __init__(self) -> None:
        from privlora.tasks.embedded import load_embedded

        self.unet, _, _ = load_embedded()
        self.unet.requires_grad_(False)
        self._taps: list[torch.Tensor] = []
        for block in (self.unet.down_blocks[1], self.unet.down_blocks[2], self.unet.mid_block):
            block.register_forward_hook(self._tap)

    def _tap(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        self._taps.append(out.mean(dim=(2, 3)))

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        x = pixels.float().cpu()
        if x.shape[1] == 3:
            x = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        feats = []
        for start in range(0, x.shape[0], EVAL_BATCH):
            self._taps = []
            chunk = x[start:start + EVAL_BATCH]
            self.unet(chunk, torch.zeros(chunk.shape[0], dtype=torch.long))
            feats.append(torch.cat(self._taps, dim=1))
        return torch.cat(feats).numpy().astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½), FID's formula (Heusel et al. 2017)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():
        eps = np.eye(cov_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def measure_utility(task: DiffusionTask, *, members: ImageSet, held_out: ImageSet, options: Any, seed: int,
                    quiet: bool = True) -> dict[str, Any]:
    """Denoising loss (members, held-out; adapter and base) and the samples' Fréchet distance."""
    ts = tuple(options.timesteps)
    result: dict[str, Any] = {"timesteps": list(ts), "noise_seed": seed}
    result["loss_members"] = denoising_loss(task, members, timesteps=ts, seed=seed)
    result["loss_heldout"] = denoising_loss(task, held_out, timesteps=ts, seed=seed)
    with task.adapter_disabled():
        result["base_loss_members"] = denoising_loss(task, members, timesteps=ts, seed=seed)
        result["base_loss_heldout"] = denoising_loss(task, held_out, timesteps=ts, seed=seed)
    if options.samples >= 2 and len(held_out) >= 2:
        features = FeatureNetwork()
        reference = features(held_out.pixels)
        gen = torch.Generator().manual_seed(seed)
        samples = task.to_pixels(task.sample(options.samples, generator=gen, steps=options.sample_steps))
        result["fd_heldout"] = frechet_distance(features(samples), reference)
        with task.adapter_disabled():
            gen = torch.Generator().manual_seed(seed)
            base = task.to_pixels(task.sample(options.samples, generator=gen, steps=options.sample_steps))
        result["base_fd_heldout"] = frechet_distance(features(base), reference)
        result["fd_features"] = "privlora embedded base UNet, pooled attention/mid-block activations (192-d)"
        result["fd_samples"] = options.samples
    return result
