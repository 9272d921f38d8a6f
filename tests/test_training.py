"""The training loop end to end: run directory, determinism, splits, interruption + resume, refusing
to overwrite, and an adapter that plain peft can load."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFIGS
from privlora.config import TrainConfig, load_config
from privlora.data.demo import load_builtin
from privlora.data.splits import make_splits
from privlora.errors import UserError
from privlora.tasks.loading import load_task
from privlora.tasks.lora import LoraSpec, lora_state_dict
from privlora.train import loop
from privlora.train.loop import Interrupted, TrainResult, train

pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Optimal order",
                                        "ignore::RuntimeWarning"),
              pytest.mark.usefixtures("one_torch_thread")]  # conftest: one intra-op thread

BASE = CONFIGS / "demo-plain.yaml"
STEPS = 3
# small splits, rank and batch, one eval timestep, no sampling: a run takes about a second
FAST = {"eval.timesteps": [200], "eval.samples": 0, "quiet": True, "optim.batch_size": 4,
        "optim.max_steps": STEPS, "data.members": 0.12, "data.aux": 0.08, "data.eval": 0.08,
        "lora.rank": 4, "lora.alpha": 4, "checkpoint_every": 1, "log_every": 1}
MODES = ("plain", "dp", "mp", "smp")
RUN_FILES = ("config.yaml", "splits.json", "metrics.jsonl", "privacy.json", "utility.json",
             "adapter/adapter_model.safetensors", "adapter/adapter_config.json")
CLI_ENV = {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}



def _config(out: Path, **changes) -> TrainConfig:
    """demo-plain.yaml made fast; ``changes`` use ``__`` for dots (``optim__lr=...``)."""
    overrides = {**FAST, **{k.replace("__", "."): v for k, v in changes.items()}, "out": str(out)}
    return load_config(BASE, overrides)


def _cli_set() -> list[str]:
    """The same FAST overrides as CLI flags."""
    args = []
    for key, value in FAST.items():
        if key == "optim.max_steps":
            continue
        if key == "quiet":
            args.append("-q")
        else:
            args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = _adapter(a), _adapter(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:2]}"


def _metrics(run_dir: Path) -> list[dict]:
    def refuse(token: str) -> float:
        raise ValueError(f"non-standard JSON constant {token} in metrics.jsonl")

    return [json.loads(line, parse_constant=refuse)
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(run: Path, reference: Path) -> None:
    """Same weights and the same numbers in every output file that does not name the run directory."""
    _assert_same_adapter(run, reference)
    for name in ("splits.json", "privacy.json", "utility.json"):
        ours, theirs = json.loads((run / name).read_text()), json.loads((reference / name).read_text())
        if name == "privacy.json":  # how the steps were split over processes differs, their total must not
            assert ours.pop("training")["steps"] == theirs.pop("training")["steps"]
        assert ours == theirs, name
    assert _metrics(run) == _metrics(reference)


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, TrainResult]:
    """One short run per mode, shared by the tests below (and the references for resume)."""
    root = tmp_path_factory.mktemp("modes")
    return {mode: train(_config(root / mode, mode=mode)) for mode in MODES}


@pytest.fixture(scope="module")
def seed1_run(tmp_path_factory) -> TrainResult:
    return train(_config(tmp_path_factory.mktemp("seed1") / "plain", mode="plain", seed=1))


# --- the run directory --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_run_directory_is_complete(runs, mode):
    result = runs[mode]
    run = result.run_dir
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    assert (run / "adapter" / "pytorch_lora_weights.safetensors").is_file()  # diffusers format too
    assert not _partial(run).exists()
    assert not (run / "checkpoint.pt").exists()
    assert result.steps == STEPS and result.mode == mode

    # config.yaml is exactly what ran, loadable again
    assert load_config(run / "config.yaml") == _config(run, mode=mode)

    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for m in metrics for v in m.values())

    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["mode"] == mode
    if mode == "plain":
        assert privacy["mechanism"] == "none"
    elif mode == "dp":
        assert privacy["steps"] == STEPS and privacy["epsilon"] > 0
    else:
        assert privacy["epsilon"] is None
        assert (privacy["alpha"], privacy["beta"]) == (1.0, 1.0)

    utility = json.loads((run / "utility.json").read_text())
    for key in ("loss_members", "loss_heldout", "base_loss_members", "base_loss_heldout"):
        assert math.isfinite(utility[key]) and utility[key] > 0, key
    assert utility["timesteps"] == [200]


@pytest.mark.parametrize("mode", MODES)
def test_every_lora_tensor_moved_from_its_initialisation(runs, mode):
    config = _config(Path("unused"), mode=mode)
    spec = LoraSpec(rank=config.lora.rank, alpha=config.lora.alpha, targets=tuple(config.lora.targets))
    initial = lora_state_dict(load_task("embedded", spec, seed=config.seed).model)
    trained = {k.removeprefix("base_model.model."): v for k, v in _adapter(runs[mode].run_dir).items()}
    assert trained.keys() == initial.keys()
    assert any(".conv1." in k for k in trained) and any(".to_v." in k for k in trained)
    lora_b = [k for k in initial if ".lora_B." in k]
    assert lora_b and all(not torch.any(initial[k] != 0) for k in lora_b)  # B starts at zero: a no-op
    unmoved = [k for k in initial if torch.equal(initial[k], trained[k])]
    assert not unmoved, f"{len(unmoved)} LoRA tensors never changed, e.g. {unmoved[:3]}"
    assert all(torch.any(trained[k] != 0) for k in lora_b)


# --- determinism and splits ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["plain", "dp"])
def test_same_seed_gives_bitwise_identical_adapter(runs, mode, tmp_path):
    again = train(_config(tmp_path / "again", mode=mode))
    _assert_same_run(again.run_dir, runs[mode].run_dir)


def test_different_seed_gives_a_different_adapter(runs, seed1_run):
    a, b = _adapter(runs["plain"].run_dir), _adapter(seed1_run.run_dir)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_splits_are_disjoint_and_reproducible_from_the_seed(runs, seed1_run):
    config = _config(Path("unused"))
    data = load_builtin(config.data.source, 32)
    for result, seed in ((runs["plain"], 0), (seed1_run, 1)):
        saved = json.loads((result.run_dir / "splits.json").read_text())
        members, aux, held = (set(saved[k]) for k in ("members", "aux_nonmembers", "eval_nonmembers"))
        assert saved["seed"] == seed and saved["source"] == config.data.source
        assert len(members) == len(saved["members"]) == round(0.12 * len(data))
        assert len(aux) == round(0.08 * len(data)) and len(held) == round(0.08 * len(data))
        assert not (members & aux) and not (members & held) and not (aux & held)
        assert members | aux | held <= set(data.ids)
        again = make_splits(data, members=0.12, aux=0.08, eval=0.08, seed=seed, source=config.data.source)
        assert again.to_json() == saved
    assert json.loads((runs["plain"].run_dir / "splits.json").read_text())["members"] != \
        json.loads((seed1_run.run_dir / "splits.json").read_text())["members"]


# --- interruption and resume --------------------------------------------------------------------

def _sigint_during_step(monkeypatch, step: int) -> None:
    """Deliver a real SIGINT in the middle of step ``step`` (after its batch and noise were drawn)."""
    from privlora.tasks.diffusion import DiffusionTask

    state = {"calls": 0, "fired": False}
    real_step, real_error = loop._one_step, DiffusionTask.squared_error

    def one_step(*args, **kwargs):
        state["calls"] += 1
        return real_step(*args, **kwargs)

    def squared_error(self, *args, **kwargs):
        result = real_error(self, *args, **kwargs)
        if state["calls"] == step and not state["fired"]:
            state["fired"] = True
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(loop, "_one_step", one_step)
    monkeypatch.setattr(DiffusionTask, "squared_error", squared_error)


@pytest.mark.parametrize("mode", ["plain", "dp", "smp"])
def test_ctrl_c_mid_step_then_resume_equals_uninterrupted_run(runs, mode, tmp_path, monkeypatch):
    out = tmp_path / mode
    with monkeypatch.context() as patch:
        _sigint_during_step(patch, step=2)
        with pytest.raises(Interrupted) as info:
            train(_config(out, mode=mode))
    assert info.value.exit_code == 130
    assert "--resume" in str(info.value)
    assert not out.exists()
    assert (_partial(out) / "checkpoint.pt").is_file()
    with pytest.raises(UserError, match="--resume"):  # a fresh start must not clobber it
        train(_config(out, mode=mode))
    with pytest.raises(UserError, match="optim.lr"):  # resuming with other settings would mix two runs
        train(_config(out, mode=mode, optim__lr=0.01, resume=True))
    assert (_partial(out) / "checkpoint.pt").is_file()
    resumed = train(_config(out, mode=mode, resume=True))
    assert resumed.steps == STEPS
    assert not _partial(out).exists() and not (out / "checkpoint.pt").exists()
    _assert_same_run(out, runs[mode].run_dir)


def test_interrupt_during_evaluation_keeps_a_resumable_run(runs, tmp_path, monkeypatch):
    out = tmp_path / "plain"
    real = loop.measure_utility

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setitem(loop.UTILITY, "image", broken)
        with pytest.raises(Interrupted, match="--resume"):
            train(_config(out, checkpoint_every=2))
    assert loop.UTILITY["image"] is real
    assert not out.exists() and (_partial(out) / "checkpoint.pt").is_file()
    train(_config(out, checkpoint_every=2, resume=True))
    _assert_same_run(out, runs["plain"].run_dir)  # no step repeated, none lost, metrics not doubled


def test_resume_without_an_interrupted_run_starts_fresh_with_a_note(runs, tmp_path, capsys):
    result = train(_config(tmp_path / "none", resume=True))
    assert "note: nothing to resume" in capsys.readouterr().err
    assert result.resumed_at is None and result.steps == result.steps_run == STEPS
    assert json.loads((result.run_dir / "privacy.json").read_text())["training"] == {
        "steps": STEPS, "steps_this_run": STEPS, "resumed_at_step": None}
    assert load_config(result.run_dir / "config.yaml").resume is False  # it is a fresh run
    _assert_same_run(result.run_dir, runs["plain"].run_dir)
    with pytest.raises(UserError, match="already exists"):  # a finished run is not started over
        train(_config(tmp_path / "none", resume=True))


def test_run_killed_before_its_first_checkpoint_can_be_started_over(runs, tmp_path, capsys):
    out = tmp_path / "early"
    partial = _partial(out)
    partial.mkdir()  # what a kill before the first checkpoint leaves: config and splits, no checkpoint
    (partial / "config.yaml").write_text("name: stale\n")
    with pytest.raises(UserError, match="--resume") as info:
        train(_config(out))
    assert "before its first checkpoint" in str(info.value)
    result = train(_config(out, resume=True))
    assert "no checkpoint was written yet" in capsys.readouterr().err
    assert result.resumed_at is None and not partial.exists()
    _assert_same_run(out, runs["plain"].run_dir)


def _cli_in_process(*args: str):
    """The real Typer app, in this process (no second torch import): exit code and stderr as a user
    sees them."""
    from typer.testing import CliRunner

    from privlora.cli import app

    return CliRunner().invoke(app, list(args))


def _start_until_checkpoint(args: list[str], out) -> subprocess.Popen:
    """``privlora *args`` in a child process, returned once its first checkpoint is on disk (still running)."""
    proc = subprocess.Popen([sys.executable, "-m", "privlora", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **CLI_ENV})
    deadline = time.time() + 240
    checkpoint = _partial(out) / "checkpoint.pt"
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()
    return proc


def test_cli_ctrl_c_exits_130_and_resume_finishes_identically(tmp_path):
    steps = 6
    out = tmp_path / "cli"
    args = ["train", "--config", str(BASE), "--out", str(out), *_cli_set(), "--max-steps", str(steps)]
    proc = _start_until_checkpoint(args, out)
    try:
        proc.send_signal(signal.SIGINT)  # a real Ctrl-C, delivered to the process mid-training
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), stderr
    assert "--resume" in lines[0] and "Traceback" not in stderr
    assert not out.exists() and (_partial(out) / "checkpoint.pt").is_file()

    done = _cli_in_process(*args, "--resume")
    assert done.exit_code == 0, (done.stdout, done.stderr, done.exception)
    assert not _partial(out).exists()
    assert [m["step"] for m in _metrics(out)] == list(range(1, steps + 1))
    reference = train(_config(tmp_path / "reference", optim__max_steps=steps))
    _assert_same_run(out, reference.run_dir)


def test_kill_before_the_step_checkpoint_resumes_from_the_timed_one(tmp_path):
    """SIGKILL (no handler runs) long before ``checkpoint_every``: the time-based checkpoint is what is
    left, ``--resume`` continues from it, and the summary and privacy.json give both step counts."""
    steps = 30
    out = tmp_path / "killed"
    args = ["train", "--config", str(BASE), "--out", str(out), *_cli_set(), "--max-steps", str(steps),
            "--set", "checkpoint_every=1000", "--set", "checkpoint_minutes=0.0001"]
    checkpoint = _partial(out) / "checkpoint.pt"
    proc = _start_until_checkpoint(args, out)
    try:
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists()
    resumed_at = int(torch.load(checkpoint, weights_only=True)["step"])
    assert 1 <= resumed_at < steps

    done = _cli_in_process(*args, "--resume")
    assert done.exit_code == 0, (done.stdout, done.stderr, done.exception)
    assert f"ran {steps - resumed_at} steps (resumed at step {resumed_at}, {steps} in total)" in done.stdout
    assert json.loads((out / "privacy.json").read_text())["training"] == {
        "steps": steps, "steps_this_run": steps - resumed_at, "resumed_at_step": resumed_at}
    assert [m["step"] for m in _metrics(out)] == list(range(1, steps + 1))
    reference = train(_config(tmp_path / "reference", optim__max_steps=steps, checkpoint_every=1000))
    _assert_same_run(out, reference.run_dir)


def test_cli_refuses_an_existing_out(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    result = _cli_in_process("train", "--config", str(BASE), "--out", str(out), *_cli_set())
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(out) in lines[0], result.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "keep.txt").read_text() == "precious"
    assert not _partial(out).exists()


# --- the adapter in the ecosystem ---------------------------------------------------------------

def test_adapter_loads_with_plain_peft(runs):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

    from privlora.tasks.embedded import load_embedded
    from privlora.tasks.lora import read_spec

    adapter = runs["plain"].run_dir / "adapter"
    saved = load_file(str(adapter / "adapter_model.safetensors"))

    # peft alone: base UNet + LoraConfig from adapter_config.json + the safetensors weights
    unet, _, _ = load_embedded()
    unet = inject_adapter_in_model(LoraConfig.from_pretrained(str(adapter)), unet)
    result = set_peft_model_state_dict(unet, saved)
    assert not [k for k in result.unexpected_keys if "lora_" in k]
    loaded = get_peft_model_state_dict(unet, save_embedding_layers=False)
    assert loaded.keys() == {k.removeprefix("base_model.model.") for k in saved}
    for key, value in saved.items():
        assert torch.equal(loaded[key.removeprefix("base_model.model.")], value), key

    # privlora's own loader
    task = load_task("embedded", read_spec(adapter), seed=123)
    task.load_adapter(adapter)
    base, _, _ = load_embedded()

    gen = torch.Generator().manual_seed(5)
    x = torch.randn((3, 1, 32, 32), generator=gen)
    t = torch.tensor([30, 300, 700])
    with torch.no_grad():
        out_peft = unet(x, t).sample
        out_privlora = task.model(x, t).sample
        out_base = base(x, t).sample
    torch.testing.assert_close(out_peft, out_privlora)
    assert (out_peft - out_base).abs().max() > 1e-6


def test_keyboard_interrupt_inside_a_step_resumes_from_the_last_checkpoint(runs, tmp_path, monkeypatch):
    """An exception-style interrupt (no signal handler involved) tears step 3; checkpoint_every=1 left
    step 2 on disk, and the resumed MP run — attacker, its Adam state, dropout RNG — equals the
    uninterrupted one."""
    from privlora.train.objectives import MinMaxObjective

    out = tmp_path / "mp"
    calls = {"n": 0}
    real = MinMaxObjective.step_loss

    def step_loss(self, batch, generator):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, batch, generator)

    with monkeypatch.context() as patch:
        patch.setattr(MinMaxObjective, "step_loss", step_loss)
        with pytest.raises(Interrupted, match="checkpoint of step 2"):
            train(_config(out, mode="mp"))
    assert not out.exists() and (_partial(out) / "checkpoint.pt").is_file()
    assert [m["step"] for m in _metrics(_partial(out))] == [1, 2]
    train(_config(out, mode="mp", resume=True))
    _assert_same_run(out, runs["mp"].run_dir)


# --- utility: the Fréchet distance --------------------------------------------------------------

def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((m + m.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def _frechet_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Independent formula: Tr(Σa + Σb − 2(Σa^½ Σb Σa^½)^½) — symmetric, eigendecompositions only."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca = (a - mu_a).T @ (a - mu_a) / (len(a) - 1)
    cb = (b - mu_b).T @ (b - mu_b) / (len(b) - 1)
    root_a = _sqrtm_psd(ca)
    cross = _sqrtm_psd(root_a @ cb @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.trace(cross))


def test_frechet_distance_matches_independent_computation():
    from privlora.train.utility import frechet_distance

    rng = np.random.default_rng(0)
    d = 5
    mix_a, mix_b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    a = rng.normal(size=(400, d)) @ mix_a + 1.0
    b = rng.normal(size=(300, d)) @ mix_b - 0.5
    assert frechet_distance(a, b) == pytest.approx(_frechet_reference(a, b), rel=1e-7)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-7)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-7)
    shifted = a + np.arange(d)  # a pure shift adds exactly ‖shift‖²
    assert frechet_distance(a, shifted) == pytest.approx(float((np.arange(d) ** 2).sum()), rel=1e-7, abs=1e-7)


def test_frechet_distance_approaches_the_gaussian_closed_form():
    """Diagonal Gaussians: FD = ‖μa − μb‖² + Σ (σa − σb)²; many samples estimate it closely."""
    from privlora.train.utility import frechet_distance

    rng = np.random.default_rng(1)
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    sd_a, sd_b = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
    a = rng.normal(mu_a, sd_a, size=(40000, 3))
    b = rng.normal(mu_b, sd_b, size=(40000, 3))
    closed = float(((mu_a - mu_b) ** 2).sum() + ((sd_a - sd_b) ** 2).sum())
    assert frechet_distance(a, b) == pytest.approx(closed, rel=0.03)


def test_no_evaluation_split_gives_valid_json_and_says_n_a(tmp_path):
    """Training on every image (data.eval=0, e.g. a canary experiment): no NaN in utility.json, 'n/a' shown."""
    from conftest import FAST, run_cli

    out = tmp_path / "run"
    proc = run_cli("train", "--config", str(CONFIGS / "demo-plain.yaml"), "--max-steps", "2", "--batch-size", "4",
                   "--set", "data.members=0.5", "--set", "data.aux=0.0", "--set", "data.eval=0.0",
                   "--out", str(out), *FAST[:-1])
    assert proc.returncode == 0, proc.stderr
    assert "held-out denoising loss n/a (base n/a)" in proc.stdout
    text = (out / "utility.json").read_text()
    utility = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in utility.json"))
    assert utility["loss_heldout"] is None and math.isfinite(utility["loss_members"])
