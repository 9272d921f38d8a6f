"""DP-LoRA: Opacus' per-sample gradients are right for every LoRA tensor, the accountant is Opacus' own
analysis, and ``privacy.json`` states numbers anyone can recompute."""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from conftest import CONFIGS
from privlora.config import load_config
from privlora.errors import UserError
from privlora.tasks.diffusion import DiffusionTask
from privlora.tasks.loading import load_task
from privlora.tasks.lora import LoraSpec
from privlora.train import accounting
from privlora.train.dp import DPParameters, PrivateTraining

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Optimal order",
                                        "ignore:divide by zero", "ignore::RuntimeWarning")

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
# The RDP orders Opacus' RDPAccountant uses, written out here so the check does not borrow privlora's.
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))




def _lora_task(seed: int = 0) -> tuple[DiffusionTask, list[str]]:
    """Embedded UNet + LoRA on attention and resnet convs, with B perturbed away from zero so that
    the A matrices get gradients too (with B = 0 their gradient is exactly zero)."""
    task = load_task("embedded", LoraSpec(rank=4, alpha=4, targets=TARGETS), seed=seed)
    params = task.trainable_parameters()
    by_id = {id(p): n for n, p in task.model.named_parameters()}
    names = [by_id[id(p)] for p in params]
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    task.train()
    return task, names


def _inputs(batch: int, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed images, timesteps and noise: the batched and the one-at-a-time pass see the same inputs."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand((batch, 1, 32, 32), generator=gen) * 2 - 1
    t = torch.tensor([15, 480, 960, 250][:batch])
    noise = torch.randn(x0.shape, generator=gen)
    return x0, t, noise


def _losses(task: DiffusionTask, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample ε-MSE through ``task.denoiser`` (the GradSampleModule once DP wraps it)."""
    return ((task.predict_noise(x0, t, noise) - noise) ** 2).flatten(1).mean(1)


def _wrap(task: DiffusionTask, n: int = 8) -> PrivateTraining:
    params = DPParameters(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, delta=1e-5, steps=1,
                          accountant="rdp")
    return PrivateTraining(task, torch.optim.SGD(task.trainable_parameters(), lr=0.0), params, n=n, seed=0)


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_per_sample_gradients_match_micro_batch_loop(memory_format):
    task, names = _lora_task()
    params = task.trainable_parameters()
    assert any(".conv1.lora_A" in n for n in names) and any(".conv2.lora_B" in n for n in names)
    assert any(".to_q.lora_A" in n for n in names) and any(".to_out.0.lora_B" in n for n in names)
    x0, t, noise = _inputs(3)
    if memory_format == "channels_last":  # the layout under which Opacus' hooks mode zeroes conv grads
        task.model.to(memory_format=torch.channels_last)
        x0 = x0.contiguous(memory_format=torch.channels_last)
        noise = noise.contiguous(memory_format=torch.channels_last)

    # reference: plain autograd, one sample at a time, on the unwrapped model
    assert task.denoiser is task.model
    reference = []
    for i in range(x0.shape[0]):
        loss_i = _losses(task, x0[i:i + 1], t[i:i + 1], noise[i:i + 1]).sum()
        reference.append(torch.autograd.grad(loss_i, params))

    private = _wrap(task)
    try:
        assert isinstance(task.denoiser, GradSampleModule)
        batch = x0.shape[0]
        # privlora back-propagates the *mean* of the per-sample losses; Opacus (loss_reduction="mean")
        # multiplies the backprops by the batch size, so grad_sample[i] is ∇ loss_i itself
        _losses(task, x0, t, noise).mean().backward()
        for j, (name, p) in enumerate(zip(names, params, strict=True)):
            expected = torch.stack([reference[i][j] for i in range(batch)])
            assert p.grad_sample is not None, name
            assert p.grad_sample.shape == (batch, *p.shape), name
            scale = expected.abs().max().item()
            assert scale > 0, name
            torch.testing.assert_close(p.grad_sample, expected, rtol=1e-4, atol=1e-5 * scale, msg=name)
            # the ordinary gradient of the mean is the per-sample gradients summed / batch size
            torch.testing.assert_close(p.grad, p.grad_sample.sum(0) / batch, rtol=1e-4, atol=1e-5 * scale,
                                       msg=name)
    finally:
        private.unwrap()
    assert task.denoiser is task.model


def test_every_lora_tensor_gets_nonzero_per_sample_gradient_and_check_passes():
    task, names = _lora_task(seed=1)
    x0, t, noise = _inputs(4, seed=3)
    task.model.to(memory_format=torch.channels_last)
    private = _wrap(task)
    try:
        _losses(task, x0.contiguous(memory_format=torch.channels_last), t, noise).mean().backward()
        for name, p in zip(names, task.trainable_parameters(), strict=True):
            per_sample = p.grad_sample.flatten(1).abs().amax(1)
            assert torch.all(per_sample > 0), f"{name}: some sample has an all-zero gradient"
        private.check_grad_samples()  # must not raise on healthy per-sample gradients
    finally:
        private.unwrap()


@pytest.mark.parametrize("damage", ["zeroed", "missing"])
def test_check_grad_samples_raises_on_a_dead_tensor(damage):
    task, names = _lora_task(seed=2)
    x0, t, noise = _inputs(2)
    private = _wrap(task)
    try:
        _losses(task, x0, t, noise).mean().backward()
        private.check_grad_samples()
        conv = next(i for i, n in enumerate(names) if ".conv2.lora_A" in n)
        p = task.trainable_parameters()[conv]
        if damage == "zeroed":
            p.grad_sample = torch.zeros_like(p.grad_sample)
        else:
            p.grad_sample = None
        with pytest.raises(RuntimeError, match="per-sample"):
            private.check_grad_samples()
    finally:
        private.unwrap()


def test_check_grad_samples_catches_the_real_hooks_mode_trap():
    """Opacus' hooks mode on channels_last gives all-zero conv per-sample gradients; the guard must see it."""
    task, _ = _lora_task(seed=3)
    task.model.to(memory_format=torch.channels_last)
    x0, t, noise = _inputs(2)
    private = _wrap(task)
    private.unwrap()  # swap privlora's functorch wrapper for the buggy default
    task.denoiser = GradSampleModule(task.model, force_functorch=False, loss_reduction="mean")
    try:
        _losses(task, x0.contiguous(memory_format=torch.channels_last), t, noise).mean().backward()
        dead = [p for p in task.trainable_parameters() if not torch.any(p.grad_sample != 0)]
        if not dead:
            pytest.skip("this Opacus version no longer zeroes channels_last conv per-sample gradients")
        with pytest.raises(RuntimeError, match="all-zero"):
            private.check_grad_samples()
    finally:
        task.denoiser._close()
        task.denoiser = task.model


# --- accounting ---------------------------------------------------------------------------------

def _rdp_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def _prv_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    acc = PRVAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta=delta))


CASES = [(1.0, 0.125, 2, 1e-3), (0.8, 0.05, 40, 1e-5), (2.5, 1.0, 3, 1e-4), (1.3, 0.3, 17, 1 / 320)]


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), CASES)
def test_epsilon_equals_opacus_analysis(sigma, q, steps, delta):
    mechanism = {"noise_multiplier": sigma, "sample_rate": q, "steps": steps, "delta": delta}
    rdp = accounting.epsilon(**mechanism, accountant="rdp")
    assert rdp == pytest.approx(_rdp_epsilon(sigma, q, steps, delta), rel=1e-9)
    prv = accounting.epsilon(**mechanism, accountant="prv")
    assert prv == pytest.approx(_prv_epsilon(sigma, q, steps, delta), rel=1e-6)
    assert 0 < prv <= rdp * 1.01  # PRV is the tighter bound


def test_no_steps_spend_nothing():
    assert accounting.epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5) == 0.0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_decreases_with_noise_and_grows_with_steps(accountant):
    def eps(sigma: float, steps: int = 20) -> float:
        return accounting.epsilon(noise_multiplier=sigma, sample_rate=0.1, steps=steps, delta=1e-5,
                                  accountant=accountant)

    by_sigma = [eps(s) for s in (0.7, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(by_sigma[:-1], by_sigma[1:], strict=True)), by_sigma
    by_steps = [eps(1.0, n) for n in (1, 5, 40)]
    assert all(a < b for a, b in zip(by_steps[:-1], by_steps[1:], strict=True)), by_steps


@pytest.mark.parametrize("target", [0.5, 4.0])
def test_noise_for_epsilon_round_trip(target):
    q, steps, delta = 0.1, 100, 1e-5
    sigma = accounting.noise_for_epsilon(target_epsilon=target, sample_rate=q, steps=steps, delta=delta)
    achieved = _rdp_epsilon(sigma, q, steps, delta)
    assert achieved <= target + 1e-9  # never more than asked for
    assert achieved >= target - 0.02  # and not needlessly noisy (Opacus' search tolerance is 0.01)
    assert _rdp_epsilon(0.95 * sigma, q, steps, delta) > target  # a smaller σ would overspend
    assert accounting.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta) == \
        pytest.approx(achieved, rel=1e-9)


@pytest.mark.slow
def test_noise_for_epsilon_prv_round_trip():
    q, steps, delta, target = 0.25, 10, 1e-4, 3.0
    sigma = accounting.noise_for_epsilon(target_epsilon=target, sample_rate=q, steps=steps, delta=delta,
                                         accountant="prv")
    achieved = _prv_epsilon(sigma, q, steps, delta)
    assert target - 0.05 <= achieved <= target + 1e-6


def test_impossible_target_epsilon_is_a_user_error():
    with pytest.raises(UserError, match="0.01"):
        accounting.noise_for_epsilon(target_epsilon=0.01, sample_rate=1.0, steps=1000, delta=1e-5)


def test_default_delta_is_below_one_over_n():
    for n in (1, 12, 630):
        assert accounting.default_delta(n) < 1.0 / n


# --- a short DP training run -------------------------------------------------------------------

def _strict_json(line: str) -> dict:
    def refuse(token: str) -> float:
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(line, parse_constant=refuse)


def test_dp_run_privacy_json_matches_independent_accounting(tmp_path):
    from privlora.train.loop import train

    target = 8.0
    out = tmp_path / "dp"
    config = load_config(CONFIGS / "demo-plain.yaml", {
        "mode": "dp", "out": str(out), "quiet": True, "eval.timesteps": [200], "eval.samples": 0,
        "optim.max_steps": 3, "optim.batch_size": 4, "lora.rank": 4, "lora.alpha": 4,
        "data.members": 0.12, "data.aux": 0.08, "data.eval": 0.08, "dp.target_epsilon": target})
    result = train(config)
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy == result.privacy

    n = len(json.loads((out / "splits.json").read_text())["members"])
    sigma, q, steps, delta = (privacy[k] for k in ("noise_multiplier", "sample_rate", "steps", "delta"))
    assert steps == 3
    assert q == pytest.approx(4 / n)
    assert delta == pytest.approx(1 / (10 * n))  # the documented default
    assert privacy["max_grad_norm"] == 1.0
    assert sigma > 0

    eps_rdp = _rdp_epsilon(sigma, q, steps, delta)
    eps_prv = _prv_epsilon(sigma, q, steps, delta)
    assert privacy["epsilon_rdp"] == pytest.approx(eps_rdp, rel=1e-9)
    assert privacy["epsilon_prv"] == pytest.approx(eps_prv, rel=1e-6)
    assert privacy["epsilon"] == privacy["epsilon_rdp"]  # the configured accountant
    assert target - 0.02 <= privacy["epsilon"] <= target + 1e-9  # σ was calibrated to the target

    lines = [_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 3
    assert lines[-1]["epsilon"] == pytest.approx(privacy["epsilon"], rel=1e-9)
    assert all(math.isfinite(v) for line in lines for v in line.values())


def test_zero_gradient_guard_runs_even_if_a_poisson_batch_is_empty(tmp_path, monkeypatch):
    """Step 0 cannot be checked (B = 0 gives A an exactly zero gradient); if step 1's Poisson batch is
    empty the guard must still run on the next non-empty one, exactly once."""
    from privlora.train.loop import train

    real_batch, real_check = PrivateTraining.poisson_batch, PrivateTraining.check_grad_samples
    calls = {"batches": 0, "checks": []}

    def poisson_batch(self, generator):
        batch = real_batch(self, generator)
        calls["batches"] += 1
        return [] if calls["batches"] == 2 else batch

    def check(self):
        calls["checks"].append(self.steps_taken)
        return real_check(self)

    monkeypatch.setattr(PrivateTraining, "poisson_batch", poisson_batch)
    monkeypatch.setattr(PrivateTraining, "check_grad_samples", check)
    config = load_config(CONFIGS / "demo-plain.yaml", {
        "mode": "dp", "out": str(tmp_path / "dp"), "quiet": True, "eval.timesteps": [200], "eval.samples": 0,
        "optim.max_steps": 4, "optim.batch_size": 6, "lora.rank": 2, "lora.alpha": 2, "data.members": 0.12,
        "data.aux": 0.04, "data.eval": 0.04, "dp.noise_multiplier": 1.0})
    result = train(config)
    assert calls["batches"] == 4
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 4 and result.privacy["steps"] == 4  # the empty step was taken and counted
    assert calls["checks"] == [2]  # step index 2: the first non-empty batch after step 0
