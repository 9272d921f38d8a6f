"""Datasets: image folders with captions, built-in demo data, member/non-member splits, sanitizing.

``ImageSet`` is imported on first use, so that ``privlora.data.sanitize`` (and its worker processes)
do not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ImageSet"]


def __getattr__(name: str) -> Any:
    if name == "ImageSet":
        from privlora.data.imageset import ImageSet

        return ImageSet
    raise AttributeError(f"module 'privlora.data' has no attribute {name!r}")
