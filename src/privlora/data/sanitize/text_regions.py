"""Printed text (ID cards, name tags, screens, licence plates) found by RapidOCR's text detector.

RapidOCR ships its PP-OCRv4 ONNX models inside the PyPI package and runs offline on onnxruntime. Its
detector (DB) finds printed lines reliably, but on photos it also fires on fur, foliage and fabric
(four "text" boxes on scikit-image's cat), and its box scores do not separate the two (0.55–0.82 on
photos, from 0.70 on printed lines). Shape does: DB merges the glyphs of a line into one box, so
printed lines are wide (width ≥ 4.7 × height on every line of the benchmark cards) while every false
box on 14 text-free photos was squarish (≤ 2.6). So a box at least ``WIDE`` times wider than tall is
text; a squarer one (a short word, a single glyph, or texture) counts only when the recogniser reads
it with a score of at least ``confidence`` (default 0.7: a JPEG of the cat still read as "O" at 0.54).
Reading every box would cost 2–3× the detection time for nothing on most images.

Scene text (embroidered name tags, curved mission patches, low-contrast signs) is often missed by the
detector at the image's own scale and contrast: on scikit-image's astronaut it finds nothing, not even
the name tag. With ``scene=True`` the detector also looks at enhanced variants of the image
(:func:`variants`: CLAHE-equalised grey, its inverse, and the image upscaled 2× when it is small) and
the boxes of every variant are mapped back and pooled; each box is read from the variant it came from
(an upscaled crop reads better than the original's 8-pixel-high letters).

The text itself goes into the report only with ``--keep-text`` (then every box is read).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from privlora.data.sanitize.detections import Detection, iou, register

#: width ÷ height from which a detected box is taken as a printed line without reading it
WIDE = 3.0
#: the detector sees images with their shorter side brought up to this (RapidOCR's default is 736;
#: 512 found every benchmark line at 40 % of the cost)
DET_SIDE = 512
#: scene variants: the 2× upscaled one only for images of at most this many pixels (640×640; detection
#: time grows with the pixels, 4× for the upscale: ~1 s on a 1000×870 photo became ~10 s on 2 loaded
#: cores; larger photos have more pixels per letter already)
UPSCALE_MAX_PIXELS = 640 * 640
#: boxes overlapping this much (IoU) are one line: read once by :meth:`RapidOcrText.readings`
SAME_LINE = 0.5
#: which variant's box a line is read from (upscaled first: more pixels per letter)
READ_ORDER = ("upscaled", "plain", "clahe", "inverted")
#: the read-back re-reads a box grown by this × its height on the left and right, half of it above and
#: below (a redaction that stopped short of a line's last letters leaves them just outside the box)
REREAD_GROW = 1.0


Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Reading:
    """One detected box and what the recogniser read in it: ``box`` in the image's pixels, ``at`` in the
    pixels of the ``variant`` it was found in (the read-back re-reads the output exactly there)."""

    box: Box
    text: str
    score: float
    variant: str
    at: Box


def variants(rgb: np.ndarray, scene: bool) -> list[tuple[str, np.ndarray, float]]:
    """(name, BGR image, scale relative to ``rgb``) the detector looks at: the image itself and, with
    ``scene``, CLAHE-equalised grey (low contrast), its inverse (light on dark) and a sharpened 2× upscale
    (small letters; images of up to ``UPSCALE_MAX_PIXELS`` only)."""
    import cv2

    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    out = [("plain", bgr, 1.0)]
    if not scene:
        return out
    grey = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(8, 8)).apply(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    out += [("clahe", cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), 1.0),
            ("inverted", cv2.cvtColor(255 - grey, cv2.COLOR_GRAY2BGR), 1.0)]
    if rgb.shape[0] * rgb.shape[1] <= UPSCALE_MAX_PIXELS:
        # unsharp mask first: the astronaut's name tag in a quality-92 JPEG is found only sharpened
        sharp = cv2.addWeighted(bgr, 1.8, cv2.GaussianBlur(bgr, (0, 0), 1.5), -0.8, 0)
        out.append(("upscaled", cv2.resize(sharp, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC), 2.0))
    return out


def _grown(box: Box, width: int, height: int) -> Box:
    x0, y0, x1, y1 = box
    dx, dy = int(round((y1 - y0) * REREAD_GROW)), int(round((y1 - y0) * REREAD_GROW / 2))
    return max(0, x0 - dx), max(0, y0 - dy), min(width, x1 + dx), min(height, y1 + dy)


class RapidOcrText:
    """PP-OCRv4 text detection; squarish boxes confirmed by recognition; ``read=True`` reads every box;
    ``scene=True`` also detects on enhanced variants of the image (see :func:`variants`)."""

    kind, name = "text", "rapidocr"

    def __init__(self, confidence: float | None = None, *, read: bool = False, threads: int = 1,
                 scene: bool = False) -> None:
        self.text_score = 0.7 if confidence is None else confidence
        self.read = read
        self.threads = threads
        self.scene = scene

    @cached_property
    def _engine(self) -> Any:
        from rapidocr_onnxruntime import RapidOCR

        return RapidOCR(text_score=self.text_score, det_limit_side_len=DET_SIDE, det_limit_type="min",
                        intra_op_num_threads=self.threads, inter_op_num_threads=1, print_verbose=False)

    def _boxes(self, bgr: np.ndarray) -> list[Box]:
        quads, _ = self._engine.text_det(bgr)
        if quads is None or len(quads) == 0:
            return []
        boxes = []
        for quad in quads:
            pts = np.asarray(quad, dtype=np.float64)
            x0, y0 = np.floor(pts.min(axis=0)).astype(int)
            x1, y1 = np.ceil(pts.max(axis=0)).astype(int)
            boxes.append((int(x0), int(y0), int(x1), int(y1)))
        return boxes

    def _read(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        if not crops:
            return []
        results, _ = self._engine.text_rec(crops)
        return [(str(text), float(score)) for text, score, *_ in results]

    @staticmethod
    def _crop(bgr: np.ndarray, box: Box) -> np.ndarray:
        x0, y0, x1, y1 = box
        return bgr[max(0, y0):max(y1, y0 + 1), max(0, x0):max(x1, x0 + 1)]

    def _scan(self, rgb: np.ndarray, read_all: bool) -> list[tuple[Reading, bool]]:
        """(reading, wide) for every box of every variant; read: all boxes, or the squarish ones only."""
        found = []
        for name, bgr, scale in variants(rgb, self.scene):
            boxes = self._boxes(bgr)
            wide = [(x1 - x0) >= WIDE * max(1, y1 - y0) for x0, y0, x1, y1 in boxes]
            to_read = [i for i in range(len(boxes)) if read_all or not wide[i]]
            texts = dict(zip(to_read, self._read([self._crop(bgr, boxes[i]) for i in to_read]), strict=True))
            for i, (x0, y0, x1, y1) in enumerate(boxes):
                box = (int(x0 // scale), int(y0 // scale), int(-(-x1 // scale)), int(-(-y1 // scale)))
                text, score = texts.get(i, ("", float("nan")))
                found.append((Reading(box, text, score, name, boxes[i]), wide[i]))
        return found

    def readings(self, rgb: np.ndarray) -> list[Reading]:
        """Every box of every variant with what the recogniser reads in it, unfiltered (the read-back's
        input: a word read at a low score is still a word an attacker can read).

        The variants find most lines two to four times; each line (boxes overlapping by IoU ≥
        ``SAME_LINE``) is read once, from the variant first in ``READ_ORDER``, and its other boxes share
        that reading: recognition of every box was half the cost of a read-back on ID cards."""
        found: list[tuple[str, np.ndarray, float, Box, Box]] = []  # variant, its image, scale, at, box
        for name, bgr, scale in variants(rgb, self.scene):
            for at in self._boxes(bgr):
                x0, y0, x1, y1 = at
                found.append((name, bgr, scale, at, (int(x0 // scale), int(y0 // scale),
                                                     int(-(-x1 // scale)), int(-(-y1 // scale)))))
        lines: list[list[int]] = []
        for i in sorted(range(len(found)), key=lambda i: READ_ORDER.index(found[i][0])):
            for line in lines:
                if iou(found[i][4], found[line[0]][4]) >= SAME_LINE:
                    line.append(i)
                    break
            else:
                lines.append([i])
        texts = self._read([self._crop(found[line[0]][1], found[line[0]][3]) for line in lines])
        # the box each line was read from first (readback re-reads one box per line: that one)
        read, rest = [], []
        for line, (text, score) in zip(lines, texts, strict=True):
            for k, i in enumerate(line):
                (rest if k else read).append(Reading(found[i][4], text, score, found[i][0], found[i][3]))
        return read + rest

    def reread(self, rgb: np.ndarray, readings: list[Reading]) -> list[Reading]:
        """Recognition alone on ``rgb`` where each of ``readings`` was: the same variant and crop (same
        pixels read the same), and that box grown by ``REREAD_GROW`` (letters just past a redaction).
        What the read-back reads in the output; a few crops cost milliseconds, not a detection pass."""
        h, w = rgb.shape[:2]
        images = {name: (bgr, scale) for name, bgr, scale in variants(rgb, self.scene)}
        crops, where = [], []
        for r in readings:
            if r.variant not in images:
                continue
            bgr, scale = images[r.variant]
            grown = _grown(r.at, bgr.shape[1], bgr.shape[0])
            for at in (r.at, grown):
                crops.append(self._crop(bgr, at))
                where.append((r.variant, at, tuple(int(v // scale) for v in at)))
        return [Reading(_clip(box, w, h), text, score, variant, at)  # type: ignore[arg-type]
                for (variant, at, box), (text, score) in zip(where, self._read(crops), strict=True)]

    def confirmed(self, readings: list[Reading]) -> list[Detection]:
        """The boxes of :meth:`readings` that :meth:`detect` keeps (wide, or read at ``confidence``)."""
        found = []
        for r in readings:
            x0, y0, x1, y1 = r.at
            if (x1 - x0) < WIDE * max(1, y1 - y0) and not (r.score >= self.text_score and r.text.strip()):
                continue
            found.append(Detection(r.box, "rapidocr", "text", r.score, r.text if self.read else None))
        return found

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        found = []
        for r, wide in self._scan(rgb, self.read):
            if not wide and not (r.score >= self.text_score and r.text.strip()):
                continue
            score = None if r.score != r.score else r.score  # NaN: a wide box nobody read
            found.append(Detection(r.box, "rapidocr", "text", score, r.text if self.read else None))
        return found


def _clip(box: Box, width: int, height: int) -> Box:
    x0, y0, x1, y1 = box
    return max(0, min(x0, width)), max(0, min(y0, height)), max(0, min(x1, width)), max(0, min(y1, height))


register("text", "rapidocr")(RapidOcrText)
