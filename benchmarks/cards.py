"""Labelled images for the sanitize benchmarks, built only from what ships offline.

* :func:`face_grids` — 512×512 sheets of 4×4 cells, each holding an upscaled scikit-image ``lfw_subset``
  crop: a face (true box = the cell's crop) or a non-face (any detection there is a false positive).
* :func:`id_cards` — 512×512 ID-card-like images: a portrait (an LFW face) and printed lines of Faker
  personal data in varied fonts, sizes and colours, with each line's true box (the extent of its ink)
  and the entity it shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 512
CELL = 128


@dataclass
class Labelled:
    """An RGB image and its true boxes ``(x0, y0, x1, y1)`` with labels (and text for printed lines)."""

    image: np.ndarray
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


def _lfw() -> tuple[np.ndarray, np.ndarray]:
    from skimage import data

    crops = data.lfw_subset()  # 100 faces, then 100 non-faces, 25×25 in [0, 1]
    return crops[:100], crops[100:]


def _upscaled(crop: np.ndarray, side: int) -> np.ndarray:
    img = Image.fromarray((crop * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
    return np.stack([np.asarray(img)] * 3, axis=-1)


def face_grids(seed: int = 0) -> list[Labelled]:
    """All 100 LFW faces and 100 non-faces shuffled over 13 sheets of 16 cells (sizes 72–112 px)."""
    rng = np.random.default_rng(seed)
    faces, non_faces = _lfw()
    items = [("face", c) for c in faces] + [("non-face", c) for c in non_faces]
    order = rng.permutation(len(items))
    sheets = []
    for start in range(0, len(items), 16):
        canvas = np.full((SIZE, SIZE, 3), 128, np.uint8)
        sheet = Labelled(canvas)
        for slot, index in enumerate(order[start:start + 16]):
            label, crop = items[index]
            side = int(rng.integers(72, 113))
            x = (slot % 4) * CELL + int(rng.integers(0, CELL - side + 1))
            y = (slot // 4) * CELL + int(rng.integers(0, CELL - side + 1))
            canvas[y:y + side, x:x + side] = _upscaled(crop, side)
            sheet.boxes.append((x, y, x + side, y + side))
            sheet.labels.append(label)
        sheets.append(sheet)
    return sheets


def _card_lines(fake) -> list[tuple[str, str]]:
    return [("PERSON", fake.name().upper()),
            ("DATE", f"DOB {fake.date_of_birth(minimum_age=18, maximum_age=90).isoformat()}"),
            ("ID", f"ID {fake.bothify('??########').upper()}"),
            ("ADDRESS", fake.street_address().replace("\n", ", ")),
            ("PHONE", fake.phone_number()),
            ("EMAIL", fake.email())]


def id_cards(n: int = 40, seed: int = 0, *, hard: bool = False) -> list[Labelled]:
    """``n`` ID-card-like images with a portrait and 4–6 printed lines of personal data.

    ``hard``: half the cards light ink on a dark background, smaller type (12–34 px), and each line
    tilted by up to ±6° (true boxes are the extents of the tilted ink).
    """
    from faker import Faker

    fake = Faker(["en_US", "en_GB"])
    fake.seed_instance(seed)
    rng = np.random.default_rng(seed)
    faces, _ = _lfw()
    cards = []
    for i in range(n):
        dark = hard and i % 2 == 1
        bg = tuple(int(v) for v in (rng.integers(20, 70, 3) if dark else rng.integers(200, 256, 3)))
        img = Image.new("RGB", (SIZE, SIZE), bg)
        noise = rng.normal(0, 6, (SIZE, SIZE, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=float) + noise, 0, 255).astype(np.uint8))
        portrait = _upscaled(faces[i % len(faces)], 120)
        img.paste(Image.fromarray(portrait), (SIZE - 150, 30))
        card = Labelled(np.zeros(0))
        lines = _card_lines(fake)
        keep = sorted(rng.choice(len(lines), size=int(rng.integers(4, len(lines) + 1)), replace=False))
        y = 40
        for k in keep:
            label, text = lines[k]
            size = int(rng.integers(12, 35) if hard else rng.integers(16, 34))
            font = ImageFont.load_default(size=size)
            colour = tuple(int(v) for v in (rng.integers(190, 256, 3) if dark else rng.integers(0, 90, 3)))
            x = int(rng.integers(20, 60))
            ink = Image.new("L", (SIZE, SIZE), 0)
            ImageDraw.Draw(ink).text((x, y), text, font=font, fill=255)
            if hard:
                ink = ink.rotate(float(rng.uniform(-6, 6)), resample=Image.Resampling.BICUBIC, center=(x, y + size / 2))
            mask = np.asarray(ink) > 64
            if mask.any():
                ys, xs = np.nonzero(mask)
                if hard:
                    img.paste(Image.new("RGB", (SIZE, SIZE), colour), (0, 0), ink)
                else:
                    ImageDraw.Draw(img).text((x, y), text, font=font, fill=colour)
                card.boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
                card.labels.append(label)
                card.texts.append(text)
            y += size + int(rng.integers(18, 40))
        card.image = np.asarray(img)
        cards.append(card)
    return cards


def covered(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]]) -> float:
    """Fraction of ``box``'s pixels inside the union of ``boxes``."""
    x0, y0, x1, y1 = box
    mask = np.zeros((max(0, y1 - y0), max(0, x1 - x0)), bool)
    for a0, b0, a1, b1 in boxes:
        mask[max(0, b0 - y0):max(0, b1 - y0), max(0, a0 - x0):max(0, a1 - x0)] = True
    return float(mask.mean()) if mask.size else 0.0
