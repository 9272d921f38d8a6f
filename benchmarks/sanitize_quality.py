"""Recall and precision of the sanitize detectors on labelled images built from what ships offline.

Faces: the 100 faces and 100 non-faces of scikit-image's ``lfw_subset`` upscaled onto 13 sheets
(``cards.face_grids``) plus ``astronaut`` (one hand-labelled face). A true face counts as found when
detections cover ≥ 50 % of its box; a detection is a false positive when it covers no true face
(≥ 30 % of the detection inside a face box). Each face detector alone (MTCNN is the default) and their
union (``--faces haar,mtcnn``).

Printed text: 40 synthetic ID-card-like images (``cards.id_cards``: Faker names, dates of birth, IDs,
addresses, phones, e-mails in varied sizes and colours, with a portrait). A line counts as found when
the text boxes cover ≥ 90 % of its ink box (the pipeline grows boxes by 10 % on top); precision is the
share of detected boxes that overlap a true line. False boxes are also counted on 7 scikit-image photos
without text, each as PNG and as a quality-75 JPEG. A second, harder set of 40 cards has light ink on
dark backgrounds on half of them, type from 12 px, and every line tilted by up to ±6°.

    python benchmarks/sanitize_quality.py

Writes benchmarks/results/sanitize_quality.json. Targets (issue 5): face recall ≥ 0.95 on frontal
faces, text-box recall ≥ 0.9.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
from cards import covered, face_grids, id_cards  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "sanitize_quality.json"
ASTRONAUT_FACE = (175, 65, 265, 170)


def _face_scores(detect, sheets) -> dict:
    found = faces = false_pos = detections = 0
    seconds = 0.0
    for sheet in sheets:
        t = time.perf_counter()
        boxes = [d.box for d in detect(sheet.image)]
        seconds += time.perf_counter() - t
        truth = [b for b, label in zip(sheet.boxes, sheet.labels, strict=True) if label == "face"]
        faces += len(truth)
        found += sum(covered(b, boxes) >= 0.5 for b in truth)
        detections += len(boxes)
        false_pos += sum(not any(covered(d, [b]) >= 0.3 for b in truth) for d in boxes)
    return {"faces": faces, "found": found, "recall": found / faces, "detections": detections,
            "false_positives": false_pos,
            "precision": (detections - false_pos) / detections if detections else None,
            "seconds_per_image": seconds / len(sheets)}


def faces() -> dict:
    from cards import Labelled
    from skimage import data

    from privlora.data.sanitize.faces import HaarFaces, MtcnnFaces

    sheets = face_grids()
    astro = Labelled(np.ascontiguousarray(data.astronaut()), [ASTRONAUT_FACE], ["face"])
    haar, mtcnn = HaarFaces(), MtcnnFaces()
    detectors = {"haar": haar.detect, "mtcnn (default)": mtcnn.detect,
                 "haar+mtcnn union": lambda img: haar.detect(img) + mtcnn.detect(img)}
    out = {}
    for name, detect in detectors.items():
        out[name] = _face_scores(detect, sheets)
        out[name]["astronaut_found"] = bool(_face_scores(detect, [astro])["found"])
    return out


def text(n: int = 40, *, hard: bool = False) -> dict:
    from privlora.data.sanitize.text_regions import RapidOcrText

    cards = id_cards(n, hard=hard)
    ocr = RapidOcrText()
    ocr.detect(cards[0].image)  # load the models outside the timing
    per_label: dict[str, list[int]] = {}
    detections = matched = 0
    misses = []
    t = time.perf_counter()
    for i, card in enumerate(cards):
        boxes = [d.box for d in ocr.detect(card.image)]
        detections += len(boxes)
        matched += sum(any(covered(b, [d]) > 0 for d in card.boxes) for b in boxes)
        for box, label, line in zip(card.boxes, card.labels, card.texts, strict=True):
            hit = covered(box, boxes) >= 0.9
            per_label.setdefault(label, []).append(int(hit))
            if not hit:
                misses.append({"card": i, "label": label, "text": line, "covered": round(covered(box, boxes), 3)})
    seconds = (time.perf_counter() - t) / n
    lines = sum(len(v) for v in per_label.values())
    photo_boxes = {name: len(ocr.detect(img)) for name, img in _text_free_photos().items()}
    return {"false_boxes_on_text_free_photos": photo_boxes,
            "cards": n, "lines": lines, "recall": sum(sum(v) for v in per_label.values()) / lines,
            "recall_by_label": {k: sum(v) / len(v) for k, v in sorted(per_label.items())},
            "precision": matched / detections if detections else None, "detections": detections,
            "seconds_per_image": seconds, "misses": misses}


#: scikit-image photos without printed text (each also as a quality-75 JPEG: artefacts look like glyphs)
TEXT_FREE = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")


def _text_free_photos() -> dict[str, np.ndarray]:
    import io

    from PIL import Image
    from skimage import data

    photos = {}
    for name in TEXT_FREE:
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=75)
        photos[name] = np.asarray(img)
        photos[f"{name}.jpg"] = np.asarray(Image.open(buf))
    return photos


def main() -> None:
    results = {"machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
               "faces": faces(), "text": text(), "text_hard": text(hard=True)}
    print(f"{'face detector':<18} {'recall':>7} {'precision':>9} {'false +':>7} {'s/image':>8} astronaut")
    for name, r in results["faces"].items():
        prec = "n/a" if r["precision"] is None else f"{r['precision']:.3f}"
        print(f"{name:<18} {r['recall']:>7.3f} {prec:>9} {r['false_positives']:>7} "
              f"{r['seconds_per_image']:>8.3f} {'yes' if r['astronaut_found'] else 'no'}")
    t = results["text"]
    print(f"text boxes (rapidocr): recall {t['recall']:.3f} over {t['lines']} lines, precision {t['precision']:.3f}, "
          f"{t['seconds_per_image']:.3f} s/image")
    print("  by label: " + ", ".join(f"{k} {v:.3f}" for k, v in t["recall_by_label"].items()))
    fp = t["false_boxes_on_text_free_photos"]
    print(f"  false boxes on {len(fp)} text-free photos: {sum(fp.values())}")
    h = results["text_hard"]
    print(f"hard cards (light-on-dark, 12-34 px, tilted ±6°): recall {h['recall']:.3f} over {h['lines']} lines, "
          f"precision {h['precision']:.3f}; by label: "
          + ", ".join(f"{k} {v:.3f}" for k, v in h["recall_by_label"].items()))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
