"""What MP/SMP-LoRA's proxy attacker reads: the paper's raw error map, or a calibrated view of it.

The paper's attacker (Luo et al. 2024) classifies the flattened per-element squared-error map. Most of
that map's variation is how hard each image is to denoise and how lucky the noise draw was, not
whether the image was trained on — so the attacker is weak, and a LoRA that fools it is not protected
against LiRA/RMIA, which calibrate every image against models that did not train on it.

The calibrated view does the same inside training: for the same ``x0`` and noise it compares the adapted
model's error with the base model's (adapter disabled, no grad), i.e. "how much did the adapter lower
the error on *this* image". Each sample gets one timestep, drawn from a few low-noise ones where
membership shows, and is reduced to the log-ratio ``log(err_adapted / err_base)`` and the difference
``err_adapted − err_base`` of its mean errors — standardised by running statistics so the MLP need not
learn a scale that drifts as the adapter trains — plus the timestep one-hot, so the MLP can weigh the
timesteps differently. Gradients reach the LoRA through the adapted error only.

Cost: one timestep per sample (not all of them) keeps the calibrated form at one adapted pass with grad
plus one base pass without in the LoRA step, and one adapted + one base pass per sample in the
attacker's step; over many steps every image still meets every timestep.

Views are chosen by ``mp.attacker`` from :data:`VIEWS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from privlora.tasks.diffusion import DiffusionTask

Batch = dict[str, Any]

#: where the calibrated view compares adapter and base. Measured on demo faces after a short plain LoRA
#: (AUC of the log-ratio alone, 16 members vs 16 non-members): t=20 0.57, 50 0.77, 100 0.72, 150 0.61,
#: 250 0.53, 400 0.51, 600 0.44 — membership shows at low noise, so three low timesteps (one drawn per
#: sample and step) and nothing above 200.
CALIBRATION_TIMESTEPS = (50, 100, 200)


class RawErrorView:
    """The paper's attacker input: the flattened error map, sharing the training forward pass."""

    def __init__(self, task: DiffusionTask) -> None:
        self.task = task

    def size(self, data: Any) -> int:
        """Features per sample, measured on one of ``data``'s samples: the error map's size follows the data's
        resolution (a 16-px-native UNet trained at 32 px, SD 1.5 at 256, 512 or 768 px), not the model's
        native size. One no-grad pass with its own generator, so the training RNG stream is untouched."""
        with torch.no_grad():
            return int(self.task.attack_features(data.batch([0]), torch.Generator().manual_seed(0)).shape[1])

    def training(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_ada, features)`` for the LoRA step; the features carry the graph back to the LoRA."""
        return self.task.adaptation_and_features(batch, generator)

    def features(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """Unscaled features for the attacker's own step (call under no_grad)."""
        return self.task.attack_features(batch, generator)

    def observe(self, features: torch.Tensor) -> None:
        """Update any running statistics from the attacker's member + auxiliary batch (none here)."""

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class RunningStandardizer(nn.Module):
    """Per-feature ``(x − mean) / std`` with exponential running statistics, like BatchNorm's, but updated
    only when told (on the attacker's member + auxiliary batches), so the LoRA's step does not move them.
    An exponential average follows the features as the adapter lowers its errors; a cumulative one
    would keep the scale of the first steps, when adapter and base barely differ."""

    def __init__(self, features: int, momentum: float = 0.05) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("var", torch.ones(features))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        mean, var = x.mean(0), x.var(0, unbiased=False)
        if int(self.updates) == 0:  # the first batch sets the scale; the zero/one init has none
            self.mean.copy_(mean)
            self.var.copy_(var)
        else:
            self.mean.lerp_(mean, self.momentum)
            self.var.lerp_(var, self.momentum)
        self.updates += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.var.sqrt() + 1e-8)


class CalibratedView:
    """Adapter-vs-base error at one of :data:`CALIBRATION_TIMESTEPS` per sample, standardised, plus that
    timestep's one-hot: see the module docstring."""

    #: the error columns (log-ratio, difference) that the running statistics standardise; the one-hot is kept
    ERRORS = 2

    def __init__(self, task: DiffusionTask, timesteps: tuple[int, ...] = CALIBRATION_TIMESTEPS) -> None:
        if getattr(task, "lora", True) is None:
            from privlora.errors import UserError

            raise UserError("mp.attacker: calibrated compares the adapter with the base model and needs a LoRA "
                            "adapter; it cannot be used with lora.full_finetune")
        self.task, self.timesteps = task, torch.tensor(timesteps, dtype=torch.long)
        self.scale = RunningStandardizer(self.ERRORS).to(task.device)

    def size(self, data: Any) -> int:
        """Two error columns and the timestep's one-hot, whatever the resolution."""
        del data
        return self.ERRORS + len(self.timesteps)

    def _raw(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """Unscaled ``[log-ratio, difference, one-hot(t)]`` per sample, one drawn timestep each."""
        which = torch.randint(0, len(self.timesteps), (len(batch["captions"]),), generator=generator)
        adapted, base = self.task.calibrated_errors(batch, generator, self.timesteps[which])
        onehot = torch.nn.functional.one_hot(which, len(self.timesteps)).to(adapted)
        return torch.cat([torch.log(adapted / base)[:, None], (adapted - base)[:, None], onehot], dim=1)

    def training(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``L_ada`` on the whole batch at random timesteps, exactly as in plain training; the attacker's
        features on its first half only (as many members as the attacker's own step sees, and half the
        cost of the extra adapted pass with grad — the batch is a random draw, so its head is too)."""
        adaptation = self.task.per_sample_loss(batch, generator).mean()
        n = len(batch["captions"])
        head = {k: v[:max(1, n // 2)] for k, v in batch.items()}
        return adaptation, self.standardize(self._raw(head, generator))

    def features(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        return self._raw(batch, generator)

    def observe(self, features: torch.Tensor) -> None:
        self.scale.update(features[:, :self.ERRORS])

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.scale(features[:, :self.ERRORS]), features[:, self.ERRORS:]], dim=1)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale.load_state_dict(state["scale"])


#: ``mp.attacker`` → what the proxy attacker reads
VIEWS: dict[str, Callable[[DiffusionTask], RawErrorView | CalibratedView]] = {
    "paper": RawErrorView,
    "calibrated": CalibratedView,
}
