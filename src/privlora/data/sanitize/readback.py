"""The sanitizer checks its own output: whatever the OCR could read in the input must not be readable after.

Detection thresholds are tuned for precision (a squarish box counts only when read with a score of 0.7,
so fur and foliage stay untouched), and they lose what matters most on photos: an embroidered name tag
that the recogniser reads at 0.5 is still a name an attacker can read. The read-back makes the
recogniser itself the judge. Every box of the input is read (all scene variants, no score threshold);
the words it yields (:func:`words`: letters and digits only, upper case, at least ``MIN_CHARS`` long)
are the input's word list. After redaction the output is read the same way, and every output reading
holding a word of that list is a *miss*: its box is redacted and the output read again, up to
``MAX_PASSES`` times. A word the OCR reads in both input and output is text that survived, whatever its
score; texture that happens to read as the same three letters twice costs one small extra box.

Misses are reported (word only with ``--keep-text``: the report must not become the leak).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from difflib import SequenceMatcher

import numpy as np

from privlora.data.sanitize.detections import iou
from privlora.data.sanitize.text_regions import SAME_LINE, Reading

#: shortest word that counts (1–2 characters are read on texture and carry little)
MIN_CHARS = 3
#: share of matching letters (difflib ratio) from which an output word is taken for an input word
SIMILAR = 0.8
#: read the output at most this many times (each pass redacts what the previous one still read)
MAX_PASSES = 3

Rereader = Callable[[np.ndarray, list[Reading]], list[Reading]]  # output RGB, input readings → output readings
Redact = Callable[[np.ndarray, list[tuple[int, int, int, int]]], np.ndarray]  # pixels, boxes → redacted copy


@dataclass(frozen=True)
class Miss:
    """A word read in the input that the OCR could still read in the output, and the pass that caught it."""

    word: str
    box: tuple[int, int, int, int]
    pass_: int


@dataclass
class ReadBack:
    """What the read-back did to one image: misses, passes run, seconds spent, words in the input."""

    misses: list[Miss]
    passes: int
    seconds: float
    input_words: int
    clean: bool  # the last pass read no input word

    def to_json(self, keep_text: bool) -> dict:
        return {"passes": self.passes, "input_words": self.input_words, "misses": len(self.misses),
                "clean": self.clean,
                "missed": [{**({"word": m.word} if keep_text else {"chars": len(m.word)}),
                            "box": list(m.box), "pass": m.pass_} for m in self.misses]}


def normalise(text: str) -> list[str]:
    """The words of one reading: split on spaces, letters and digits kept, upper-cased, ≥ ``MIN_CHARS``."""
    tokens = ("".join(ch for ch in part if ch.isalnum()).upper() for part in text.split())
    return [t for t in tokens if len(t) >= MIN_CHARS]


def words(readings: Iterable[Reading]) -> set[str]:
    """Every word the readings hold (see :func:`normalise`)."""
    return {w for d in readings for w in normalise(d.text or "")}


def legible(word: str, expected: set[str]) -> bool:
    """Whether ``word`` (read in the output) is one of the input's words. The OCR's reading of a word it
    half-recognises wobbles by a letter when anything nearby changes ("TUENVICS" in, "TUENVICSL" out on
    the astronaut's name tag once the face was filled), and a half-redacted line reads as part of its
    word, so a word also counts when one contains the other or they agree on ``SIMILAR`` of their letters."""
    if word in expected:
        return True
    return any(word in e or e in word or SequenceMatcher(None, word, e).ratio() >= SIMILAR for e in expected)


def read_back(pixels_out: np.ndarray, input_readings: list[Reading], reread: Rereader, redact: Redact, *,
              max_passes: int = MAX_PASSES) -> tuple[np.ndarray, ReadBack]:
    """Re-read ``pixels_out`` (the redacted image) wherever ``input_readings`` (every box of the input
    with its reading) held a word, and redact every input word still legible there.

    The output is the input with boxes filled, so a word can only survive where the input had it: the
    recogniser re-reads those places (grown, so letters just past a box are read too) rather than the
    whole image. Returns the final pixels and what was found.
    """
    t = time.perf_counter()
    expected = words(input_readings)
    places = _one_per_line([r for r in input_readings if normalise(r.text)])
    reader = lambda rgb: reread(rgb, places)  # noqa: E731
    misses: list[Miss] = []
    passes, clean = 0, True
    while expected and passes < max_passes:
        passes += 1
        out_rgb = _rgb(pixels_out)
        found = [(d.box, w) for d in reader(out_rgb) for w in normalise(d.text or "") if legible(w, expected)]
        clean = not found
        if clean:
            break
        boxes = []
        for box, word in dict.fromkeys(found):
            misses.append(Miss(word, box, passes))
            if box not in boxes:
                boxes.append(box)
        pixels_out = redact(pixels_out, boxes)
    if not clean and passes == max_passes:  # the last redaction was never read back
        clean = not any(legible(w, expected) for d in reader(_rgb(pixels_out)) for w in normalise(d.text or ""))
    return pixels_out, ReadBack(misses, passes, time.perf_counter() - t, len(expected), clean)


def _one_per_line(readings: list[Reading]) -> list[Reading]:
    """The best-read reading of each line: the variants find the same line up to four times, and reading
    each of them back would cost four times as much for the same answer. On a tie the earlier one wins:
    ``RapidOcrText.readings`` lists first the box each line was actually read from."""
    kept: list[Reading] = []
    for r in sorted(readings, key=lambda r: -r.score):
        if not any(iou(r.box, k.box) >= SAME_LINE for k in kept):
            kept.append(r)
    return kept


def _rgb(pixels: np.ndarray) -> np.ndarray:
    """H×W×3 uint8 view of grey / RGB / RGBA pixels, as the detectors take them."""
    if pixels.ndim == 2:
        return np.ascontiguousarray(np.stack([pixels] * 3, axis=-1))
    return np.ascontiguousarray(pixels[:, :, :3])
