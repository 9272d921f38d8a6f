"""Built-in datasets that ship offline (scikit-image, scikit-learn, or rendered in-process).

* ``demo:faces`` — the 100 faces of scikit-image's ``lfw_subset``: the *private* set of the
  memorisation demo (few samples, so an undefended adapter memorises them).
* ``demo:digits`` — scikit-learn digits 5–9 (~900 images): the *private* set of the DP demo; DP needs
  hundreds of samples before the clipped signal rises above the noise.
* ``demo:idcards`` — 5,000 synthetic ID cards rendered with Faker names and numbers
  (:mod:`privlora.data.idcards`): the *private* benchmark set big enough for the membership audit to
  have power (thousands of members and non-members from one distribution).
* ``public`` — what the embedded base model is pre-trained on and which never overlaps the private
  sets: digits 0–4, the 100 non-face patches of ``lfw_subset`` and random crops of scikit-image's
  sample photographs.

All images are grayscale, resized to ``resolution`` and scaled to ``[-1, 1]``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from privlora.data.idcards import idcards
from privlora.data.imageset import ImageSet
from privlora.errors import UserError

_SKIMAGE_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page",
                   "text", "horse", "brick", "grass", "gravel", "immunohistochemistry", "cat")


def _to_tensor(images: np.ndarray, resolution: int) -> torch.Tensor:
    """``[N, H, W]`` floats in [0, 1] → ``[N, 1, R, R]`` in [-1, 1] (bilinear, antialiased)."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)).unsqueeze(1)
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                      align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).contiguous()


def _lfw() -> np.ndarray:
    from skimage import data

    return data.lfw_subset()  # 100 faces then 100 non-faces, 25×25, floats in [0, 1]


def _digits(keep: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    mask = keep(digits.target)
    return digits.images[mask] / 16.0, digits.target[mask]


def faces(resolution: int) -> ImageSet:
    """The 100 faces of ``lfw_subset`` (private demo set)."""
    imgs = _lfw()[:100]
    ids = [f"faces/{i:03d}" for i in range(len(imgs))]
    return ImageSet(ids=ids, pixels=_to_tensor(imgs, resolution), captions=["a face"] * len(ids))


def digits_private(resolution: int) -> ImageSet:
    """scikit-learn digits 5–9 (private set of the DP demo)."""
    imgs, labels = _digits(lambda t: t >= 5)
    ids = [f"digits/{i:04d}" for i in range(len(imgs))]
    caps = [f"the digit {d}" for d in labels]
    return ImageSet(ids=ids, pixels=_to_tensor(imgs, resolution), captions=caps)


def public(resolution: int, *, crops_per_photo: int = 40, seed: int = 0) -> ImageSet:
    """Public pre-training images: digits 0–4, lfw non-faces, random grayscale photo crops."""
    from skimage import data
    from skimage.color import rgb2gray

    rng = np.random.default_rng(seed)
    d_imgs, _ = _digits(lambda t: t < 5)
    parts = [_to_tensor(d_imgs, resolution), _to_tensor(_lfw()[100:], resolution)]
    crops = []
    for name in _SKIMAGE_PHOTOS:
        photo = getattr(data, name)()
        gray = rgb2gray(photo[..., :3]) if photo.ndim == 3 else photo.astype(np.float64)
        gray = gray / max(float(gray.max()), 1e-8) if gray.max() > 1 else gray
        for _ in range(crops_per_photo):
            size = int(rng.integers(24, min(gray.shape) // 2))
            y = int(rng.integers(0, gray.shape[0] - size))
            x = int(rng.integers(0, gray.shape[1] - size))
            crops.append(_to_tensor(gray[None, y:y + size, x:x + size], resolution))
    pixels = torch.cat(parts + crops)
    ids = [f"public/{i:05d}" for i in range(pixels.shape[0])]
    return ImageSet(ids=ids, pixels=pixels, captions=[""] * len(ids))


BUILTIN: dict[str, Callable[[int], ImageSet]] = {
    "demo:faces": faces,
    "demo:digits": digits_private,
    "demo:idcards": idcards,
    "public": public,
}


def load_builtin(name: str, resolution: int) -> ImageSet:
    """Load a built-in dataset by name (``demo:faces``, ``demo:digits``, ``demo:idcards``, ``public``)."""
    try:
        loader = BUILTIN[name]
    except KeyError:
        raise UserError(f"unknown built-in dataset {name!r}; choose one of {sorted(BUILTIN)} "
                        "or give an image folder") from None
    return loader(resolution)
