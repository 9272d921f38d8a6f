"""ESD concept erasure (privlora.unlearn.concept) on the tiny Stable Diffusion pipeline of test_sd.py.

The source run is a real 1-step SD LoRA run (train loop, in process); the erasure runs for real and is
checked against independent computations: the ESD target recomputed with plain diffusers (the source
adapter loaded with ``load_lora_weights``), guidance measured again from scratch, files re-read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from test_sd import _image_folder, _one_thread, _tiny_pipeline

CONCEPT = "sks dog"
KEPT = ("zebra on grass", "a red car")
# small enough for the shared CI CPU: 4-step DDIM for x_t, 20 Adam steps of 4 states, 2 trajectories per prompt
FAST_ESD = {"steps": 20, "lr": 5e-3, "batch_size": 4, "sample_steps": 4, "n_eval": 2, "preserve": KEPT}


@pytest.fixture(scope="module", autouse=True)
def _single_threaded():
    with _one_thread():
        yield


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD pipeline folder and a 1-step plain LoRA run on it (alpha ≠ rank, so scaling errors show)."""
    from privlora.config import load_config
    from privlora.train.loop import train

    tmp = tmp_path_factory.mktemp("concept")
    _tiny_pipeline(tmp).save_pretrained(tmp / "pipe", safe_serialization=True)
    images = _image_folder(tmp / "images", captions=True)
    cfg = load_config(None, {
        "base": str(tmp / "pipe"), "out": str(tmp / "run"), "quiet": True, "seed": 3,
        "data": {"source": str(images), "members": 0.5, "aux": 0.25, "eval": 0.25},
        "optim": {"max_steps": 1, "batch_size": 2, "lr": 0.05}, "lora": {"rank": 4, "alpha": 8},
        "eval": {"timesteps": [200], "samples": 0}})
    train(cfg)
    return {"pipe": tmp / "pipe", "run": tmp / "run", "tmp": tmp}


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def erased(source) -> dict:
    """η = 0 (map the concept onto ∅) with the anchor term keeping the other prompts and ∅ (pure ESD on a
    random-init pipeline erases every prompt alike: their guidance directions have cosine ≈ 0.9)."""
    from privlora.unlearn.concept import erase_concept

    before = _hashes(source["run"])
    out = source["tmp"] / "erased"
    figures = erase_concept(source["run"], CONCEPT, out, eta=0.0, preserve_weight=3.0, seed=0, **FAST_ESD)
    return {"figures": figures, "out": out, "hashes_before": before}


# --- the objective -------------------------------------------------------------------------------

def test_esd_target_matches_plain_diffusers(source):
    """ESD's target from the weight-swapped frozen model equals ε*(∅) − η(ε*(c) − ε*(∅)) recomputed with the
    source adapter loaded into a plain diffusers pipeline, while the adapter being trained has moved."""
    from diffusers import StableDiffusionPipeline

    from privlora.unlearn.concept import _load_source, _trainable, esd_batch

    _, task, adapter = _load_source(source["run"])
    _, trained = _trainable(task, "xattn")
    frozen = [p.detach().clone() for p in trained]
    with torch.no_grad():  # the live adapter drifts from the source, as it does after a few ESD steps
        g = torch.Generator().manual_seed(5)
        for p in trained:
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    live = [p.detach().clone() for p in trained]
    g = torch.Generator().manual_seed(11)
    x_t, t, eta = torch.randn(2, 4, 8, 8, generator=g), torch.tensor(601), 1.7
    out = esd_batch(task, CONCEPT, x_t, t, trained, frozen, eta=eta, anchors=(KEPT[0],))

    pipe = StableDiffusionPipeline.from_pretrained(str(source["pipe"]), safety_checker=None)
    pipe.load_lora_weights(str(adapter))
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(CONCEPT, "cpu", 2, True, negative_prompt="")
        kept, _ = pipe.encode_prompt(KEPT[0], "cpu", 2, False)
        e_c = pipe.unet(x_t, t, encoder_hidden_states=cond).sample
        e_u = pipe.unet(x_t, t, encoder_hidden_states=uncond).sample
        e_k = pipe.unet(x_t, t, encoder_hidden_states=kept).sample
    assert (e_c - e_u).abs().max() > 1e-4  # the prompt matters, so the check below is not vacuous
    torch.testing.assert_close(out["target"], e_u - eta * (e_c - e_u), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["anchor_target"], e_k, rtol=1e-4, atol=1e-5)
    # the trained prediction is the live (drifted) model's, with a graph; the live weights are back in place
    assert out["pred"].requires_grad
    assert (out["pred"] - e_c).abs().max() > 1e-3
    for p, v in zip(trained, live, strict=True):
        torch.testing.assert_close(p.detach(), v)


def test_params_groups_split_cross_attention(source):
    from privlora.unlearn.concept import _load_source, _trainable

    _, task, _ = _load_source(source["run"])
    x_names, _ = _trainable(task, "xattn")
    u_names, _ = _trainable(task, "noxattn")
    all_names, _ = _trainable(task, "all")
    assert x_names and all(".attn2." in n for n in x_names)
    assert u_names and not any(".attn2." in n for n in u_names)
    assert sorted(x_names + u_names) == sorted(all_names)
    assert [n for n, p in task.model.named_parameters() if p.requires_grad] == all_names


# --- erasure -------------------------------------------------------------------------------------

def _guidance_now(pipe, adapter: Path, prompt: str, xs: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """ε(x, prompt) − ε(x, ∅) from a plain diffusers pipeline with ``adapter`` loaded (then unloaded)."""
    pipe.load_lora_weights(str(adapter))
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, "cpu", xs.shape[0], True, negative_prompt="")
        delta = (pipe.unet(xs, ts, encoder_hidden_states=cond).sample
                 - pipe.unet(xs, ts, encoder_hidden_states=uncond).sample)
    pipe.unload_lora_weights()
    return delta


def test_concept_guidance_drops_and_preserved_prompts_stay(erased):
    s = erased["figures"]["summary"]
    assert s["concept_guidance_ratio"] < 0.7 and s["concept_guidance_toward"] < 0.5
    assert s["preserved_guidance_ratio"] == pytest.approx(1.0, abs=0.2)
    assert s["preserved_guidance_toward"] > 0.75
    # the concept moved by most of its guidance, the preserved prompts by a small part of theirs
    prompts = erased["figures"]["prompts"]
    assert prompts[CONCEPT]["guidance_change"] > 2 * max(prompts[k]["guidance_change"] for k in KEPT)
    # generations: the concept's images moved toward the ∅ images, the preserved ones stayed with the source
    assert s["concept_gen_mse_to_uncond_after"] < 0.5 * s["concept_gen_mse_to_uncond_before"]
    assert s["preserved_gen_mse_to_source"] < 0.2 * s["preserved_gen_mse_to_uncond_before"]


def test_erased_adapter_loads_in_diffusers_and_erases(erased, source):
    """The written adapter, loaded by plain diffusers, shows the erasure on fresh states (not the ones the
    figures used): the concept's guidance shrinks, a preserved prompt's much less."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(source["pipe"]), safety_checker=None)
    g = torch.Generator().manual_seed(99)
    xs, ts = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([900, 500, 100])
    ratio = {}
    for prompt in (CONCEPT, KEPT[0]):
        before = _guidance_now(pipe, source["run"] / "adapter", prompt, xs, ts)
        after = _guidance_now(pipe, erased["out"] / "adapter", prompt, xs, ts)
        ratio[prompt] = float(after.norm() / before.norm())
    assert ratio[CONCEPT] < 0.7
    assert abs(ratio[KEPT[0]] - 1) < 0.25
    assert abs(ratio[KEPT[0]] - 1) < 0.5 * abs(ratio[CONCEPT] - 1)


def test_output_run_directory(erased, source):
    out = erased["out"]
    for name in ("config.yaml", "adapter/pytorch_lora_weights.safetensors", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "privacy.json", "unlearn.json", "splits.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "config.yaml").read_bytes() == (source["run"] / "config.yaml").read_bytes()
    assert json.loads((out / "unlearn.json").read_text()) == json.loads(json.dumps(erased["figures"]))
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["source_run"] == str(source["run"]) and privacy["mode"] == "plain"
    assert privacy["unlearning"]["concept"] == CONCEPT and privacy["unlearning"]["variant"] == "ESD-x"
    losses = [json.loads(line)["esd_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == FAST_ESD["steps"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp dirs left


def test_source_run_is_not_modified(erased, source):
    assert _hashes(source["run"]) == erased["hashes_before"]


def test_only_cross_attention_changed(erased, source):
    from safetensors.torch import load_file

    old = load_file(str(source["run"] / "adapter" / "adapter_model.safetensors"))
    new = load_file(str(erased["out"] / "adapter" / "adapter_model.safetensors"))
    assert old.keys() == new.keys()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(".attn2." in k for k in changed)


# --- bad input -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory) -> Path:
    """A run directory of the embedded (unconditional UNet2DModel) base, as `privlora train` writes it."""
    from privlora.config import dump_config, load_config
    from privlora.tasks.loading import load_task
    from privlora.tasks.lora import LoraSpec

    run = tmp_path_factory.mktemp("embedded") / "run"
    cfg = load_config(None, {"out": str(run)})
    task = load_task("embedded", LoraSpec(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=cfg.lora.targets))
    task.save_adapter(run / "adapter")
    (run / "config.yaml").write_text(dump_config(cfg))
    return run


def test_unconditional_run_is_refused(embedded_run, tmp_path):
    from privlora.errors import UserError
    from privlora.unlearn.concept import erase_concept

    with pytest.raises(UserError, match=r"^concept erasure needs a text-conditioned \(Stable Diffusion\) run"):
        erase_concept(embedded_run, CONCEPT, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("concept", ["", "   "])
def test_empty_concept_is_refused(source, tmp_path, concept):
    from privlora.errors import UserError
    from privlora.unlearn.concept import erase_concept

    with pytest.raises(UserError, match="concept"):
        erase_concept(source["run"], concept, tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_existing_output_is_refused(source, tmp_path):
    from privlora.errors import UserError
    from privlora.unlearn.concept import erase_concept

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        erase_concept(source["run"], CONCEPT, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(("kwargs", "needle"), [({"params": "attn"}, "unknown params"), ({"eta": -1.0}, "eta"),
                                                 ({"steps": 0}, "steps"), ({"lr": 0.0}, "lr")])
def test_bad_options_are_refused(source, tmp_path, kwargs, needle):
    from privlora.errors import UserError
    from privlora.unlearn.concept import erase_concept

    with pytest.raises(UserError, match=needle):
        erase_concept(source["run"], CONCEPT, tmp_path / "out", **kwargs)
    assert not list(tmp_path.iterdir())


def test_output_inside_the_source_run_is_refused(source):
    from privlora.errors import UserError
    from privlora.unlearn.concept import erase_concept

    before = _hashes(source["run"])
    with pytest.raises(UserError, match="inside the source run"):
        erase_concept(source["run"], CONCEPT, source["run"] / "erased")
    assert _hashes(source["run"]) == before


def test_missing_run_is_refused(tmp_path):
    from privlora.errors import UserError
    from privlora.unlearn.concept import erase_concept

    with pytest.raises(UserError, match="does not exist"):
        erase_concept(tmp_path / "nope", CONCEPT, tmp_path / "out")


@pytest.mark.slow
def test_pure_esd_with_negative_guidance_reverses_the_concept(source, tmp_path):
    """The paper's setting (η = 1, no anchors, ESD-x): the concept's guidance turns against its old direction.
    On the random-init pipeline the other prompts go with it (their guidance directions are nearly
    parallel); that is what the anchor term of the default-run test is for."""
    from privlora.unlearn.concept import erase_concept

    figures = erase_concept(source["run"], CONCEPT, tmp_path / "out", eta=1.0, seed=0,
                            **{**FAST_ESD, "steps": 60})
    s = figures["summary"]
    assert s["concept_guidance_toward"] < 0.0
    assert s["concept_guidance_toward"] < s["preserved_guidance_toward"]
    assert figures["anchors"] == [] and not any(v["anchored"] for v in figures["prompts"].values())


def test_same_seed_same_erasure(source, tmp_path):
    from privlora.unlearn.concept import erase_concept

    kw = {**FAST_ESD, "steps": 3, "n_eval": 1, "sample_steps": 2, "preserve": KEPT[:1], "preserve_weight": 1.0}
    a = erase_concept(source["run"], CONCEPT, tmp_path / "a", seed=4, **kw)
    b = erase_concept(source["run"], CONCEPT, tmp_path / "b", seed=4, **kw)
    a.pop("seconds"), b.pop("seconds")
    assert a["adapter_change_rms"] > 0 and a == b
    from safetensors.torch import load_file

    # tensors, not bytes: safetensors writes its metadata map in no fixed order
    weights_a, weights_b = (load_file(str(tmp_path / r / "adapter" / "adapter_model.safetensors")) for r in "ab")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_broken_source_privacy_is_refused_before_work(source, tmp_path):
    import shutil

    from privlora.errors import UserError
    from privlora.unlearn.concept import erase_concept

    run = tmp_path / "run"
    shutil.copytree(source["run"], run)
    (run / "privacy.json").write_text("{not json")
    with pytest.raises(UserError, match="privacy.json"):
        erase_concept(run, CONCEPT, tmp_path / "out")
    assert not (tmp_path / "out").exists()
