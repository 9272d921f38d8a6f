"""The diffusers-style training options: gradient accumulation (plain and DP), learning-rate schedules,
mixed precision, gradient checkpointing, random crop/flip, and their refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import assert_one_line_error, invoke_cli, run_cli
from privlora.config import DataOptions
from privlora.data.folder import load_folder
from privlora.tasks.loading import load_task
from privlora.tasks.lora import LoraSpec
from privlora.train.augment import Augmenter
from privlora.train.loop import Interrupted, train
from privlora.train.precision import Precision
from test_sd import _train_args, sd  # noqa: F401, F811 - sd is a fixture
from test_training import _assert_same_run, _config, _metrics, _partial, _sigint_during_step

pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Optimal order",
                                         "ignore::RuntimeWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_torch_thread")]

SPEC = LoraSpec(rank=4, alpha=4, targets=("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"))


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _max_diff(a: Path, b: Path) -> float:
    ta, tb = _adapter(a), _adapter(b)
    assert ta.keys() == tb.keys()
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


# --- gradient accumulation ------------------------------------------------------------------------

def test_accumulation_of_two_batches_equals_one_batch_of_twice_the_size(tmp_path):
    """Same samples (the shuffle draws K·B indices per update) and the same timesteps and noise (drawn once
    per logical batch): K=2 × B=2 must give the update of one batch of 4. SGD (not Adam, whose first step is
    nearly sign(g)) and two steps, so the comparison sees the gradient's size. K=1 × B=2 must differ."""
    common = {"optim__optimizer": "sgd", "optim__lr": 0.05, "optim__max_steps": 2, "optim__grad_clip": None}
    accumulated = train(_config(tmp_path / "k2", optim__batch_size=2, optim__gradient_accumulation_steps=2, **common))
    big = train(_config(tmp_path / "b4", optim__batch_size=4, **common))
    small = train(_config(tmp_path / "b2", optim__batch_size=2, **common))
    assert _max_diff(accumulated.run_dir, big.run_dir) < 1e-5
    assert _max_diff(small.run_dir, big.run_dir) > 1e-4  # the comparison can fail
    first_acc, first_big = _metrics(accumulated.run_dir)[0], _metrics(big.run_dir)[0]
    assert abs(first_acc["loss"] - first_big["loss"]) < 1e-6


def test_dp_accumulation_is_one_logical_poisson_batch(tmp_path):
    """Under DP, K=2 × B=2 is one Poisson batch at q = 4/N, noised once: the same q and ε as B=4 in
    privacy.json, and — same sampling and noise generators — the same update."""
    common = {"mode": "dp", "optim__max_steps": 2, "dp__noise_multiplier": 1.0}
    accumulated = train(_config(tmp_path / "k2", optim__batch_size=2, optim__gradient_accumulation_steps=2, **common))
    big = train(_config(tmp_path / "b4", optim__batch_size=4, **common))
    acc, ref = (json.loads((r.run_dir / "privacy.json").read_text()) for r in (accumulated, big))
    n = acc["dataset_size"]
    assert acc["sample_rate"] == pytest.approx(4 / n) and ref["sample_rate"] == pytest.approx(4 / n)
    assert acc["epsilon"] == pytest.approx(ref["epsilon"], rel=1e-12)
    assert acc["gradient_accumulation_steps"] == 2 and acc["physical_batch_size"] == 2
    assert _max_diff(accumulated.run_dir, big.run_dir) < 1e-5
    assert [m["batch"] for m in _metrics(accumulated.run_dir)] == [m["batch"] for m in _metrics(big.run_dir)]


# --- learning-rate schedules ----------------------------------------------------------------------

def test_warmup_starts_below_the_base_lr_and_reaches_it(tmp_path):
    result = train(_config(tmp_path / "warm", optim__max_steps=4, optim__lr_scheduler="constant_with_warmup",
                           optim__lr_warmup_steps=2))
    lrs = [m["lr"] for m in _metrics(result.run_dir)]
    base = 0.002  # demo-plain.yaml's optim.lr
    assert lrs[0] < base
    assert lrs[1] < base
    assert lrs[2:] == [pytest.approx(base)] * 2


def test_schedule_names_are_diffusers_schedulers():
    from diffusers.optimization import SchedulerType

    from privlora.cli.choices import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}


def test_resume_restores_schedule_accumulation_and_augmentation(tmp_path, monkeypatch):
    """Interrupted at step 2 and resumed, a run with a cosine warmup, K=2 and random flips equals the
    uninterrupted one: the scheduler's and the augmenter's states come back from the checkpoint."""
    options = {"optim__lr_scheduler": "cosine", "optim__lr_warmup_steps": 1,
               "optim__gradient_accumulation_steps": 2, "optim__batch_size": 2, "data__random_flip": True}
    reference = train(_config(tmp_path / "ref", **options))
    out = tmp_path / "cut"
    with monkeypatch.context() as patch:
        _sigint_during_step(patch, step=2)
        with pytest.raises(Interrupted):
            train(_config(out, **options))
    assert (_partial(out) / "checkpoint.pt").is_file()
    train(_config(out, resume=True, **options))
    _assert_same_run(out, reference.run_dir)


# --- mixed precision --------------------------------------------------------------------------------

def test_bf16_run_has_finite_loss_and_fp32_lora_weights(tmp_path):
    result = train(_config(tmp_path / "bf16", optim__mixed_precision="bf16"))
    losses = [m["loss"] for m in _metrics(result.run_dir)]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    tensors = _adapter(result.run_dir)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert any(bool(t.abs().sum() > 0) for k, t in tensors.items() if "lora_B" in k)  # it trained


def test_fp16_on_cpu_trains_with_a_grad_scaler(tmp_path):
    """Measured: CPU autocast fp16 + GradScaler('cpu') works on torch 2.13, so it is not refused."""
    result = train(_config(tmp_path / "fp16", optim__mixed_precision="fp16"))
    assert all(torch.isfinite(torch.tensor([m["loss"] for m in _metrics(result.run_dir)])))
    assert {t.dtype for t in _adapter(result.run_dir).values()} == {torch.float32}


def test_dp_bf16_per_sample_gradients_are_fp32_and_finite():
    from opacus import GradSampleModule

    task = load_task("embedded", SPEC, seed=0)
    task.train()
    task.denoiser = GradSampleModule(task.model, force_functorch=True, loss_reduction="mean")
    pixels = torch.rand(3, task.channels, task.resolution, task.resolution) * 2 - 1
    with Precision("bf16", torch.device("cpu")).autocast():
        losses = task.per_sample_loss({"pixels": pixels, "captions": [""] * 3}, torch.Generator().manual_seed(0))
    losses.mean().backward()
    samples = [p.grad_sample for p in task.trainable_parameters()]
    assert all(s is not None and s.dtype == torch.float32 and s.shape[0] == 3 for s in samples)
    assert all(bool(torch.isfinite(s).all()) for s in samples)
    assert {p.dtype for p in task.trainable_parameters()} == {torch.float32}


def test_dp_bf16_run_finishes(tmp_path):
    result = train(_config(tmp_path / "dp", mode="dp", optim__mixed_precision="bf16", optim__max_steps=2))
    assert result.privacy["epsilon"] > 0
    assert all(torch.isfinite(torch.tensor([m["loss"] for m in _metrics(result.run_dir) if "loss" in m])))


# --- gradient checkpointing -----------------------------------------------------------------------

def test_checkpointing_keeps_the_first_loss_and_trains(tmp_path):
    plain = train(_config(tmp_path / "plain", optim__max_steps=2))
    ckpt = train(_config(tmp_path / "ckpt", optim__max_steps=2, optim__gradient_checkpointing=True))
    assert abs(_metrics(plain.run_dir)[0]["loss"] - _metrics(ckpt.run_dir)[0]["loss"]) < 1e-5
    tensors = _adapter(ckpt.run_dir)
    assert all(bool(t.abs().sum() > 0) for k, t in tensors.items() if "lora_B" in k)  # every B moved from 0


def test_checkpointing_on_stable_diffusion_same_loss_and_gradients(tmp_path):
    from privlora.tasks.sd import StableDiffusionTask
    from test_sd import _tiny_pipeline

    spec = LoraSpec(rank=4, alpha=4, targets=("to_q", "to_k", "to_v", "to_out.0"))
    batch = {"pixels": torch.rand(2, 3, 16, 16) * 2 - 1, "captions": ["a photo", "a cat"]}
    results = []
    for checkpointing in (False, True):
        task = StableDiffusionTask(_tiny_pipeline(tmp_path / str(checkpointing)), spec, base_name="tiny")
        task.train()
        if checkpointing:
            task.enable_gradient_checkpointing()
            assert task.model.is_gradient_checkpointing
        with torch.no_grad():  # LoRA B is zero at init: give it values so A's gradients are not zero too
            for p in task.trainable_parameters():
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(p.numel()))
        loss = task.per_sample_loss(batch, torch.Generator().manual_seed(0)).mean()
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in task.trainable_parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a - loss_b) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b, strict=True))
    assert all(bool(g.abs().sum() > 0) for g in grads_b)


# --- crop and flip ------------------------------------------------------------------------------

def _wide_folder(folder: Path) -> Path:
    folder.mkdir()
    rng = torch.Generator().manual_seed(0)
    for i in range(4):
        array = (torch.rand(16, 28 + 4 * i, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(array).save(folder / f"w{i}.png")
    return folder


def test_random_crop_and_flip_change_pixels_deterministically_by_seed(tmp_path):
    data, _ = load_folder(_wide_folder(tmp_path / "wide"), channels=3, resolution=16, center_crop=False)
    assert data.pixels.shape == (4, 3, 16, 16)
    assert [tuple(u.shape) for u in data.uncropped] == [(3, 16, 28 + 4 * i) for i in range(4)]
    options = DataOptions(center_crop=False, random_flip=True)

    def draw(seed: int) -> torch.Tensor:
        augment = Augmenter(options, seed=seed)
        return torch.cat([augment.batch(data, [0, 1, 2, 3])["pixels"] for _ in range(3)])

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    assert not torch.equal(draw(0), data.pixels.repeat(3, 1, 1, 1))  # not just the centre crops
    off = Augmenter(DataOptions(), seed=0).batch(data, [0, 1])
    assert torch.equal(off["pixels"], data.pixels[:2])  # defaults: centre crop, no flip

    flips = Augmenter(DataOptions(random_flip=True), seed=0)
    out = torch.cat([flips.batch(data, [0, 1, 2, 3])["pixels"] for _ in range(4)])
    same = data.pixels.repeat(4, 1, 1, 1)
    flipped = [bool(torch.equal(o, s.flip(-1))) for o, s in zip(out, same, strict=True)]
    kept = [bool(torch.equal(o, s)) for o, s in zip(out, same, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)


def test_random_crop_training_reads_the_folder(tmp_path):
    folder = _wide_folder(tmp_path / "wide")
    for i in range(4, 12):  # a dozen images, so the splits have members
        (folder / f"w{i}.png").write_bytes((folder / f"w{i % 4}.png").read_bytes())
    result = train(_config(tmp_path / "run", data__source=str(folder), data__center_crop=False,
                           data__random_flip=True, data__resolution=16, data__members=0.5, data__aux=0.2,
                           data__eval=0.3, optim__batch_size=2, optim__max_steps=2))
    assert all(torch.isfinite(torch.tensor([m["loss"] for m in _metrics(result.run_dir)])))


# --- the command line -----------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "needle"), [
    (["--gradient-accumulation-steps", "0"], "gradient_accumulation_steps"),
    (["--lr-scheduler", "sawtooth"], "sawtooth"),
    (["--mode", "dp", "--mixed-precision", "fp16"], "bf16"),
    (["--mode", "dp", "--gradient-checkpointing"], "gradient_checkpointing"),
    (["--lr-warmup-steps", "-1"], "lr_warmup_steps"),
    (["--center-crop", "--random-crop"], "not both"),
])
def test_bad_values_are_one_line_errors(tmp_path, args, needle):
    out = tmp_path / "never"
    proc = run_cli("train", "--out", str(out), "-q", *args)
    assert_one_line_error(proc, needle)
    assert not out.exists()


def test_help_names_the_new_flags_and_the_dp_meaning():
    proc = invoke_cli("train", "--help", env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    text = " ".join(proc.stdout.split())
    for flag in ("--gradient-accumulation-steps", "--lr-scheduler", "--lr-warmup-steps", "--mixed-precision",
                 "--gradient-checkpointing", "--random-flip", "--center-crop", "--random-crop", "--resolution"):
        assert flag in text, flag
    assert "logical Poisson batch" in text and "q = K·B/N" in text


def test_stable_diffusion_trains_with_every_new_option(sd, tmp_path):  # noqa: F811 - the fixture
    """The SD task through the real CLI: accumulation, bf16, checkpointing, a warmup schedule, random
    crop and flip together; the run finishes with finite losses and a logged warmup."""
    out = tmp_path / "sd"
    proc = invoke_cli(*_train_args(sd, out, "plain"), "--gradient-accumulation-steps", "2",
                      "--mixed-precision", "bf16", "--gradient-checkpointing", "--lr-scheduler", "linear",
                      "--lr-warmup-steps", "1", "--random-crop", "--random-flip", "--resolution", "16",
                      "--set", "log_every=1")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    metrics = _metrics(out)
    assert metrics[0]["lr"] == 0.0 and metrics[-1]["lr"] > 0
    assert all(torch.isfinite(torch.tensor([m["loss"] for m in metrics])))
    assert {t.dtype for t in _adapter(out).values()} == {torch.float32}
