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

The text itself goes into the report only with ``--keep-text`` (then every box is read).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np

from privlora.data.sanitize.detections import Detection, register

#: width ÷ height from which a detected box is taken as a printed line without reading it
WIDE = 3.0
#: the detector sees images with their shorter side brought up to this (RapidOCR's default is 736;
#: 512 found every benchmark line at 40 % of the cost)
DET_SIDE = 512


class RapidOcrText:
    """PP-OCRv4 text detection; squarish boxes confirmed by recognition; ``read=True`` reads every box."""

    kind, name = "text", "rapidocr"

    def __init__(self, confidence: float | None = None, *, read: bool = False, threads: int = 1) -> None:
        self.text_score = 0.7 if confidence is None else confidence
        self.read = read
        self.threads = threads

    @cached_property
    def _engine(self) -> Any:
        from rapidocr_onnxruntime import RapidOCR

        return RapidOCR(text_score=self.text_score, det_limit_side_len=DET_SIDE, det_limit_type="min",
                        intra_op_num_threads=self.threads, inter_op_num_threads=1, print_verbose=False)

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        quads, _ = self._engine.text_det(bgr)
        if quads is None or len(quads) == 0:
            return []
        boxes = []
        for quad in quads:
            pts = np.asarray(quad, dtype=np.float64)
            x0, y0 = np.floor(pts.min(axis=0)).astype(int)
            x1, y1 = np.ceil(pts.max(axis=0)).astype(int)
            boxes.append((int(x0), int(y0), int(x1), int(y1)))
        wide = [(x1 - x0) >= WIDE * max(1, y1 - y0) for x0, y0, x1, y1 in boxes]
        to_read = [i for i in range(len(boxes)) if self.read or not wide[i]]
        readings: dict[int, tuple[str, float]] = {}
        if to_read:
            crops = [bgr[max(0, boxes[i][1]):boxes[i][3], max(0, boxes[i][0]):boxes[i][2]] for i in to_read]
            results, _ = self._engine.text_rec(crops)
            readings = {i: (str(text), float(score)) for i, (text, score, *_) in zip(to_read, results, strict=True)}
        found = []
        for i, box in enumerate(boxes):
            text, score = readings.get(i, (None, None))
            if not wide[i] and (score is None or score < self.text_score or not (text or "").strip()):
                continue
            found.append(Detection(box, "rapidocr", "text", score, text if self.read else None))
        return found


register("text", "rapidocr")(RapidOcrText)
