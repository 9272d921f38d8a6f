"""Image sanitizing: faces and printed text redacted, metadata gone from the bytes, duplicates found,
bad files skipped, the input untouched and the output written all at once or not at all."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from skimage import data as skdata

from conftest import ROOT, assert_one_line_error, run_cli
from privlora.data.folder import load_folder
from privlora.data.sanitize import ImageOptions, SanitizeOptions, TextOptions, sanitize
from privlora.data.sanitize.dedup import DEFAULT_DISTANCE, clusters, distance, phash, signature
from privlora.data.sanitize.faces import HaarFaces, MtcnnFaces
from privlora.data.sanitize.images import ImageSanitizer
from privlora.data.sanitize.redact import REDACTORS, redact
from privlora.data.sanitize.text_regions import RapidOcrText

# the astronaut's face in skimage's astronaut() (hand-labelled)
ASTRONAUT_FACE = (175, 65, 265, 170)
NO_TEXT = ImageOptions(text=())
IMAGES_ONLY = SanitizeOptions(images=ImageOptions(), text=TextOptions(enabled=False))
#: the printed-text detector without its scene-text variants and read-back (test_sanitize_readback.py covers
#: those): for tests of folders, workers and dry runs, where 5-7x slower text detection buys nothing
PRINTED_TEXT = ImageOptions(scene_text=False, read_back=False)
SECRET = "Jane-Doe-serial-SN99887766"


def _exiftool(path: Path) -> dict:
    exe = shutil.which("exiftool")
    if exe is None:
        pytest.fail("exiftool is missing: `make test` installs Debian's libimage-exiftool-perl")
    out = subprocess.run([exe, "-j", "-a", "-G1", str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)[0]


def _card(text_lines: list[str], size: int = 512) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A white ID-card-like image with printed lines, and each line's true box (its ink's extent)."""
    img = np.full((size, size, 3), 255, np.uint8)
    boxes = []
    for i, line in enumerate(text_lines):
        ink = np.zeros((size, size), np.uint8)
        cv2.putText(ink, line, (30, 80 + 70 * i), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 255, 2, cv2.LINE_AA)
        ys, xs = np.nonzero(ink > 127)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
        img[ink > 0] = np.minimum(img[ink > 0], (255 - ink[ink > 0])[:, None])
    return img, boxes


def _covered(box, boxes) -> float:
    """Fraction of ``box``'s pixels inside the union of ``boxes``."""
    x0, y0, x1, y1 = box
    mask = np.zeros((y1 - y0, x1 - x0), bool)
    for a0, b0, a1, b1 in boxes:
        mask[max(0, b0 - y0):max(0, b1 - y0), max(0, a0 - x0):max(0, a1 - x0)] = True
    return float(mask.mean())


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- detectors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("detector", [HaarFaces(), MtcnnFaces()], ids=["haar", "mtcnn"])
def test_each_face_detector_finds_the_astronaut(detector):
    found = detector.detect(np.ascontiguousarray(skdata.astronaut()))
    assert any(_covered(ASTRONAUT_FACE, [d.box]) > 0.6 for d in found), found


def test_face_detectors_find_nothing_in_a_face_free_image():
    img = np.ascontiguousarray(skdata.coffee())
    assert MtcnnFaces().detect(img) == []


def test_text_detector_boxes_cover_printed_lines():
    img, truth = _card(["JOHN SMITH", "ID 110105194912310021", "DOB 1949-12-31"])
    found = RapidOcrText().detect(img)
    boxes = [d.box for d in found]
    for box in truth:
        assert _covered(box, boxes) > 0.9, (box, boxes)


@pytest.mark.parametrize("photo", ["coffee", "chelsea", "astronaut", "rocket"])
def test_text_detector_leaves_text_free_photos_alone(photo):
    # the bare DB detector draws boxes on fur and foliage; recognition must veto them
    img = Image.fromarray(getattr(skdata, photo)())
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=75)  # JPEG artefacts made the cat read as an "O" at a low score
    for pixels in (np.asarray(img), np.asarray(Image.open(buf))):
        assert RapidOcrText().detect(np.ascontiguousarray(pixels)) == []


def test_keep_text_reads_what_the_boxes_say():
    img, _ = _card(["JOHN SMITH"])
    found = RapidOcrText(read=True).detect(img)
    assert any("SMITH" in (d.text or "") for d in found), found


# --- redaction ----------------------------------------------------------------------------------------

def test_redaction_operators_change_only_the_boxes():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    box = (10, 20, 40, 50)
    for name, op in REDACTORS.items():
        out = redact(img, [box], op)
        inside, outside = out[20:50, 10:40], out.copy()
        outside[20:50, 10:40] = img[20:50, 10:40]
        assert np.array_equal(outside, img), name
        assert not np.array_equal(inside, img[20:50, 10:40]), name
        # every operator destroys detail: far less variance than the random original
        assert inside.astype(float).std() < 0.5 * img[20:50, 10:40].astype(float).std(), name
    assert (redact(img, [box], REDACTORS["fill"])[20:50, 10:40] == 0).all()
    pix = redact(img, [box], REDACTORS["pixelate"])[20:50, 10:40]
    assert len(np.unique(pix.reshape(-1, 3), axis=0)) <= 36  # at most 6×6 mean-colour blocks


def test_redaction_keeps_alpha_and_grayscale():
    rgba = np.full((20, 20, 4), 200, np.uint8)
    out = redact(rgba, [(0, 0, 10, 10)], REDACTORS["fill"])
    assert (out[:10, :10, :3] == 0).all() and (out[:10, :10, 3] == 200).all()
    gray = np.full((20, 20), 200, np.uint8)
    assert (redact(gray, [(0, 0, 5, 5)], REDACTORS["fill"])[:5, :5] == 0).all()


def test_pipeline_blanks_the_face_and_the_printed_text(tmp_path):
    photo = skdata.astronaut().copy()
    cv2.putText(photo, "JANE DOE 555-0100", (20, 480), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
    src = tmp_path / "p.png"
    Image.fromarray(photo).save(src)
    report, _ = ImageSanitizer(ImageOptions())(src, tmp_path / "out.png", "p.png")
    out = np.asarray(Image.open(tmp_path / "out.png"))
    x0, y0, x1, y1 = ASTRONAUT_FACE
    assert (out[y0 + 10:y1 - 10, x0 + 10:x1 - 10] == 0).all()
    kinds = {f.kind for f in report.findings}
    assert {"face", "text"} <= kinds
    text_boxes = [f.where["box"] for f in report.findings if f.kind == "text"]
    assert any(b[1] < 470 < b[3] for b in text_boxes), text_boxes
    # pixels far from every box are exactly the input's (PNG: lossless)
    assert np.array_equal(out[300:400, 400:500], photo[300:400, 400:500])


# --- metadata -----------------------------------------------------------------------------------------

def _exif_with_gps_and_serial() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"  # Make
    exif[0x0110] = "Model-X"  # Model
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2], gps[3], gps[4] = "N", (48.0, 51.0, 29.0), "E", (2.0, 17.0, 40.0)
    sub = exif.get_ifd(0x8769)
    sub[0xA431] = SECRET  # BodySerialNumber
    return exif


def _xmp() -> bytes:
    return (b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
            b'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
            b'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:creator>' + SECRET.encode() +
            b'</dc:creator></rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>')


def test_jpeg_metadata_is_gone_from_the_bytes(tmp_path):
    from PIL import ImageCms

    src, dst = tmp_path / "in.jpg", tmp_path / "out.jpg"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(skdata.coffee()).save(src, exif=_exif_with_gps_and_serial(), comment=SECRET.encode(),
                                          xmp=_xmp(), icc_profile=icc, quality=90)
    before = _exiftool(src)
    assert any("GPS" in k for k in before) and any("Comment" in k for k in before)  # the fixture has them
    report, _ = ImageSanitizer(NO_TEXT)(src, dst, "in.jpg")
    labels = {f.label for f in report.findings if f.kind == "metadata"}
    assert {"GPS location", "identifying EXIF", "comment", "XMP", "ICC profile"} <= labels, labels
    after = _exiftool(dst)
    groups = {k.split(":")[0] for k in after}
    assert not groups & {"GPS", "IFD0", "ExifIFD", "XMP-x", "XMP-dc", "ICC_Profile", "ICC-header", "IPTC"}, after
    assert not any("Comment" in k or "Serial" in k or "GPS" in k for k in after), after
    raw = dst.read_bytes()
    assert SECRET.encode() not in raw and b"Exif\x00\x00" not in raw and b"http://ns.adobe.com/xap" not in raw
    assert not any(json.dumps(f.to_json()).count(SECRET) for f in report.findings)  # values never reported
    # the pixels survive re-encoding (JPEG at quality 95)
    a = np.asarray(Image.open(src), dtype=float)
    b = np.asarray(Image.open(dst), dtype=float)
    assert a.shape == b.shape and np.abs(a - b).mean() < 3


def test_png_text_chunks_are_gone_from_the_bytes(tmp_path):
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", SECRET)
    info.add_itxt("Description", SECRET, zip=True)
    info.add_text("Comment", SECRET, zip=True)
    Image.fromarray(skdata.coffee()[:64, :64]).save(src, pnginfo=info, exif=_exif_with_gps_and_serial())
    report, _ = ImageSanitizer(NO_TEXT)(src, dst, "in.png")
    assert "PNG text" in {f.label for f in report.findings}
    after = _exiftool(dst)
    assert not any(k.split(":")[-1] in ("Author", "Description", "Comment") for k in after), after
    assert not any("GPS" in k for k in after)
    raw = dst.read_bytes()
    for chunk in (b"tEXt", b"iTXt", b"zTXt", b"eXIf"):
        assert chunk not in raw
    assert np.array_equal(np.asarray(Image.open(src)), np.asarray(Image.open(dst)))


def test_exif_orientation_is_applied_before_it_is_dropped(tmp_path):
    src, dst = tmp_path / "in.jpg", tmp_path / "out.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    Image.new("RGB", (80, 40), (10, 200, 30)).save(src, exif=exif)
    ImageSanitizer(ImageOptions(faces=(), text=()))(src, dst, "in.jpg")
    assert Image.open(dst).size == (40, 80)
    assert "Orientation" not in str(_exiftool(dst))


# --- duplicates ---------------------------------------------------------------------------------------

def test_phash_links_recompressed_and_resized_copies_not_different_images():
    base = Image.fromarray(skdata.astronaut())
    buf = io.BytesIO()
    base.resize((300, 300)).save(buf, "JPEG", quality=60)
    copy = Image.open(io.BytesIO(buf.getvalue()))
    brighter = Image.fromarray(np.clip(skdata.astronaut().astype(int) + 12, 0, 255).astype(np.uint8))
    others = [Image.fromarray(skdata.coffee()), Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.rocket())]
    hashes = [phash(im) for im in (base, *others, copy, brighter)]
    assert clusters(hashes) == [[0, 4, 5]]



def test_signature_links_mirrored_and_cropped_copies_that_phash_misses():
    base = Image.fromarray(skdata.astronaut())
    w, h = base.size
    cropped = base.crop((15, 15, w - 15, h - 15)).resize((int(0.8 * (w - 30)), int(0.8 * (h - 30))))
    mirrored = base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert phash(base) != phash(mirrored)
    assert distance(phash(base), phash(mirrored)) > 2 * DEFAULT_DISTANCE
    assert distance(signature(base), signature(mirrored)) == 0
    assert distance(signature(base), signature(cropped)) <= DEFAULT_DISTANCE
    others = [Image.fromarray(skdata.coffee()), Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.rocket())]
    sigs = [signature(im) for im in (base, *others, cropped, mirrored)]
    assert clusters(sigs) == [[0, 4, 5]]


def test_dedup_distance_help_states_the_library_default():
    """The CLI leaves the default to SanitizeOptions (no sanitizer import at start-up); its help must say it."""
    proc = run_cli("sanitize", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.replace("│", " ").split())  # rich wraps the help inside a box
    assert f"(default {DEFAULT_DISTANCE})" in text

def test_dedup_recall_and_precision_on_a_labelled_folder_of_copies(tmp_path):
    """benchmarks/dedup_quality.py on scikit-image's photos: JPEG, crop+resize, brightness and mirror copies."""
    out = tmp_path / "dedup.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dedup_quality.py"), "--photos-only", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    at = {name: next(r for r in det["by_distance"] if r["distance"] == DEFAULT_DISTANCE)
          for name, det in result["detectors"].items()}
    assert at["signature"]["recall"] >= 0.95 and at["signature"]["precision"] == 1.0
    assert at["phash"]["recall"] < 0.8  # the old detector: mirrors and crops slip through
    assert result["copy_pairs"] == result["sources"] * 10  # 5 images per source, every pair labelled

# --- the whole folder ---------------------------------------------------------------------------------

def _bomb_png(path: Path, side: int = 40000) -> None:
    """A valid-looking PNG header that claims side×side pixels over a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _dataset(folder: Path) -> None:
    """Faces with captions, a duplicate, and every kind of bad file."""
    folder.mkdir(parents=True)
    astro = Image.fromarray(skdata.astronaut())
    astro.save(folder / "astronaut.jpg", exif=_exif_with_gps_and_serial(), quality=92)
    astro.resize((256, 256)).save(folder / "astronaut_small.png")
    Image.fromarray(skdata.coffee()).save(folder / "coffee.png")
    (folder / "sub").mkdir()
    Image.fromarray(skdata.chelsea()).save(folder / "sub" / "cat.jpg")
    good = (folder / "coffee.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 3])
    (folder / "fake.jpg").write_text("not a jpeg\n")
    _bomb_png(folder / "bomb.png")
    (folder / "notes.bin").write_bytes(b"\x00\x01")
    lines = [{"file_name": "astronaut.jpg", "text": "an astronaut"},
             {"file_name": "astronaut_small.png", "text": "the same astronaut, smaller"},
             {"file_name": "coffee.png", "text": "a cup of coffee"},
             {"file_name": "sub/cat.jpg", "text": "a cat"},
             {"file_name": "truncated.png", "text": "broken"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_folder_is_sanitized_whole_and_usable_for_training(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _dataset(src)
    before = _tree_digest(src)
    options = SanitizeOptions(images=PRINTED_TEXT, text=TextOptions(enabled=False), dedup=True)
    result = sanitize(src, out, options=options, quiet=True)
    assert _tree_digest(src) == before  # input never modified
    by_path = {r.path: r for r in result.files}
    assert by_path["astronaut_small.png"].status == "duplicate"
    assert "astronaut.jpg" in by_path["astronaut_small.png"].reason
    for bad in ("truncated.png", "fake.jpg", "bomb.png", "notes.bin"):
        assert by_path[bad].status == "skipped", bad
        assert not (out / bad).exists()
    assert "decompression bomb" in by_path["bomb.png"].reason
    assert by_path["astronaut.jpg"].status == "cleaned"
    assert {f.kind for f in by_path["astronaut.jpg"].findings} >= {"face", "metadata"}
    report = json.loads((out / "sanitize_report.json").read_text())
    assert report["statuses"] == {"cleaned": 1, "clean": 3, "duplicate": 1, "skipped": 4}, report["statuses"]
    assert "text" not in report["found"]  # no printed text in these photos
    assert report["found"]["face"]["files"] >= 1
    # captions follow the images: the duplicate's and the broken file's rows are gone
    captions = [json.loads(line)["file_name"] for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert captions == ["astronaut.jpg", "coffee.png", "sub/cat.jpg"]
    images, folder_report = load_folder(out, channels=3, resolution=32)
    assert sorted(images.ids) == ["astronaut.jpg", "coffee.png", "sub/cat.jpg"]
    assert folder_report.skipped == {} and folder_report.uncaptioned == []
    assert images.captions[images.ids.index("coffee.png")] == "a cup of coffee"


def test_dry_run_writes_nothing_and_reports_everything(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _dataset(src)
    dry = SanitizeOptions(images=PRINTED_TEXT, text=TextOptions(enabled=False), dry_run=True)
    result = sanitize(src, out, options=dry, quiet=True)
    assert not out.exists() and result.out is None
    assert len(result.files) == 9
    assert result.counts()["duplicate"]["files"] == 1  # reported, not dropped


def test_a_crash_midway_leaves_no_output(tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    _dataset(src)
    calls = {"n": 0}
    real = MtcnnFaces.detect

    def flaky(self, rgb):  # a bug in the second image: not a SkipFile, so the run must fail as a whole
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(self, rgb)

    monkeypatch.setattr(MtcnnFaces, "detect", flaky)
    with pytest.raises(RuntimeError):
        sanitize(src, out, options=IMAGES_ONLY, quiet=True)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in"]  # no temporary left behind


def test_cli_sanitizes_and_prints_a_summary(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _dataset(src)
    proc = run_cli("sanitize", str(src), str(out), "--no-pii", "--redaction", "pixelate", "--no-scene-text",
                   "--no-read-back", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "face" in proc.stdout and "metadata" in proc.stdout and "4 skipped" in proc.stdout
    assert (out / "sanitize_report.json").exists()
    report = json.loads((out / "sanitize_report.json").read_text())
    assert report["options"]["images"]["redaction"] == "pixelate"
    assert (out / "astronaut_small.png").exists()  # without --dedup duplicates are only reported
    again = run_cli("sanitize", str(src), str(out), "--no-pii", "-q")
    assert_one_line_error(again, "already exists", "--overwrite")
    proc = run_cli("sanitize", str(src), str(out), "--no-pii", "--overwrite", "--faces", "none", "--text", "none",
                   "-q")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "sanitize_report.json").read_text())
    assert "face" not in report["found"]


@pytest.mark.parametrize("args,needles", [
    (["{missing}", "{out}"], ["does not exist"]),
    (["{src}/a.png", "{src}"], ["outside the input"]),
    (["{src}", "{src}/inside"], ["outside the input"]),
    (["{src}", "{out}", "--faces", "yolo"], ["unknown face detector", "haar"]),
    (["{src}", "{out}", "--redaction", "smudge"], ["'smudge' is not one of", "fill"]),
    (["{src}"], ["output folder", "--dry-run"]),
    (["{src}", "{out}", "--margin", "-1"], ["--margin"]),
])
def test_cli_bad_input_is_one_line(tmp_path, args, needles):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(skdata.coffee()[:32, :32]).save(src / "a.png")
    values = {"src": str(src), "out": str(tmp_path / "out"), "missing": str(tmp_path / "nope")}
    proc = run_cli("sanitize", *(a.format(**values) for a in args), "--no-pii", "-q")
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "out").exists() and not (src / "inside").exists()


def test_non_overwritable_folder_is_refused(tmp_path):
    src, out = tmp_path / "in", tmp_path / "precious"
    src.mkdir()
    out.mkdir()
    Image.fromarray(skdata.coffee()[:32, :32]).save(src / "a.png")
    (out / "thesis.tex").write_text("years of work")
    proc = run_cli("sanitize", str(src), str(out), "--no-pii", "--overwrite", "-q")
    assert_one_line_error(proc, "not a sanitize output")
    assert (out / "thesis.tex").read_text() == "years of work"


# --- images and text together, as a user runs it ------------------------------------------------------

def test_cli_scrubs_captions_and_tables_and_trains_on_the_copy(tmp_path):
    """Captions and a CSV lose their PII (salted pseudonyms, stable across runs); `privlora train` reads OUT."""
    from conftest import CONFIGS, FAST

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    photo = skdata.astronaut()
    rows = []
    for i in range(12):  # enough images for the demo split (members / aux / eval)
        y, x = rng.integers(0, 512 - 96, 2)
        Image.fromarray(photo[y:y + 96, x:x + 96]).save(src / f"img{i:02d}.png")
        rows.append({"file_name": f"img{i:02d}.png", "text": f"photo {i} of Jane Doe, jane.doe@example.com"})
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (src / "img03.txt").write_text("ignored: metadata.jsonl wins, but scrubbed anyway: call +1 212-555-0187\n")
    (src / "notes.csv").write_text("id,note,amount\n1,Patient John Smith called from +1 212-555-0187,12.50\n"
                                   "2,Card 4111 1111 1111 1111 declined,99.00\n")
    before = _tree_digest(src)
    outs = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        proc = run_cli("sanitize", str(src), str(out), "--operator", "hash", "--salt", "s3cret", "--faces", "none",
                       "--text", "none", "-q")
        assert proc.returncode == 0, proc.stderr
        assert "pii:EMAIL_ADDRESS" in proc.stdout and "pii:PERSON" in proc.stdout
        outs.append(out)
    assert _tree_digest(src) == before
    out = outs[0]
    captions = (out / "metadata.jsonl").read_text()
    notes = (out / "notes.csv").read_text()
    sidecar = (out / "img03.txt").read_text()
    for secret in ("Jane Doe", "jane.doe@example.com", "John Smith", "212-555-0187", "4111 1111 1111 1111"):
        assert secret not in captions + notes + sidecar, secret
        assert secret not in (out / "sanitize_report.json").read_text()
    assert "s3cret" not in "".join((o / f).read_text() for o in outs for f in ("sanitize_report.json",
                                                                               "metadata.jsonl", "notes.csv"))
    assert notes.splitlines()[0] == "id,note,amount" and notes.splitlines()[1].endswith(",12.50")
    pseudonym = json.loads(captions.splitlines()[0])["text"].split("of ")[1].split(",")[0]
    assert pseudonym.startswith("<PERSON_") and all(pseudonym in line for line in captions.splitlines())
    assert (outs[1] / "metadata.jsonl").read_text() == captions  # same salt, same pseudonyms
    report = json.loads((out / "sanitize_report.json").read_text())
    assert report["options"]["text"]["salted"] is True and report["found"]["pii:EMAIL_ADDRESS"]["items"] == 12
    run = tmp_path / "run"
    proc = run_cli("train", "--config", str(CONFIGS / "demo-plain.yaml"), "--data", str(out), "--max-steps", "2",
                   "--batch-size", "2", "--out", str(run), *FAST)
    assert proc.returncode == 0, proc.stderr
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_worker_processes_give_the_same_copy_and_report(tmp_path):
    """Images spread over two processes: same files, same findings, same order as one process."""
    src = tmp_path / "in"
    src.mkdir()
    photo = skdata.astronaut()
    for i in range(17):  # ≥ MIN_PER_WORKER × 2, so the pool really starts
        y = 20 * i
        Image.fromarray(photo[y:y + 200, 100:300]).save(src / f"{i:02d}.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    results = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        options = SanitizeOptions(images=PRINTED_TEXT, text=TextOptions(enabled=False), workers=workers)
        results[workers] = sanitize(src, out, options=options, quiet=True)
        results[workers].options = None  # compare what was found, not how it was run
    one, two = ([r.to_json() for r in results[k].files] for k in (1, 2))
    assert one == two
    assert sum(f["kind"] == "face" for r in one for f in r["findings"]) >= 5
    assert _tree_digest(tmp_path / "out1") == {k: v for k, v in _tree_digest(tmp_path / "out2").items()
                                               if k != "sanitize_report.json"} | {
        "sanitize_report.json": _tree_digest(tmp_path / "out1")["sanitize_report.json"]}


def test_one_file_in_gives_a_folder_with_its_copy_and_report(tmp_path):
    table = tmp_path / "records.csv"
    table.write_text("id,note\n1,Call Jane Doe at +1 212-555-0187 or jane@example.com\n")
    out = tmp_path / "clean"
    proc = run_cli("sanitize", str(table), str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["records.csv", "sanitize_report.json"]
    cleaned = (out / "records.csv").read_text()
    assert "jane@example.com" not in cleaned and "212-555-0187" not in cleaned and cleaned.startswith("id,note\n1,")
    assert table.read_text().count("jane@example.com") == 1


def test_deep_images_keep_their_brightness(tmp_path):
    """16-bit and float images are brought to 8 bits the way the training loader does, not darkened."""
    cases = {"deep16.png": Image.fromarray(np.full((32, 32), 32768, np.uint16)),
             "float.tif": Image.fromarray(np.full((32, 32), 0.5, np.float32), mode="F")}
    for name, img in cases.items():
        img.save(tmp_path / name)
        ImageSanitizer(ImageOptions(faces=(), text=()))(tmp_path / name, tmp_path / f"out-{name}", name)
        out = np.asarray(Image.open(tmp_path / f"out-{name}"))
        assert abs(int(out.mean()) - 127) <= 1, (name, out.mean())
