"""The user's loop: bottom forward → privatize → server logits → local loss → gradient back.

One function per job, transport-agnostic: ``top`` is :class:`~privlora.split.client.HttpTop` (real server)
or :class:`~privlora.split.service.LocalTop` (same service in-process), so the HTTP run and the
in-process baseline of the throughput benchmark differ only in the transport.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from privlora.data.text import TextSet
from privlora.split.models import SplitBottom
from privlora.split.privatizers import Privatizer


class TopEndpoint(Protocol):
    def info(self) -> dict[str, Any]: ...

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, *, train: bool,
                want_input_grad: bool = False) -> tuple[str | None, torch.Tensor]: ...

    def backward(self, step_id: str, grad_logits: torch.Tensor) -> torch.Tensor | None: ...


def batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches of indices: seeded reshuffle every epoch, last partial batch of an epoch dropped."""
    rng = random.Random(seed)
    out: list[list[int]] = []
    while len(out) < steps:
        order = list(range(n))
        rng.shuffle(order)
        full = max(1, n // batch_size)
        out.extend(order[i * batch_size:(i + 1) * batch_size] for i in range(full))
    return out[:steps]


def train_step(bottom: SplitBottom, privatizer: Privatizer, top: TopEndpoint, texts: list[str], labels: list[int],
               optimizer: torch.optim.Optimizer | None, generator: torch.Generator) -> float:
    """One SAP step; returns the batch loss. Labels never leave this function."""
    input_ids, mask = bottom.encode(texts)
    with torch.set_grad_enabled(bottom.trainable):
        hidden = bottom.forward(input_ids, mask)
    noised = privatizer(hidden.detach(), input_ids, generator)
    step_id, logits = top.forward(noised, mask, train=True, want_input_grad=bottom.trainable)
    logits = logits.detach().requires_grad_(True)
    loss = nn.functional.cross_entropy(logits, torch.as_tensor(labels, dtype=torch.long))
    loss.backward()
    assert step_id is not None and logits.grad is not None
    grad_hidden = top.backward(step_id, logits.grad)
    if bottom.trainable and optimizer is not None:
        if grad_hidden is None or tuple(grad_hidden.shape) != tuple(hidden.shape):
            raise RuntimeError("the server returned no gradient for the hidden states")
        optimizer.zero_grad(set_to_none=True)
        hidden.backward(grad_hidden)  # the noise is additive: d(h + n)/dh = I
        optimizer.step()
    return float(loss.detach())


def train(bottom: SplitBottom, privatizer: Privatizer, top: TopEndpoint, data: TextSet, *, steps: int,
          batch_size: int, lr: float, seed: int, generator: torch.Generator,
          on_step: Callable[[int, float], None] | None = None) -> list[dict[str, float]]:
    """Train for ``steps`` batches; returns one metrics row per step (step, loss, seconds)."""
    optimizer = torch.optim.AdamW(bottom.trainable_parameters(), lr=lr) if bottom.trainable else None
    rows = []
    start = time.perf_counter()
    for step, idx in enumerate(batches(len(data), batch_size, steps, seed), start=1):
        batch = data.batch(idx)
        loss = train_step(bottom, privatizer, top, batch["texts"], batch["labels"], optimizer, generator)
        rows.append({"step": step, "loss": round(loss, 5), "seconds": round(time.perf_counter() - start, 3)})
        if on_step is not None:
            on_step(step, loss)
    return rows


@torch.no_grad()
def logits_for(bottom: SplitBottom, privatizer: Privatizer, top: TopEndpoint, texts: list[str], *,
               batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Inference: the same privatization as in training, then the server's logits."""
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        input_ids, mask = bottom.encode(chunk)
        noised = privatizer(bottom.forward(input_ids, mask), input_ids, generator)
        out.append(top.forward(noised, mask, train=False)[1])
    return torch.cat(out) if out else torch.empty(0)


def evaluate(bottom: SplitBottom, privatizer: Privatizer, top: TopEndpoint, data: TextSet, *, batch_size: int,
             generator: torch.Generator) -> tuple[float, float]:
    """Accuracy and mean cross-entropy on ``data`` through the privatized pipeline."""
    logits = logits_for(bottom, privatizer, top, data.texts, batch_size=batch_size, generator=generator)
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    accuracy = float((logits.argmax(-1) == labels).float().mean())
    return accuracy, float(nn.functional.cross_entropy(logits, labels))
