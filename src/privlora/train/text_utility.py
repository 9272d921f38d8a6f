"""Utility of a text-classification run: accuracy and loss on members and held-out texts.

The yardstick beside them is the majority-class rate of the held-out texts (what always answering
the most common label scores), since the base model with LoRA disabled has an untrained head.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from privlora.data.text import TextSet


def measure_text_utility(task: Any, *, members: TextSet, held_out: TextSet, options: Any = None, seed: int = 0,
                         quiet: bool = True) -> dict[str, Any]:
    task.model.eval()
    acc_m, loss_m = task.score(members)
    acc_h, loss_h = task.score(held_out)
    majority = Counter(held_out.labels).most_common(1)[0][1] / len(held_out) if len(held_out) else None
    return {"accuracy_members": acc_m, "accuracy_heldout": acc_h, "loss_members": loss_m, "loss_heldout": loss_h,
            "majority_class_heldout": majority, "classes": held_out.classes, "heldout": len(held_out)}
