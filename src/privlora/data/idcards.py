"""``demo:idcards``: thousands of synthetic ID cards, each one person's secrets, built offline.

The membership audit only has statistical power with thousands of private samples (≥ 2,000 members,
≥ 2,000 evaluation and ≥ 1,000 auxiliary non-members) drawn from *one* distribution, so members and
non-members are exchangeable and any score gap is the adapter's doing. The scikit demo sets are far too
small, so this module renders them: the "ID card on a desk" case, where the card's name and number are
what must not leak.

Every card comes from the same generator: a Faker name (unique by construction) and a unique ID number,
a procedurally drawn portrait whose head, hair, eyes, mouth and grey levels come from that person's own
RNG, a barcode derived from the number, and random desk grey, card tone, tilt and offset. Cards are drawn
with PIL on a 96×96 canvas and resized with :func:`privlora.data.demo._to_tensor`; at 32 px the text
becomes texture, but the portrait, barcode and layout jitter keep every card distinct. The caption holds
no secret; :func:`idcard_secrets` gives the name and number per id for later leak checks.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from privlora.data.imageset import ImageSet

CANVAS = 96  # working size: big enough for legible text and a portrait before the resize
CARD = (90, 60)  # card width × height on the canvas
CAPTION = "an ID card"
_NUMBER_RANGE = (10_000_000, 100_000_000)  # 8-digit ID numbers
_NAME_CHUNK = 256


def _ids(n: int) -> list[str]:
    return [f"idcards/{i:05d}" for i in range(n)]


@lru_cache(maxsize=8)
def _people(n: int, seed: int) -> tuple[tuple[str, str], ...]:
    """``n`` (name, number) pairs: names unique (repeats skipped), numbers unique (repeats redrawn).

    Names are Faker's weighted en_US first × last names, drawn in fixed chunks (one ``random_elements``
    call each: per-name ``first_name()`` calls took over a second for 5,000). Fixed chunks make the set
    prefix-stable: the first ``k`` people are the same for any ``n ≥ k``. First + last only, no titles
    or suffixes: they crowd the card.
    """
    from faker import Faker
    from faker.providers.person.en_US import Provider as Person

    fake = Faker("en_US")
    fake.seed_instance(seed)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        firsts = fake.random_elements(Person.first_names, length=_NAME_CHUNK, use_weighting=True)
        lasts = fake.random_elements(Person.last_names, length=_NAME_CHUNK, use_weighting=True)
        for first, last in zip(firsts, lasts, strict=True):
            name = f"{first} {last}"
            if name not in seen and len(names) < n:
                seen.add(name)
                names.append(name)
    lo, hi = _NUMBER_RANGE
    rng = np.random.default_rng([seed, 1])  # one draw per person, so numbers are prefix-stable too
    numbers: list[str] = []
    used: set[int] = set()
    while len(numbers) < n:
        value = int(rng.integers(lo, hi))
        if value not in used:
            used.add(value)
            numbers.append(str(value))
    return tuple(zip(names, numbers, strict=True))


def idcard_secrets(n: int = 5000, seed: int = 0) -> dict[str, dict[str, str]]:
    """``{id: {"name": …, "number": …}}``: what each card shows, for checking outputs for leaks."""
    return {sample_id: {"name": name, "number": number}
            for sample_id, (name, number) in zip(_ids(n), _people(n, seed), strict=True)}


def _grey(rng: np.random.Generator, lo: float, hi: float) -> int:
    return int(rng.uniform(lo, hi) * 255)


def _portrait(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: tuple[int, int, int, int]) -> None:
    """A face from this person's RNG: backdrop, shoulders, head, hair style, eyes, brows, mouth."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    draw.rectangle(box, fill=_grey(rng, 0.45, 0.85))
    cx = x0 + w / 2 + rng.uniform(-2, 2)
    # shoulders
    sw = w * rng.uniform(0.7, 1.0)
    draw.ellipse((cx - sw / 2, y1 - h * rng.uniform(0.22, 0.35), cx + sw / 2, y1 + h * 0.3),
                 fill=_grey(rng, 0.05, 0.6))
    # head
    hw, hh = w * rng.uniform(0.42, 0.62), h * rng.uniform(0.45, 0.62)
    hy = y0 + h * rng.uniform(0.12, 0.22)
    skin = _grey(rng, 0.35, 0.95)
    hair = _grey(rng, 0.0, 0.7)
    style = int(rng.integers(0, 4))  # 0 bald, 1 short cap, 2 long (sides), 3 tall
    if style == 2:
        draw.rectangle((cx - hw / 2 - 1.5, hy + hh * 0.2, cx + hw / 2 + 1.5, hy + hh * rng.uniform(0.8, 1.2)),
                       fill=hair)
    draw.ellipse((cx - hw / 2, hy, cx + hw / 2, hy + hh), fill=skin)
    if style in (1, 2):
        draw.chord((cx - hw / 2 - 1, hy - 1, cx + hw / 2 + 1, hy + hh * rng.uniform(0.5, 0.8)), 180, 360,
                   fill=hair)
    elif style == 3:
        draw.ellipse((cx - hw * 0.45, hy - hh * rng.uniform(0.15, 0.35), cx + hw * 0.45, hy + hh * 0.3),
                     fill=hair)
    # eyes, brows, mouth
    ey = hy + hh * rng.uniform(0.42, 0.55)
    gap = hw * rng.uniform(0.16, 0.28)
    er = rng.uniform(0.8, 1.8)
    eye = _grey(rng, 0.0, 0.3)
    for side in (-1, 1):
        ex = cx + side * gap
        draw.ellipse((ex - er, ey - er * rng.uniform(0.6, 1.0), ex + er, ey + er * rng.uniform(0.6, 1.0)),
                     fill=eye)
        if rng.random() < 0.6:
            draw.line((ex - er - 0.5, ey - 2.5, ex + er + 0.5, ey - 2.5 - side * rng.uniform(-0.8, 0.8)),
                      fill=hair, width=1)
    my = hy + hh * rng.uniform(0.72, 0.84)
    mw = hw * rng.uniform(0.15, 0.35)
    if rng.random() < 0.5:
        draw.line((cx - mw, my, cx + mw, my), fill=_grey(rng, 0.0, 0.35), width=1)
    else:
        draw.arc((cx - mw, my - 2, cx + mw, my + 2), 0, 180, fill=_grey(rng, 0.0, 0.35), width=1)


def _barcode(draw: ImageDraw.ImageDraw, number: str, box: tuple[int, int, int, int], ink: int) -> None:
    """Stripes whose widths and gaps spell the number's digits (with a check digit), like a real code."""
    x0, y0, x1, y1 = box
    digits = [int(c) for c in number]
    digits.append(sum(digits) % 10)
    x = x0
    for d in digits:
        bar, gap = 1 + d % 3, 1 + d // 4
        if x + bar > x1:
            break
        draw.rectangle((x, y0, x + bar - 1, y1), fill=ink)
        x += bar + gap


class _Text:
    """Text stamped from cached masks: FreeType rendering was most of the build time, yet names repeat
    (Faker draws from ~1,000 first and last names) and numbers are ten glyphs."""

    def __init__(self, size: int = 9) -> None:
        self.font = ImageFont.load_default(size=size)
        self._masks: dict[str, tuple[Image.Image, int]] = {}

    def _mask(self, text: str) -> tuple[Image.Image, int]:
        if text not in self._masks:
            width = max(1, int(np.ceil(self.font.getlength(text))))
            mask = Image.new("L", (width, self.font.size + 4), 0)
            ImageDraw.Draw(mask).text((0, 0), text, fill=255, font=self.font)
            self._masks[text] = (mask, int(round(self.font.getlength(text))))
        return self._masks[text]

    def word(self, draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, ink: int) -> None:
        draw.bitmap(xy, self._mask(text)[0], fill=ink)

    def glyphs(self, draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, ink: int) -> None:
        """Character by character, for strings that never repeat (the ID numbers)."""
        x, y = xy
        for char in text:
            mask, advance = self._mask(char)
            draw.bitmap((x, y), mask, fill=ink)
            x += advance


def _card(name: str, number: str, rng: np.random.Generator, text: _Text) -> np.ndarray:
    """One card on the desk as a ``[CANVAS, CANVAS]`` float array in [0, 1]."""
    cw, ch = CARD
    tone = _grey(rng, 0.72, 0.97)
    card = Image.new("L", (cw, ch), tone)
    draw = ImageDraw.Draw(card)
    ink = _grey(rng, 0.0, 0.25)
    draw.rectangle((0, 0, cw - 1, 9), fill=_grey(rng, 0.3, 0.6))  # issuer band
    text.word(draw, (3, 0), "IDENTITY CARD", tone)
    face = Image.new("L", (26, 34))  # drawn apart so shoulders and hair stay inside the photo
    _portrait(ImageDraw.Draw(face), rng, (0, 0, face.width - 1, face.height - 1))
    card.paste(face, (3, 12))
    first, _, last = name.partition(" ")
    text.word(draw, (32, 12), last.upper(), ink)
    text.word(draw, (32, 21), first, ink)
    text.word(draw, (32, 32), "No", ink)
    text.glyphs(draw, (46, 32), number, ink)
    _barcode(draw, number, (32, 46, cw - 4, ch - 4), ink)
    desk_grey = _grey(rng, 0.05, 0.5)
    # the desk is one grey, so rotating with it as the fill blends the card's edges without a mask
    card = card.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BILINEAR, expand=True,
                       fillcolor=desk_grey)
    desk = Image.new("L", (CANVAS, CANVAS), desk_grey)
    desk.paste(card, (int(rng.integers(-4, 5)) + (CANVAS - card.width) // 2,
                      int(rng.integers(-4, 5)) + (CANVAS - card.height) // 2))
    return np.asarray(desk, dtype=np.float32) / 255.0


@lru_cache(maxsize=4)
def _pixels(resolution: int, n: int, seed: int) -> torch.Tensor:
    """Rendered cards, cached per (resolution, n, seed): the audit and the training loop load the set
    several times in one process, and rendering 5,000 cards takes seconds."""
    from privlora.data.demo import _to_tensor  # demo imports this module for its registry

    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    text, people, chunk = _Text(), _people(n, seed), 500  # chunks keep the 96-px canvases ~18 MB
    parts = []
    for start in range(0, n, chunk):
        # each person's own stream: card i looks the same whatever n is
        canvases = np.stack([_card(name, number, np.random.default_rng([seed, 2, i]), text)
                             for i, (name, number) in enumerate(people[start:start + chunk], start)])
        parts.append(_to_tensor(canvases, resolution))
    return torch.cat(parts)


def idcards(resolution: int, n: int = 5000, seed: int = 0) -> ImageSet:
    """``n`` synthetic ID cards at ``resolution`` (ids ``idcards/00000``…, caption "an ID card")."""
    ids = _ids(n)
    # the cached tensor is shared: a clone keeps one caller's in-place edit out of the next caller's set
    return ImageSet(ids=ids, pixels=_pixels(resolution, n, seed).clone(), captions=[CAPTION] * n)
