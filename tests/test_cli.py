"""The command line as a user meets it: bad input is one line on stderr, exit 2, nothing half-written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CONFIGS, FAST, assert_nothing_written, assert_one_line_error, run_cli


def test_help_explains_every_command():
    top = run_cli("--help")
    assert top.returncode == 0
    for command in ("train", "generate", "base"):
        assert command in top.stdout
    train = run_cli("train", "--help")
    assert train.returncode == 0
    for flag in ("--mode", "--max-steps", "--out", "--target-epsilon", "--noise-multiplier", "--alpha",
                 "--beta", "--resume", "--set"):
        assert flag in train.stdout


def test_unknown_config_key_in_file(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text((CONFIGS / "demo-plain.yaml").read_text() + "\noptim_typo: 3\n")
    out = tmp_path / "run"
    assert_one_line_error(run_cli("train", "--config", str(cfg), "--out", str(out)), "optim_typo")
    assert_nothing_written(out)


def test_unknown_nested_key_on_command_line(tmp_path):
    out = tmp_path / "run"
    assert_one_line_error(run_cli("train", "--set", "optim.foo=1", "--out", str(out)), "optim.foo")
    assert_nothing_written(out)


def test_wrong_value_type_is_one_line(tmp_path):
    out = tmp_path / "run"
    assert_one_line_error(run_cli("train", "--set", "optim.batch_size=many", "--out", str(out)),
                           "optim.batch_size")
    assert_nothing_written(out)


def test_missing_and_malformed_config_file(tmp_path):
    out = tmp_path / "run"
    assert_one_line_error(run_cli("train", "--config", str(tmp_path / "nope.yaml"), "--out", str(out)),
                           "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("optim: [unclosed\n  lr: 1\n")
    assert_one_line_error(run_cli("train", "--config", str(bad), "--out", str(out)), "broken.yaml")
    assert_nothing_written(out)


def test_unknown_mode(tmp_path):
    out = tmp_path / "run"
    assert_one_line_error(run_cli("train", "--mode", "magic", "--out", str(out)), "mode")
    assert_nothing_written(out)


def test_dp_with_impossible_target_epsilon(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--config", str(CONFIGS / "dp-digits.yaml"), "--target-epsilon", "0.001",
                   "--max-steps", "300", "--out", str(out), *FAST)
    assert_one_line_error(proc, "0.001")
    assert_nothing_written(out)


def test_missing_image_folder(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--data", str(tmp_path / "no-such-folder"), "--out", str(out), *FAST)
    assert_one_line_error(proc, "no-such-folder")
    assert_nothing_written(out)


def test_pickle_checkpoint_as_base_is_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"w": torch.zeros(1)}, ckpt)
    out = tmp_path / "run"
    assert_one_line_error(run_cli("train", "--base", str(ckpt), "--out", str(out), *FAST), "pickle")
    assert_nothing_written(out)


def test_pickle_only_unet_folder_is_refused(tmp_path):
    from diffusers import UNet2DModel

    folder = tmp_path / "unet"
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                layers_per_block=1, norm_num_groups=4).save_pretrained(folder, safe_serialization=False)
    assert not list(folder.glob("*.safetensors"))
    out = tmp_path / "run"
    assert_one_line_error(run_cli("train", "--base", str(folder), "--out", str(out), *FAST), "pickle")
    assert_nothing_written(out)


def test_unknown_base(tmp_path):
    out = tmp_path / "run"
    assert_one_line_error(run_cli("train", "--base", "not-a-model", "--out", str(out), *FAST), "not-a-model")
    assert_nothing_written(out)


def test_generate_from_missing_run(tmp_path):
    png = tmp_path / "x.png"
    assert_one_line_error(run_cli("generate", str(tmp_path / "nothing"), "--out", str(png)), "nothing")
    assert not png.exists()


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory) -> tuple[Path, str]:
    """A 3-step plain run through the CLI: (run directory, what it printed)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli("train", "--config", str(CONFIGS / "demo-plain.yaml"), "--max-steps", "3",
                   "--batch-size", "4", "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


@pytest.fixture(scope="module")
def tiny_run(tiny_train) -> Path:
    return tiny_train[0]


def test_smoke_train_prints_privacy_and_utility(tiny_train):
    """The summary a user reads is the run's own files: mode and steps, the privacy mechanism, and the
    held-out/member losses of utility.json (adapter and base), which are finite and not all equal."""
    import json

    run, stdout = tiny_train
    for name in ("config.yaml", "splits.json", "metrics.jsonl", "privacy.json", "utility.json",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    privacy = json.loads((run / "privacy.json").read_text())
    utility = json.loads((run / "utility.json").read_text())
    lines = stdout.splitlines()
    assert lines[0].startswith("plain: 3 steps in ") and lines[0].endswith(f"→ {run}"), lines
    assert privacy["mode"] == "plain" and privacy.get("epsilon") is None
    assert lines[1] == f"  privacy: {privacy['mechanism']}", lines
    keys = ("loss_heldout", "base_loss_heldout", "loss_members", "base_loss_members")
    values = [utility[k] for k in keys]
    assert all(isinstance(v, float) and np.isfinite(v) and v > 0 for v in values), utility
    assert values[0] != values[1]  # the adapter changed the held-out loss: the figures are not the base's twice
    assert lines[2] == ("  held-out denoising loss {:.4f} (base {:.4f}), members {:.4f} (base {:.4f})"
                        .format(*values)), lines
    assert len((run / "metrics.jsonl").read_text().splitlines()) >= 1


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_generate_is_deterministic_per_seed(tiny_run, tmp_path):
    a, b, c, base = (tmp_path / f"{k}.png" for k in "abcz")
    for out, seed in ((a, 0), (b, 0), (c, 1)):
        proc = run_cli("generate", str(tiny_run), "--n", "4", "--steps", "3", "--seed", str(seed),
                       "--out", str(out))
        assert proc.returncode == 0, proc.stderr
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    image = np.asarray(Image.open(a))
    assert image.shape == (64, 64) and image.dtype == np.uint8  # 2×2 grid of 32×32 grayscale
    proc = run_cli("generate", "--n", "4", "--steps", "3", "--seed", "0", "--out", str(base))
    assert proc.returncode == 0, proc.stderr
    assert _digest(base) != _digest(a)  # the adapter changes what is sampled
    assert not list(tmp_path.glob(".*.tmp"))


def test_named_flags_win_over_set_and_replace_their_alternative():
    from privlora.config import CLEAR, load_config

    cfg = load_config(CONFIGS / "dp-digits.yaml", {"optim.max_steps": 7, "dp.target_epsilon": CLEAR,
                                                  "dp.noise_multiplier": 1.5})
    assert cfg.optim.max_steps == 7 and cfg.dp.noise_multiplier == 1.5 and cfg.dp.target_epsilon is None
    untouched = load_config(CONFIGS / "dp-digits.yaml")
    assert untouched.dp.target_epsilon == 8.0 and untouched.dp.noise_multiplier is None


def test_target_epsilon_flag_replaces_a_noise_multiplier_from_set(tmp_path):
    out = tmp_path / "run"
    # --target-epsilon drops the σ given by --set (they are alternatives), so the impossible target is
    # what gets reported, not a conflict between the two
    proc = run_cli("train", "--config", str(CONFIGS / "dp-digits.yaml"), "--target-epsilon", "0.001",
                   "--set", "dp.noise_multiplier=2", "--out", str(out), *FAST)
    assert_one_line_error(proc, "0.001")
    assert_nothing_written(out)


def test_world_size_without_a_launcher_is_refused_not_raced(tmp_path, monkeypatch):
    """WORLD_SIZE > 1 but no torchrun/accelerate environment (RANK, MASTER_ADDR, ...): a one-line error,
    not two processes that each train alone (tests/test_distributed.py runs real launches)."""
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "run"
    assert_one_line_error(run_cli("train", "--max-steps", "1", "--out", str(out), *FAST), "WORLD_SIZE=2")
    assert_nothing_written(out)
