"""DP-SGD around any optimizer, with Opacus: per-sample gradients, clipping, Gaussian noise, accounting.

A wrapper, not a flag: :class:`PrivateTraining` wraps the Task's denoiser for per-sample gradients and
the optimizer for clipping + noise; the training loop stays the same.

How each sample's gradient is clipped is a :mod:`privlora.train.dp_clipping` mode (``dp.clipping``):
materialised per-sample gradients in Opacus' *functorch* mode (its default hooks mode returns all-zero
per-sample gradients for ``Conv2d`` on channels_last inputs — diffusers UNets — which would silently drop
the conv LoRA tensors), or ghost clipping. On the first non-empty batch after step 0 we check every LoRA
tensor got a non-zero per-sample gradient (Opacus + PEFT has corrupted LoRA updates silently before,
opacus#820).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from opacus import GradSampleModule

from privlora.errors import UserError
from privlora.tasks.diffusion import DiffusionTask
from privlora.train import accounting
from privlora.train.accounting import DPParameters, resolve
from privlora.train.dp_clipping import clipping_mode, describe

__all__ = ["DPParameters", "GradientCanaryHook", "PrivateTraining", "resolve"]  # DPParameters, resolve: accounting


class GradientCanaryHook(Protocol):
    """White-box audit hook (``privlora.audit.gradient_canaries``): sees each DP-SGD step's sum of clipped
    per-sample gradients just before the Gaussian noise, and the noisy sum just after it."""

    def inject(self, summed: list[torch.Tensor], *, max_grad_norm: float, sample_rate: float) -> None:
        """Add the participating canaries' gradients to ``summed`` in place (treated like clipped samples)."""

    def observe(self, noisy: list[torch.Tensor]) -> None:
        """Record the noisy summed gradients (before Opacus divides by the expected batch size)."""


class PrivateTraining:
    """Wraps a Task and its optimizer for DP-SGD; samples Poisson batches; tracks ε."""

    def __init__(self, task: DiffusionTask, optimizer: torch.optim.Optimizer, params: DPParameters, *,
                 n: int, seed: int, gradient_canaries: GradientCanaryHook | None = None,
                 accumulation: int = 1, physical_batch: int | None = None, clipping: str = "per-sample") -> None:
        self.task, self.params, self.n, self.accumulation = task, params, n, accumulation
        self.physical_batch, self.clipping, self.mode = physical_batch, clipping, clipping_mode(clipping)
        task.denoiser = self.mode.wrap(task.model, params.max_grad_norm)
        self.optimizer = self.mode.optimizer(optimizer, noise_multiplier=params.noise_multiplier,
                                             max_grad_norm=params.max_grad_norm,
                                             expected_batch_size=max(1, round(params.sample_rate * n)),
                                             loss_reduction="mean",
                                             generator=torch.Generator(device=task.device).manual_seed(seed + 1))
        self.steps_taken = 0
        self.checked = False  # has check_grad_samples() passed on a real batch yet?
        if gradient_canaries is not None:
            self._hook_noise(gradient_canaries)

    def _hook_noise(self, hook: GradientCanaryHook) -> None:
        """Put ``hook`` around Opacus' ``add_noise``: it runs after ``clip_and_accumulate`` has summed the
        clipped per-sample gradients into ``p.summed_grad`` and before ``scale_grad`` divides ``p.grad``
        by the expected batch size — so injected canaries get exactly the samples' noise, and what is
        observed is the noisy *sum*. The noise generator is not touched: no canaries → same numbers."""
        dp_optimizer, add_noise = self.optimizer, self.optimizer.add_noise

        def add_noise_with_canaries() -> None:
            hook.inject([p.summed_grad for p in dp_optimizer.params], max_grad_norm=self.params.max_grad_norm,
                        sample_rate=self.params.sample_rate)
            add_noise()
            hook.observe([p.grad for p in dp_optimizer.params])

        dp_optimizer.add_noise = add_noise_with_canaries  # type: ignore[method-assign]

    def poisson_batch(self, generator: torch.Generator) -> list[int]:
        """Each sample joins independently with probability q — the sampling the accountant assumes."""
        mask = torch.rand(self.n, generator=generator) < self.params.sample_rate
        return mask.nonzero().flatten().tolist()

    def check_grad_samples(self) -> None:
        """Raise if any trainable tensor got an all-zero per-sample gradient (silent-corruption guard).

        A LoRA ``A`` whose ``B`` is exactly zero (LoRA's own start, when both train — FedIT's first round)
        has ``∂L/∂A = s·Bᵀ(∂L/∂y)xᵀ = 0`` by construction, not by a grad-sampler fault: it is checked at a
        later step instead (``checked`` stays False until every tensor has been seen non-zero)."""
        params = self.task.trainable_parameters()
        named = dict(self.task.model.named_parameters())
        names = {id(p): n for n, p in named.items()}

        def zero_partner(p: torch.Tensor) -> bool:
            name = names.get(id(p), "")
            partner = named.get(name.replace("lora_A", "lora_B")) if "lora_A" in name else None
            return partner is not None and not torch.any(partner != 0)

        evidence = [self.mode.evidence(p) for p in params]
        missing = [i for i, e in enumerate(evidence) if e is None]
        zero = [i for i, e in enumerate(evidence) if e is not None and not torch.any(e != 0)]
        deferred = [i for i in zero if zero_partner(params[i])]
        dead = [i for i in zero if i not in deferred]
        if missing or dead:
            raise RuntimeError(f"{len(dead)} LoRA tensors received all-zero per-sample gradients and "
                               f"{len(missing)} none at all (of {len(params)}; Opacus grad-sampler bug); "
                               "refusing to train silently wrong")
        self.checked = not deferred

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly: the noise generator, the steps spent, and the
        mechanism's parameters (a resume must not change σ, q, C or δ behind the accountant's back)."""
        p = self.params
        return {"noise_generator": self.optimizer.generator.get_state(), "steps_taken": self.steps_taken,
                "noise_multiplier": p.noise_multiplier, "max_grad_norm": p.max_grad_norm,
                "sample_rate": p.sample_rate, "delta": p.delta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = self.params
        now = {"noise_multiplier": p.noise_multiplier, "max_grad_norm": p.max_grad_norm,
               "sample_rate": p.sample_rate, "delta": p.delta}
        changed = [k for k, v in now.items() if not math.isclose(float(state[k]), v, rel_tol=1e-12)]
        if changed:
            key = changed[0]
            raise UserError(f"cannot resume: the interrupted run used {key}={state[key]:g}, this one "
                            f"{now[key]:g}; ε is only valid for one mechanism — "
                            "resume with the same settings")
        self.optimizer.generator.set_state(state["noise_generator"])
        self.steps_taken = int(state["steps_taken"])

    def accumulate(self) -> None:
        """A physical chunk of the logical batch that is not its last: clip its per-sample gradients into
        the running sum (``p.summed_grad``) and clear them — no noise, no update, no step accounted. The
        logical batch's last chunk then calls :meth:`step`, which adds the noise once and divides by the
        logical batch's expected size (Opacus' virtual steps, as its BatchMemoryManager does)."""
        self.optimizer.signal_skip_step(do_skip=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, losses: torch.Tensor) -> None:
        """Backward pass of a (chunk of a) batch's per-sample losses ``[B]``, the way the clipping mode needs
        it; :meth:`step` (or :meth:`accumulate`) then clips, sums and noises."""
        self.mode.backward(self.task.denoiser, self.optimizer, losses)

    def step(self, *, empty_batch: bool = False) -> None:
        """Clip, add noise, update. An empty Poisson batch still takes a noise-only step (the accountant
        counts it): Opacus is given no sample's gradient, as its own DataLoader would."""
        if empty_batch:
            for p in self.task.trainable_parameters():
                self.mode.empty(p)
        self.optimizer.step()
        self.steps_taken += 1

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def epsilon(self, accountant: str | None = None) -> float:
        return accounting.epsilon(noise_multiplier=self.params.noise_multiplier,
                                  sample_rate=self.params.sample_rate, steps=self.steps_taken,
                                  delta=self.params.delta, accountant=accountant or self.params.accountant)

    def report(self) -> dict[str, Any]:
        """What goes to ``privacy.json``: mechanism, σ, clip, q, steps, δ and ε from both accountants."""
        p = self.params
        return {"mechanism": "DP-SGD (Poisson-subsampled Gaussian, per-sample clipping)",
                "library": "opacus", "noise_multiplier": p.noise_multiplier, "max_grad_norm": p.max_grad_norm,
                "sample_rate": p.sample_rate, "expected_batch_size": p.sample_rate * self.n,
                "dataset_size": self.n, "steps": self.steps_taken, "delta": p.delta,
                "gradient_accumulation_steps": self.accumulation,
                "physical_batch_size": self.physical_batch,
                "accountant": p.accountant, "epsilon": self.epsilon(),
                "epsilon_rdp": self.epsilon("rdp"), "epsilon_prv": self.epsilon("prv"),
                "sampling": f"poisson, q={p.sample_rate:.6g} (each sample joins a batch independently)"
                + (f"; one logical batch per step, processed in {self.accumulation} expected physical chunks, "
                   "noised once" if self.accumulation > 1 else ""),
                "neighbouring": accounting.SAMPLE_NEIGHBOURS,
                "unit": "sample-level (add/remove one training sample)", **describe(self.clipping)}

    def unwrap(self) -> None:
        """Restore the plain denoiser (removes Opacus hooks) before evaluation and saving."""
        gsm = self.task.denoiser
        if isinstance(gsm, GradSampleModule):
            gsm._close()
        self.task.denoiser = self.task.model
