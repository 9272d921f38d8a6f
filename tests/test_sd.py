"""The Stable Diffusion path (``--base <pipeline folder>``) on a tiny pipeline built from config.

Nothing is downloaded: the pipeline (UNet, VAE, CLIP text encoder, CLIP tokenizer from a hand-written
vocabulary, DDPM scheduler) is built with random weights exactly as diffusers' own tests do.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, assert_nothing_written, assert_one_line_error
from conftest import run_cli as _run_cli

# 8 images: 4 members, 2 aux, 2 eval — enough for every mode, including SMP's proxy attacker.
SPLIT = ["--set", "data.members=0.5", "--set", "data.aux=0.25", "--set", "data.eval=0.25"]
RUN_FILES = ("adapter/pytorch_lora_weights.safetensors", "adapter/adapter_model.safetensors",
             "adapter/adapter_config.json", "privacy.json", "utility.json", "config.yaml", "splits.json")


@contextmanager
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 OpenMP threads on these tiny convolutions
    oversubscribe and run ~100× slower. Speed only; the code under test is the same."""
    old_env, old_threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        if old_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old_env


@pytest.fixture(scope="module", autouse=True)
def _single_threaded():
    with _one_thread():
        yield


def run_cli(*args: str):
    with _one_thread():
        return _run_cli(*args)




def _tiny_tokenizer(folder: Path):
    """A CLIP tokenizer from a one-character-per-token vocabulary (no merges), built offline."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=16)


def _tiny_pipeline(tmp: Path):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, sample_size=16)
    tokenizer = _tiny_tokenizer(tmp / "tokenizer-src")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=1,
        hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=16))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, clip_sample=False)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _image_folder(folder: Path, *, captions: bool) -> Path:
    from skimage import data

    folder.mkdir(parents=True)
    photo = data.astronaut()
    rows = []
    for i in range(8):
        size = 32 + 4 * i
        Image.fromarray(photo[40 * i:40 * i + size, 30 * i:30 * i + size]).save(folder / f"img{i}.png")
        rows.append(json.dumps({"file_name": f"img{i}.png", "text": f"a photo number {i}"}))
    if captions:
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="session")
def sd(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD pipeline (safetensors), the same pipeline saved as pickle, captioned and bare image folders."""
    tmp = tmp_path_factory.mktemp("sd")
    pipe = _tiny_pipeline(tmp)
    pipe.save_pretrained(tmp / "pipe", safe_serialization=True)
    pipe.save_pretrained(tmp / "pipe-pickle", safe_serialization=False)
    for st in (tmp / "pipe-pickle").rglob("*.safetensors"):  # transformers ≥ 5 always writes safetensors
        from safetensors.torch import load_file

        torch.save(load_file(str(st)), st.with_name("pytorch_model.bin"))
        st.unlink()
    assert (tmp / "pipe" / "model_index.json").is_file()
    assert not list((tmp / "pipe-pickle").rglob("*.safetensors"))
    return {"pipe": tmp / "pipe", "pickle": tmp / "pipe-pickle",
            "images": _image_folder(tmp / "images", captions=True),
            "bare": _image_folder(tmp / "bare", captions=False)}


def _train_args(sd: dict[str, Path], out: Path, mode: str, data: str = "images") -> list[str]:
    return ["train", "--base", str(sd["pipe"]), "--data", str(sd[data]), "--mode", mode, "--max-steps", "2",
            "--batch-size", "2", "--out", str(out), *SPLIT, *FAST]


def _assert_run(run: Path, mode: str) -> None:
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    assert not run.with_name(run.name + ".partial").exists()
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["mode"] == mode
    if mode == "dp":
        assert privacy["epsilon"] > 0
    utility = json.loads((run / "utility.json").read_text())
    assert utility  # figures were measured on the SD task


@pytest.fixture(scope="module")
def sd_run(sd, tmp_path_factory) -> Path:
    """A plain SD LoRA run through the real CLI, with lora.alpha ≠ rank (so a scale mismatch shows)."""
    out = tmp_path_factory.mktemp("sdrun") / "run"
    proc = run_cli(*_train_args(sd, out, "plain"), "--rank", "4", "--set", "lora.alpha=8",
                   "--set", "optim.lr=0.05")
    assert proc.returncode == 0, proc.stderr
    return out


def test_cli_plain_run_directory(sd_run, sd):
    _assert_run(sd_run, "plain")
    cfg = json.loads((sd_run / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(sd["pipe"])
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8


@pytest.mark.parametrize("mode", ["dp", "smp"])
def test_cli_private_modes(sd, tmp_path, mode):
    out = tmp_path / "run"
    extra = ["--noise-multiplier", "1.0"] if mode == "dp" else []
    proc = run_cli(*_train_args(sd, out, mode), *extra)
    assert proc.returncode == 0, proc.stderr
    _assert_run(out, mode)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and np.isfinite(last["loss"])
    if mode == "dp":
        privacy = json.loads((out / "privacy.json").read_text())
        assert privacy["noise_multiplier"] == 1.0 and privacy["steps"] == 2
        assert last["epsilon"] == pytest.approx(privacy["epsilon"])


@pytest.mark.parametrize(("mode", "attacker"), [("mp", "paper"), ("smp", "paper"), ("smp", "calibrated")])
def test_min_max_modes_take_a_resolution_other_than_the_native_one(sd, tmp_path, mode, attacker):
    """The pipeline is 16-px native (8×8 latents); at 32 px the error map is 4×16×16 — the paper's proxy
    attacker must be sized from the data, not from the UNet's config (this crashed with a shape error)."""
    out = tmp_path / "run"
    proc = run_cli(*_train_args(sd, out, mode), "--set", "data.resolution=32", "--set", f"mp.attacker={attacker}")
    assert proc.returncode == 0, proc.stderr
    _assert_run(out, mode)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and np.isfinite(last["loss"]) and np.isfinite(last["attacker_loss_members"])


# --- the adapter in the ecosystem ----------------------------------------------------------------

def _fixed_input():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, 8, 8, generator=g)
    states = torch.randn(2, 16, 32, generator=g)
    return x, torch.tensor([10, 700]), states


@torch.no_grad()
def _unet_out(unet) -> torch.Tensor:
    x, t, states = _fixed_input()
    unet.eval()
    return unet(x, t, encoder_hidden_states=states).sample


@pytest.fixture(scope="module")
def outputs(sd, sd_run) -> dict[str, torch.Tensor]:
    """UNet outputs on one fixed input: base, privlora's loaded adapter, plain diffusers' loaded adapter."""
    from diffusers import StableDiffusionPipeline

    from privlora.tasks.loading import load_task
    from privlora.tasks.lora import read_spec

    adapter = sd_run / "adapter"
    task = load_task(str(sd["pipe"]), read_spec(adapter), seed=1)
    fresh = _unet_out(task.model)
    task.load_adapter(adapter)
    ours = _unet_out(task.model)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd["pipe"]), safety_checker=None)
    base = _unet_out(pipe.unet)
    pipe.load_lora_weights(str(adapter))  # plain diffusers, no privlora involved
    theirs = _unet_out(pipe.unet)
    return {"base": base, "fresh": fresh, "ours": ours, "diffusers": theirs}


def test_fresh_adapter_is_a_no_op(outputs):
    torch.testing.assert_close(outputs["fresh"], outputs["base"])


def test_trained_adapter_changes_the_unet(outputs):
    assert (outputs["ours"] - outputs["base"]).abs().max() > 1e-4


def test_diffusers_load_lora_weights_matches_privlora(outputs):
    assert (outputs["diffusers"] - outputs["base"]).abs().max() > 1e-4
    torch.testing.assert_close(outputs["diffusers"], outputs["ours"], rtol=1e-5, atol=1e-6)


def test_peft_loads_adapter_on_plain_unet(sd, sd_run, outputs):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = sd_run / "adapter"
    config = LoraConfig.from_pretrained(str(adapter))
    unet = UNet2DConditionModel.from_pretrained(str(sd["pipe"]), subfolder="unet")
    inject_adapter_in_model(config, unet)
    state = {k.removeprefix("base_model.model."): v
             for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    result = set_peft_model_state_dict(unet, state)
    assert not [k for k in result.unexpected_keys if "lora_" in k]
    torch.testing.assert_close(_unet_out(unet), outputs["ours"], rtol=1e-5, atol=1e-6)


def test_generate_on_sd_run(sd_run, tmp_path):
    png = tmp_path / "grid.png"
    proc = run_cli("generate", str(sd_run), "--prompt", "a photo", "--n", "2", "--steps", "2",
                   "--out", str(png))
    assert proc.returncode == 0, proc.stderr
    with Image.open(png) as img:
        assert img.mode == "RGB"
        arr = np.asarray(img)
    assert arr.shape == (16, 32, 3)  # 2 samples of 16×16 (8 latents × VAE factor 2), side by side
    assert arr.std() > 0
    assert not list(tmp_path.glob(".*.tmp"))


# --- user errors ---------------------------------------------------------------------------------

def test_missing_captions_is_a_user_error(sd, tmp_path):
    out = tmp_path / "run"
    assert_one_line_error(run_cli(*_train_args(sd, out, "plain", data="bare")), "caption", "--prompt")
    assert_nothing_written(out)


def test_prompt_supplies_missing_captions(sd, tmp_path):
    from privlora.config import load_config
    from privlora.tasks.loading import load_task
    from privlora.train.data import load_training_data

    cfg = load_config(None, {"base": str(sd["pipe"]), "prompt": "a photo",
                             "data": {"source": str(sd["bare"])}})
    task = load_task(cfg.base, None, seed=0)
    data = load_training_data(cfg, task)
    assert len(data) == 8 and set(data.captions) == {"a photo"}
    assert tuple(data.pixels.shape[1:]) == (3, 16, 16)  # the pipeline's own size: 8 latents × VAE factor 2


def test_cli_prompt_trains_without_captions(sd, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*_train_args(sd, out, "plain", data="bare"), "--prompt", "a photo")
    assert proc.returncode == 0, proc.stderr
    _assert_run(out, "plain")


def test_cli_pickle_only_pipeline_is_refused(sd, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--base", str(sd["pickle"]), "--data", str(sd["images"]), "--max-steps", "1",
                   "--out", str(out), *SPLIT, *FAST)
    assert_one_line_error(proc, "pickle", "--trust-pickle")
    assert_nothing_written(out)


def test_trust_pickle_loads_the_pipeline(sd):
    from privlora.errors import UserError
    from privlora.tasks.loading import load_task
    from privlora.tasks.sd import StableDiffusionTask

    with pytest.raises(UserError, match="pickle.*--trust-pickle"):
        load_task(str(sd["pickle"]), None)
    task = load_task(str(sd["pickle"]), None, trust_pickle=True)
    assert isinstance(task, StableDiffusionTask)
    reference = load_task(str(sd["pipe"]), None)
    torch.testing.assert_close(_unet_out(task.model), _unet_out(reference.model))


def test_one_pickle_only_component_is_refused(sd, tmp_path):
    """A pipeline whose UNet is safetensors but whose text encoder is only pickle still needs pickle."""
    from privlora.errors import UserError
    from privlora.tasks.loading import load_task

    mixed = tmp_path / "mixed"
    shutil.copytree(sd["pipe"], mixed)
    shutil.rmtree(mixed / "text_encoder")
    shutil.copytree(sd["pickle"] / "text_encoder", mixed / "text_encoder")
    with pytest.raises(UserError, match="pickle.*text_encoder"):
        load_task(str(mixed), None)
    task = load_task(str(mixed), None, trust_pickle=True)
    reference = load_task(str(sd["pipe"]), None)
    torch.testing.assert_close(_unet_out(task.model), _unet_out(reference.model))
    states = task._text_states(["a photo"])
    torch.testing.assert_close(states, reference._text_states(["a photo"]))


def test_caption_longer_than_the_text_encoder_is_truncated(sd):
    from privlora.tasks.loading import load_task

    task = load_task(str(sd["pipe"]), None)
    task.pipe.tokenizer.model_max_length = int(1e30)  # what tokenizers without a limit report
    states = task._text_states(["a " * 100, "short"])
    assert states.shape == (2, 16, 32)


def test_pickle_files_that_are_never_loaded_are_not_refused(sd, tmp_path):
    """A repo snapshot often ships a single-file ``.ckpt`` beside ``model_index.json`` and a pickle-only
    safety checker; privlora loads neither, so neither may force --trust-pickle."""
    from privlora.errors import UserError
    from privlora.tasks.loading import load_task

    folder = tmp_path / "snapshot"
    shutil.copytree(sd["pipe"], folder)
    (folder / "v1-5-pruned.ckpt").write_bytes(b"\x80\x04not loaded")
    index = json.loads((folder / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "safety_checker").mkdir()
    (folder / "safety_checker" / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    task = load_task(str(folder), None)
    torch.testing.assert_close(_unet_out(task.model), _unet_out(load_task(str(sd["pipe"]), None).model))
    (folder / "model_index.json").write_text("{not json")
    with pytest.raises(UserError, match="model_index.json"):
        load_task(str(folder), None)


def test_cached_hub_id_with_only_pickle_weights(sd, tmp_path, monkeypatch, capfd):
    """``--base owner/name`` from the local hub cache (offline): refused naming --trust-pickle with nothing
    else on stderr (no hub/diffusers log lines before the one error line), loaded with it (it used to be
    refused even with --trust-pickle)."""
    import huggingface_hub.constants

    from privlora.errors import UserError
    from privlora.tasks.loading import load_task

    repo = tmp_path / "hub" / "models--tiny--sd-pickle"
    shutil.copytree(sd["pickle"], repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    capfd.readouterr()
    with pytest.raises(UserError, match="pickle.*--trust-pickle"):
        load_task("tiny/sd-pickle", None)
    assert capfd.readouterr().err == ""
    task = load_task("tiny/sd-pickle", None, trust_pickle=True)
    assert capfd.readouterr().err == ""
    torch.testing.assert_close(_unet_out(task.model), _unet_out(load_task(str(sd["pipe"]), None).model))


def test_sd_folder_copy_without_model_index_is_a_user_error(sd, tmp_path):
    from privlora.errors import UserError
    from privlora.tasks.loading import load_task

    broken = tmp_path / "broken"
    shutil.copytree(sd["pipe"], broken)
    (broken / "model_index.json").unlink()
    with pytest.raises(UserError, match="model_index.json"):
        load_task(str(broken), None)


# --- prediction types (SD 2.x 768 models predict v, not ε) ---------------------------------------

def _task_with_prediction(sd, prediction_type: str):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from privlora.tasks.sd import StableDiffusionTask

    pipe = StableDiffusionPipeline.from_pretrained(str(sd["pipe"]), safety_checker=None)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    return StableDiffusionTask(pipe, None, base_name="tiny", seed=0)


def _batch(sd) -> dict:
    from privlora.data.folder import load_folder

    data, _ = load_folder(sd["images"], channels=3, resolution=16)
    return {"pixels": data.pixels[:3], "captions": data.captions[:3]}


class _Oracle(torch.nn.Module):
    """A denoiser that outputs a fixed tensor: the exact target, to check the conversions."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x_t, t, encoder_hidden_states):
        from types import SimpleNamespace

        return SimpleNamespace(sample=self.out)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target_follows_the_scheduler_prediction_type(sd, prediction_type):
    task = _task_with_prediction(sd, prediction_type)
    batch = _batch(sd)
    x0 = task.encode(batch)
    t = torch.tensor([5, 400, 990])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    abar = torch.cumprod(1 - task.scheduler.betas, 0)[t].reshape(-1, 1, 1, 1)  # independent of the task
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    target = {"epsilon": noise, "v_prediction": abar.sqrt() * noise - (1 - abar).sqrt() * x0,
              "sample": x0}[prediction_type]
    # the real UNet: the loss is its error against the target of its own parametrisation
    states = task._text_states(batch["captions"])
    with torch.no_grad():
        raw = task.model(x_t, t, encoder_hidden_states=states).sample
        errors = task.squared_error(batch, timesteps=t, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(errors, (raw - target) ** 2, rtol=1e-4, atol=1e-5)
    # an oracle that outputs the exact target has zero loss, and predict_noise recovers ε from it
    task.denoiser = _Oracle(target)
    with torch.no_grad():
        perfect = task.squared_error(batch, timesteps=t, generator=torch.Generator().manual_seed(0))
        assert float(perfect.max()) < 1e-8
        torch.testing.assert_close(task.predict_noise(x0, t, noise, batch), noise, rtol=1e-4, atol=1e-4)


def test_unknown_prediction_type_is_a_user_error(sd):
    from privlora.errors import UserError

    with pytest.raises(UserError, match="prediction_type"):
        _task_with_prediction(sd, "flow")


def test_unet2d_folder_that_predicts_v_is_refused(tmp_path):
    """A plain UNet2DModel base is trained on ε only: a v-prediction one is refused, not silently ruined."""
    from diffusers import DDPMScheduler, UNet2DModel

    from privlora.errors import UserError
    from privlora.tasks.loading import load_task
    from privlora.tasks.unet import UNetTask

    folder = tmp_path / "unet"
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                layers_per_block=1, norm_num_groups=4).save_pretrained(folder)
    DDPMScheduler().save_pretrained(folder)
    assert isinstance(load_task(str(folder), None), UNetTask)
    DDPMScheduler(prediction_type="v_prediction").save_pretrained(folder)
    with pytest.raises(UserError, match="v_prediction"):
        load_task(str(folder), None)
