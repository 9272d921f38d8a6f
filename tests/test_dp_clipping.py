"""``dp.clipping: ghost`` is the same mechanism as per-sample clipping: the same clipped, noised gradient
on the demo UNet (attention LoRA by ghost norms, conv LoRA by the functorch fallback), the guard still
catches dead tensors, and a training run states the mode and spends the same ε."""

from __future__ import annotations

import json

import pytest
import torch

from privlora.config import load_config
from privlora.errors import UserError
from privlora.tasks.diffusion import DiffusionTask
from privlora.train.dp import DPParameters, PrivateTraining
from privlora.train.dp_clipping import CLIPPING, clipping_mode
from privlora.train.loop import train
from test_dp import _lora_task  # the tests folder is on sys.path, as for conftest

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Optimal order",
                                        "ignore:Using a non-full backward hook", "ignore::RuntimeWarning")


def _task() -> DiffusionTask:
    """The embedded UNet + LoRA on attention and convs with B moved off zero (test_dp's)."""
    return _lora_task()[0]


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x0 = torch.rand((n, 1, 32, 32), generator=gen) * 2 - 1
    return x0, torch.randint(0, 1000, (n,), generator=gen), torch.randn(x0.shape, generator=gen)


def _one_step(clipping: str, clip: float) -> tuple[list[torch.Tensor], PrivateTraining]:
    """One DP-SGD step's noised gradient (lr 0: the weights stay put) under ``clipping``."""
    task = _task()
    params = DPParameters(noise_multiplier=0.7, max_grad_norm=clip, sample_rate=0.5, delta=1e-5, steps=1,
                          accountant="rdp")
    private = PrivateTraining(task, torch.optim.SGD(task.trainable_parameters(), lr=0.0), params, n=12,
                              seed=3, clipping=clipping)
    x0, t, noise = _batch()
    private.zero_grad()
    private.backward(((task.predict_noise(x0, t, noise) - noise) ** 2).flatten(1).mean(1))
    private.check_grad_samples()
    private.step()
    grads = [p.grad.detach().clone() for p in task.trainable_parameters()]
    private.unwrap()
    return grads, private


@pytest.mark.parametrize("clip", [1e-3, 10.0], ids=["every-sample-clipped", "none-clipped"])
def test_ghost_clipping_gives_the_per_sample_mechanisms_noised_gradient(clip: float) -> None:
    reference, _ = _one_step("per-sample", clip)
    ghost, private = _one_step("ghost", clip)
    assert private.checked
    for a, b in zip(reference, ghost, strict=True):
        scale = a.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4 * scale)


def test_ghost_guard_sees_every_tensor_and_an_empty_batch_still_steps() -> None:
    task = _task()
    params = DPParameters(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, delta=1e-5, steps=2,
                          accountant="rdp")
    private = PrivateTraining(task, torch.optim.SGD(task.trainable_parameters(), lr=0.1), params, n=12, seed=0,
                              clipping="ghost")
    x0, t, noise = _batch(4)
    private.zero_grad()
    private.backward(((task.predict_noise(x0, t, noise) - noise) ** 2).flatten(1).mean(1))
    evidence = [clipping_mode("ghost").evidence(p) for p in task.trainable_parameters()]
    assert all(e is not None and e.shape == (4,) and torch.all(e > 0) for e in evidence)
    # a dead tensor (its per-sample norms all zero) is refused, as under per-sample clipping
    first = task.trainable_parameters()[0]
    first._norm_sample = torch.zeros_like(first._norm_sample)
    with pytest.raises(RuntimeError, match="all-zero per-sample gradients"):
        private.check_grad_samples()
    before = [p.detach().clone() for p in task.trainable_parameters()]
    private.zero_grad()
    private.step(empty_batch=True)  # noise only: the weights move, the step is counted
    assert private.steps_taken == 1
    assert any(not torch.equal(b, p) for b, p in zip(before, task.trainable_parameters(), strict=True))
    private.unwrap()


def test_unknown_mode_is_one_clear_error() -> None:
    assert set(CLIPPING) == {"per-sample", "ghost"}
    with pytest.raises(UserError, match="dp.clipping"):
        clipping_mode("fast")


def test_a_ghost_run_learns_states_its_mode_and_spends_the_same_epsilon(tmp_path) -> None:
    def run(name: str, clipping: str) -> dict:
        out = tmp_path / name
        train(load_config(None, {"mode": "dp", "dp.noise_multiplier": 1.0, "dp.clipping": clipping,
                                 "optim.max_steps": 4, "optim.batch_size": 8, "out": str(out), "quiet": True,
                                 "data.limit": 40, "eval.timesteps": [200], "eval.samples": 0}))
        return json.loads((out / "privacy.json").read_text())

    ghost, per_sample = run("ghost", "ghost"), run("per-sample", "per-sample")
    assert ghost["clipping"] == "ghost" and per_sample["clipping"] == "per-sample"
    assert ghost["epsilon"] == pytest.approx(per_sample["epsilon"])
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "ghost" / "adapter" / "adapter_model.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    assert any(k.endswith("lora_B.weight") and w.abs().sum() > 0 for k, w in weights.items())  # B moved off 0
