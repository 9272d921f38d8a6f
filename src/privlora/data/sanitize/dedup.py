"""Near-duplicate images by perceptual hash: the images a diffusion model memorises most.

Carlini et al. 2023 ("Extracting Training Data from Diffusion Models") found that the training images
Stable Diffusion regurgitates are overwhelmingly the ones duplicated in its training set. The hash is
pHash (Zauner 2010): the signs of the lowest 8×8 DCT frequencies of a 32×32 greyscale thumbnail relative
to their median, so re-encoding, resizing and small colour or brightness changes leave it (nearly) the
same. pHash alone is neither mirror- nor crop-robust: a flipped copy sits ~36 bits away and a copy cropped
3 % per side and scaled ×0.8 at 8–24, past any threshold that keeps distinct images apart. So an image's
:func:`signature` is the pHash of the image, of centre crops losing 3 % and 6 % per side, and of the mirror of
each; two images are as far apart as the nearest pair of one's whole image with any view of the other. Images
within ``max_distance`` bits of each other are linked; a cluster is a connected component. Measured on a
labelled folder of copies (``benchmarks/dedup_quality.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy.fft import dctn

#: Hamming distance (of 64 bits) up to which two images count as near-duplicates: on the labelled folder of
#: benchmarks/dedup_quality.py every copy pair is within 8 bits but 0.4 %, and the closest distinct pair is at 10
DEFAULT_DISTANCE = 8
#: the centre crops (fraction lost per side) a signature hashes beside the whole image
CROPS = (0.03, 0.06)

#: an image's signature: the pHash of the whole image first, then of its other views
Signature = tuple[int, ...]


def phash(img: Image.Image) -> int:
    """64-bit perceptual hash of an image."""
    thumb = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(thumb, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])  # the DC term carries brightness only: left out of the median
    return int("".join("1" if b else "0" for b in bits), 2)


def _centre(img: Image.Image, fraction: float) -> Image.Image:
    w, h = img.size
    dx, dy = round(w * fraction), round(h * fraction)
    return img.crop((dx, dy, w - dx, h - dy)) if min(w - 2 * dx, h - 2 * dy) >= 8 else img


def signature(img: Image.Image) -> Signature:
    """pHashes of the whole image, its mirror, and the mirrored and unmirrored centre crops of :data:`CROPS`."""
    views = [img, *(_centre(img, f) for f in CROPS)]
    return tuple(h for v in views for h in (phash(v), phash(v.transpose(Image.Transpose.FLIP_LEFT_RIGHT))))


def _distances(a: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Signature distance from ``a`` ([V]) to each row of ``others`` ([M, V]): one whole image against every
    view of the other, both ways round (a crop of one lines up with the other's whole image)."""
    one_way = np.bitwise_count(others ^ a[0]).min(axis=1)
    other_way = np.bitwise_count(others[:, :1] ^ a[None, :]).min(axis=1)
    return np.minimum(one_way, other_way)


def clusters(signatures: Sequence[Signature | int], max_distance: int = DEFAULT_DISTANCE) -> list[list[int]]:
    """Indices grouped into near-duplicate clusters (singletons left out), each sorted, first = kept.

    Plain pHashes (ints) are accepted as one-view signatures."""
    n = len(signatures)
    if n < 2:
        return []
    rows = [(s,) if isinstance(s, int) else tuple(s) for s in signatures]
    width = max(len(r) for r in rows)
    values = np.array([r + (r[0],) * (width - len(r)) for r in rows], dtype=np.uint64)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n - 1):
        distances = _distances(values[i], values[i + 1:])
        for j in np.nonzero(distances <= max_distance)[0]:
            a, b = root(i), root(i + 1 + int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def distance(a: Signature | int, b: Signature | int) -> int:
    """Bits between two signatures (or two plain pHashes), as :func:`clusters` links them."""
    rows = np.array([(a,) if isinstance(a, int) else a], dtype=np.uint64)
    other = np.array([(b,) if isinstance(b, int) else b], dtype=np.uint64)
    return int(_distances(rows[0], other)[0])
