"""Near-duplicate images by perceptual hash: the images a diffusion model memorises most.

Carlini et al. 2023 ("Extracting Training Data from Diffusion Models") found that the training images
Stable Diffusion regurgitates are overwhelmingly the ones duplicated in its training set. The hash is
pHash (Zauner 2010): the signs of the lowest 8×8 DCT frequencies of a 32×32 greyscale thumbnail relative
to their median, so re-encoding, resizing and small colour or brightness changes leave it (nearly) the
same. Images within ``max_distance`` bits of each other are linked; a cluster is a connected component.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy.fft import dctn

#: Hamming distance (of 64 bits) up to which two images count as near-duplicates
DEFAULT_DISTANCE = 6


def phash(img: Image.Image) -> int:
    """64-bit perceptual hash of an image."""
    thumb = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(thumb, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])  # the DC term carries brightness only: left out of the median
    return int("".join("1" if b else "0" for b in bits), 2)


def clusters(hashes: Sequence[int], max_distance: int = DEFAULT_DISTANCE) -> list[list[int]]:
    """Indices grouped into near-duplicate clusters (singletons left out), each sorted, first = kept."""
    n = len(hashes)
    if n < 2:
        return []
    values = np.array(hashes, dtype=np.uint64)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n - 1):
        distances = np.bitwise_count(values[i + 1:] ^ values[i])
        for j in np.nonzero(distances <= max_distance)[0]:
            a, b = root(i), root(i + 1 + int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def distance(a: int, b: int) -> int:
    return int(a ^ b).bit_count()
