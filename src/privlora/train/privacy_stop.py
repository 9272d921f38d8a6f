"""Privacy-aware early stopping: audit the run on a held-aside probe while it trains, and stop before the
adapter leaks more membership than a bound.

The demo's plain LoRA stopped at 100 steps beat every MP/SMP setting on the privacy/utility trade-off:
membership leakage grows with training, and stopping in time is the cheapest defence there is. This
module makes "in time" a measured rule instead of a guessed step count.

**Probe.** ``probe`` training members (a seeded random subset) against as many *aux* non-members — the
split MP/SMP's proxy attacker already reads. The evaluation non-members are never touched: only the
final audit may see them, so the audit of the kept adapter stays an honest, held-out measurement.

**Attack.** The base-calibrated loss attack, the strongest cheap one on the demo: per image, the
audit's loss signal (:func:`privlora.audit.references.loss_signal` — log mean denoising error at fixed
timesteps with fixed noise) of the adapter minus that of the base model on identical noisy inputs. The
subtraction cancels image difficulty (some faces are simply easy to denoise), which alone gives the base
AUC ≈ 0.6. Score = base − adapter: a member's loss drops more. The base signal is computed once, at step
0, and kept in the checkpoint: each check then costs one pass of the adapter over the probe.

**Advantage** is ``2·AUC − 1`` of that score (AUC as Mann–Whitney U, ties ½: 0 for an adapter that treats
members and non-members alike, 1 for one that separates them completely). It is chosen over the max over
thresholds of TPR − FPR because that maximum is biased upwards on a small probe (about 0.2 for a
useless attack on 32 + 32 images), so a bound of 0.1–0.2 would stop on noise; 2·AUC − 1 is centred on 0
for a leak-free adapter and never exceeds the max-threshold advantage, so the final audit (which
reports both) is the place to read the worst-case figure.

**Rule.** Check every ``every`` steps and at ``max_steps``. A check whose advantage exceeds
``max_advantage`` stops the run and restores the LoRA parameters of the last check that passed (step 0,
the base itself, when none did): the saved adapter has always passed a check. Each check goes to
``metrics.jsonl`` (``probe_auc``, ``probe_advantage``) and the whole record to privacy.json's
``early_stop`` block. History and kept snapshot are in the checkpoint, so a resumed run decides alike.

**Not with DP.** The stopping decision reads the private members' losses, which the DP accountant does
not count: a DP run stopped this way would not be (ε, δ)-DP as privacy.json claims. A sound version would
spend budget on the decision (e.g. the sparse vector technique on the probe statistic); it is refused
instead. Under MP/SMP the probe reads the same aux images the proxy attacker trains against, so it is
the attacker's own view: the held-out audit remains the measure to trust.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

import numpy as np
import torch

from privlora.audit.metrics import auc
from privlora.audit.references import SIGNAL_TIMESTEPS, loss_signal
from privlora.config import TrainConfig
from privlora.data.imageset import ImageSet
from privlora.errors import UserError
from privlora.tasks.diffusion import DiffusionTask

#: added to the run's seed for the probe's noise draws, so they differ from the final audit's (which
#: scores the same members with ``seed``): the stopping rule must not be tuned on the audit's own noise
NOISE_OFFSET = 7919
RULE = "stop before 2*AUC-1 of a base-calibrated loss attack (probe members vs aux non-members) exceeds the bound"


def refuse_unsupported(config: TrainConfig) -> None:
    """One-line refusals for runs the rule cannot serve soundly (see the module docstring)."""
    if config.mode == "dp":
        raise UserError("privacy_stop cannot be used with mode dp: the stopping decision reads the private "
                        "members, which the DP accountant does not count (unset privacy_stop.every)")
    if config.task != "image":
        raise UserError("privacy_stop supports the image task only (its probe attack is a denoising loss)")
    if config.data.aux == 0:
        raise UserError("privacy_stop needs auxiliary non-members for its probe: set data.aux > 0 "
                        "(the evaluation split is reserved for the final audit)")


def advantage(area: float) -> float:
    """The probe's membership advantage: ``2·AUC − 1``."""
    return 2.0 * area - 1.0


class PrivacyStop:
    """The rule's state inside one training run; inert (every method a no-op) when ``every`` is None."""

    def __init__(self, config: TrainConfig, task: DiffusionTask, members: ImageSet, aux: ImageSet,
                 params: list[torch.nn.Parameter]) -> None:
        self.options = config.privacy_stop
        self.max_steps = config.optim.max_steps
        self.quiet = config.quiet
        self.task, self.params = task, params
        self.checks: list[tuple[int, float, float]] = []
        self.kept_step = 0  # the step whose LoRA is kept: the last check passed (0: the base itself)
        self.stopped_at: int | None = None  # the step whose check breached the bound
        self.seconds = 0.0
        if self.options.every is None:
            return
        refuse_unsupported(config)
        self.timesteps = tuple(self.options.timesteps or SIGNAL_TIMESTEPS)
        limit = int(task.scheduler.config.num_train_timesteps)
        if any(not 0 <= t < limit for t in self.timesteps):
            raise UserError(f"privacy_stop.timesteps must lie in [0, {limit}), got {list(self.timesteps)}")
        k = min(self.options.probe, len(members), len(aux))
        if k < 2:
            raise UserError(f"privacy_stop needs at least 2 members and 2 aux non-members for its probe; this "
                            f"run has {len(members)} and {len(aux)} (raise data.aux or data.members)")
        pick = torch.Generator().manual_seed(config.seed)
        chosen_members = torch.randperm(len(members), generator=pick)[:k].tolist()
        chosen_aux = torch.randperm(len(aux), generator=pick)[:k].tolist()
        self.probe = members.subset(chosen_members).concat(aux.subset(chosen_aux))
        self.labels = np.r_[np.ones(k, int), np.zeros(k, int)]
        self.noise_seed = config.seed + NOISE_OFFSET
        self.snapshot = [p.detach().cpu().clone() for p in params]
        self.base = np.zeros(2 * k)
        if not config.resume:  # at step 0; a resumed run reads it from the checkpoint
            started = time.perf_counter()
            with task.adapter_disabled():  # a full fine-tune has no adapter: at step 0 it is the base
                self.base = self._signal()
            self.seconds += time.perf_counter() - started

    @property
    def enabled(self) -> bool:
        return self.options.every is not None

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    def _signal(self) -> np.ndarray:
        """The probe's loss signal with the model in eval mode (no dropout draws from the global RNG, so
        training after a check is the training of a run without checks)."""
        was_training = self.task.model.training
        self.task.model.eval()
        try:
            return loss_signal(self.task, self.probe, seed=self.noise_seed, timesteps=self.timesteps)
        finally:
            self.task.model.train(was_training)

    def after_step(self, step: int, metrics: IO[str]) -> None:
        """Check at every ``every``-th step and the last; on a breach restore the kept snapshot and stop."""
        if not self.enabled or self.stopped or not (step % self.options.every == 0 or step == self.max_steps):
            return
        started = time.perf_counter()
        area = auc(self.base - self._signal(), self.labels)
        adv = advantage(area)
        self.checks.append((step, area, adv))
        passed = adv <= self.options.max_advantage
        if passed:
            self.snapshot = [p.detach().cpu().clone() for p in self.params]
            self.kept_step = step
        else:
            with torch.no_grad():
                for p, saved in zip(self.params, self.snapshot, strict=True):
                    p.copy_(saved)
            self.stopped_at = step
        self.seconds += time.perf_counter() - started
        metrics.write(json.dumps({"step": step, "probe_auc": area, "probe_advantage": adv,
                                  "probe_passed": passed}) + "\n")
        metrics.flush()
        if not passed and not self.quiet:
            print(f"privacy stop: probe advantage {adv:.3f} > {self.options.max_advantage:g} at step {step}; "
                  f"keeping the adapter of step {self.kept_step}", file=sys.stderr, flush=True)

    # --- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        return {"checks": [list(c) for c in self.checks], "kept_step": self.kept_step,
                "stopped_at": self.stopped_at, "snapshot": self.snapshot,
                "base": torch.from_numpy(self.base.copy()), "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if not state:
            raise UserError("the checkpoint was written without privacy_stop; resume with the run's own settings")
        self.checks = [(int(s), float(a), float(v)) for s, a, v in state["checks"]]
        self.kept_step = int(state["kept_step"])
        self.stopped_at = None if state["stopped_at"] is None else int(state["stopped_at"])
        self.snapshot = [t.clone() for t in state["snapshot"]]
        self.base = state["base"].numpy().copy()
        self.seconds = float(state["seconds"])

    def report(self) -> dict[str, Any] | None:
        """privacy.json's ``early_stop`` block (None when the rule is off)."""
        if not self.enabled:
            return None
        k = len(self.labels)
        return {"rule": RULE, "statistic": "2*auc-1", "every": self.options.every,
                "max_advantage": self.options.max_advantage, "timesteps": list(self.timesteps),
                "probe": {"members": self.probe.ids[: k // 2], "aux_nonmembers": self.probe.ids[k // 2:]},
                "checks": [list(c) for c in self.checks], "stopped_at": self.stopped_at,
                "kept_step": self.kept_step, "seconds": self.seconds}
