"""The SD-1.5-size benchmarks (``benchmarks/sd15_step.py``, ``benchmarks/sd15_gpu.py``) in ``--tiny`` mode:
they run end to end through privlora's own training step and write the JSON the docs describe.

Every config is a fresh interpreter (torch + diffusers import, ~10-20 s on a loaded 2-core machine), so
the fast tests run one measured config each; all modes together are the slow tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

STEP_RATIOS = {"lora_vs_full_step", "lora_vs_full_memory", "smp_vs_plain_step", "dp_vs_plain_step",
               "dp_vs_plain_memory"}


def _bench(script: str, out: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--steps", "1",
                           "--warmup", "0", "--out", str(out), *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def _assert_measured(row: dict) -> None:
    assert "error" not in row, row
    assert row["median_step_s"] > 0 and row["samples_per_s"] > 0 and row["peak_rss_mb"] > 100
    assert row["trainable_params"] > 0


def test_sd15_step_tiny_json_shape(tmp_path):
    result = _bench("sd15_step.py", tmp_path / "step.json", "--configs", "lora-fp32,dp-fp32-gc")
    assert result["benchmark"] == "sd15_step" and result["model"] == "tiny" and result["batch_size"] >= 2
    assert set(result["ratios"]) == STEP_RATIOS
    rows = result["configs"]
    _assert_measured(rows["lora-fp32"])
    assert rows["lora-fp32"]["mode"] == "lora" and rows["lora-fp32"]["cuda_max_memory_allocated_mb"] is None
    assert "gradient_checkpointing" in rows["dp-fp32-gc"]["skipped"]  # refused by privlora's config
    assert result["ratios"]["dp_vs_plain_step"] is None  # DP did not run in this setting


@pytest.mark.slow
def test_sd15_step_tiny_all_modes(tmp_path):
    result = _bench("sd15_step.py", tmp_path / "step.json", "--configs", "full-fp32,lora-fp32,smp-fp32,dp-fp32")
    for row in result["configs"].values():
        _assert_measured(row)
    rows = result["configs"]
    assert rows["full-fp32"]["trainable_params"] > rows["lora-fp32"]["trainable_params"]  # r64 on a tiny UNet
    assert all(isinstance(result["ratios"][k], float) for k in STEP_RATIOS)


def test_sd15_gpu_reference_tiny_on_cpu(tmp_path):
    """The reference loop (the part only this script has; privlora's step is the one measured above)."""
    result = _bench("sd15_gpu.py", tmp_path / "gpu.json", "--device", "cpu", "--configs", "reference-fp32")
    assert result["benchmark"] == "sd15_gpu" and result["device"] == "cpu" and result["gpu"] is None
    row = result["configs"]["reference-fp32"]
    _assert_measured(row)
    assert row["mode"] == "reference" and row["cuda_max_memory_allocated_mb"] is None
    assert set(result["ratios"]) == {"fp32", "bf16"}
    assert result["ratios"]["fp32"]["privlora_plain_vs_reference"] is None  # privlora's LoRA did not run


@pytest.mark.slow
def test_sd15_gpu_ratio_against_the_reference_on_cpu(tmp_path):
    result = _bench("sd15_gpu.py", tmp_path / "gpu.json", "--device", "cpu", "--configs",
                    "lora-fp32,reference-fp32")
    lora, ref = result["configs"]["lora-fp32"], result["configs"]["reference-fp32"]
    _assert_measured(lora)
    _assert_measured(ref)
    assert lora["trainable_params"] == ref["trainable_params"]  # the same LoRA on the same UNet
    ratio = result["ratios"]["fp32"]["privlora_plain_vs_reference"]
    assert ratio == pytest.approx(lora["samples_per_s"] / ref["samples_per_s"])


@pytest.mark.slow
def test_sd15_gpu_tiny_all_modes_on_cpu(tmp_path):
    result = _bench("sd15_gpu.py", tmp_path / "gpu.json", "--device", "cpu")
    assert len(result["configs"]) == 10
    for row in result["configs"].values():
        _assert_measured(row)
    assert all(v is not None for per in result["ratios"].values() for k, v in per.items() if "memory" not in k)
