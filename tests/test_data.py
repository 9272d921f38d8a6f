"""Image folders (modes, corrupt files, captions), built-in demo data and member/non-member splits."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, assert_one_line_error, run_cli
from privlora.data.demo import digits_private, faces, public
from privlora.data.folder import load_folder, load_image
from privlora.data.imageset import ImageSet
from privlora.data.splits import make_splits
from privlora.errors import UserError

R = 16  # load at the files' own size, so no resampling blurs the value checks


def _gradient(size: int = R) -> np.ndarray:
    """A uint8 horizontal ramp 0..255 with a vertical ripple: every pixel value is known exactly."""
    ramp = np.linspace(0, 255, size)[None, :].repeat(size, 0)
    return np.clip(ramp + 20 * np.sin(np.arange(size))[:, None], 0, 255).round().astype(np.uint8)


def _load(path: Path, channels: int) -> torch.Tensor:
    return load_image(path, channels=channels, resolution=R)


def _assert_range(t: torch.Tensor) -> None:
    assert t.dtype == torch.float32
    assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0


# --- image modes ---------------------------------------------------------------------------------

def test_grayscale_loads_as_one_or_three_channels(tmp_path):
    gray = _gradient()
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    one = _load(tmp_path / "g.png", 1)
    three = _load(tmp_path / "g.png", 3)
    assert one.shape == (1, R, R) and three.shape == (3, R, R)
    _assert_range(one)
    expected = torch.from_numpy(gray.astype(np.float32) / 127.5 - 1)
    torch.testing.assert_close(one[0], expected, atol=1e-6, rtol=0)
    for c in range(3):
        torch.testing.assert_close(three[c], expected, atol=1e-6, rtol=0)
    assert float(one.min()) == -1.0 and float(one.max()) == 1.0  # the full range is used


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((R, R, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red …
    rgba[:, : R // 2, 3] = 255  # … opaque on the left half, fully transparent on the right
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    t = _load(tmp_path / "a.png", 3)
    assert t.shape == (3, R, R)
    _assert_range(t)
    left, right = t[:, :, : R // 2], t[:, :, R // 2:]
    torch.testing.assert_close(left[0], torch.ones_like(left[0]))
    torch.testing.assert_close(left[1:], -torch.ones_like(left[1:]))
    torch.testing.assert_close(right, torch.ones_like(right))  # transparent → white, not black
    assert _load(tmp_path / "a.png", 1).shape == (1, R, R)


def test_palette_image(tmp_path):
    img = Image.new("P", (R, R))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    arr = np.zeros((R, R), dtype=np.uint8)
    arr[R // 2:] = 1
    img.putdata(arr.flatten().tolist())
    img.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as check:
        assert check.mode == "P"
    t = _load(tmp_path / "p.png", 3)
    assert t.shape == (3, R, R)
    _assert_range(t)
    torch.testing.assert_close(t[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))  # red
    torch.testing.assert_close(t[:, -1, 0], torch.tensor([-1.0, -1.0, 1.0]))  # blue


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (R, R))
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    arr = np.zeros((R, R), dtype=np.uint8)
    arr[:, R // 2:] = 1
    img.putdata(arr.flatten().tolist())
    img.info["transparency"] = 0
    img.save(tmp_path / "pt.png", transparency=0)
    t = _load(tmp_path / "pt.png", 3)
    torch.testing.assert_close(t[:, 0, 0], torch.ones(3))  # transparent black → white
    torch.testing.assert_close(t[:, 0, -1], torch.tensor([-1.0, 1.0, -1.0]))


def test_16bit_png_keeps_its_contrast(tmp_path):
    ramp16 = (np.linspace(0, 65535, R)[None, :].repeat(R, 0)).round().astype(np.uint16)
    Image.fromarray(ramp16).save(tmp_path / "d.png")
    with Image.open(tmp_path / "d.png") as check:
        assert check.mode.startswith("I")
    t = _load(tmp_path / "d.png", 1)
    assert t.shape == (1, R, R)
    _assert_range(t)
    # independent conversion: scale the 16-bit range to [-1, 1] directly (8-bit quantisation allowed)
    expected = torch.from_numpy(ramp16.astype(np.float32) / 65535.0 * 2 - 1)
    torch.testing.assert_close(t[0], expected, atol=2.5 / 255, rtol=0)
    assert float(t.max() - t.min()) > 1.9  # not clipped to white nor crushed to black
    three = _load(tmp_path / "d.png", 3)
    assert three.shape == (3, R, R)
    torch.testing.assert_close(three[1], t[0])


def test_dark_16bit_png_stays_dark(tmp_path):
    """A 16-bit image whose values all fit in 8 bits is nearly black, not stretched to full contrast."""
    dark = (np.arange(R * R).reshape(R, R) % 256).astype(np.uint16)  # 0..255 of 65535
    Image.fromarray(dark).save(tmp_path / "dark.png")
    with Image.open(tmp_path / "dark.png") as check:
        assert check.mode == "I;16"
    t = _load(tmp_path / "dark.png", 1)
    torch.testing.assert_close(t[0], torch.from_numpy(dark.astype(np.float32) / 65535.0 * 2 - 1),
                               atol=2.5 / 255, rtol=0)
    assert float(t.max()) < -0.98


def test_resizes_and_center_crops_to_resolution(tmp_path):
    Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    assert load_image(tmp_path / "wide.png", channels=3, resolution=8).shape == (3, 8, 8)
    assert load_image(tmp_path / "wide.png", channels=3, resolution=8, center_crop=False).shape == (3, 8, 8)


# --- folders: corrupt files, captions --------------------------------------------------------------

def _good_images(folder: Path, n: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (R, R, 3), dtype=np.uint8)).save(folder / f"ok{i}.png")


def _corrupt_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_gradient(64)).save(folder / "full.png")
    data = (folder / "full.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "full.png").unlink()
    (folder / "fake.jpg").write_text("this is not a jpeg at all\n")
    (folder / "notes.csv").write_text("a,b\n1,2\n")


def test_corrupt_and_non_image_files_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "imgs"
    _good_images(folder)
    _corrupt_files(folder)
    with pytest.warns(UserWarning) as record:
        data, report = load_folder(folder, channels=3, resolution=R, default_caption="x")
    assert len(data) == 3 and report.loaded == 3
    assert set(report.skipped) == {"truncated.png", "fake.jpg", "notes.csv"}
    messages = " ".join(str(w.message) for w in record)
    for name in ("truncated.png", "fake.jpg", "notes.csv"):
        assert name in messages
    assert sorted(data.ids) == ["ok0.png", "ok1.png", "ok2.png"]
    _assert_range(data.pixels)


@pytest.mark.parametrize("case", ["missing", "file", "empty", "only-corrupt"])
def test_unusable_folder_is_a_user_error(tmp_path, case):
    folder = tmp_path / "imgs"
    if case == "file":
        folder.write_text("x")
    elif case == "empty":
        folder.mkdir()
    elif case == "only-corrupt":
        _corrupt_files(folder)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match="imgs") as err:
            load_folder(folder, channels=3, resolution=R)
    assert not record  # the one error says it all; no warning per file before it
    if case == "only-corrupt":
        assert "3 files skipped" in str(err.value)



def test_cli_only_corrupt_folder(tmp_path):
    folder = tmp_path / "corrupt"
    _corrupt_files(folder)
    out = tmp_path / "run"
    proc = run_cli("train", "--data", str(folder), "--max-steps", "1", "--out", str(out), *FAST)
    assert_one_line_error(proc, "corrupt")
    assert not out.exists() and not out.with_name("run.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt"]


def test_captions_from_metadata_jsonl(tmp_path):
    folder = tmp_path / "imgs"
    _good_images(folder)
    (folder / "sub").mkdir()
    Image.fromarray(_gradient()).save(folder / "sub" / "deep.png")
    rows = [{"file_name": "ok0.png", "text": "a red car"}, {"file_name": "ok1.png", "text": "ünïcödé ✓"},
            {"file_name": "sub/deep.png", "text": "nested"}]
    lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    (folder / "metadata.jsonl").write_text(lines + "\n\n", encoding="utf-8")
    data, report = load_folder(folder, channels=3, resolution=R, default_caption=None)
    captions = dict(zip(data.ids, data.captions, strict=True))
    assert captions == {"ok0.png": "a red car", "ok1.png": "ünïcödé ✓", "ok2.png": "",
                        "sub/deep.png": "nested"}
    assert report.uncaptioned == ["ok2.png"]
    assert not report.skipped  # metadata.jsonl itself is not reported as a skipped file


def test_captions_from_txt_sidecars(tmp_path):
    folder = tmp_path / "imgs"
    _good_images(folder)
    (folder / "ok0.txt").write_text("  a cat on a mat \n", encoding="utf-8")
    (folder / "ok1.txt").write_text("a dog", encoding="utf-8")
    data, report = load_folder(folder, channels=3, resolution=R, default_caption="fallback")
    captions = dict(zip(data.ids, data.captions, strict=True))
    assert captions == {"ok0.png": "a cat on a mat", "ok1.png": "a dog", "ok2.png": "fallback"}
    assert report.uncaptioned == [] and not report.skipped


def test_metadata_in_subfolders_with_bom_and_dot_slash_names(tmp_path):
    """Hugging Face imagefolder layout: each ``metadata.jsonl`` names files relative to its own folder;
    files written by Windows tools start with a byte-order mark and may say ``./a.png``."""
    folder = tmp_path / "imgs"
    _good_images(folder / "train", 2)
    _good_images(folder, 1)
    (folder / "train" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "./ok0.png", "text": "first"}) + "\n"
        + json.dumps({"file_name": "ok1.png", "text": "second"}) + "\n", encoding="utf-8-sig")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "ok0.png", "text": "top"}) + "\n",
                                           encoding="utf-8-sig")
    data, report = load_folder(folder, channels=3, resolution=R)
    assert dict(zip(data.ids, data.captions, strict=True)) == {
        "ok0.png": "top", "train/ok0.png": "first", "train/ok1.png": "second"}
    assert report.uncaptioned == [] and not report.skipped


def test_caption_file_that_is_not_utf8_is_a_user_error(tmp_path):
    folder = tmp_path / "imgs"
    _good_images(folder, 1)
    (folder / "ok0.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match=r"ok0\.txt.*UTF-8"):
        load_folder(folder, channels=3, resolution=R)
    (folder / "ok0.txt").unlink()
    (folder / "metadata.jsonl").write_bytes(b'{"file_name": "ok0.png", "text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"metadata\.jsonl.*UTF-8"):
        load_folder(folder, channels=3, resolution=R)


def test_metadata_wins_over_sidecar_and_bad_metadata_is_a_user_error(tmp_path):
    folder = tmp_path / "imgs"
    _good_images(folder, 1)
    (folder / "ok0.txt").write_text("sidecar")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "ok0.png", "text": "meta"}) + "\n")
    data, _ = load_folder(folder, channels=3, resolution=R)
    assert data.captions == ["meta"]
    (folder / "metadata.jsonl").write_text('{"text": "no file name"}\n')
    with pytest.raises(UserError, match="metadata.jsonl:1"):
        load_folder(folder, channels=3, resolution=R)


# --- demo data -----------------------------------------------------------------------------------

def _digests(images: ImageSet) -> set[str]:
    return {hashlib.sha256(p.numpy().tobytes()).hexdigest() for p in images.pixels}


@pytest.fixture(scope="module")
def demo_sets() -> dict[str, ImageSet]:
    return {"faces": faces(R), "digits": digits_private(R), "public": public(R)}


def test_demo_sizes(demo_sets):
    assert len(demo_sets["faces"]) == 100
    assert len(demo_sets["digits"]) == 896
    for name, data in demo_sets.items():
        assert data.pixels.shape[1:] == (1, R, R), name
        _assert_range(data.pixels)
        assert len(set(data.ids)) == len(data), name
    assert set(demo_sets["digits"].captions) == {f"the digit {d}" for d in range(5, 10)}


def test_public_never_contains_a_private_image(demo_sets):
    public_set = _digests(demo_sets["public"])
    assert len(demo_sets["public"]) > 1000
    for name in ("faces", "digits"):
        private = _digests(demo_sets[name])
        assert len(private) > 0.9 * len(demo_sets[name])
        assert not public_set & private, name


def test_public_is_reproducible():
    a, b = public(8, crops_per_photo=2, seed=3), public(8, crops_per_photo=2, seed=3)
    assert torch.equal(a.pixels, b.pixels)
    assert not torch.equal(a.pixels, public(8, crops_per_photo=2, seed=4).pixels)


# --- splits --------------------------------------------------------------------------------------

def _dummy(n: int) -> ImageSet:
    return ImageSet(ids=[f"s{i:03d}" for i in range(n)], pixels=torch.zeros(n, 1, 2, 2), captions=[""] * n)


@pytest.mark.parametrize(("n", "fractions"), [(100, (0.32, 0.32, 0.36)), (50, (0.5, 0.2, 0.3)),
                                              (8, (0.5, 0.25, 0.25)), (30, (0.6, 0.0, 0.4))])
def test_splits_are_disjoint_and_sized(n, fractions):
    members, aux, eval_ = fractions
    s = make_splits(_dummy(n), members=members, aux=aux, eval=eval_, seed=0, source="x")
    parts = [set(s.members), set(s.aux), set(s.eval)]
    assert sum(len(p) for p in parts) == len(set().union(*parts))  # disjoint, no duplicates
    assert set().union(*parts) <= set(_dummy(n).ids)
    assert len(s.members) == round(members * n)
    assert len(s.aux) == round(aux * n)
    assert len(s.eval) == min(round(eval_ * n), n - len(s.members) - len(s.aux))
    assert len(s.members) + len(s.aux) + len(s.eval) <= n


def test_splits_reproducible_from_seed_and_round_trip(tmp_path):
    data = _dummy(60)
    a = make_splits(data, members=0.4, aux=0.3, eval=0.3, seed=7, source="x")
    b = make_splits(data, members=0.4, aux=0.3, eval=0.3, seed=7, source="x")
    c = make_splits(data, members=0.4, aux=0.3, eval=0.3, seed=8, source="x")
    assert a == b
    assert set(a.members) != set(c.members)
    a.save(tmp_path)
    from privlora.data.splits import Splits

    assert Splits.load(tmp_path) == a


def test_splits_too_few_images_is_a_user_error():
    with pytest.raises(UserError):
        make_splits(_dummy(3), members=0.9, aux=0.9, eval=0.0, seed=0, source="x")
