"""Training-time augmentation with diffusers' semantics: random square crop and horizontal flip.

Drawn from a generator of its own, seeded from the run's seed (``seed + 2``; DP noise uses ``seed + 1``),
so the sampling and noise streams of a run without augmentation are untouched, the same seed gives the
same pixels, and a resumed run continues the same draws (its state is in the checkpoint). Each sample is
augmented on its own, so DP-SGD's per-sample sensitivity is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from privlora.config import DataOptions
from privlora.data.imageset import ImageSet


class Augmenter:
    """``batch(data, indices)``: the Task's batch, each image randomly cropped and/or flipped."""

    def __init__(self, options: DataOptions, *, seed: int) -> None:
        self.random_crop, self.random_flip = not options.center_crop, options.random_flip
        self.generator = torch.Generator().manual_seed(seed + 2)

    @property
    def active(self) -> bool:
        return self.random_crop or self.random_flip

    def batch(self, data: ImageSet, indices: list[int]) -> dict[str, Any]:
        if not self.active or not indices:
            return data.batch(indices)
        size = data.pixels.shape[-1]
        images = []
        for i in indices:
            image = data.uncropped_image(i) if self.random_crop else data.pixels[i]
            if self.random_crop:  # torchvision's RandomCrop: offsets uniform over the valid range
                top = int(torch.randint(0, image.shape[1] - size + 1, (1,), generator=self.generator))
                left = int(torch.randint(0, image.shape[2] - size + 1, (1,), generator=self.generator))
                image = image[:, top:top + size, left:left + size]
            if self.random_flip and float(torch.rand((), generator=self.generator)) < 0.5:
                image = image.flip(-1)
            images.append(image)
        return {"pixels": torch.stack(images).contiguous(), "captions": [data.captions[i] for i in indices]}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
