"""``--validation-prompt``: a grid of images from the adapter being trained, every ``--validation-steps``.

Written to ``<run>/validation/step-<k>.png`` with the Task's DDIM sampler (the one ``privlora generate``
uses, ``eval.sample_steps`` steps) and a generator of its own seeded from the run's seed, so every grid
starts from the same noise and grids of different steps compare the adapter, not the draw. Validation
must not change training: it reads no training generator, and the global RNG state (which MP/SMP's
proxy-attacker dropout draws from) is restored afterwards, so a run with validation gives the same
adapter as one without. On an unconditional (pixel-space) base the prompt is ignored with a note and
the grid is sampled unconditionally. Under DP the images are post-processing of an iterate the DP-SGD
analysis already releases, so they cost no ε.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from privlora.config import ValidationOptions
from privlora.runs import atomic_file


class Validation:
    """``after_step(step)`` writes the grid on every ``options.steps``-th step; inert without a prompt."""

    def __init__(self, options: ValidationOptions, task: Any, run: Path, *, seed: int, sample_steps: int,
                 writes: bool = True) -> None:
        self.options, self.task, self.folder = options, task, Path(run) / "validation"
        self.seed, self.sample_steps = seed, sample_steps
        self.active = options.prompt is not None and writes  # one process writes (rank 0)
        self.conditional = bool(getattr(task, "needs_captions", False))
        if self.active and not self.conditional:
            print("note: --validation-prompt is ignored: this base is unconditional; validation images are "
                  "sampled without it", file=sys.stderr, flush=True)

    def after_step(self, step: int) -> Path | None:
        if not self.active or step % self.options.steps:
            return None
        return self.write(step)

    def write(self, step: int) -> Path:
        from privlora.generate import grid_image

        n = self.options.images
        cond = {"captions": [self.options.prompt] * n} if self.conditional else None
        model = self.task.model
        was_training = model.training
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        model.eval()
        try:
            samples = self.task.sample(n, generator=torch.Generator().manual_seed(self.seed),
                                       steps=self.sample_steps, batch=cond)
            pixels = self.task.to_pixels(samples).float().cpu()
        finally:
            model.train(was_training)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        out = self.folder / f"step-{step}.png"
        with atomic_file(out) as tmp:
            grid_image(pixels).save(tmp, format="PNG")
        return out
