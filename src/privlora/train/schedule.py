"""Learning-rate schedules by name, from diffusers (``diffusers.optimization.get_scheduler``), as in
diffusers' ``train_text_to_image_lora.py``: stepped once per update (not per micro-batch)."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from privlora.config import OptimOptions


def make_scheduler(optimizer: torch.optim.Optimizer, options: OptimOptions) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule ``options.lr_scheduler`` names over ``max_steps`` updates (``constant`` ignores warmup)."""
    return get_scheduler(options.lr_scheduler, optimizer, num_warmup_steps=options.lr_warmup_steps,
                         num_training_steps=options.max_steps, num_cycles=options.lr_num_cycles,
                         power=options.lr_power)
