"""Mixed precision (``optim.mixed_precision``): autocast of the forward pass, fp32 LoRA weights.

Only the forward pass runs in the low-precision dtype; parameters, their gradients and the optimizer
state stay fp32 (autocast casts copies). fp16 needs loss scaling: a ``torch.amp.GradScaler`` scales the
loss before backward and unscales before clipping. Works on CPU too (measured on torch 2.13: fp16 and bf16
autocast + GradScaler("cpu") train the embedded UNet). DP runs refuse fp16 (config.py) and under bf16
Opacus' per-sample gradients come out fp32 (checked by tests/test_train_options.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

#: optim.mixed_precision → autocast dtype (None: full precision)
DTYPES: dict[str, torch.dtype | None] = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class Precision:
    """``autocast()`` around forward passes; ``backward`` / ``unscale`` / ``step`` through the scaler."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.dtype, self.device_type = DTYPES[name], device.type
        self.scaler = torch.amp.GradScaler(self.device_type) if self.dtype is torch.float16 else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device_type, dtype=self.dtype):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Before clipping: the gradients back in true units."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The update (skipped by the scaler when a gradient overflowed in fp16)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
