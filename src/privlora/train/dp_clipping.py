"""How DP-SGD gets each sample's clipped gradient: the two Opacus machineries behind ``dp.clipping``.

* ``per-sample`` — :class:`opacus.GradSampleModule` in functorch mode materialises every sample's
  gradient (``p.grad_sample``, B × the parameter) and :class:`opacus.optimizers.DPOptimizer` clips and
  sums them. Functorch, not hooks: the hooks' Conv2d sampler returns all-zero gradients on the
  channels_last inputs of diffusers UNets.
* ``ghost`` — Opacus' fast gradient clipping with ghost clipping (Li et al. 2022, Bu et al. 2023):
  a first backward pass computes only each sample's gradient *norm* (for ``nn.Linear`` and
  ``nn.Embedding`` from activations and output gradients, without forming the gradient; other layers —
  the conv LoRA tensors — fall back to functorch per-sample gradients, reduced to norms at once), then a
  second backward of ``Σ_i min(1, C/‖g_i‖)·loss_i`` yields the clipped sum directly. Same mechanism, same
  ε; it pays when a layer's ``T² < d_in·d_out`` (T: tokens per sample), which LoRA's thin matrices
  seldom meet: measured in benchmarks/dp_clipping.py.

Each mode says how to wrap the model and the optimizer, how to run the backward pass of a batch's
per-sample losses, and where the per-sample evidence lives for the dead-gradient guard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

from privlora.errors import UserError


@dataclass(frozen=True)
class ClippingMode:
    """One way of clipping per-sample gradients (see the module docstring)."""

    #: (model, max_grad_norm) → the per-sample-aware module the Task calls
    wrap: Callable[[torch.nn.Module, float], GradSampleModule]
    optimizer: type[DPOptimizer]
    #: (wrapped module, DP optimizer, per-sample losses [B]) → gradients ready for ``optimizer.step()``
    backward: Callable[[GradSampleModule, DPOptimizer, torch.Tensor], None]
    #: parameter → the tensor whose rows are its per-sample gradients (or their norms); None if missing
    evidence: Callable[[torch.Tensor], torch.Tensor | None]
    #: an empty Poisson batch: what the optimizer needs to take its noise-only step
    empty: Callable[[torch.Tensor], None]


def _per_sample_backward(module: GradSampleModule, optimizer: DPOptimizer, losses: torch.Tensor) -> None:
    losses.mean().backward()  # Opacus undoes the mean: per-sample gradients, clipped in optimizer.step()


def _ghost_backward(module: GradSampleModule, optimizer: DPOptimizer, losses: torch.Tensor) -> None:
    DPTensorFastGradientClipping(module, optimizer, losses, "mean").backward()  # norms, then the clipped sum


def _no_grad_samples(p: torch.Tensor) -> None:
    p.grad_sample = p.new_zeros((0, *p.shape))  # what Opacus' own DataLoader yields for an empty batch


def _zero_grad(p: torch.Tensor) -> None:
    p.grad = torch.zeros_like(p)  # fast gradient clipping accumulates p.grad (the clipped sum): here, none


CLIPPING: dict[str, ClippingMode] = {
    "per-sample": ClippingMode(
        wrap=lambda model, clip: GradSampleModule(model, force_functorch=True, loss_reduction="mean"),
        optimizer=DPOptimizer, backward=_per_sample_backward,
        evidence=lambda p: getattr(p, "grad_sample", None), empty=_no_grad_samples),
    "ghost": ClippingMode(
        wrap=lambda model, clip: GradSampleModuleFastGradientClipping(
            model, force_functorch=True, loss_reduction="mean", max_grad_norm=clip, use_ghost_clipping=True),
        optimizer=DPOptimizerFastGradientClipping, backward=_ghost_backward,
        evidence=lambda p: getattr(p, "_norm_sample", None), empty=_zero_grad),
}


def clipping_mode(name: str) -> ClippingMode:
    try:
        return CLIPPING[name]
    except KeyError:
        raise UserError(f"unknown dp.clipping {name!r}: choose one of {', '.join(CLIPPING)}") from None


def describe(name: str) -> dict[str, Any]:
    """What privacy.json says about the clipping machinery (the mechanism and ε do not depend on it)."""
    return {"clipping": name, "clipping_library": "opacus " + ("fast gradient clipping, ghost norms"
                                                               if name == "ghost" else "functorch grad samples")}
