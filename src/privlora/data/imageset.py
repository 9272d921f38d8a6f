"""The in-memory image dataset every diffusion Task consumes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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
    #: the images before cropping (shorter side = resolution, ``[C, H, W]`` each), kept only for training's
    #: random crop (``data.center_crop: false``); ``pixels`` holds their centre crops. None: ``pixels``.
    uncropped: list[torch.Tensor] | None = None
    #: kohya repeat folders (``10_name/``): how many times one epoch shows each sample; None: once each.
    #: Splits pick from the samples as they are (one per source image); :meth:`expanded` repeats the members.
    repeats: list[int] | None = None

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.captions) == self.pixels.shape[0]):
            raise ValueError("ids, captions and pixels must have the same length")
        if self.uncropped is not None and len(self.uncropped) != len(self.ids):
            raise ValueError("uncropped must hold one image per sample")
        if self.repeats is not None and (len(self.repeats) != len(self.ids) or min(self.repeats, default=1) < 1):
            raise ValueError("repeats must hold one count ≥ 1 per sample")

    def expanded(self) -> ImageSet:
        """Each sample ``repeats`` times (copies ``<id>#2`` … ``<id>#N`` after the original), as kohya's
        repeat folders train; a set without repeats is returned as it is. Call it after splitting, so the
        copies of one image never land on both sides of a split."""
        if self.repeats is None:
            return self
        order = [i for i, count in enumerate(self.repeats) for _ in range(count)]
        copy = [k for count in self.repeats for k in range(1, count + 1)]
        out = self.subset(order)
        ids = [sample_id if k == 1 else f"{sample_id}#{k}" for sample_id, k in zip(out.ids, copy, strict=True)]
        return ImageSet(ids=ids, pixels=out.pixels, captions=out.captions, uncropped=out.uncropped)

    def uncropped_image(self, i: int) -> torch.Tensor:
        """Sample ``i`` before cropping (its pixels where no uncropped copy is kept)."""
        return self.pixels[i] if self.uncropped is None else self.uncropped[i]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: list[int]) -> ImageSet:
        """A new ImageSet holding ``indices`` in that order (the caller's set is not changed)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(
            ids=[self.ids[i] for i in indices],
            pixels=self.pixels.index_select(0, index) if indices else self.pixels[:0],
            captions=[self.captions[i] for i in indices],
            uncropped=None if self.uncropped is None else [self.uncropped[i] for i in indices],
            repeats=None if self.repeats is None else [self.repeats[i] for i in indices],
        )

    def batches(self, size: int) -> Iterator[dict[str, Any]]:
        """Fixed, ordered batches in the dict form Tasks consume (``pixels``, ``captions``)."""
        for start in range(0, len(self), size):
            sub = self.subset(list(range(start, min(start + size, len(self)))))
            yield {"pixels": sub.pixels, "captions": sub.captions}

    def batch(self, indices: list[int]) -> dict[str, Any]:
        """The Task's batch for these samples: pixels and captions."""
        sub = self.subset(indices)
        return {"pixels": sub.pixels, "captions": sub.captions}

    def concat(self, other: ImageSet) -> ImageSet:
        """This set followed by ``other`` (e.g. audit canaries added to the training data); ids must be
        new and images the same shape, or the splits would point at the wrong samples."""
        clash = set(self.ids) & set(other.ids)
        if clash:
            raise ValueError(f"{len(clash)} ids are in both sets (e.g. {sorted(clash)[0]})")
        if len(self) and len(other) and self.pixels.shape[1:] != other.pixels.shape[1:]:
            raise ValueError(f"images of shape {tuple(other.pixels.shape[1:])} cannot join a set of "
                             f"{tuple(self.pixels.shape[1:])}")
        uncropped = None
        if self.uncropped is not None or other.uncropped is not None:
            uncropped = [*(self.uncropped_image(i) for i in range(len(self))),
                         *(other.uncropped_image(i).to(self.pixels) for i in range(len(other)))]
        repeats = None
        if self.repeats is not None or other.repeats is not None:
            repeats = [*(self.repeats or [1] * len(self)), *(other.repeats or [1] * len(other))]
        return ImageSet(ids=[*self.ids, *other.ids], pixels=torch.cat([self.pixels, other.pixels.to(self.pixels)]),
                        captions=[*self.captions, *other.captions], uncropped=uncropped, repeats=repeats)

    def by_ids(self, wanted: list[str]) -> ImageSet:
        """Subset by id, in the order given."""
        position = {sample_id: i for i, sample_id in enumerate(self.ids)}
        return self.subset([position[w] for w in wanted])
