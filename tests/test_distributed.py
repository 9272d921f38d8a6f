"""Data-parallel training under torchrun: two processes sharing each global batch train the adapter one
process trains on the whole batch (plain and DP, same ε), MP/SMP's replicas stay identical, only rank 0
writes, and a checkpoint resumes under another number of processes.

The two-process runs start real ``torchrun --standalone --nproc_per_node 2 -m privlora train`` launches
(gloo on the CPU): ~30 s each on two cores, hence ``slow``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from privlora.train.distributed import World
from privlora.train.loop import Interrupted, train
from test_training import FAST, _adapter, _config, _metrics, _partial, _sigint_during_step

pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Optimal order",
                                         "ignore::RuntimeWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_torch_thread")]

BASE = Path(__file__).resolve().parents[1] / "configs" / "demo-plain.yaml"
TOLERANCE = 1e-4


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}


def _command(out: Path, processes: int = 2, **changes) -> list[str]:
    """``privlora train`` with :func:`test_training._config`'s settings, under torchrun."""
    settings = {**FAST, **{k.replace("__", "."): v for k, v in changes.items()}}
    args = [a for key, value in settings.items() for a in ("--set", f"{key}={json.dumps(value)}")]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "privlora", "train", "--config", str(BASE), "--out", str(out), *args]


def _torchrun(out: Path, processes: int = 2, **changes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_command(out, processes, **changes), capture_output=True, text=True, timeout=300, env=ENV)


def _ran(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def _max_diff(a: Path, b: Path) -> float:
    ta, tb = _adapter(a), _adapter(b)
    assert ta.keys() == tb.keys()
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


def _moved(run: Path) -> float:
    """How far LoRA B moved from its zero start: the comparison's tolerance must be far below it."""
    return max(float(t.abs().max()) for k, t in _adapter(run).items() if "lora_B" in k)


def _privacy(run: Path) -> dict:
    return json.loads((run / "privacy.json").read_text())


# --- fast ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 3, 4, 7])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_shards_are_contiguous_and_cover_the_batch(n, size):
    shards = [World(rank=r, size=size).shard(n) for r in range(size)]
    assert shards[0][0] == 0 and shards[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:], strict=False))  # contiguous, in rank order
    lengths = [stop - start for start, stop in shards]
    assert max(lengths) - min(lengths) <= 1


def test_one_process_world_is_inert():
    world = World()
    grad = torch.ones(3)
    world.sum_tensors([grad])
    assert torch.equal(grad, torch.ones(3)) and world.any(True) and not world.any(False)
    assert world.sum_values({"loss": 2.0}) == {"loss": 2.0} and world.share(5) == 5


# --- torchrun ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_plain_two_processes_train_what_one_process_trains(tmp_path):
    """A batch of 4 split 2 + 2 over the processes, gradients all-reduced: the one-process update. 5 steps
    (the shuffle wraps an epoch of 12 members once)."""
    common = {"optim__max_steps": 5}
    one = train(_config(tmp_path / "one", **common)).run_dir
    _ran(proc := _torchrun(tmp_path / "two", **common))
    two = tmp_path / "two"
    assert "plain: 5 steps" in proc.stdout and proc.stdout.count("plain: 5 steps") == 1  # rank 0 reports, once
    diff = _max_diff(one, two)
    print(f"plain max|Δ| = {diff:.3g} (B moved {_moved(one):.3g})")
    assert diff < TOLERANCE < _moved(one) / 10
    assert [m["loss"] for m in _metrics(two)] == pytest.approx([m["loss"] for m in _metrics(one)], rel=1e-5)
    assert json.loads((two / "splits.json").read_text()) == json.loads((one / "splits.json").read_text())
    assert not _partial(two).exists() and not (two / "checkpoint.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("shape", [
    # K=2 × B=2: one Poisson batch at q = 4/N, shards processed in up to two physical chunks
    {"optim__batch_size": 2, "optim__gradient_accumulation_steps": 2},
    # q = 1/N: batches of 0 or 1, so rank 1's shard is often empty and still draws noise in step
    {"optim__batch_size": 1},
], ids=["accumulated", "empty-shards"])
def test_dp_two_processes_train_what_one_process_trains_at_the_same_epsilon(tmp_path, shape):
    """Each process clips its own samples; the clipped sums are all-reduced and noised once: the one-process
    DP-SGD update, and one accountant at q = global batch / N."""
    common = {"mode": "dp", "optim__max_steps": 4, "dp__noise_multiplier": 1.0, **shape}
    one = train(_config(tmp_path / "one", **common)).run_dir
    _ran(_torchrun(tmp_path / "two", **common))
    two = tmp_path / "two"
    diff = _max_diff(one, two)
    print(f"dp {shape} max|Δ| = {diff:.3g} (B moved {_moved(one):.3g})")
    assert diff < TOLERANCE < _moved(one) / 10
    a, b = _privacy(one), _privacy(two)
    assert b["epsilon"] == a["epsilon"] and b["sample_rate"] == a["sample_rate"] and b["steps"] == a["steps"] == 4
    batches = [m["batch"] for m in _metrics(two)]
    assert batches == [m["batch"] for m in _metrics(one)]  # the same Poisson draws
    if shape["optim__batch_size"] == 1:  # a batch of one: rank 1's shard was empty that step
        assert 1.0 in batches


@pytest.mark.slow
def test_smp_replicas_stay_identical(tmp_path):
    """SMP's proxy attacker trains on every process: the run ends only if all processes' LoRA, attacker,
    optimizer, sampler and RNG states are bit-equal (the check before rank 0 saves raises otherwise)."""
    _ran(_torchrun(tmp_path / "smp", mode="smp", optim__max_steps=3))
    assert (tmp_path / "smp" / "adapter" / "adapter_model.safetensors").is_file()
    assert [m["step"] for m in _metrics(tmp_path / "smp")] == [1, 2, 3]  # one writer: no line twice


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_under_two_processes(tmp_path, monkeypatch):
    """The checkpoint holds global state only: DP interrupted at step 2 in one process and finished by two
    equals the uninterrupted one-process run, at the same ε."""
    common = {"mode": "dp", "optim__max_steps": 4, "dp__noise_multiplier": 1.0}
    reference = train(_config(tmp_path / "ref", **common)).run_dir
    out = tmp_path / "cut"
    with monkeypatch.context() as patch:
        _sigint_during_step(patch, step=2)
        with pytest.raises(Interrupted):
            train(_config(out, **common))
    assert (_partial(out) / "checkpoint.pt").is_file()
    _ran(_torchrun(out, resume=True, **common))
    diff = _max_diff(out, reference)
    print(f"resume 1→2 processes max|Δ| = {diff:.3g}")
    assert diff < TOLERANCE
    assert _privacy(out)["epsilon"] == _privacy(reference)["epsilon"]
    assert _privacy(out)["training"]["resumed_at_step"] == 2
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_ctrl_c_under_torchrun_stops_every_rank_at_one_step_and_resumes_in_one_process(tmp_path):
    """Ctrl-C to torchrun (it passes SIGINT on to both ranks, which may see it at different steps): the
    ranks agree on one step, rank 0 checkpoints it, and one process finishes the run as if uninterrupted."""
    common = {"mode": "dp", "optim__max_steps": 8, "dp__noise_multiplier": 1.0}
    out = tmp_path / "cut"
    proc = subprocess.Popen(_command(out, **common), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    try:
        deadline = time.time() + 240
        while not (_partial(out) / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and not out.exists()
    stops = {line for line in stderr.splitlines() if line.startswith("error: interrupted at step")}
    assert len(stops) == 1, stderr[-3000:]  # both ranks name the same step
    stopped_at = int(next(iter(stops)).split("step ")[1].split(";")[0])
    assert 1 <= stopped_at < 8
    train(_config(out, resume=True, **common))
    reference = train(_config(tmp_path / "ref", **common)).run_dir
    diff = _max_diff(out, reference)
    print(f"ctrl-c at step {stopped_at}, resume 2→1 processes max|Δ| = {diff:.3g}")
    assert diff < TOLERANCE
    assert _privacy(out)["epsilon"] == _privacy(reference)["epsilon"]
    assert _privacy(out)["training"]["resumed_at_step"] == stopped_at
    assert [m["step"] for m in _metrics(out)] == list(range(1, 9))
