"""The README's before/after picture, made by the real command.

Builds a one-image dataset (scikit-image's astronaut with a printed name badge, GPS and a camera serial
in its EXIF, and a caption naming her), runs ``privlora sanitize`` on it, and puts input and output side
by side with their captions.

    python scripts/sanitize_example.py [--out docs/img/sanitize-before-after.png] [--work demo/sanitize]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage import data

CAPTION = "Jane Doe (jane.doe@example.com) at the launch pad, call +1 212-555-0187"


def make_input(folder: Path) -> None:
    folder.mkdir(parents=True)
    img = Image.fromarray(data.astronaut())
    draw = ImageDraw.Draw(img)
    draw.rectangle((300, 400, 500, 470), fill=(245, 245, 235), outline=(20, 20, 20), width=2)
    font = ImageFont.load_default(size=22)
    draw.text((312, 408), "JANE DOE", font=font, fill=(10, 10, 60))
    draw.text((312, 438), "ID 4521-8870", font=font, fill=(10, 10, 60))
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "ExampleCam", "X100"
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2], gps[3], gps[4] = "N", (28.0, 34.0, 22.0), "W", (80.0, 39.0, 3.0)
    exif.get_ifd(0x8769)[0xA431] = "SN-0042-7731"  # BodySerialNumber
    img.save(folder / "astronaut.jpg", exif=exif, quality=92)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "astronaut.jpg", "text": CAPTION}) + "\n")


def side_by_side(before: Path, after: Path, out: Path) -> None:
    font = ImageFont.load_default(size=15)
    panels = []
    for folder, title in ((before, "before"), (after, "after `privlora sanitize`")):
        img = Image.open(folder / "astronaut.jpg").convert("RGB")
        caption = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])["text"]
        panel = Image.new("RGB", (img.width, img.height + 70), "white")
        panel.paste(img, (0, 0))
        draw = ImageDraw.Draw(panel)
        draw.text((8, img.height + 6), title, font=ImageFont.load_default(size=18), fill="black")
        words, lines = caption.split(), [""]
        for word in words:  # wrap the caption to the panel width
            trial = f"{lines[-1]} {word}".strip()
            lines[-1:] = [trial] if draw.textlength(trial, font=font) < img.width - 16 else [lines[-1], word]
        for i, line in enumerate(lines[:2]):
            draw.text((8, img.height + 30 + 18 * i), line, font=font, fill=(60, 60, 60))
        panels.append(panel)
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 10, panels[0].height), "white")
    sheet.paste(panels[0], (0, 0))
    sheet.paste(panels[1], (panels[0].width + 10, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img/sanitize-before-after.png"))
    parser.add_argument("--work", type=Path, default=Path("demo/sanitize"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    before, after = args.work / "in", args.work / "out"
    make_input(before)
    subprocess.run([sys.executable, "-m", "privlora", "sanitize", str(before), str(after), "-q"], check=True)
    side_by_side(before, after, args.out)
    report = json.loads((after / "sanitize_report.json").read_text())
    print(f"found: {json.dumps(report['found'])}")
    print(f"wrote {args.out}")
    assert np.asarray(Image.open(after / "astronaut.jpg")).shape == (512, 512, 3)


if __name__ == "__main__":
    main()
