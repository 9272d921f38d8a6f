"""The federated run's result as an ordinary adapter: the same peft folder central training writes
(SEQ_CLS for text, CAUSAL_LM for a causal LM: the run task's own ``save_adapter``).

FedIT/FFA state already is LoRA factors at the run's rank. FLoRA's state is a dense ``ΔW`` per layer
(merged stacks): it is factorised exactly by SVD at the largest numerical rank over the layers and
saved with ``alpha = r`` (scaling 1), so ``PeftModel.from_pretrained`` reproduces ``W₀ + ΔW``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from privlora.config import FederatedConfig
from privlora.federated.rules import ADAPTER, FLoRA, Rule, lora_layers, set_head


def save_global_adapter(rule: Rule, state: Sequence[np.ndarray], config: FederatedConfig, num_labels: int | None,
                        out: Path) -> None:
    """``num_labels``: the classifier's size (None: the data's; ignored by a causal LM)."""
    from privlora.federated.client import model_key_for
    from privlora.federated.tasks import federated_task

    As, Bs = rule.adapter_factors(state)
    rank = int(As[0].shape[0])
    alpha = float(rank) if isinstance(rule, FLoRA) else config.lora.alpha
    task = federated_task(config).build(model_key_for(config, num_labels), rank, alpha, tuple(config.lora.targets),
                                        config.seed)
    with torch.no_grad():
        for (_, m), A, B in zip(lora_layers(task.model), As, Bs, strict=True):
            m.lora_A[ADAPTER].weight.copy_(torch.from_numpy(np.ascontiguousarray(A)))
            m.lora_B[ADAPTER].weight.copy_(torch.from_numpy(np.ascontiguousarray(B)))
        set_head(task.model, state[len(state) - rule.head:])
    task.save_adapter(out)
