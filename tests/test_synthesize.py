"""``privlora synthesize``: a replacement image folder from a run's adapter, and its membership audit.

Real runs only: a DP run of the demo recipe (2 steps) and a plain run on a tiny SD pipeline built from
config (with a tiny ControlNet made by ``ControlNetModel.from_unet``), both trained by ``train()``.
The CLI is exercised in-process through Typer's runner (a subprocess would pay the torch import again).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from conftest import CONFIGS
from privlora.data.folder import load_folder
from privlora.data.imageset import ImageSet
from privlora.errors import UserError
from privlora.synthesize import nearest_synthetic_audit, synthesize
from test_sd import _image_folder, _one_thread, _tiny_pipeline

EVAL_FAST = {"eval.timesteps": [200], "eval.samples": 0, "quiet": True}


@pytest.fixture(scope="module", autouse=True)
def _single_threaded():
    with _one_thread():
        yield


def _cli(*args: str):
    """The real Typer app in this process: exit code, stdout and stderr as a user sees them."""
    from typer.testing import CliRunner

    from privlora.cli import app

    return CliRunner().invoke(app, list(args))


def _assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), list(out.parent.iterdir())


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory) -> Path:
    from privlora.config import CLEAR, load_config
    from privlora.train.loop import train

    out = tmp_path_factory.mktemp("dp") / "run"
    # a fixed σ skips the accountant's search for σ (most of a 2-step DP run's time); ε is still computed
    train(load_config(CONFIGS / "demo-dp.yaml", {"optim.max_steps": 2, "out": str(out), "dp.target_epsilon": CLEAR,
                                                 "dp.noise_multiplier": 1.0, **EVAL_FAST}))
    return out


@pytest.fixture(scope="module")
def synthetic(dp_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "dp"
    synthesize(dp_run, 6, out, seed=3, steps=3, batch_size=4, quiet=True)
    return out


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


# --- the output folder ---------------------------------------------------------------------------------
def test_output_is_an_image_folder_with_the_sources_guarantee(dp_run, synthetic):
    images, report = load_folder(synthetic, channels=1, resolution=32)
    assert len(images) == 6 and not report.skipped and not report.uncaptioned  # sidecars are not "skipped"
    source = json.loads((dp_run / "privacy.json").read_text())
    privacy = json.loads((synthetic / "privacy.json").read_text())
    assert privacy["epsilon"] == source["epsilon"] and privacy["delta"] == source["delta"]
    assert privacy["mechanism"] == source["mechanism"] and privacy["post_processing"] is True
    assert privacy["derived_from"] == str(dp_run) and "same (epsilon, delta)" in privacy["note"]
    manifest = json.loads((synthetic / "synthesize.json").read_text())
    weights = dp_run / "adapter" / "adapter_model.safetensors"
    assert manifest["source"]["adapter_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (manifest["n"], manifest["seed"], manifest["steps"], manifest["sampler"]) == (6, 3, 3, "pixel")
    assert images.pixels.std() > 0.05  # images, not blank tiles


def test_output_trains_with_privlora_train(synthetic, tmp_path):
    out = tmp_path / "trained"
    result = _cli("train", "--data", str(synthetic), "--max-steps", "2", "--batch-size", "2", "--out", str(out),
                  "--set", "data.members=1.0", "--set", "data.aux=0", "--set", "data.eval=0",
                  "--set", "eval.timesteps=[200]", "--set", "eval.samples=0", "-q")
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    splits = json.loads((out / "splits.json").read_text())
    assert sorted(splits["members"]) == [f"{i:05d}.png" for i in range(6)]


def test_same_seed_same_images_whatever_the_batch_other_seed_differs(dp_run, synthetic, tmp_path):
    synthesize(dp_run, 6, tmp_path / "again", seed=3, steps=3, batch_size=5, quiet=True)
    assert _pngs(tmp_path / "again") == _pngs(synthetic)
    synthesize(dp_run, 6, tmp_path / "other", seed=4, steps=3, batch_size=4, quiet=True)
    other = _pngs(tmp_path / "other")
    assert all(other[name] != data for name, data in _pngs(synthetic).items())


def test_non_dp_source_has_no_guarantee(dp_run, tmp_path):
    plain = tmp_path / "plain-run"
    shutil.copytree(dp_run, plain)
    (plain / "privacy.json").write_text(json.dumps({"mechanism": "none", "mode": "plain"}))
    with pytest.warns(UserWarning, match="NO privacy guarantee"):
        result = synthesize(plain, 2, tmp_path / "out", steps=2, quiet=True)
    privacy = json.loads((tmp_path / "out" / "privacy.json").read_text())
    assert privacy["mechanism"] == "none" and privacy["epsilon"] is None and privacy["source_mode"] == "plain"
    assert result["privacy"] == privacy


# --- the membership / extraction audit ------------------------------------------------------------------
def _tiled_l2_brute(a: np.ndarray, b: np.ndarray, tiles: int = 4) -> float:
    """Carlini's tiled ℓ2 for one pair, written out with numpy array_split tiles on the [0, 1] scale."""
    a, b = (a + 1) / 2, (b + 1) / 2
    rows = np.array_split(np.arange(a.shape[1]), tiles)
    cols = np.array_split(np.arange(a.shape[2]), tiles)
    return max(math.sqrt(np.mean((a[:, r][:, :, c] - b[:, r][:, :, c]) ** 2)) for r in rows for c in cols)


def _real_splits(run: Path) -> tuple[ImageSet, ImageSet]:
    from privlora.audit.runner import load_run

    loaded = load_run(run)
    return loaded.members, loaded.held_out


def test_membership_audit_matches_brute_force_and_sklearn(dp_run, synthetic):
    members, nonmembers = _real_splits(dp_run)
    synth, _ = load_folder(synthetic, channels=1, resolution=32)
    result = nearest_synthetic_audit(synth, members, nonmembers, neighbours=5)
    real = np.concatenate([members.pixels.numpy(), nonmembers.pixels.numpy()]).astype(np.float64)
    s = synth.pixels.numpy().astype(np.float64)
    d = np.array([[_tiled_l2_brute(x, y) for y in s] for x in real])
    labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    dcr = d.min(1)
    np.testing.assert_allclose(result["scores"]["dcr"], dcr, rtol=1e-5, atol=1e-6)
    assert result["dcr"]["auc"] == pytest.approx(roc_auc_score(labels, -dcr), abs=1e-6)
    denominator = 0.5 * np.sort(d.T, axis=1)[:, :5].mean(1)  # α = ½, 5 nearest pool images of each x̂
    per_record = (d / denominator[None, :]).min(1)
    np.testing.assert_allclose(result["scores"]["normalised"], per_record, rtol=1e-4)
    assert result["normalised"]["auc"] == pytest.approx(roc_auc_score(labels, -per_record), abs=1e-6)
    nearest = d.argmin(0)
    flagged = d.min(0) / denominator <= 1.0
    assert result["extraction"]["flagged"] == int(flagged.sum())
    assert result["extraction"]["flagged_on_members"] == int((flagged & (nearest < len(members))).sum())


def test_copies_of_members_are_caught(dp_run):
    members, nonmembers = _real_splits(dp_run)
    copies = members.pixels[:8].clone()  # a "synthetic" set that leaks 8 members verbatim
    result = nearest_synthetic_audit(copies, members, nonmembers)
    assert result["extraction"]["members_copied"] == 8
    assert result["extraction"]["flagged_on_members"] == 8 and result["extraction"]["flagged_on_nonmembers"] == 0
    # 8 members at distance 0, every other image further away: AUC = P(member ranks above non-member)
    assert result["dcr"]["auc"] > 0.6
    with pytest.raises(UserError, match="same channels"):
        nearest_synthetic_audit(copies[:, :, :16, :16], members, nonmembers)


# --- Stable Diffusion and ControlNet ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> dict[str, Path]:
    """A plain 1-step run on the tiny SD pipeline, a tiny ControlNet (safetensors and pickle) and
    two different condition images."""
    from diffusers import ControlNetModel

    from privlora.config import load_config
    from privlora.train.loop import train

    tmp = tmp_path_factory.mktemp("sd")
    pipe = _tiny_pipeline(tmp)
    pipe.save_pretrained(tmp / "pipe", safe_serialization=True)
    images = _image_folder(tmp / "images", captions=True)
    train(load_config(None, {"base": str(tmp / "pipe"), "data.source": str(images), "mode": "plain",
                             "optim.max_steps": 1, "optim.batch_size": 2, "data.members": 0.5, "data.aux": 0.25,
                             "data.eval": 0.25, "out": str(tmp / "run"), **EVAL_FAST}))
    torch.manual_seed(1)
    net = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():  # zero convolutions make an untrained ControlNet a no-op; give them weights
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0, 0.5)
    net.save_pretrained(tmp / "controlnet", safe_serialization=True)
    pickled = tmp / "controlnet-pickle"
    pickled.mkdir()
    shutil.copy(tmp / "controlnet" / "config.json", pickled)
    torch.save(net.state_dict(), pickled / "diffusion_pytorch_model.bin")
    conds = {}
    for name, box in (("a", (2, 2, 8, 14)), ("b", (9, 3, 14, 8))):
        folder = tmp / f"cond-{name}"
        folder.mkdir()
        img = np.zeros((16, 16, 3), np.uint8)
        img[box[1]:box[3], box[0]:box[2]] = 255
        Image.fromarray(img).save(folder / "c.png")
        conds[name] = folder
    return {"run": tmp / "run", "controlnet": tmp / "controlnet", "pickle": pickled, "images": images,
            "cond_a": conds["a"], "cond_b": conds["b"], "tmp": tmp}


def test_sd_path_writes_prompted_rgb_images(sd, tmp_path):
    result = synthesize(sd["run"], 3, tmp_path / "out", steps=2, prompt=["a red cube", "a blue ball"], quiet=True)
    images, report = load_folder(tmp_path / "out", channels=3, resolution=16)
    assert len(images) == 3 and images.captions == ["a red cube", "a blue ball", "a red cube"]
    assert result["sampler"] == "sd" and json.loads((tmp_path / "out" / "privacy.json").read_text())[
        "mechanism"] == "none"
    with pytest.raises(UserError, match="give --prompt"):
        synthesize(sd["run"], 1, tmp_path / "none", steps=1, quiet=True)
    _assert_nothing_left(tmp_path / "none")


def test_controlnet_changes_with_the_condition(sd, tmp_path):
    common = {"steps": 2, "prompt": "a photo", "controlnet": sd["controlnet"], "quiet": True}
    synthesize(sd["run"], 2, tmp_path / "a", conditions=sd["cond_a"], **common)
    synthesize(sd["run"], 2, tmp_path / "a2", conditions=sd["cond_a"], **common)
    synthesize(sd["run"], 2, tmp_path / "b", conditions=sd["cond_b"], **common)
    assert _pngs(tmp_path / "a") == _pngs(tmp_path / "a2")
    a, b = (load_folder(tmp_path / k, channels=3, resolution=16)[0].pixels for k in ("a", "b"))
    assert (a - b).abs().mean() > 1e-3
    privacy = json.loads((tmp_path / "a" / "privacy.json").read_text())
    assert privacy["post_processing"] is False and privacy["conditioning"]["covered_by_epsilon"] is False
    assert "edge maps of private images" in privacy["conditioning"]["note"]


def test_edges_from_is_opencv_canny(sd, tmp_path):
    common = {"steps": 2, "prompt": "a photo", "controlnet": sd["controlnet"], "quiet": True}
    synthesize(sd["run"], 2, tmp_path / "edges", edges_from=sd["images"], **common)
    # the same edges computed here with OpenCV directly, given as a conditions folder
    edges = tmp_path / "edge-maps"
    edges.mkdir()
    gray, _ = load_folder(sd["images"], channels=1, resolution=16)
    for i, g in enumerate(gray.pixels[:, 0].numpy()):
        u8 = ((g.clip(-1, 1) + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(cv2.Canny(u8, 100, 200)).convert("RGB").save(edges / f"{i:02d}.png")
    synthesize(sd["run"], 2, tmp_path / "given", conditions=edges, **common)
    assert _pngs(tmp_path / "edges") == _pngs(tmp_path / "given")
    manifest = json.loads((tmp_path / "edges" / "synthesize.json").read_text())
    assert manifest["conditioning"]["conditions"].startswith("canny") and manifest["conditioning"]["count"] == 8


# --- bad input and failures -----------------------------------------------------------------------------
def test_bad_input_is_one_line(dp_run, sd, tmp_path):
    out = tmp_path / "out"
    cases = [
        ((str(tmp_path / "missing"), "--out", str(out)), ("does not exist",)),
        ((str(dp_run), "--out", str(dp_run)), ("already exists",)),
        ((str(dp_run), "--out", str(out), "--n", "0"), ("--n must be at least 1",)),
        ((str(dp_run), "--out", str(out), "--controlnet", str(sd["controlnet"]), "--conditions",
          str(sd["cond_a"])), ("stable diffusion",)),
        ((str(sd["run"]), "--out", str(out), "--prompt", "x", "--controlnet", str(sd["pickle"]), "--conditions",
          str(sd["cond_a"])), ("pickle",)),
        ((str(sd["run"]), "--out", str(out), "--prompt", "x", "--conditions", str(sd["cond_a"])),
         ("need --controlnet",)),
        ((str(sd["run"]), "--out", str(out), "--prompt", "x", "--controlnet", str(sd["controlnet"])),
         ("--conditions",)),
    ]
    for args, needles in cases:
        _assert_one_line_error(_cli("synthesize", *args, "--steps", "1", "-q"), *needles)
        _assert_nothing_left(out)


def test_cli_writes_the_folder_says_the_guarantee_and_audits_beside_the_run(dp_run, tmp_path):
    from privlora.synthesize.measure import audit_synthetic

    out = tmp_path / "cli"
    result = _cli("synthesize", str(dp_run), "--n", "3", "--steps", "2", "--out", str(out), "--audit", "-q")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    eps = json.loads((dp_run / "privacy.json").read_text())["epsilon"]
    assert f"ε={eps:.3g}" in result.stdout and len(list(out.glob("*.png"))) == 3
    report = json.loads((dp_run / "audit" / "synthetic-cli.json").read_text())
    assert report["dcr"]["auc"] == audit_synthetic(dp_run, out)["dcr"]["auc"]
    assert f"AUC {report['dcr']['auc']:.3f}" in result.stdout
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".png") == [
        "metadata.jsonl", "privacy.json", "synthesize.json"]  # no member ids in the shareable folder


def test_failure_midway_leaves_nothing(dp_run, tmp_path, monkeypatch):
    import privlora.synthesize.core as core

    calls = {"n": 0}
    real = core.grid_image

    def disk_full(*args, **kwargs):  # the third image cannot be written
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "grid_image", disk_full)
    with pytest.raises(OSError):
        synthesize(dp_run, 4, tmp_path / "out", steps=1, batch_size=2, quiet=True)
    _assert_nothing_left(tmp_path / "out")
