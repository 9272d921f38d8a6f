"""Resumable checkpoints: LoRA weights + optimizer, objective, sampler and RNG state.

Written atomically (temp file + rename) every ``checkpoint_every`` steps and on Ctrl-C, inside the
run's ``.partial`` directory. Loaded with ``torch.load(weights_only=True)``: tensors and plain
containers only, never arbitrary pickled objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from privlora.errors import UserError

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    tmp = run_dir / f".{CHECKPOINT}.tmp"
    torch.save(state, tmp)
    tmp.replace(run_dir / CHECKPOINT)


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CHECKPOINT
    if not path.exists():
        raise UserError(f"nothing to resume: {path} does not exist")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises several types for a damaged file
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); "
                        "delete the run and start again") from None
