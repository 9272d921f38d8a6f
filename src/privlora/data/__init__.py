"""Datasets: image folders with captions, built-in demo data, member/non-member splits."""

from privlora.data.imageset import ImageSet

__all__ = ["ImageSet"]
