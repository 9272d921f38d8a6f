"""The one DDIM sampler (``DiffusionTask.ddim``, issue 19) against diffusers' ``DDIMScheduler`` loop.

Generation, validation, utility, extraction, synthesis and concept erasure all sample through it; before
issue 19 each had its own copy of this loop. The reference here is that loop written out with diffusers
directly (η = 0, ε from the UNet at each of ``set_timesteps(steps)``), and CFG as concept erasure computed
it: ε(∅) + s·(ε(c) − ε(∅)) from one batched pass. The numbers must be the same bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from test_sd import _one_thread, _tiny_pipeline


@pytest.fixture(scope="module", autouse=True)
def _single_threaded():
    with _one_thread():
        yield


def _reference(task, noise: torch.Tensor, steps: int, captions: list[str] | None = None, *, stop: int | None = None,
               guidance_scale: float = 1.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """diffusers' DDIM loop on the task's UNet: (x after ``stop`` steps, the states visited before each)."""
    ddim = DDIMScheduler.from_config(task.scheduler.config)
    ddim.set_timesteps(steps)
    x, n, visited = noise.clone(), noise.shape[0], []
    with torch.no_grad():
        for t in ddim.timesteps[:stop]:
            visited.append(x)
            if captions is None:
                eps = task.denoise(x, t.expand(n), {})
            elif guidance_scale == 1.0:
                eps = task.denoise(x, t.expand(n), {"captions": captions})
            else:
                both = task.denoise(torch.cat([x, x]), t.expand(2 * n), {"captions": captions + [""] * n})
                eps = both[n:] + guidance_scale * (both[:n] - both[n:])
            x = ddim.step(eps, t, x).prev_sample
    return x, visited


@pytest.fixture(scope="module")
def pixel_task():
    from privlora.tasks.loading import load_task
    from privlora.tasks.lora import LoraSpec

    task = load_task("embedded", LoraSpec(rank=4, alpha=8, targets=("to_q", "to_k", "to_v", "conv1")), seed=0)
    task.model.eval()
    return task


@pytest.fixture(scope="module")
def sd_task(tmp_path_factory):
    """The tiny SD pipeline of test_sd.py with a LoRA whose B is not zero (so the adapter takes part)."""
    from privlora.tasks.lora import LoraSpec
    from privlora.tasks.sd import StableDiffusionTask

    tmp: Path = tmp_path_factory.mktemp("ddim")
    task = StableDiffusionTask(_tiny_pipeline(tmp), LoraSpec(rank=4, alpha=8, targets=("to_q", "to_k", "to_v")),
                               base_name="tiny", seed=0)
    task.model.eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in task.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return task


def test_pixel_ddim_sample_and_generations_are_the_diffusers_loop(pixel_task):
    from privlora.audit.extraction import generations, initial_noise
    from privlora.synthesize.samplers import SAMPLERS, Batch, SamplerOptions, sampler_kind

    task = pixel_task
    noise = torch.randn((2, *task.sample_shape()), generator=torch.Generator().manual_seed(8))
    expected, _ = _reference(task, noise, 4)
    assert torch.equal(task.ddim(noise, 4), expected)
    assert not torch.equal(expected, noise)  # the loop did run
    # sample: x_T for the batch from the generator, then the same loop
    drawn = torch.randn((2, *task.sample_shape()), generator=torch.Generator().manual_seed(7))
    sampled = task.sample(2, generator=torch.Generator().manual_seed(7), steps=3)
    assert torch.equal(sampled, _reference(task, drawn, 3)[0])
    # extraction's generations and the pixel synthesis sampler: per-image seeds, the same loop
    seeded = initial_noise(tuple(task.sample_shape()), 5, 0, 2)
    pixels = task.to_pixels(_reference(task, seeded, 3)[0]).float()
    (_, generated), = list(generations(task, 2, seed=5, batch=2, steps=3))
    assert torch.equal(generated, pixels)
    kind = sampler_kind(task, controlnet=False)
    synthetic = SAMPLERS[kind](task, SamplerOptions(steps=3))(Batch(noise=seeded, prompts=["", ""]))
    assert torch.equal(synthetic, pixels)


def test_guided_partial_and_recorded_ddim_is_concept_erasures_loop(sd_task):
    from privlora.unlearn.concept import denoise_until

    task = sd_task
    noise = torch.randn((2, *task.sample_shape()), generator=torch.Generator().manual_seed(9))
    prompt = ["sks dog"] * 2
    expected, visited = _reference(task, noise, 5, prompt, stop=3, guidance_scale=3.0)
    x, states = denoise_until(task, "sks dog", noise, steps=5, stop=3, guidance_scale=3.0, record=True)
    assert torch.equal(x, expected)
    assert len(states) == 3 and all(torch.equal(a, b) for a, b in zip(states, visited, strict=True))
    unguided = task.ddim(noise, 5, batch={"captions": prompt}, until=3)
    assert torch.equal(unguided, _reference(task, noise, 5, prompt, stop=3)[0])
    assert not torch.allclose(unguided, x)  # guidance changed the trajectory: the test can tell them apart
    # the empty prompt (and s = 1) needs no unconditioned twin: one pass, as the reference
    empty, _ = denoise_until(task, "", noise, steps=3, stop=3, guidance_scale=7.5)
    assert torch.equal(empty, _reference(task, noise, 3, ["", ""])[0])
    # a conditioned sample (canary audit, validation grids) is the same loop
    drawn = torch.randn((2, *task.sample_shape()), generator=torch.Generator().manual_seed(3))
    sampled = task.sample(2, generator=torch.Generator().manual_seed(3), steps=3, batch={"captions": ["a", "b"]})
    assert torch.equal(sampled, _reference(task, drawn, 3, ["a", "b"])[0])
