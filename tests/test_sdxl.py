"""The SDXL path (``--base <SDXL pipeline folder>``) on a tiny SDXL pipeline built from config.

Nothing is downloaded: two CLIP text encoders (the second with a projection), two tokenizers from a
hand-written vocabulary, a UNet with ``addition_embed_type="text_time"`` and a VAE, random weights, as
diffusers' own SDXL pipeline tests build them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST
from test_sd import SPLIT, _assert_run, _image_folder, _tiny_tokenizer, run_cli

TIME_EMBED = 8  # addition_time_embed_dim: each of the 6 time ids gets 8 Fourier features
POOLED = 16  # text_encoder_2's projection_dim: the pooled text embedding the UNet adds


def _tiny_sdxl(tmp: Path):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * TIME_EMBED + POOLED,
        cross_attention_dim=32 + 16)  # the two encoders' hidden sizes, concatenated
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, sample_size=16)
    tokenizer = _tiny_tokenizer(tmp / "tokenizer-src")
    tokenizer_2 = _tiny_tokenizer(tmp / "tokenizer-2-src")

    def clip(hidden: int, **extra) -> CLIPTextConfig:
        return CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=1,
            hidden_size=hidden, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
            num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=16, **extra)

    text_encoder = CLIPTextModel(clip(32))
    text_encoder_2 = CLIPTextModelWithProjection(clip(16, projection_dim=POOLED))
    # SDXL ships an Euler scheduler; privlora trains with the DDPM schedule built from its config
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=scheduler, add_watermarker=False)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("sdxl")
    _tiny_sdxl(tmp).save_pretrained(tmp / "pipe", safe_serialization=True)
    index = json.loads((tmp / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and "text_encoder_2" in index
    return {"pipe": tmp / "pipe", "images": _image_folder(tmp / "images", captions=True)}


def _train(sdxl: dict[str, Path], out: Path, mode: str, *extra: str):
    return run_cli("train", "--base", str(sdxl["pipe"]), "--data", str(sdxl["images"]), "--mode", mode,
                   "--max-steps", "2", "--batch-size", "2", "--out", str(out), *SPLIT, *FAST, *extra)


@pytest.fixture(scope="module")
def sdxl_run(sdxl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdxlrun") / "run"
    proc = _train(sdxl, out, "plain", "--rank", "4", "--set", "lora.alpha=8", "--set", "optim.lr=0.05")
    assert proc.returncode == 0, proc.stderr
    return out


def test_folder_is_detected_as_sdxl(sdxl):
    from privlora.tasks.loading import load_task
    from privlora.tasks.sdxl import StableDiffusionXLTask, is_sdxl

    assert is_sdxl(str(sdxl["pipe"]))
    task = load_task(str(sdxl["pipe"]), None)
    assert isinstance(task, StableDiffusionXLTask)
    states = task._text_states(["a photo", "b"])
    assert states.shape == (2, 16, 48)  # both encoders' penultimate states, concatenated
    assert task._pooled(["a photo"]).shape == (1, POOLED)
    x = torch.zeros(3, 4, 8, 8)
    assert task.time_ids(x).tolist() == [[16, 16, 0, 0, 16, 16]] * 3  # 8 latents × VAE factor 2, no crop


def test_conditioning_reaches_the_unet(sdxl):
    """The pooled embedding and the time ids both change the UNet's output: they are not dropped."""
    from privlora.tasks.loading import load_task

    task = load_task(str(sdxl["pipe"]), None)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    states = task._text_states(["a photo"])
    pooled = task._pooled(["a photo"])
    ids = task.time_ids(x)

    @torch.no_grad()
    def out(p, i):
        return task.model(x, t, encoder_hidden_states=states,
                          added_cond_kwargs={"text_embeds": p, "time_ids": i}).sample

    base = out(pooled, ids)
    assert (out(pooled + 1, ids) - base).abs().max() > 1e-4
    assert (out(pooled, ids * 2) - base).abs().max() > 1e-4
    torch.testing.assert_close(task._denoise(x, t, {"captions": ["a photo"]}).detach(), base)


def test_cli_plain_run(sdxl_run, sdxl):
    _assert_run(sdxl_run, "plain")
    cfg = json.loads((sdxl_run / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(sdxl["pipe"]) and cfg["r"] == 4


def test_cli_dp_run(sdxl, tmp_path):
    out = tmp_path / "run"
    proc = _train(sdxl, out, "dp", "--noise-multiplier", "1.0")
    assert proc.returncode == 0, proc.stderr
    _assert_run(out, "dp")
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and np.isfinite(last["loss"])
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["noise_multiplier"] == 1.0 and privacy["steps"] == 2


def _fixed(task):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, 8, 8, generator=g)
    return x, torch.tensor([10, 700]), task._text_states(["a photo", "x"]), task._pooled(["a photo", "x"])


@torch.no_grad()
def _unet_out(unet, inputs) -> torch.Tensor:
    x, t, states, pooled = inputs
    unet.eval()
    ids = torch.tensor([[16, 16, 0, 0, 16, 16]] * 2, dtype=x.dtype)
    return unet(x, t, encoder_hidden_states=states,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample


def test_diffusers_sdxl_pipeline_loads_the_adapter(sdxl, sdxl_run):
    from diffusers import StableDiffusionXLPipeline

    from privlora.tasks.loading import load_task
    from privlora.tasks.lora import read_spec

    adapter = sdxl_run / "adapter"
    task = load_task(str(sdxl["pipe"]), read_spec(adapter), seed=1)
    inputs = _fixed(task)
    task.load_adapter(adapter)
    ours = _unet_out(task.model, inputs)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl["pipe"]), add_watermarker=False)
    base = _unet_out(pipe.unet, inputs)
    pipe.load_lora_weights(str(adapter))  # plain diffusers, no privlora involved
    theirs = _unet_out(pipe.unet, inputs)
    assert (ours - base).abs().max() > 1e-4
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def test_generate_on_sdxl_run(sdxl_run, tmp_path):
    png = tmp_path / "grid.png"
    proc = run_cli("generate", str(sdxl_run), "--prompt", "a photo", "--n", "2", "--steps", "2",
                   "--out", str(png))
    assert proc.returncode == 0, proc.stderr
    with Image.open(png) as img:
        arr = np.asarray(img.convert("RGB"))
    assert arr.shape == (16, 32, 3) and arr.std() > 0


def test_cached_hub_id_is_detected_as_sdxl(sdxl, tmp_path, monkeypatch):
    """``--base owner/name`` from the local hub cache: SDXL is read from the cached model_index.json."""
    import shutil

    import huggingface_hub.constants

    from privlora.tasks.loading import load_task
    from privlora.tasks.sdxl import StableDiffusionXLTask, is_sdxl

    repo = tmp_path / "hub" / "models--tiny--sdxl"
    shutil.copytree(sdxl["pipe"], repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert is_sdxl("tiny/sdxl") and not is_sdxl("tiny/not-cached")
    assert isinstance(load_task("tiny/sdxl", None), StableDiffusionXLTask)
