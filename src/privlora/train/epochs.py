"""``--num-train-epochs``: the number of updates that makes that many passes over the members.

Resolved once the members are known (they come from the split), into ``optim.max_steps``, so every
part of the loop that reads the step count — schedules, DP calibration, progress, checkpoints — sees one
number, and ``config.yaml`` records it. One step takes a logical batch of ``K·B`` samples
(``gradient_accumulation_steps × batch_size``, the global batch across processes), or all ``N`` members
when there are fewer; under DP an epoch is the expected ``N/(K·B)`` Poisson batches (each member is in a
batch with probability ``q = K·B/N``, so on average once per epoch), not a pass that sees every member.
"""

from __future__ import annotations

import math

from privlora.config import TrainConfig


def steps_for_epochs(epochs: int, members: int, global_batch: int) -> int:
    """``ceil(epochs · N / min(K·B, N))``, at least one step."""
    per_step = max(1, min(global_batch, members))
    return max(1, math.ceil(epochs * members / per_step))


def with_epoch_steps(config: TrainConfig, members: int) -> TrainConfig:
    """``config`` with ``optim.max_steps`` from ``optim.num_train_epochs`` (unchanged when that is unset)."""
    o = config.optim
    if o.num_train_epochs is None:
        return config
    steps = steps_for_epochs(o.num_train_epochs, members, o.batch_size * o.gradient_accumulation_steps)
    return config.model_copy(update={"optim": o.model_copy(update={"max_steps": steps})})
