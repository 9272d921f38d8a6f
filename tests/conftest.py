"""Shared fixtures. Every test runs offline: nothing may reach a model hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# Tiny convolutions run far faster single-threaded on a small shared CPU (measured ~200× on 2 cores
# under load); subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Overrides that keep a CLI training run to seconds: one eval timestep, no sampling for the FD.
FAST = ["--set", "eval.timesteps=[200]", "--set", "eval.samples=0", "-q"]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real ``privlora`` entry point in a subprocess (exit codes and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "privlora", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def invoke_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The same ``privlora`` app in-process (Typer's CliRunner): no interpreter start or torch import per call,
    exit code and stdout/stderr as :func:`run_cli` gives them."""
    from typer.testing import CliRunner

    from privlora.cli import app

    result = CliRunner().invoke(app, list(args), env=env)
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Bad input as the user must see it: exit 2, one ``error:`` line on stderr, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]


def assert_nothing_written(out: Path) -> None:
    """Neither the run directory nor its ``.partial`` working copy exists."""
    assert not out.exists()
    assert not out.with_name(out.name + ".partial").exists()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny-model tests: two OpenMP threads on a shared 2-core machine
    oversubscribe on such small convolutions. Speed only; the code under test is the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli():
    return run_cli
