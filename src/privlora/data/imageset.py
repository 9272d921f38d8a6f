"""The in-memory image dataset every diffusion Task consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageSet:
    """Images as one tensor, with stable ids and captions.

    ``pixels`` is float32 ``[N, C, H, W]`` scaled to ``[-1, 1]`` (the range diffusion models train in).
    ``ids`` name each image stably (file name or ``faces/017``) so splits and audit scores can be
    traced back to a sample.
    """

    ids: list[str]
    pixels: torch.Tensor
    captions: list[str]

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.captions) == self.pixels.shape[0]):
            raise ValueError("ids, captions and pixels must have the same length")

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: list[int]) -> ImageSet:
        """A new ImageSet holding ``indices`` in that order (the caller's set is not changed)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(
            ids=[self.ids[i] for i in indices],
            pixels=self.pixels.index_select(0, index) if indices else self.pixels[:0],
            captions=[self.captions[i] for i in indices],
        )

    def by_ids(self, wanted: list[str]) -> ImageSet:
        """Subset by id, in the order given."""
        position = {sample_id: i for i, sample_id in enumerate(self.ids)}
        return self.subset([position[w] for w in wanted])
