"""Hostile and broken inputs (issue 18): each ends in one ``error:`` line, exit 2, nothing half-written.

YAML alias bombs and huge values in configs, output on a read-only or full file system (real tmpfs
mounts: a chmod'ed folder does not stop root), adapters with NaN or infinite weights.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import CONFIGS, FAST, assert_nothing_written, assert_one_line_error
from privlora.config import MAX_ALIAS_NODES, load_config, parse_assignment
from privlora.errors import UserError, file_error

#: a training run of a few seconds: 2 steps on 12 faces at rank 4
TINY = ["--config", str(CONFIGS / "demo-plain.yaml"), "--max-steps", "2", "--batch-size", "4", "--rank", "4",
        "--set", "lora.alpha=4", "--set", "data.members=0.12", "--set", "data.aux=0.08",
        "--set", "data.eval=0.08", "--set", "checkpoint_every=1", *FAST]

def _laughs(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs" document under a real key (so validation, and its error message, walk it):
    level i is a list of ``width`` aliases of level i - 1, 9⁹ = 387 million strings once expanded."""
    lines = ["lora:", "  targets:", "    - &l0 [" + ", ".join(width * ['"lol"']) + "]"]
    lines += [f"    - &l{i} [" + ", ".join(width * [f"*l{i - 1}"]) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


BILLION_LAUGHS = _laughs()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real Typer app in this process (torch is imported once per test session, not per command),
    with its exit code and stderr as a user sees them."""
    from typer.testing import CliRunner

    from privlora.cli import app

    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def _capped(limit_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return apply


# --- configs ------------------------------------------------------------------------------------

def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    """Nine levels of nine aliases: 387 million strings once expanded. Under a 3 GB address-space cap the
    old loader died with a MemoryError (exit 1); the refusal comes from the composed graph, in seconds."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS)
    out = tmp_path / "run"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "privlora", "train", "--config", str(bomb), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, preexec_fn=_capped(3 * 2**30),
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert_one_line_error(proc, "bomb.yaml", "alias")
    assert time.monotonic() - start < 60
    assert len(proc.stderr) < 300
    assert_nothing_written(out)


def test_alias_bomb_in_a_set_value_is_refused_and_small_aliases_still_load(tmp_path):
    with pytest.raises(UserError, match="alias"):
        parse_assignment("lora.targets=[" + ", ".join(BILLION_LAUGHS.splitlines()[2:]).replace("- ", "") + "]")
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("defaults: &lora {rank: 4, alpha: 4}\nlora: {<<: *lora, targets: [to_q]}\n"
                   "eval: {timesteps: &t [50, 200]}\n")
    with pytest.raises(UserError, match="unknown config key 'defaults'"):  # loaded, then validated
        load_config(cfg)
    cfg.write_text("lora: &l {rank: 4, alpha: 4}\n" + "".join(f"x{i}: *l\n" for i in range(3)))
    with pytest.raises(UserError, match="unknown config key 'x0'"):
        load_config(cfg)


@pytest.mark.parametrize("text, needle", [
    ("lora: {targets: &a [*a]}\n", "recursive"),
    ("data: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested too deeply"),
    (BILLION_LAUGHS.replace('"lol"', "{k: v}"), f"more than {MAX_ALIAS_NODES:,}"),
], ids=["recursive", "deep", "mappings"])
def test_recursive_deep_or_merge_heavy_yaml_is_one_line(tmp_path, text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(UserError, match=needle) as info:
        load_config(cfg)
    assert len(str(info.value)) < 300


def test_a_10_mb_value_in_a_wrong_field_gives_a_short_error_line(tmp_path):
    cfg = tmp_path / "big.yaml"
    cfg.write_text("seed: " + "x" * 10_000_000 + "\n" + "".join(f"typo{i}: 1\n" for i in range(1000)))
    out = tmp_path / "run"
    proc = _cli("train", "--config", str(cfg), "--out", str(out))
    assert_one_line_error(proc, "seed", "10,000,002 characters", "typo0", "more")
    assert len(proc.stderr) < 1000
    assert_nothing_written(out)


# --- output on a read-only or full file system ---------------------------------------------------

@pytest.fixture
def mount(tmp_path) -> Iterator:
    """``mount(options)`` → a fresh tmpfs with those options, unmounted afterwards (skips if not permitted)."""
    mounted: list[Path] = []

    def make(options: str) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): needs root")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_train_on_a_read_only_file_system_is_one_line(mount):
    ro = mount("ro,size=1m")
    out = ro / "run"
    proc = _cli("train", *TINY, "--out", str(out))
    assert_one_line_error(proc, "read-only", str(ro))
    assert list(ro.iterdir()) == []


def test_train_on_a_full_disk_is_one_line_and_leaves_nothing(mount):
    full = mount("size=64k")
    out = full / "run"
    proc = _cli("train", *TINY, "--out", str(out))
    assert_one_line_error(proc, "disk is full")
    assert list(full.iterdir()) == []  # no run, no .partial, no temporary


def test_checkpoint_on_a_full_disk_keeps_the_previous_one_whole(mount):
    """torch.save straight to the file raised 'unexpected pos' and left half a checkpoint.pt."""
    import torch

    from privlora.train.checkpoint import load_checkpoint, save_checkpoint

    full = mount("size=256k")
    save_checkpoint(full, {"step": 1, "w": torch.zeros(1000)})
    with pytest.raises(OSError) as info:
        save_checkpoint(full, {"step": 2, "w": torch.zeros(100_000)})
    assert "disk is full" in str(file_error(info.value))
    assert sorted(p.name for p in full.iterdir()) == ["checkpoint.pt"]
    assert load_checkpoint(full)["step"] == 1


# --- adapters with NaN or infinite weights -------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "run"
    proc = _cli("train", *TINY, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def _poisoned_copy(run: Path, dest: Path, value: float) -> Path:
    import shutil

    shutil.copytree(run, dest)
    for name in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
        file = dest / "adapter" / name
        state = load_file(str(file))
        key = sorted(k for k in state if "lora_B" in k)[0]
        state[key][0, 0] = value
        save_file(state, str(file), metadata={"format": "pt", "privlora_base": "embedded"})
    return dest


def test_generate_refuses_an_adapter_with_non_finite_weights(tiny_run, tmp_path):
    """Before: exit 0 and a PNG of NaN noise."""
    run = _poisoned_copy(tiny_run, tmp_path / "poisoned", float("nan"))
    png = tmp_path / "x.png"
    proc = _cli("generate", str(run), "--n", "1", "--steps", "1", "--out", str(png))
    assert_one_line_error(proc, "non-finite weights", "lora_B")
    assert not png.exists() and not list(tmp_path.glob(".*"))


def test_every_adapter_loader_refuses_non_finite_weights(tiny_run, tmp_path):
    """read_lora is the one door: spectrum, the Task's load_adapter (audit, unlearn, synthesize, split)."""
    from privlora.audit.spectrum import adapter_spectrum
    from privlora.tasks.loading import load_task
    from privlora.tasks.lora import LoraSpec, read_lora

    run = _poisoned_copy(tiny_run, tmp_path / "poisoned", float("nan"))
    infinite = _poisoned_copy(tiny_run, tmp_path / "infinite", float("-inf"))
    with pytest.raises(UserError, match="non-finite weights"):
        read_lora(run / "adapter")
    with pytest.raises(UserError, match="non-finite weights"):
        read_lora(infinite / "adapter")
    with pytest.raises(UserError, match="non-finite weights"):
        adapter_spectrum(run / "adapter")
    task = load_task("embedded", lora=LoraSpec(rank=4, alpha=4, targets=("to_q", "to_k", "to_v", "to_out.0",
                                                                            "conv1", "conv2")))
    task.load_adapter(tiny_run / "adapter")  # the clean one loads
    with pytest.raises(UserError, match=r"non-finite weights \(tensor base_model\.model\..*lora_B"):
        task.load_adapter(run / "adapter")


def test_generate_to_a_read_only_folder_is_one_line(tiny_run, mount):
    ro = mount("ro,size=1m")
    proc = _cli("generate", str(tiny_run), "--n", "1", "--steps", "1", "--out", str(ro / "x.png"))
    assert_one_line_error(proc, "read-only")
