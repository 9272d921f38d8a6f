"""The read-back: what the OCR read in the input must not be readable in the output.

The checks read the output with the full OCR (detection on every scene variant, then recognition of
every box), not with the read-back's own cheaper re-reading, so they would fail if the re-reading looked
in the wrong places.
"""

from __future__ import annotations

import functools
import json

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage import data as skdata

from conftest import invoke_cli
from privlora.data.sanitize import ImageOptions, SanitizeOptions, TextOptions, sanitize
from privlora.data.sanitize.images import ImageSanitizer
from privlora.data.sanitize.readback import legible, normalise, words
from privlora.data.sanitize.text_regions import RapidOcrText

#: the astronaut's embroidered name tag ("EILEEN M. COLL…"), hand-labelled from the image
NAME_TAG = (283, 362, 318, 379)
#: a word planted 30 grey levels lighter than the cat's fur, tilted by 10°: the OCR reads it ("SMAEH",
#: "SMETH", "SMATE") but below the 0.7 that confirms a squarish box, so the first pass redacts nothing
PLANTED_AT, PLANTED = (40, 40), "SMITH"


def _overlaps(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _sanitized(tmp_path, pixels: np.ndarray, **options) -> tuple[dict, np.ndarray]:
    src = tmp_path / "in.png"
    Image.fromarray(pixels).save(src)
    sanitizer = ImageSanitizer(ImageOptions(**options), threads=1)
    report, _ = sanitizer(src, tmp_path / "out.png", "in.png")
    return report.to_json(), np.ascontiguousarray(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")))


def _still_legible(before: np.ndarray, after: np.ndarray) -> list[tuple[str, tuple]]:
    """Output words (with their boxes) that the full OCR also read in the input."""
    expected = _words(before.tobytes(), before.shape)
    return [(w, r.box) for r in _OCR.readings(after) for w in normalise(r.text) if legible(w, expected)]


_OCR = RapidOcrText(scene=True)


@functools.lru_cache(maxsize=4)
def _words(pixels: bytes, shape: tuple[int, ...]) -> frozenset[str]:
    return frozenset(words(_OCR.readings(np.frombuffer(pixels, np.uint8).reshape(shape))))


@functools.lru_cache(maxsize=1)
def _planted() -> np.ndarray:
    base = Image.fromarray(skdata.chelsea()).convert("RGB").resize((384, 256))
    font = ImageFont.load_default(size=22)
    width = int(font.getlength(PLANTED)) + 8
    x, y = PLANTED_AT
    background = np.asarray(base)[y:y + 22, x:x + width].reshape(-1, 3).mean(axis=0)
    ink = Image.new("L", (width, 30), 0)
    ImageDraw.Draw(ink).text((4, 2), PLANTED, font=font, fill=255)
    ink = ink.rotate(10, expand=True, resample=Image.Resampling.BICUBIC)
    colour = Image.new("RGB", ink.size, tuple(int(min(255, c + 30)) for c in background))  # 30 levels lighter
    base.paste(colour, PLANTED_AT, ink)
    out = np.ascontiguousarray(np.asarray(base))
    out.flags.writeable = False  # cached: shared by the tests
    return out


def test_words_are_normalised_and_matched_loosely():
    assert normalise("Eileen M. Coll-ins  ID") == ["EILEEN", "COLLINS"]  # < 3 characters dropped
    assert legible("TUENVICSL", {"TUENVICS"})  # one letter more: the same word read again
    assert legible("HEH", {"SMHEH"})  # what a half-redacted line still shows
    assert not legible("ROCKET", {"TUENVICS"})


def test_read_back_leaves_no_legible_input_word_on_the_astronaut(tmp_path):
    astronaut = np.ascontiguousarray(skdata.astronaut())
    report, out = _sanitized(tmp_path, astronaut)
    assert report["read_back"]["clean"] and report["read_back"]["input_words"] >= 1
    assert any(_overlaps(m["box"], NAME_TAG) for m in report["read_back"]["missed"]), report  # first pass missed it
    assert not any(f["kind"] == "text" for f in report["findings"])  # the detector alone kept nothing
    assert _still_legible(astronaut, out) == []
    assert (out[NAME_TAG[1] + 3:NAME_TAG[3] - 3, NAME_TAG[0] + 3:NAME_TAG[2] - 3] == 0).all()  # filled


def test_planted_word_the_first_pass_misses_is_caught_and_reported(tmp_path):
    planted = _planted()
    off_report, off = _sanitized(tmp_path, planted, faces=(), read_back=False)
    assert "read_back" not in off_report
    assert any(_overlaps(box, (30, 30, 140, 110)) for _, box in _still_legible(planted, off))  # first pass left it
    report, out = _sanitized(tmp_path, planted, faces=())
    missed = report["read_back"]["missed"]
    assert missed and all(m["pass"] >= 1 and "word" not in m for m in missed)  # the word itself needs --keep-text
    assert any(_overlaps(m["box"], (30, 30, 140, 110)) for m in missed), missed
    assert [f for f in report["findings"] if f["kind"] == "read-back"]
    assert _still_legible(planted, out) == []
    kept, _ = _sanitized(tmp_path, planted, faces=(), keep_text=True)
    assert all(m["word"] for m in kept["read_back"]["missed"])


def test_read_back_off_lists_no_read_back(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(_planted()).save(src / "cat.png")
    result = invoke_cli("sanitize", str(src), str(out), "--no-pii", "--faces", "none", "--no-read-back", "-q")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "sanitize_report.json").read_text())
    assert report["options"]["images"]["read_back"] is False
    assert "read_back" not in report and "read_back" not in report["files"][0]
    assert "read-back" not in report["found"] and "read-back" not in result.stdout
    on = sanitize(src, tmp_path / "on", options=SanitizeOptions(images=ImageOptions(faces=()),
                                                                text=TextOptions(enabled=False)), quiet=True)
    summary = on.to_json()["read_back"]
    assert summary["images"] == 1 and summary["misses"] >= 1 and summary["still_legible"] == []
