"""Near-duplicate detection on a labelled folder of copies: precision and recall of ``--dedup``.

Sources: scikit-image's bundled photos (``chessboard_GRAY`` and ``motorcycle_right`` left out: the first is
``chessboard_RGB`` in grey, the second the other half of a stereo pair — real near-duplicates, not distinct
images) and, unless ``--photos-only``, the 100 faces of ``lfw_subset`` upscaled from 25 px (hard negatives:
small, alike, low detail). Each source gets four copies: JPEG at quality 40, a centre crop of 3 % per side
scaled ×0.8, brightness ×1.25, and a mirror. Every pair of images in the folder is labelled by whether they
come from the same source; a pair is found when the two are within the distance. Reported for the old
detector (one pHash per image) and for privlora's signature (pHash of the image, its centre crops and their
mirrors), at distances 4–14.

    python benchmarks/dedup_quality.py [--photos-only] [--out FILE]

Writes benchmarks/results/dedup_quality.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from privlora.data.sanitize.dedup import DEFAULT_DISTANCE, distance, phash, signature

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "dedup_quality.json"
NOT_DISTINCT = {"chessboard_GRAY.png", "motorcycle_right.png"}


def _jpeg(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=40)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _crop_resize(img: Image.Image) -> Image.Image:
    w, h = img.size
    dx, dy = int(w * 0.03), int(h * 0.03)
    cut = img.crop((dx, dy, w - dx, h - dy))
    return cut.resize((int(cut.width * 0.8), int(cut.height * 0.8)), Image.Resampling.BILINEAR)


COPIES: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg40": _jpeg, "crop3%+resize0.8": _crop_resize,
    "brightness1.25": lambda im: ImageEnhance.Brightness(im).enhance(1.25), "mirror": ImageOps.mirror}


def sources(photos_only: bool) -> list[Image.Image]:
    """Distinct images that ship with scikit-image (nothing downloaded)."""
    import skimage
    from skimage import data

    folder = Path(os.path.dirname(skimage.__file__)) / "data"
    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix in (".png", ".jpg") and path.name not in NOT_DISTINCT:
            img = Image.open(path).convert("RGB")
            if min(img.size) >= 64:
                out.append(img)
    if not photos_only:
        out += [Image.fromarray((a * 255).astype(np.uint8)).convert("RGB").resize((100, 100), Image.Resampling.BICUBIC)
                for a in data.lfw_subset()[:100]]
    return out


def labelled_folder(photos_only: bool) -> tuple[list[Image.Image], list[int], list[str]]:
    """Every source and its copies, with the source index and the kind of copy of each image."""
    images, labels, kinds = [], [], []
    for i, src in enumerate(sources(photos_only)):
        images.append(src)
        labels.append(i)
        kinds.append("source")
        for kind, make in COPIES.items():
            images.append(make(src))
            labels.append(i)
            kinds.append(kind)
    return images, labels, kinds


def evaluate(photos_only: bool) -> dict:
    images, labels, kinds = labelled_folder(photos_only)
    detectors = {"phash": [phash(im) for im in images], "signature": [signature(im) for im in images]}
    n = len(images)
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    same = np.array([labels[a] == labels[b] for a, b in pairs])
    out: dict = {"sources": len(set(labels)), "images": n, "copy_pairs": int(same.sum()),
                 "distinct_pairs": int((~same).sum()), "default_distance": DEFAULT_DISTANCE, "detectors": {}}
    for name, hashes in detectors.items():
        d = np.array([distance(hashes[a], hashes[b]) for a, b in pairs])
        rows = []
        for t in range(4, 15):
            found = d <= t
            tp, fp = int((found & same).sum()), int((found & ~same).sum())
            rows.append({"distance": t, "recall": tp / int(same.sum()), "precision": tp / max(tp + fp, 1),
                         "false_pairs": fp})
        # recall per copy kind: a copy against its own source
        by_kind = {}
        for kind in COPIES:
            ds = [d[i] for i, (a, b) in enumerate(pairs) if same[i] and kinds[a] == "source" and kinds[b] == kind]
            by_kind[kind] = {"max_distance": int(max(ds)),
                             "recall_at_default": float(np.mean(np.array(ds) <= DEFAULT_DISTANCE))}
        out["detectors"][name] = {"by_distance": rows, "closest_distinct_pair": int(d[~same].min()),
                                  "by_copy_kind": by_kind}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos-only", action="store_true", help="scikit-image's photos only (fast; for tests)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = evaluate(args.photos_only)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, det in result["detectors"].items():
        at = next(r for r in det["by_distance"] if r["distance"] == DEFAULT_DISTANCE)
        print(f"{name}: recall {at['recall']:.3f} precision {at['precision']:.3f} at {DEFAULT_DISTANCE} bits; "
              f"closest distinct pair {det['closest_distinct_pair']}")


if __name__ == "__main__":
    main()
