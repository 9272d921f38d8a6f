"""Printed-line and scene-text recall of the image pipeline, with and without scene variants and read-back.

Three settings of :class:`ImageSanitizer` (faces off, so only text is redacted): the old default (plain
detector), scene variants on (``--no-read-back``), and the new default (scene variants + read-back).

* Printed lines: ID cards (``cards.id_cards``) and the hard set (light on dark, 12 px, tilted ±6°). A
  line counts as found when the report's boxes (text findings + read-back misses) cover ≥ 90 % of its ink
  box, as in sanitize_quality.py.
* Scene text: names (Faker) drawn with PIL onto 512×512 crops of scikit-image photos, 14–24 px, 15–45
  grey levels from the background (lighter or darker), rotated by up to ±20°; plus the astronaut's
  embroidered name tag (hand-labelled box). A word counts as found when the boxes cover ≥ 90 % of its
  ink pixels.
* Legible after: the full OCR (every scene variant, every box read) reads the input and the output; an
  input word still read in the output (readback.legible) is a leak. Counted for every image.
* False boxes: text and read-back findings on 4 text-free photos (PNG and quality-75 JPEG).

    python benchmarks/sanitize_readback.py [--cards 8] [--scene 8]

Writes benchmarks/results/sanitize_readback.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
from cards import covered, id_cards  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "sanitize_readback.json"
NAME_TAG = (285, 365, 316, 376)  # the ink of the astronaut's name tag, hand-labelled
SCENES = ("chelsea", "coffee", "rocket", "astronaut", "hubble_deep_field", "immunohistochemistry")
TEXT_FREE = ("coffee", "chelsea", "rocket", "immunohistochemistry")
SETTINGS = {"plain (old default)": {"scene_text": False, "read_back": False},
            "scene variants": {"scene_text": True, "read_back": False},
            "scene + read-back (default)": {"scene_text": True, "read_back": True}}


def _photo(name: str, rng: np.random.Generator) -> np.ndarray:
    from skimage import data

    img = np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB"))
    h, w = img.shape[:2]
    if min(h, w) < 512:
        img = np.asarray(Image.fromarray(img).resize((max(512, w * 512 // h), max(512, h * 512 // w))))
        h, w = img.shape[:2]
    y, x = int(rng.integers(0, h - 511)), int(rng.integers(0, w - 511))
    return np.ascontiguousarray(img[y:y + 512, x:x + 512])


def scene_images(n: int, seed: int = 0) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """``n`` photos with two planted names each, and each name's ink mask; the astronaut's tag first."""
    from faker import Faker
    from skimage import data

    fake, rng = Faker(), np.random.default_rng(seed)
    fake.seed_instance(seed)
    tag = np.zeros((512, 512), bool)
    tag[NAME_TAG[1]:NAME_TAG[3], NAME_TAG[0]:NAME_TAG[2]] = True
    out = [(np.ascontiguousarray(data.astronaut()), [tag])]
    for i in range(n):
        img = Image.fromarray(_photo(SCENES[i % len(SCENES)], rng))
        masks = []
        for slot in range(2):
            word = fake.last_name().upper() if rng.random() < 0.5 else fake.first_name()
            size = int(rng.integers(14, 25))
            font = ImageFont.load_default(size=size)
            ink = Image.new("L", (int(font.getlength(word)) + 8, size + 10), 0)
            ImageDraw.Draw(ink).text((4, 2), word, font=font, fill=255)
            ink = ink.rotate(float(rng.uniform(-20, 20)), expand=True, resample=Image.Resampling.BICUBIC)
            x = int(rng.integers(10, 512 - ink.width - 10))
            y = int(rng.integers(20 + 250 * slot, 250 * slot + 250 - ink.height))
            region = np.asarray(img)[y:y + ink.height, x:x + ink.width].reshape(-1, 3).mean(axis=0)
            delta = float(rng.uniform(15, 45)) * (1 if region.mean() < 128 else -1)
            img.paste(Image.new("RGB", ink.size, tuple(int(np.clip(c + delta, 0, 255)) for c in region)), (x, y), ink)
            mask = np.zeros((512, 512), bool)
            mask[y:y + ink.height, x:x + ink.width] = np.asarray(ink) > 127
            masks.append(mask)
        out.append((np.ascontiguousarray(np.asarray(img)), masks))
    return out


def _boxes(report: dict) -> list[tuple[int, int, int, int]]:
    boxes = [tuple(f["where"]["box"]) for f in report["findings"] if f["kind"] in ("text", "read-back")]
    return boxes  # type: ignore[return-value]


def _mask_covered(mask: np.ndarray, boxes) -> float:
    cover = np.zeros_like(mask)
    for x0, y0, x1, y1 in boxes:
        cover[y0:y1, x0:x1] = True
    return float((mask & cover).sum() / max(1, mask.sum()))


class Runner:
    """Each setting's sanitizer, and the full OCR that judges what is still legible."""

    def __init__(self) -> None:
        from privlora.data.sanitize.images import ImageOptions, ImageSanitizer
        from privlora.data.sanitize.text_regions import RapidOcrText

        self.sanitizers = {k: ImageSanitizer(ImageOptions(faces=(), **v), threads=1) for k, v in SETTINGS.items()}
        self.ocr = RapidOcrText(scene=True)
        self.tmp = Path(tempfile.mkdtemp())

    def run(self, pixels: np.ndarray) -> dict[str, tuple[dict, float, int, int]]:
        """setting → (report, seconds, input words, input words still legible in the output)."""
        from privlora.data.sanitize.readback import legible, normalise, words

        src = self.tmp / "in.png"
        Image.fromarray(pixels).save(src)
        expected = words(self.ocr.readings(pixels))
        out = {}
        for name, sanitizer in self.sanitizers.items():
            t = time.perf_counter()
            report, _ = sanitizer(src, self.tmp / "out.png", "in.png")
            seconds = time.perf_counter() - t
            after = np.ascontiguousarray(np.asarray(Image.open(self.tmp / "out.png").convert("RGB")))
            still = {w for r in self.ocr.readings(after) for w in normalise(r.text) if legible(w, expected)}
            left = sum(legible(w, still) for w in expected) if still else 0
            out[name] = (report.to_json(), seconds, len(expected), left)
        return out


def _add(acc: dict, name: str, found: int, total: int, seconds: float, words_in: int, left: int,
         misses: int = 0) -> None:
    a = acc.setdefault(name, {"found": 0, "total": 0, "seconds": 0.0, "images": 0, "input_words": 0,
                              "still_legible": 0, "images_with_legible": 0, "read_back_misses": 0})
    a["found"] += found
    a["total"] += total
    a["seconds"] += seconds
    a["images"] += 1
    a["input_words"] += words_in
    a["still_legible"] += left
    a["images_with_legible"] += int(left > 0)
    a["read_back_misses"] += misses


def _finish(acc: dict) -> dict:
    for a in acc.values():
        a["recall"] = a["found"] / a["total"] if a["total"] else None
        a["seconds_per_image"] = a.pop("seconds") / a["images"]
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", type=int, default=8, help="cards per set (plain and hard)")
    parser.add_argument("--scene", type=int, default=8, help="photos with planted names (+ the astronaut)")
    args = parser.parse_args()
    runner = Runner()
    runner.run(np.full((64, 64, 3), 255, np.uint8))  # load the models outside the timing
    results: dict = {"machine": {"python": platform.python_version(), "cpu": platform.processor() or
                                 platform.machine()}, "cards": args.cards, "scene_images": args.scene}
    for key, hard in (("printed_lines", False), ("printed_lines_hard", True)):
        acc: dict = {}
        for card in id_cards(args.cards, hard=hard):
            for name, (report, s, n_in, left) in runner.run(card.image).items():
                boxes = _boxes(report)
                found = sum(covered(b, boxes) >= 0.9 for b in card.boxes)
                _add(acc, name, found, len(card.boxes), s, n_in, left, report.get("read_back", {}).get("misses", 0))
        results[key] = _finish(acc)
        print(key, json.dumps({k: (round(v["recall"], 3), v["still_legible"], round(v["seconds_per_image"], 2))
                               for k, v in acc.items()}), flush=True)
    acc, tag = {}, {}
    for i, (img, masks) in enumerate(scene_images(args.scene)):
        for name, (report, s, n_in, left) in runner.run(img).items():
            boxes = _boxes(report)
            found = sum(_mask_covered(m, boxes) >= 0.9 for m in masks)
            _add(acc, name, found, len(masks), s, n_in, left, report.get("read_back", {}).get("misses", 0))
            if i == 0:
                tag[name] = {"found": bool(found), "still_legible": left, "seconds": round(s, 3)}
    results["scene_text"], results["astronaut_name_tag"] = _finish(acc), tag
    print("scene_text", json.dumps({k: (round(v["recall"], 3), v["still_legible"], round(v["seconds_per_image"], 2))
                                    for k, v in acc.items()}), flush=True)
    print("astronaut name tag", json.dumps(tag), flush=True)
    acc = {}
    from sanitize_quality import _text_free_photos

    for photo, img in _text_free_photos().items():
        if photo.split(".")[0] not in TEXT_FREE:
            continue
        for name, (report, s, n_in, left) in runner.run(np.ascontiguousarray(img)).items():
            _add(acc, name, len(_boxes(report)), 0, s, n_in, left)
    results["text_free_photos"] = {k: {"false_boxes": v["found"], "images": v["images"],
                                       "seconds_per_image": v["seconds"] / v["images"]} for k, v in acc.items()}
    print("false boxes on text-free photos", json.dumps({k: v["false_boxes"]
                                                         for k, v in results["text_free_photos"].items()}))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
