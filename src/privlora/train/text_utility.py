"""Utility of a text-classification run: accuracy and loss on members and held-out texts.

The yardstick beside them is the majority-class rate of the held-out texts (what always answering
the most common label scores), since the base model with LoRA disabled has an untrained head.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from privlora.data.text import TextSet

BATCH = 64


@torch.no_grad()
def _scores(task: Any, data: TextSet) -> tuple[float | None, float | None]:
    if len(data) == 0:
        return None, None
    correct, losses = 0, []
    for start in range(0, len(data), BATCH):
        batch = data.batch(list(range(start, min(start + BATCH, len(data)))))
        logits = task.logits(batch)
        labels = torch.as_tensor(batch["labels"])
        correct += int((logits.argmax(-1) == labels).sum())
        losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="none"))
    return correct / len(data), float(torch.cat(losses).mean())


def measure_text_utility(task: Any, *, members: TextSet, held_out: TextSet, options: Any = None, seed: int = 0,
                         quiet: bool = True) -> dict[str, Any]:
    task.model.eval()
    acc_m, loss_m = _scores(task, members)
    acc_h, loss_h = _scores(task, held_out)
    majority = Counter(held_out.labels).most_common(1)[0][1] / len(held_out) if len(held_out) else None
    return {"accuracy_members": acc_m, "accuracy_heldout": acc_h, "loss_members": loss_m, "loss_heldout": loss_h,
            "majority_class_heldout": majority, "classes": held_out.classes, "heldout": len(held_out)}
