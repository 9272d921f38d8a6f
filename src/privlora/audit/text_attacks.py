"""Membership attacks on text classifiers (``privlora train --task text``): loss, LiRA and RMIA signals.

A classifier gives an exact per-sample likelihood of the true label, so the signals are the ones the
literature uses for classifiers rather than the diffusion audit's denoising errors:

* ``loss`` (Yeom et al. 2018): score = −cross-entropy of the true label (lower loss = member).
* LiRA (Carlini et al. 2022) on the logit-scaled confidence φ = log(p_y / (1 − p_y)), which the paper
  found close to Gaussian across reference models; computed as ``z_y − logsumexp_{j≠y} z_j`` from the
  logits (exact even when p_y rounds to 1). :func:`text_signal` returns −φ, the "lower = member" signal
  :func:`privlora.audit.references.lira_scores` takes.
* RMIA (Zarifzadeh et al. 2024) with p(x|θ) = softmax probability of the true label: −log p_y =
  softplus(−φ) (:func:`rmia_signal`), the signal :func:`privlora.audit.references.rmia_scores` takes.

One forward pass per sample and model gives φ, so a reference adapter's cached signal serves both.

**Base control (decision).** The image audit's control is the base model with the adapter disabled. A
text run also trains its classification head on the private members, so "LoRA off, trained head" is not
a model that never saw the data. The control here is *the model training started from*: LoRA layers
bypassed (B = 0 at init, so the same thing) and the head put back to its seeded initialisation — exactly
what ``train`` builds from the run's seed before the first step. It has seen no private sample, so its
AUC shows what chance and sample difficulty give on these splits (≈ 0.5 within its interval); reference
attacks on it use the same references as the adapter. Rejected: a head trained without the private data
(another training run per audit — the reference adapters already play that role).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numpy as np
import torch

BATCH = 64


def _batches(data: Any) -> Iterator[dict[str, Any]]:
    for start in range(0, len(data), BATCH):
        yield data.batch(list(range(start, min(start + BATCH, len(data)))))


@torch.no_grad()
def text_loss_attack(task: Any, data: Any, *, seed: int = 0) -> np.ndarray:
    """Loss threshold for classifiers (Yeom et al. 2018): −cross-entropy of the true label. Deterministic
    (no dropout in the text task): ``seed`` is kept for the attacks' common signature."""
    del seed
    scores = [-task.per_sample_loss(batch).double().cpu().numpy() for batch in _batches(data)]
    return np.concatenate(scores) if scores else np.zeros(0)


@torch.no_grad()
def logit_confidence(task: Any, data: Any) -> np.ndarray:
    """φ = log(p_y / (1 − p_y)) per sample, as ``z_y − logsumexp_{j≠y} z_j`` (stable at p_y → 0 or 1)."""
    out = []
    for batch in _batches(data):
        logits = task.logits(batch).double()
        labels = torch.as_tensor(batch["labels"], dtype=torch.long, device=logits.device)
        true = logits.gather(1, labels[:, None])[:, 0]
        others = logits.scatter(1, labels[:, None], float("-inf")).logsumexp(1)
        out.append((true - others).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def text_signal(task: Any, data: Any, *, seed: int = 0) -> np.ndarray:
    """The reference attacks' signal, lower = member: −φ. Deterministic (``seed`` unused)."""
    del seed
    return -logit_confidence(task, data)


def rmia_signal(signal: np.ndarray) -> np.ndarray:
    """−φ → −log p_y = log(1 + e^{−φ}) = softplus(−φ): RMIA's p(x|θ) is the true label's probability."""
    return np.logaddexp(0.0, signal)


def untrained_control(task: Any) -> Callable[[], AbstractContextManager[None]]:
    """The base control of a text run (see the module docstring): call it on a freshly built task, *before*
    the run's adapter is loaded, to capture the seeded initial head; the returned context manager then
    swaps that head in and bypasses LoRA, and puts back whatever adapter was loaded on exit."""
    from privlora.tasks.lora import lora_bypassed

    head = task.model.classifier
    initial = {k: v.detach().clone() for k, v in head.state_dict().items()}

    @contextmanager
    def control() -> Iterator[None]:
        saved = {k: v.detach().clone() for k, v in head.state_dict().items()}
        with torch.no_grad():
            head.load_state_dict(initial)
        try:
            with lora_bypassed(task.model):
                yield
        finally:
            with torch.no_grad():
                head.load_state_dict(saved)

    return control
