"""Stable Diffusion training extras on the tiny pipeline of ``test_sd.py``: the on-disk encoder cache
(``--cache-latents``), SDPA attention, validation grids and ``--num-train-epochs``.

Training runs in-process (``privlora.train.loop.train``) to stay within seconds per test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import FAST, assert_one_line_error, invoke_cli
from privlora.config import load_config
from privlora.errors import UserError
from test_sd import _image_folder, _tiny_pipeline

SPLIT = {"data.members": 0.5, "data.aux": 0.25, "data.eval": 0.25}  # 8 images: 4 members, 2 eval


@pytest.fixture(scope="module")
def sdx(tmp_path_factory, one_torch_thread) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("sdx")
    _tiny_pipeline(tmp).save_pretrained(tmp / "pipe", safe_serialization=True)
    return {"pipe": tmp / "pipe", "images": _image_folder(tmp / "images", captions=True), "tmp": tmp}


def _train(sdx: dict[str, Path], out: Path, **extra):
    from privlora.train.loop import train

    settings = {"base": str(sdx["pipe"]), "data.source": str(sdx["images"]), "mode": "plain",
                "optim.max_steps": 2, "optim.batch_size": 2, "optim.lr": 0.05, "out": str(out), "quiet": True,
                # SGD: Adam's first step is lr·sign(g), which turns a 1e-8 gradient difference into 2·lr
                "optim.optimizer": "sgd", "eval.timesteps": [200], "eval.samples": 0, "eval.sample_steps": 2,
                **SPLIT, **extra}
    return train(load_config(None, settings))


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def baseline(sdx, tmp_path_factory) -> Path:
    """The plain run every comparison starts from: no cache, no validation."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    _train(sdx, out, **{"log_every": 1})
    return out


def _entries(root: Path) -> dict[str, int]:
    """cache file name → mtime_ns, latents and text states alike."""
    return {f"{p.parent.name}/{p.name}": p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}


def _task(sdx: dict[str, Path]):
    from privlora.tasks.loading import load_task
    from privlora.tasks.lora import LoraSpec

    return load_task(str(sdx["pipe"]), LoraSpec(rank=4, alpha=4, targets=("to_q", "to_k", "to_v", "to_out.0")))


def test_second_run_hits_the_cache_and_trains_the_same(sdx, baseline, tmp_path):
    cache = tmp_path / "cache"
    opts = {"data.cache_latents": True, "data.cache_dir": str(cache), "log_every": 1}
    _train(sdx, tmp_path / "cold", **opts)
    filled = _entries(cache)
    # the 4 members and 2 held-out images the utility measure reads, and their 6 distinct captions
    assert sum(k.startswith("latents/") for k in filled) == 6
    assert sum(k.startswith("text/") for k in filled) == 6
    _train(sdx, tmp_path / "warm", **opts)
    assert _entries(cache) == filled  # nothing recomputed or rewritten: every entry was a hit
    cold, warm, plain = (_adapter(tmp_path / "cold"), _adapter(tmp_path / "warm"), _adapter(baseline))
    assert _losses(tmp_path / "cold") == _losses(tmp_path / "warm")
    assert all(torch.equal(cold[k], warm[k]) for k in cold)
    # without the cache the VAE sees whole batches, which differ from single images in the last bits
    # (measured: adapters within 1e-8 of each other after 2 steps)
    assert _losses(baseline) == pytest.approx(_losses(tmp_path / "cold"), rel=1e-5)
    assert any(not torch.equal(plain[k], torch.zeros_like(plain[k])) for k in plain)
    assert all(torch.allclose(plain[k], cold[k], atol=1e-6) for k in plain)


def test_changed_image_or_model_is_another_key(sdx, tmp_path):
    task = _task(sdx)
    task.enable_encoder_cache(tmp_path)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    task.encode({"pixels": pixels})
    first = set(_entries(tmp_path))
    assert len(first) == 2
    changed = pixels.clone()
    changed[1, 0, 3, 3] += 1e-3  # one sub-pixel of one image
    task.encode({"pixels": changed})
    assert len(set(_entries(tmp_path)) - first) == 1  # the untouched image was a hit
    task.encode({"pixels": pixels.flip(-1)[:1]})  # a flip is another input, so another entry
    assert len(_entries(tmp_path)) == 4
    other = _task(sdx)
    with torch.no_grad():
        next(other.pipe.vae.parameters()).add_(1e-4)  # the same architecture, other weights
    other.enable_encoder_cache(tmp_path)
    other.encode({"pixels": pixels})
    assert len(_entries(tmp_path)) == 6


def test_corrupt_entries_are_rebuilt(sdx, tmp_path, capfd):
    task = _task(sdx)
    task.enable_encoder_cache(tmp_path)
    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    expected = task.encode({"pixels": pixels})
    files = sorted((tmp_path / "latents").iterdir())
    files[0].write_bytes(files[0].read_bytes()[:50])  # truncated
    raw = bytearray(files[1].read_bytes())
    raw[-3] ^= 0xFF  # one flipped bit pattern in the tensor data: still parses, checksum disagrees
    files[1].write_bytes(bytes(raw))
    files[2].write_bytes(b"not a safetensors file")
    fresh = _task(sdx)
    fresh.enable_encoder_cache(tmp_path)
    assert torch.equal(fresh.encode({"pixels": pixels}), expected)
    assert fresh._latent_store.stats() == {"hits": 0, "misses": 3, "rebuilt": 3}
    assert "rebuilding a corrupt latent cache entry" in capfd.readouterr().err
    again = _task(sdx)
    again.enable_encoder_cache(tmp_path)
    assert torch.equal(again.encode({"pixels": pixels}), expected)
    assert again._latent_store.stats() == {"hits": 3, "misses": 0, "rebuilt": 0}


def test_cache_refuses_a_random_crop():
    with pytest.raises(UserError, match="random crop"):
        load_config(None, {"data.cache_latents": True, "data.center_crop": False})
    load_config(None, {"data.cache_latents": True, "data.random_flip": True})  # both flips cached


def test_unet_attention_runs_through_sdpa(sdx, monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from diffusers.models.attention_processor import F as attention_functional

    from privlora.tasks.sd import use_sdpa

    task = _task(sdx)
    processors = task.pipe.unet.attn_processors
    assert processors and all(type(p) is AttnProcessor2_0 for p in processors.values())
    calls = []
    original = attention_functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention_functional, "scaled_dot_product_attention", counting)
    batch = {"pixels": torch.rand(2, 3, 16, 16) * 2 - 1, "captions": ["a", "b"]}
    task.per_sample_loss(batch, torch.Generator().manual_seed(0)).sum().backward()
    assert calls  # the LoRA-injected UNet's forward reached PyTorch's fused kernel
    task.pipe.unet.set_attn_processor(AttnProcessor())  # a base that had the classic processor
    use_sdpa(task.pipe.unet)
    assert all(type(p) is AttnProcessor2_0 for p in task.pipe.unet.attn_processors.values())


def test_validation_grids_leave_the_adapter_unchanged(sdx, baseline, tmp_path):
    out = tmp_path / "run"
    _train(sdx, out, **{"validation.prompt": "a photo", "validation.steps": 1, "validation.images": 2,
                        "log_every": 1})
    grids = sorted(p.name for p in (out / "validation").iterdir())
    assert grids == ["step-1.png", "step-2.png"]
    first, second = (Image.open(out / "validation" / g) for g in grids)
    assert first.size == (32, 16) and first.mode == "RGB"  # two 16-px images side by side
    assert list(first.getdata()) != list(second.getdata())  # the adapter moved between the two steps
    assert _losses(out) == _losses(baseline)
    a, b = _adapter(out), _adapter(baseline)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_on_an_unconditional_base_ignores_the_prompt(tmp_path, capfd, one_torch_thread):
    from privlora.train.loop import train

    out = tmp_path / "run"
    train(load_config(None, {"data.source": "demo:digits", "data.limit": 16, "optim.max_steps": 1,
                             "optim.batch_size": 2, "out": str(out), "quiet": True, "eval.timesteps": [200],
                             "eval.samples": 0, "eval.sample_steps": 2, "lora.rank": 2,
                             "validation.prompt": "ignored", "validation.steps": 1, "validation.images": 1}))
    assert (out / "validation" / "step-1.png").is_file()
    assert "--validation-prompt is ignored" in capfd.readouterr().err


def test_epochs_set_the_number_of_steps(sdx, tmp_path):
    from privlora.train.epochs import steps_for_epochs

    assert steps_for_epochs(3, members=10, global_batch=4) == 8  # ceil(30 / 4)
    assert steps_for_epochs(2, members=3, global_batch=8) == 2  # a step takes all 3 when B > N
    out = tmp_path / "run"
    result = _train(sdx, out, **{"optim.num_train_epochs": 2, "optim.gradient_accumulation_steps": 2,
                                 "optim.max_steps": 400})
    assert result.steps == 2  # 2 epochs × 4 members / (2 × 2) per update; max_steps is overridden
    saved = load_config(out / "config.yaml")
    assert saved.optim.max_steps == 2 and saved.optim.num_train_epochs == 2


def test_epochs_and_max_steps_together_are_refused():
    proc = invoke_cli("train", "--max-steps", "5", "--num-train-epochs", "2", *FAST)
    assert_one_line_error(proc, "--max-steps or --num-train-epochs")


def test_max_steps_flag_replaces_the_epochs_of_a_config_file(sdx, tmp_path):
    config = tmp_path / "epochs.yaml"
    config.write_text("optim:\n  num_train_epochs: 3\n  batch_size: 2\n")
    out = tmp_path / "run"
    proc = invoke_cli("train", "--config", str(config), "--base", str(sdx["pipe"]), "--data", str(sdx["images"]),
                      "--max-steps", "1", "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    saved = load_config(out / "config.yaml")
    assert saved.optim.max_steps == 1 and saved.optim.num_train_epochs is None
