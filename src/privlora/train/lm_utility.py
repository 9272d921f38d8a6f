"""Utility of a causal-LM run: response loss and perplexity of the adapter vs the base, members and held-out.

The base (LoRA bypassed, same tokens, same masking) is the yardstick: an adapter that learned the task lowers
the held-out loss below the base's; one that only memorised lowers the members' far more than the held-out.
Perplexity is ``exp`` of the token-level mean NLL over response tokens (prompt tokens are never scored).
"""

from __future__ import annotations

from typing import Any


def measure_lm_utility(task: Any, *, members: Any, held_out: Any, options: Any = None, seed: int = 0,
                       quiet: bool = True) -> dict[str, Any]:
    task.model.eval()
    result: dict[str, Any] = {"heldout": len(held_out), "members": len(members)}
    for prefix, disabled in (("", False), ("base_", True)):
        for name, data in (("members", members), ("heldout", held_out)):
            if disabled:
                with task.adapter_disabled():
                    score = task.score(data)
            else:
                score = task.score(data)
            for key in ("loss", "token_loss", "perplexity"):
                result[f"{prefix}{key}_{name}"] = None if score is None else score[key]
            if not disabled:
                result[f"tokens_{name}"] = 0 if score is None else score["tokens"]
    return result
