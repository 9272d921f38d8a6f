"""Canaries: the DCT watermark is invisible, detectable where planted, silent elsewhere, and `privlora canary`
embeds and detects it end to end without ever touching its input or leaving half-written output."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from conftest import CONFIGS, FAST, assert_one_line_error, run_cli
from privlora.audit.canary import (
    Band,
    canary_z,
    default_band,
    embed_canary,
    embed_folder,
    fpr_of_threshold,
    psnr,
    threshold_for_fpr,
    to_gray,
)
from privlora.data.folder import load_folder, load_image
from privlora.errors import UserError

KEY = 982_451_653_117
BAND = default_band(32)


def _faces(size: int = 32, count: int = 100) -> np.ndarray:
    """lfw_subset faces as uint8 ``[N, size, size]`` (bicubic from 25×25)."""
    faces = data.lfw_subset()[:count]
    return np.stack([np.asarray(Image.fromarray((f * 255).astype(np.uint8)).resize((size, size),
                                                                                   Image.Resampling.BICUBIC))
                     for f in faces])


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    return _faces()


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_folder(folder: Path, faces: np.ndarray) -> Path:
    """16 faces captioned in metadata.jsonl (one a JPEG), an RGB JPEG with a .txt sidecar, a non-image file."""
    folder.mkdir(parents=True)
    rows = []
    for i, face in enumerate(faces[:16]):
        name = f"face{i:02d}.{'jpg' if i == 13 else 'png'}"
        Image.fromarray(face).save(folder / name, quality=95)
        rows.append(json.dumps({"file_name": name, "text": f"a face number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    Image.fromarray(np.stack([faces[20]] * 3, -1)).save(folder / "photo.jpg", quality=95)
    (folder / "photo.txt").write_text("a photo\n")
    (folder / "README").write_text("not an image\n")
    return folder


@pytest.fixture(scope="module")
def marked(tmp_path_factory, faces) -> tuple[Path, Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("canary")
    src = _write_folder(root / "clean", faces)
    before = _snapshot(src)
    out = root / "marked"
    proc = run_cli("canary", "embed", str(src), str(out), "--fraction", "0.5", "--key", str(KEY), "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert "marked 8 of 17 images" in proc.stdout
    return src, out, before


# --- the pattern ------------------------------------------------------------------------------------
def test_invisible_and_detectable_where_planted(faces):
    marks = np.stack([embed_canary(face, KEY, band=BAND) for face in faces])
    quality = [psnr(a, b) for a, b in zip(faces, marks, strict=True)]
    assert min(quality) > 35.0  # invisible: strength 3 grey levels RMS ≈ 38.6 dB
    threshold = threshold_for_fpr(0.01, BAND)
    z_marked = canary_z(marks.astype(float), KEY, band=BAND)
    z_clean = canary_z(faces.astype(float), KEY, band=BAND)
    assert np.median(z_marked) > 4.0
    assert (z_marked > threshold).mean() >= 0.9
    assert (z_clean > threshold).mean() <= 0.05
    assert abs(z_clean.mean()) < 0.35 and 0.7 < z_clean.std() < 1.3


def test_rgb_images_carry_the_same_luminance_mark(faces):
    rgb = np.stack([faces[0], faces[1], faces[2]], -1)
    mark = embed_canary(rgb, KEY, band=BAND)
    delta = mark.astype(float) - rgb.astype(float)
    assert np.abs(delta[..., 0] - delta[..., 1]).max() <= 1.0  # same change on every channel (up to rounding)
    assert canary_z(to_gray(mark), KEY, band=BAND) > 3.0


def test_clean_false_positive_rate_matches_the_analytic_one(faces):
    """Without the pattern, (z√M + M)/2 is Binomial(M, ½): over many keys on natural images, and over many
    white-noise images for one key, the share above a threshold is the analytic FPR."""
    natural = faces[:20].astype(float)
    z_keys = np.concatenate([canary_z(natural, key, band=BAND) for key in range(1000, 1400)])
    z_noise = canary_z(np.random.default_rng(0).normal(128, 40, (6000, 32, 32)), KEY, band=BAND)
    for z in (z_keys, z_noise):
        assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
        for target in (0.05, 0.01):
            tau = threshold_for_fpr(target, BAND)
            analytic = fpr_of_threshold(tau, BAND)
            assert analytic <= target
            se = np.sqrt(analytic * (1 - analytic) / z.size)
            assert abs((z > tau).mean() - analytic) < 4 * se + 1e-3, (target, (z > tau).mean(), analytic)


def test_detection_survives_mild_operations(faces, tmp_path):
    threshold = threshold_for_fpr(0.01, BAND)
    marks = np.stack([embed_canary(face, KEY, band=BAND) for face in faces[:50]]).astype(float)
    noisy = np.clip(marks + np.random.default_rng(1).normal(0, 2.0, marks.shape), 0, 255)
    assert (canary_z(noisy, KEY, band=BAND) > threshold).mean() >= 0.85
    # marked at 64 px, then resized to 32 px by the training loader: the band is in cycles per image
    big = _faces(64, 30)
    z_seen = []
    for i, face in enumerate(big):
        path = tmp_path / f"{i}.png"
        Image.fromarray(embed_canary(face, KEY, band=BAND)).save(path)
        z_seen.append(float(canary_z((load_image(path, channels=1, resolution=32)[0].numpy() + 1) * 127.5,
                                     KEY, band=BAND)))
    assert np.median(z_seen) > 3.0


def test_wrong_key_detects_nothing(faces):
    marks = np.stack([embed_canary(face, KEY, band=BAND) for face in faces]).astype(float)
    threshold = threshold_for_fpr(0.01, BAND)
    for wrong in (KEY + 1, 12345):
        z = canary_z(marks, wrong, band=BAND)
        assert abs(z.mean()) < 0.35
        assert (z > threshold).mean() <= 0.05


def test_images_too_small_for_the_band_are_refused(faces):
    with pytest.raises(UserError, match="too small"):
        embed_canary(faces[0][:20, :20], KEY, band=BAND)
    with pytest.raises(UserError, match="lo < hi"):
        Band(10, 10)


# --- privlora canary embed --------------------------------------------------------------------------
def test_embed_copies_the_folder_and_marks_a_fraction(marked):
    src, out, before = marked
    assert _snapshot(src) == before  # the input is never modified
    manifest = json.loads((out / "canary.json").read_text())
    assert manifest["images"] == 17 and manifest["marked_count"] == 8
    assert manifest["band"] == [8, 32] and manifest["strength"] == 3.0
    assert str(KEY) not in (out / "canary.json").read_text()  # only a salted hash of the key
    assert manifest["psnr"]["min"] > 35.0
    assert {"face13.jpg", "photo.jpg"} <= {e["source"] for e in manifest["marked"]}  # seed 1 marks both JPEGs
    assert not (out / "face13.jpg").exists() and not (out / "photo.jpg").exists()
    assert '"face13.png"' in (out / "metadata.jsonl").read_text()
    marked_files = {e["source"]: e for e in manifest["marked"]}
    assert len(marked_files) + len(manifest["unmarked"]) == 17
    assert all(e["z_at_resolution"] > 2.0 for e in manifest["marked"])
    for rel in manifest["unmarked"]:
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
    for rel, entry in marked_files.items():
        assert entry["file"] == str(Path(rel).with_suffix(".png"))
        assert (out / entry["file"]).read_bytes() != (src / rel).read_bytes()
    # what training reads: the same images and captions (a marked JPEG became PNG, captions followed it)
    images, _ = load_folder(src, channels=1, resolution=32)
    copy, report = load_folder(out, channels=1, resolution=32)
    stems = {Path(i).stem: c for i, c in zip(images.ids, images.captions, strict=True)}
    assert {Path(i).stem: c for i, c in zip(copy.ids, copy.captions, strict=True)} == stems
    assert not report.uncaptioned
    assert (out / "README").read_text() == "not an image\n"


def test_embed_bad_input_is_one_line_and_writes_nothing(tmp_path, marked, faces):
    src, _, _ = marked
    assert_one_line_error(run_cli("canary", "embed", str(tmp_path / "missing"), str(tmp_path / "o"),
                                  "--key", "1"), "does not exist")
    broken = _write_folder(tmp_path / "broken", faces)
    (broken / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    before = _snapshot(broken)
    out = tmp_path / "broken-marked"
    assert_one_line_error(run_cli("canary", "embed", str(broken), str(out), "--key", "1"), "zz_corrupt.png")
    assert _snapshot(broken) == before
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["broken"]  # no temporary left over
    with pytest.raises(UserError, match="already exists"):
        embed_folder(src, broken, key=1)
    with pytest.raises(UserError, match="outside"):
        embed_folder(src, src / "inside", key=1)


# --- privlora canary detect -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_on_marked(tmp_path_factory, marked) -> Path:
    _, out, _ = marked
    run = tmp_path_factory.mktemp("canary-run") / "run"
    proc = run_cli("train", "--config", str(CONFIGS / "demo-plain.yaml"), "--data", str(out), "--max-steps", "3",
                   "--batch-size", "4", "--out", str(run), *FAST)
    assert proc.returncode == 0, proc.stderr
    return run


def test_detect_on_a_tiny_real_run(run_on_marked, marked):
    _, out, _ = marked
    run = run_on_marked
    (run / "audit").mkdir(exist_ok=True)
    (run / "audit" / "results.json").write_text("{}\n")  # another audit's file must survive
    proc = run_cli("canary", "detect", "--run", str(run), "--key", str(KEY), "--manifest", str(out / "canary.json"),
                   "--n", "8", "--steps", "4")
    assert proc.returncode == 0, proc.stderr
    assert "canary detected in" in proc.stdout
    result = json.loads((run / "audit" / "canary.json").read_text())
    assert (run / "audit" / "results.json").read_text() == "{}\n"
    assert sorted(p.name for p in (run / "audit").iterdir()) == ["canary.json", "results.json"]
    assert result["n"] == 8 and result["target_fpr"] == 0.01 and result["trained_on_marked_folder"] is True
    assert result["fpr_clean"] <= 0.01 and result["fpr_analytic"] <= 0.01
    assert result["threshold"] >= max(result["z_clean"]["values"])  # 8 clean images allow no false positive
    assert result["threshold"] >= result["threshold_analytic"]
    assert 0 <= result["detection_rate"] <= 1 and result["detected"] == sum(
        z > result["threshold"] for z in result["z_adapter"]["values"])
    assert len(result["z_adapter"]["values"]) == len(result["z_clean"]["values"]) == 8
    assert result["z_adapter"]["values"] != result["z_clean"]["values"]  # the adapter changes the generations
    assert result["image_size"] == [32, 32] and result["band"] == [8, 32]
    # 3 steps cannot teach the mark (300 steps find it in 3 of 128 generations, README): the detector stays silent
    assert result["detected"] == 0 and result["fpr_clean"] == 0.0


def test_detector_fires_on_canaried_generations_and_not_on_clean_ones(run_on_marked, marked):
    """The detector of `canary detect` on the run's real generations: each one marked afterwards (what a model
    that reproduces the canary would emit) is detected, the same generations unmarked — or marked with another
    key — are not; a detector that never (or always) fires fails here."""
    from privlora.audit.canary import _generate, _load_run, decide, read_manifest

    _, out, _ = marked
    band = Band(*read_manifest(out / "canary.json")["band"])
    _, task = _load_run(run_on_marked, "cpu")
    gray = _generate(task, 16, seed=0, steps=4, prompts=None, batch_size=16)
    other = _generate(task, 16, seed=1, steps=4, prompts=None, batch_size=16)
    as_png = np.clip(np.rint(gray), 0, 255).astype(np.uint8)  # what a saved generation holds
    canaried = np.stack([embed_canary(g, KEY, band=band) for g in as_png]).astype(float)
    forged = np.stack([embed_canary(g, KEY + 1, band=band) for g in as_png]).astype(float)
    z_clean = canary_z(gray, KEY, band=band)
    fires = decide(canary_z(canaried, KEY, band=band), z_clean, fpr=0.01, band=band)
    assert fires["detection_rate"] >= 0.9 and fires["fpr_clean"] == 0.0, fires
    assert fires["p_value_binomial"] < 1e-6 and fires["paired"]["p_value"] < 1e-3
    for z in (canary_z(other, KEY, band=band), canary_z(forged, KEY, band=band)):
        silent = decide(z, z_clean, fpr=0.01, band=band)
        assert silent["detected"] <= 1 and silent["p_value_binomial"] > 0.01, silent


def test_detect_bad_input(run_on_marked, marked, tmp_path):
    _, out, _ = marked
    manifest = str(out / "canary.json")
    assert_one_line_error(run_cli("canary", "detect", "--run", str(run_on_marked), "--key", str(KEY + 1),
                                  "--manifest", manifest), "not the key")
    assert_one_line_error(run_cli("canary", "detect", "--run", str(tmp_path / "nope"), "--key", str(KEY),
                                  "--manifest", manifest), "does not exist")
    assert_one_line_error(run_cli("canary", "detect", "--run", str(run_on_marked), "--key", str(KEY),
                                  "--manifest", str(tmp_path / "missing.json")), "canary manifest")
