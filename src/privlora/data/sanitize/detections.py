"""Boxes found in an image, and the registry that detectors of every kind (faces, printed text) join.

A detector is a small class with ``kind``, ``name`` and ``detect(rgb) -> list[Detection]``; adding one
is adding one class with :func:`register`, the pipeline never names them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from privlora.errors import UserError


@dataclass(frozen=True)
class Detection:
    """An axis-aligned box ``(x0, y0, x1, y1)`` in pixels (x1, y1 exclusive), with who found it."""

    box: tuple[int, int, int, int]
    detector: str
    label: str
    score: float | None = None
    text: str | None = None  # recognised text, only kept when the user asks for it

    def clipped(self, width: int, height: int) -> Detection:
        x0, y0, x1, y1 = self.box
        box = (max(0, min(x0, width)), max(0, min(y0, height)), max(0, min(x1, width)), max(0, min(y1, height)))
        return Detection(box, self.detector, self.label, self.score, self.text)

    @property
    def area(self) -> int:
        x0, y0, x1, y1 = self.box
        return max(0, x1 - x0) * max(0, y1 - y0)


class Detector(Protocol):
    kind: str  # "face" | "text"
    name: str

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Boxes in an ``H×W×3`` uint8 RGB image."""


Factory = Callable[[float | None], Detector]  # confidence → detector

#: kind → name → factory building the detector (models load on first use, not here)
DETECTORS: dict[str, dict[str, Factory]] = {}


def register(kind: str, name: str) -> Callable[[Factory], Factory]:
    def add(factory: Factory) -> Factory:
        DETECTORS.setdefault(kind, {})[name] = factory
        return factory

    return add


def build(kind: str, names: Sequence[str], confidence: float | None = None) -> list[Detector]:
    """Detectors of one kind by name; an unknown name is the user's to fix."""
    known = DETECTORS.get(kind, {})
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"unknown {kind} detector {', '.join(map(repr, unknown))}; "
                        f"choose from {', '.join(sorted(known))}")
    return [known[n](confidence) for n in names]


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def merge(detections: Sequence[Detection], threshold: float = 0.3) -> list[list[Detection]]:
    """Group detections of the same object (IoU ≥ ``threshold`` to any member): one group per face.

    Redaction covers every box of every detector (the union); the report counts groups, so two
    detectors agreeing on one face are one face, not two.
    """
    groups: list[list[Detection]] = []
    for det in sorted(detections, key=lambda d: -d.area):
        for group in groups:
            if any(iou(det.box, other.box) >= threshold for other in group):
                group.append(det)
                break
        else:
            groups.append([det])
    return groups
