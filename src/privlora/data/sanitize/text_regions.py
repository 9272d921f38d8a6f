"""Printed text (ID cards, name tags, screens, licence plates) found by RapidOCR's text detector.

The detector alone (DB, PP-OCRv4) also fires on fur, foliage and fabric: on scikit-image's cat it drew
four "text" boxes. So every box is verified by the recogniser, and only boxes it reads with a score of at
least ``confidence`` (default 0.5) count; on the same photos that leaves none, while printed lines on
ID cards read at 0.96-1.0 (benchmarks/sanitize_quality.py). The text it reads goes into the report only
with ``--keep-text``. RapidOCR ships its ONNX models inside the PyPI package and runs offline.
"""

from __future__ import annotations

import os
from functools import cached_property
from typing import Any

import numpy as np

from privlora.data.sanitize.detections import Detection, register


class RapidOcrText:
    """PP-OCRv4 text detection verified by recognition; ``read=True`` keeps what the boxes said."""

    kind, name = "text", "rapidocr"

    def __init__(self, confidence: float | None = None, *, read: bool = False) -> None:
        self.text_score = 0.7 if confidence is None else confidence
        self.read = read

    @cached_property
    def _engine(self) -> Any:
        from rapidocr_onnxruntime import RapidOCR

        threads = max(1, os.cpu_count() or 1)
        return RapidOCR(text_score=self.text_score, intra_op_num_threads=threads, inter_op_num_threads=1,
                        print_verbose=False)

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        result, _ = self._engine(bgr, use_det=True, use_cls=False, use_rec=True)
        found = []
        for quad, text, score in result or []:
            pts = np.asarray(quad, dtype=np.float64)
            x0, y0 = np.floor(pts.min(axis=0)).astype(int)
            x1, y1 = np.ceil(pts.max(axis=0)).astype(int)
            found.append(Detection((int(x0), int(y0), int(x1), int(y1)), "rapidocr", "text", float(score),
                                   str(text) if self.read else None))
        return found


register("text", "rapidocr")(RapidOcrText)
