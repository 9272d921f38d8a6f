"""The Task protocol: the one abstraction training, DP, MP/SMP and the audits work through."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Task(Protocol):
    """A base model with LoRA attached, seen through the few calls every training mode needs."""

    #: the module LoRA is injected into and saved from
    model: nn.Module
    #: what forward passes call: ``model`` itself, or DP's per-sample-gradient wrapper around it
    denoiser: nn.Module

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA parameters only (the base stays frozen)."""
        ...

    def per_sample_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """Loss of each sample, shape ``[B]``."""
        ...

    def attack_features(self, batch: dict[str, Any],
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample features ``[B, F]`` a proxy membership attacker looks at (MP/SMP)."""
        ...

    def save_adapter(self, path: str | Path) -> None:
        """Write the adapter in ecosystem formats (peft and diffusers), safetensors only."""
        ...

    def load_adapter(self, path: str | Path) -> None:
        """Load adapter weights written by :meth:`save_adapter`."""
        ...
