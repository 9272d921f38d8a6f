"""Image folders with captions, in the layouts diffusers' and kohya's LoRA scripts read.

Captions come from ``metadata.jsonl`` (lines ``{"file_name": ..., "text": ...}``) or from a ``.txt``
sidecar beside each image. Grayscale, palette, RGBA (composited on white) and 16-bit images are
converted; corrupt, truncated, non-image and decompression-bomb files are skipped with a warning and
counted, never fatal unless nothing usable is left.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageOps

from privlora.data.formats import IMAGE_SUFFIXES, to_8bit
from privlora.data.imageset import ImageSet
from privlora.errors import UserError

METADATA = "metadata.jsonl"
#: files privlora itself writes into a data folder, never images, never worth a warning
SIDECARS = {METADATA, "canary.json", "sanitize_report.json", "privacy.json", "synthesize.json"}


@dataclass
class FolderReport:
    """What loading a folder found: how many images were used and which files were skipped, why."""

    loaded: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    uncaptioned: list[str] = field(default_factory=list)


def _read_text(path: Path) -> str:
    """A caption file's text (UTF-8, a byte-order mark allowed); anything else is the user's to fix."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        "re-save it as UTF-8") from None


def _read_metadata(folder: Path) -> dict[str, str]:
    """Captions from every ``metadata.jsonl`` under ``folder``, keyed by image path relative to ``folder``.

    As in Hugging Face's imagefolder layout, a ``metadata.jsonl`` names files relative to its own
    directory (``train/metadata.jsonl`` captions ``train/…``); ``./a.png`` and ``a.png`` are the same file.
    """
    captions: dict[str, str] = {}
    for path in sorted(folder.rglob(METADATA)):
        base = PurePosixPath(path.parent.relative_to(folder).as_posix())
        for number, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = str(row["file_name"]).replace("\\", "/")
                captions[(base / PurePosixPath(name)).as_posix()] = str(row.get("text", ""))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{number} is not a JSON object with 'file_name' and 'text'") from None
    return captions


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode → 'L' (1 channel) or 'RGB' (3 channels), 16-bit scaled down, alpha on white."""
    img = to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def _open(path: Path, channels: int) -> Image.Image:
    """Decode safely (bomb and truncation checks first), orientation applied, in the wanted mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as probe:
            probe.verify()  # catches truncated/corrupt files before decoding
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_mode(img, channels)


def _to_tensor(img: Image.Image, channels: int) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(arr)
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1).contiguous()


def load_resized(path: Path, *, channels: int, resolution: int) -> torch.Tensor:
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


def load_image(path: Path, *, channels: int, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """One image → ``[C, R, R]`` float in ``[-1, 1]``. Raises ``OSError``/``ValueError`` if unreadable.
    ``center_crop=False`` stretches the whole image to the square."""
    img = _open(path, channels)
    if center_crop:
        img = ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.BICUBIC)
    else:
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return _to_tensor(img, channels)


def load_folder(folder: Path, *, channels: int, resolution: int, center_crop: bool = True,
                default_caption: str | None = None) -> tuple[ImageSet, FolderReport]:
    """Load every image under ``folder`` (recursively) with its caption.

    ``center_crop=False`` (diffusers' random crop): each image is kept with its shorter side at
    ``resolution`` in ``ImageSet.uncropped`` for training to crop at random; ``pixels`` are centre crops."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of images")
    meta = _read_metadata(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES)
    report = FolderReport()
    ids, tensors, captions = [], [], []
    uncropped: list[torch.Tensor] = []
    for path in files:
        rel = path.relative_to(folder).as_posix()
        try:
            if center_crop:
                tensors.append(load_image(path, channels=channels, resolution=resolution))
            else:
                uncropped.append(load_resized(path, channels=channels, resolution=resolution))
                tensors.append(center_square(uncropped[-1], resolution))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as e:
            report.skipped[rel] = f"{type(e).__name__}: {e}"
            continue
        sidecar = path.with_suffix(".txt")
        caption = meta.get(rel) if rel in meta else (
            _read_text(sidecar).strip() if sidecar.exists() else default_caption)
        if caption is None:
            report.uncaptioned.append(rel)
        ids.append(rel)
        captions.append(caption if caption is not None else "")
    others = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES
              and p.suffix.lower() != ".txt" and p.name not in SIDECARS and not p.name.startswith(".")]
    for p in others:
        report.skipped[p.relative_to(folder).as_posix()] = "not an image file"
    if not tensors:  # one error line that says why, instead of a warning per file before it
        example = next(iter(report.skipped.items()), None)
        why = f", e.g. {example[0]}: {example[1]}" if example else ""
        raise UserError(f"no usable images in {folder} ({len(report.skipped)} files skipped{why}); "
                        f"expected {', '.join(sorted(IMAGE_SUFFIXES))}")
    for rel, why in report.skipped.items():
        warnings.warn(f"skipped {rel}: {why}", stacklevel=2)
    report.loaded = len(tensors)
    return ImageSet(ids=ids, pixels=torch.stack(tensors), captions=captions,
                    uncropped=None if center_crop else uncropped), report
