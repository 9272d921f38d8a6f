"""One image through the pipeline: open safely, detect faces and printed text, redact, re-encode bare."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from privlora.data.sanitize import faces as _faces  # noqa: F401  (registers the face detectors)
from privlora.data.sanitize import text_regions as _text  # noqa: F401  (registers the text detector)
from privlora.data.sanitize.dedup import Signature, signature
from privlora.data.sanitize.detections import Detection, Detector, build, merge
from privlora.data.sanitize.metadata import bare_pixels, encode, findings
from privlora.data.sanitize.readback import read_back
from privlora.data.sanitize.redact import get_redactor, padded, redact
from privlora.data.sanitize.report import FileReport, Finding, SkipFile
from privlora.data.sanitize.text_regions import Reading

#: refuse images above this many pixels (decompression bombs); 8192×8192 by default
MAX_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class ImageOptions:
    """What to look for in images and what to do with it (see ``privlora sanitize --help``)."""

    faces: Sequence[str] = ("mtcnn",)
    face_confidence: float | None = None
    text: Sequence[str] = ("rapidocr",)
    text_confidence: float | None = None
    keep_text: bool = False
    scene_text: bool = True  # also detect on enhanced variants (text_regions.variants)
    read_back: bool = True  # re-read the output, redact input words still legible (readback.py)
    redaction: str = "fill"
    margin: float = 0.1
    max_pixels: int = MAX_PIXELS


def open_image(path: Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``path`` fully, or raise :class:`SkipFile` saying why it cannot be used.

    The pixel count is checked from the header before anything is decoded, so a decompression bomb
    costs nothing; ``verify`` catches truncated and corrupt files before the real decode.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as probe:
                w, h = probe.size
                if w * h > max_pixels:
                    raise SkipFile(f"{w}×{h} pixels is over the {max_pixels:,}-pixel limit "
                                   "(possible decompression bomb; raise --max-pixels if it is genuine)")
                probe.verify()
            img = Image.open(path)
            frames = getattr(img, "n_frames", 1)
            img.load()
    except SkipFile:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipFile(f"decompression bomb refused: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's ways of saying corrupt/truncated/unknown
        raise SkipFile(f"not a readable image ({type(e).__name__}: {e})") from None
    if frames > 1:
        img.info["privlora_frames"] = frames
    return img


class ImageSanitizer:
    """Applies one set of :class:`ImageOptions` to image after image (models load once, on first use)."""

    def __init__(self, options: ImageOptions, *, threads: int | None = None) -> None:
        self.options = options
        self.redactor = get_redactor(options.redaction)
        self.detectors: list[Detector] = [*build("face", options.faces, options.face_confidence),
                                          *build("text", options.text, options.text_confidence)]
        for det in self.detectors:  # settings only some detectors have
            if hasattr(det, "read"):
                det.read = options.keep_text
            if hasattr(det, "scene"):
                det.scene = options.scene_text
            if hasattr(det, "threads"):
                det.threads = threads or os.cpu_count() or 1

        #: the OCR the read-back reads with (the first text detector that can read every box), or None
        self.reader = next((d for d in self.detectors if hasattr(d, "readings")), None) if options.read_back \
            else None

    def detect(self, rgb: np.ndarray, readings: list[Reading] | None = None) -> dict[str, list[Detection]]:
        """Every detector's boxes, by kind (``face``, ``text``), clipped to the image. With ``readings``
        (a list to fill), the read-back's reader reads every box once into it and keeps its confirmed ones."""
        h, w = rgb.shape[:2]
        found: dict[str, list[Detection]] = {}
        for det in self.detectors:
            if readings is not None and det is self.reader:
                readings.extend(det.readings(rgb))  # type: ignore[attr-defined]
                boxes = [d.clipped(w, h) for d in det.confirmed(readings)]  # type: ignore[attr-defined]
            else:
                boxes = [d.clipped(w, h) for d in det.detect(rgb)]
            found.setdefault(det.kind, []).extend(boxes)
        return found

    def __call__(self, src: Path, dst: Path | None, rel: str) -> tuple[FileReport, Signature]:
        """Sanitize ``src`` into ``dst`` (None: dry run). Returns the report and the image's pHash signature."""
        report = FileReport(rel, "image")
        img = open_image(src, self.options.max_pixels)
        for finding in findings(img):
            report.add(finding)
        frames = img.info.get("privlora_frames")
        if frames:
            report.add(Finding("metadata", "extra frames", "pillow", {"field": "frames", "count": frames - 1},
                               "dropped"))
        clean = bare_pixels(img)
        img.close()
        pixels = np.asarray(clean)
        rgb = np.ascontiguousarray(np.stack([pixels] * 3, axis=-1) if pixels.ndim == 2 else pixels[:, :, :3])
        image_hash = signature(clean)  # of the content, before redaction
        h, w = rgb.shape[:2]
        boxes = []
        readings: list[Reading] | None = [] if self.reader is not None else None
        for kind, detections in self.detect(rgb, readings).items():
            boxes += [padded(d.box, self.options.margin, w, h) for d in detections]
            for group in merge([d for d in detections if d.area > 0]):
                best = max(group, key=lambda d: (d.score is not None, d.score or 0.0))
                box = [min(d.box[0] for d in group), min(d.box[1] for d in group),
                       max(d.box[2] for d in group), max(d.box[3] for d in group)]
                who = "+".join(sorted({f"{d.detector}:{d.label}" if d.detector == "haar" else d.detector
                                       for d in group}))
                text = best.text if self.options.keep_text else None
                report.add(Finding(kind, kind, who, {"box": box}, self.options.redaction, best.score, text))
        out = redact(pixels, boxes, self.redactor) if boxes else pixels
        if self.reader is not None:
            def redact_more(px: np.ndarray, more: list[tuple[int, int, int, int]]) -> np.ndarray:
                return redact(px, [padded(b, self.options.margin, w, h) for b in more], self.redactor)

            out, checked = read_back(out, readings or [], self.reader.reread, redact_more)  # type: ignore[attr-defined]
            report.read_back, report.read_back_seconds = checked.to_json(self.options.keep_text), checked.seconds
            for m in checked.misses:
                report.add(Finding("read-back", "missed word", "rapidocr", {"box": list(m.box), "pass": m.pass_},
                                   self.options.redaction, None, m.word if self.options.keep_text else None))
        if out is not pixels:
            clean = Image.fromarray(out)
        if dst is not None:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(encode(clean, dst.suffix))
        return report, image_hash
