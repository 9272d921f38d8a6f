"""Resumable checkpoints: LoRA weights + optimizer, objective, sampler and RNG state.

Written atomically (temp file + rename) every ``checkpoint_every`` steps, every ``checkpoint_minutes``
and on Ctrl-C, inside the run's ``.partial`` directory. Loaded with ``torch.load(weights_only=True)``: tensors and plain
containers only, never arbitrary pickled objects.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from privlora.errors import UserError
from privlora.runs import atomic_file

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Serialise in memory, then write with Python's file calls: a full or read-only disk is then an
    ``OSError`` with its errno (torch's own writer reports it as "unexpected pos …" and leaves half a file),
    the temporary is removed, and the previous checkpoint stays whole. fsync before the rename, so a
    crash of the machine, not only of the process, leaves the old checkpoint or the new one."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_file(run_dir / CHECKPOINT) as tmp, tmp.open("wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CHECKPOINT
    if not path.exists():
        raise UserError(f"nothing to resume: {path} does not exist")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises several types for a damaged file
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); "
                        "delete the run and start again") from None
