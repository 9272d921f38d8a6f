"""Shared fixtures. Every test runs offline: nothing may reach a model hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# Tiny convolutions run far faster single-threaded on a small shared CPU (measured ~200× on 2 cores
# under load); subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Overrides that keep a CLI training run to seconds: one eval timestep, no sampling for the FD.
FAST = ["--set", "eval.timesteps=[200]", "--set", "eval.samples=0", "-q"]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real ``privlora`` entry point in a subprocess (exit codes and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "privlora", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture
def cli():
    return run_cli
