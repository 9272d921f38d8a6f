"""Image folders with captions, in the layouts diffusers' and kohya's LoRA scripts read, decoded to tensors.

Captions come from ``metadata.jsonl`` / ``metadata.csv`` (``file_name`` plus a caption column) or from a
``.caption`` / ``.txt`` sidecar beside each image (``privlora.data.sources`` finds them; it also reads
Hugging Face datasets, which :func:`load_listing` decodes the same way). Grayscale, palette, RGBA
(composited on white) and 16-bit images are converted; corrupt, truncated, non-image and
decompression-bomb files are skipped with a warning and counted, never fatal unless nothing usable is left.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from privlora.data.formats import IMAGE_SUFFIXES, to_8bit
from privlora.data.imageset import ImageSet
from privlora.data.sources import NOT_IMAGES, Columns, Listing, metadata_captions, read_image_folder, read_text
from privlora.errors import UserError

METADATA = "metadata.jsonl"
#: files privlora itself writes into a data folder, never images, never worth a warning
SIDECARS = NOT_IMAGES


@dataclass
class FolderReport:
    """What loading a folder found: how many images were used and which files were skipped, why."""

    loaded: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    uncaptioned: list[str] = field(default_factory=list)


def _read_text(path: Path) -> str:
    """A caption file's text (UTF-8, a byte-order mark allowed); anything else is the user's to fix."""
    return read_text(path)


def _read_metadata(folder: Path) -> dict[str, str]:
    """Captions from every ``metadata.jsonl`` / ``metadata.csv`` under ``folder`` (sources.metadata_captions)."""
    return metadata_captions(folder)


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode → 'L' (1 channel) or 'RGB' (3 channels), 16-bit scaled down, alpha on white."""
    img = to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def _open(path: Path | bytes, channels: int) -> Image.Image:
    """Decode safely (bomb and truncation checks first), orientation applied, in the wanted mode. ``path``
    may be encoded bytes (a Hugging Face ``Image`` cell)."""
    def stream() -> Path | io.BytesIO:
        return io.BytesIO(path) if isinstance(path, bytes) else path

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(stream()) as probe:
            probe.verify()  # catches truncated/corrupt files before decoding
        with Image.open(stream()) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_mode(img, channels)


def _to_tensor(img: Image.Image, channels: int) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(arr)
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1).contiguous()


def load_resized(path: Path | bytes, *, channels: int, resolution: int) -> torch.Tensor:
    """One image with its shorter side resized to ``resolution`` (diffusers' ``Resize``), ``[C, H, W]`` in
    ``[-1, 1]``: what training's random crop cuts a square from."""
    img = _open(path, channels)
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    return _to_tensor(img.resize(size, Image.Resampling.BICUBIC), channels)


def center_square(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """The centre ``resolution``² crop of ``[C, H, W]`` (torchvision's CenterCrop offsets)."""
    top = int(round((image.shape[1] - resolution) / 2.0))
    left = int(round((image.shape[2] - resolution) / 2.0))
    return image[:, top:top + resolution, left:left + resolution].contiguous()


def load_image(path: Path | bytes, *, channels: int, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """One image → ``[C, R, R]`` float in ``[-1, 1]``. Raises ``OSError``/``ValueError`` if unreadable.
    ``center_crop=False`` stretches the whole image to the square."""
    img = _open(path, channels)
    if center_crop:
        img = ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.BICUBIC)
    else:
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return _to_tensor(img, channels)


def load_folder(folder: Path, *, channels: int, resolution: int, center_crop: bool = True,
                default_caption: str | None = None, caption_column: str | None = None) -> tuple[ImageSet, FolderReport]:
    """Load every image under ``folder`` (recursively) with its caption.

    ``center_crop=False`` (diffusers' random crop): each image is kept with its shorter side at
    ``resolution`` in ``ImageSet.uncropped`` for training to crop at random; ``pixels`` are centre crops."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of images")
    listing = read_image_folder(str(folder), Columns(caption=caption_column), "image")
    return load_listing(listing, str(folder), channels=channels, resolution=resolution, center_crop=center_crop,
                        default_caption=default_caption)


def load_listing(listing: Listing, source: str, *, channels: int, resolution: int, center_crop: bool = True,
                 default_caption: str | None = None) -> tuple[ImageSet, FolderReport]:
    """Decode a source's image records (privlora.data.sources) into an ImageSet, skipping what will not
    decode; kohya repeat counts travel in ``ImageSet.repeats`` (one entry per source image)."""
    report = FolderReport()
    ids, tensors, captions, repeats = [], [], [], []
    uncropped: list[torch.Tensor] = []
    for record in listing.records:
        item = record.item
        assert not isinstance(item, str), "image records hold a path or bytes"
        try:
            if center_crop:
                tensors.append(load_image(item, channels=channels, resolution=resolution))
            else:
                uncropped.append(load_resized(item, channels=channels, resolution=resolution))
                tensors.append(center_square(uncropped[-1], resolution))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as e:
            report.skipped[record.id] = f"{type(e).__name__}: {e}"
            continue
        caption = record.target if record.target is not None else default_caption
        if caption is None:
            report.uncaptioned.append(record.id)
        ids.append(record.id)
        captions.append(caption if caption is not None else "")
        repeats.append(record.repeats)
    report.skipped.update(listing.skipped)  # after the decode failures, as they say more
    if not tensors:  # one error line that says why, instead of a warning per file before it
        example = next(iter(report.skipped.items()), None)
        why = f", e.g. {example[0]}: {example[1]}" if example else ""
        raise UserError(f"no usable images in {source} ({len(report.skipped)} files skipped{why}); "
                        f"expected {', '.join(sorted(IMAGE_SUFFIXES))}")
    for rel, why in report.skipped.items():
        warnings.warn(f"skipped {rel}: {why}", stacklevel=2)
    report.loaded = len(tensors)
    return ImageSet(ids=ids, pixels=torch.stack(tensors), captions=captions,
                    uncropped=None if center_crop else uncropped,
                    repeats=repeats if any(r != 1 for r in repeats) else None), report
