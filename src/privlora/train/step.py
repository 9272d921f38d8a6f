"""One training update, and the sampler that picks its batch: what :func:`privlora.train.loop.train` repeats.

Kept apart from the loop (run directory, checkpoints, resume, results) so the benchmarks can time exactly the
update a run makes. ``privlora.train.loop`` keeps the old private names (``loop._one_step``, ``loop._StepParts``,
``loop._Sampler``) and calls ``loop._one_step`` through its own module, so a test that patches it there still
reaches every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from privlora.data.imageset import ImageSet
from privlora.tasks.diffusion import DiffusionTask
from privlora.train.augment import Augmenter
from privlora.train.distributed import World
from privlora.train.dp import PrivateTraining
from privlora.train.objectives import Objective
from privlora.train.precision import Precision


class Sampler:
    """Shuffled epochs (plain/MP/SMP) or Poisson subsampling (DP), reproducible from the seed."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator,
                 private: PrivateTraining | None) -> None:
        self.n, self.batch_size, self.generator, self.private = n, batch_size, generator, private
        self.order: list[int] = []
        self.position = 0

    def next(self) -> list[int]:
        if self.private is not None:
            return self.private.poisson_batch(self.generator)
        batch: list[int] = []
        while len(batch) < min(self.batch_size, self.n):
            if self.position >= len(self.order):
                self.order = torch.randperm(self.n, generator=self.generator).tolist()
                self.position = 0
            take = self.order[self.position:self.position + self.batch_size - len(batch)]
            batch += take
            self.position += len(take)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"order": torch.tensor(self.order, dtype=torch.long), "position": self.position,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order = state["order"].tolist()
        self.position = int(state["position"])
        self.generator.set_state(state["generator"])


@dataclass
class StepParts:
    """What one update reads and changes (built once per run by ``loop._train_loop``)."""

    task: DiffusionTask
    objective: Objective
    private: PrivateTraining | None
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    sampler: Sampler
    members: ImageSet
    generator: torch.Generator
    precision: Precision
    augment: Augmenter
    chunk: int  # the physical batch: --batch-size
    grad_clip: float | None
    world: World = World()  # this process's share of each global batch


def chunks(batch: dict[str, Any], n: int, size: int) -> list[tuple[dict[str, Any], int]]:
    """The logical batch of ``n`` samples cut into physical chunks of ``size``, each with its count
    (every value of a batch — pixel tensor, captions, texts, labels — is sliced alike)."""
    return [({k: v[i:i + size] for k, v in batch.items()}, min(size, n - i)) for i in range(0, n, size)]


def one_step(s: StepParts, *, check: bool) -> dict[str, float]:
    """One update from one logical batch (``gradient_accumulation_steps`` × ``batch_size`` samples, or
    one Poisson draw at q = K·B/N under DP), processed in chunks of ``batch_size``."""
    indices = s.sampler.next()
    batch = s.augment.batch(s.members, indices)
    # the timesteps and noise are drawn once for the whole (global) batch; this process takes its shard
    with s.world.global_batch(s.task, batch, len(indices), s.generator, s.precision.autocast) as (mine, n):
        if s.private is not None:
            logs = private_step(s, mine, n, len(indices), check=check)
        else:
            logs = plain_step(s, mine, n, len(indices), check=check)
    s.world.sync_rng()
    if s.private is not None:
        return logs
    return {**logs, **s.objective.after_step(s.generator)}  # the proxy attacker's turn, its own draws


def private_step(s: StepParts, batch: dict[str, Any], n: int, total_n: int, *, check: bool) -> dict[str, float]:
    """``n`` of the Poisson batch's ``total_n`` samples are this process's (all of them in one process)."""
    assert s.private is not None
    s.private.zero_grad()
    logs: dict[str, float] = {"batch": float(total_n)}
    if not n:  # an empty Poisson batch (or shard) still takes a (noise-only) step, as the accountant assumes
        s.private.step(empty_batch=True)
        if total_n:
            logs["loss"] = s.world.sum_values({"loss": 0.0})["loss"] / total_n
        return logs
    total = 0.0
    pieces = chunks(batch, n, s.chunk)
    for number, (chunk, _) in enumerate(pieces, start=1):
        with s.precision.autocast():
            losses = s.objective.per_sample_loss(chunk, s.generator)
        s.private.backward(losses)  # per-sample gradients (or their norms) of the chunk, as for any chunking
        total += float(losses.detach().float().sum())
        if check and not s.private.checked:  # the first non-empty Poisson batch after step 0
            s.private.check_grad_samples()
        if number < len(pieces):
            s.private.accumulate()
    s.private.step()
    logs["loss"] = s.world.sum_values({"loss": total})["loss"] / total_n
    return logs


def plain_step(s: StepParts, batch: dict[str, Any], n: int, total_n: int, *, check: bool) -> dict[str, float]:
    """``n`` of the logical batch's ``total_n`` samples are this process's (all of them in one process)."""
    s.optimizer.zero_grad(set_to_none=True)
    logs: dict[str, float] = {}
    for chunk, size in chunks(batch, n, s.chunk):
        weight = size / total_n  # Σ weight·mean(chunk), over chunks and processes = the logical batch's mean
        with s.precision.autocast():
            result = s.objective.step_loss(chunk, s.generator)
        s.precision.backward(result.loss * weight)  # ×1 is exact: one chunk is unchanged
        for key, value in result.logs.items():
            logs[key] = logs.get(key, 0.0) + value * weight
    s.world.sum_grads(s.params)
    logs = s.world.sum_values(logs)
    if check:
        dead = sum(1 for p in s.params if p.grad is None or not torch.any(p.grad != 0))
        if dead:
            raise RuntimeError(f"{dead} trainable tensors got no gradient; the adapter would not learn")
    s.precision.unscale(s.optimizer)
    if s.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(s.params, s.grad_clip)
    s.precision.step(s.optimizer)
    return logs
