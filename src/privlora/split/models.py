"""The model cut in two: the user's bottom (embeddings + ``depth`` blocks) and the provider's top.

Both halves are built from the same text Task (MiniLM as ``BertForSequenceClassification``, dropout 0),
so the pieces compose to exactly the full model: ``top(bottom(x)) == full(x)`` without noise (tested).
LoRA targets are full module names of the half's own blocks, so each half's adapter is a standard peft
SEQ_CLS adapter for the *whole* base model — the server's adapter (top blocks + head) loads with
``PeftModel.from_pretrained`` on the full model; the user's trainable-bottom adapter covers the blocks
below the cut. Each half deletes the blocks it does not run: the user never holds the provider's top.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from privlora.errors import UserError
from privlora.tasks.text import MAX_LENGTH, TextClassificationTask, TextLora

ATTENTION_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")


def block_targets(blocks: range) -> tuple[str, ...]:
    """Full peft target names for LoRA on the attention of these encoder blocks."""
    return tuple(f"bert.encoder.layer.{i}.{part}" for i in blocks for part in ATTENTION_PARTS)


def _check_depth(depth: int, layers: int) -> None:
    if not 0 <= depth < layers:
        raise UserError(f"split depth must be in 0..{layers - 1} for a {layers}-block encoder (got {depth})")


def _run_blocks(model: nn.Module, blocks: list[nn.Module], hidden: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
    from transformers.masking_utils import create_bidirectional_mask

    mask = create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=attention_mask)
    for block in blocks:
        out = block(hidden, attention_mask=mask)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


class SplitBottom:
    """The user's half: tokenizer, embeddings and the first ``depth`` blocks (LoRA on them if trainable)."""

    def __init__(self, depth: int, *, trainable: bool = False, lora: TextLora = TextLora(), seed: int = 0,
                 base: str | Path | None = None, max_length: int = MAX_LENGTH, keep_top: bool = False) -> None:
        if trainable and depth == 0:
            raise UserError("a trainable bottom needs depth ≥ 1 (at depth 0 the user holds no encoder block)")
        bottom_lora = TextLora(lora.rank, lora.alpha, block_targets(range(depth))) if trainable else None
        self.task = TextClassificationTask(2, lora=bottom_lora, seed=seed, base=base, max_length=max_length)
        model = self.task.model
        _check_depth(depth, len(model.bert.encoder.layer))
        self.depth, self.trainable = depth, trainable
        model.classifier.requires_grad_(False)
        if not keep_top:  # the user does not get the provider's top blocks (the attacks keep them: white box)
            model.bert.encoder.layer = model.bert.encoder.layer[:depth]
            model.bert.pooler = None
            model.classifier = nn.Identity()
        self.model = model
        self.tokenizer = self.task.tokenizer
        self.special_ids = frozenset(self.tokenizer.all_special_ids)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def word_embeddings(self) -> torch.Tensor:
        return self.model.bert.embeddings.word_embeddings.weight

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if p.requires_grad and "lora_" in n]

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.task.encode(texts)
        return enc["input_ids"], enc["attention_mask"]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states after the embeddings and ``depth`` blocks, ``[B, T, H]``."""
        hidden = self.model.bert.embeddings(input_ids=input_ids)
        return _run_blocks(self.model, list(self.model.bert.encoder.layer[:self.depth]), hidden, attention_mask)

    def forward_embeds(self, word_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The same from (relaxed) word embeddings ``[B, T, H]`` — what an inversion attack optimises."""
        hidden = self.model.bert.embeddings(inputs_embeds=word_embeds)
        return _run_blocks(self.model, list(self.model.bert.encoder.layer[:self.depth]), hidden, attention_mask)

    def save_adapter(self, path: Path) -> None:
        from privlora.tasks.lora import PEFT_PREFIX, PEFT_WEIGHTS, lora_state_dict

        if not self.trainable:
            raise UserError("a frozen bottom has no adapter to save")
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        state = {PEFT_PREFIX + k: v for k, v in lora_state_dict(self.model).items()}
        save_file(state, str(path / PEFT_WEIGHTS), metadata={"format": "pt", "privlora_split": f"bottom:{self.depth}"})
        assert self.task.lora is not None
        config = self.task.lora.peft_config()
        config.base_model_name_or_path = str(self.task.base)
        config.task_type = "SEQ_CLS"
        config.save_pretrained(str(path))

    def load_adapter(self, path: Path) -> None:
        from privlora.tasks.lora import load_lora

        load_lora(self.model, path)


#: clean hidden states of MiniLM have norms 8–13.4 at depths 0–3 (measured on 256 tweets): a clip at 14
#: leaves them untouched and brings dχ-noised ones (norm ≈ 384/η ≫ 14) back to the scale the blocks expect
INPUT_CLIP = 14.0


class SplitTop:
    """The provider's half: blocks ``depth..`` with LoRA on their attention, the pooler and the head.

    ``input_clip``: every received token vector longer than this is scaled down to it. Post-processing
    of privatized data (no privacy cost); without it a heavily noised token (norm 30–130) swamps the
    attention of every clean token in the first block and the top cannot learn (measured: majority-class
    accuracy at η ≤ 6 without it).
    """

    kind = "text"

    def __init__(self, depth: int, num_labels: int, *, lora: TextLora = TextLora(), seed: int = 0,
                 base: str | Path | None = None, input_clip: float | None = INPUT_CLIP) -> None:
        probe = TextClassificationTask(num_labels, lora=None, seed=seed, base=base)
        layers = len(probe.model.bert.encoder.layer)
        _check_depth(depth, layers)
        del probe
        self.task = TextClassificationTask(num_labels, lora=TextLora(lora.rank, lora.alpha,
                                                                     block_targets(range(depth, layers))),
                                           seed=seed, base=base)
        self.depth, self.num_labels, self.input_clip = depth, num_labels, input_clip
        model = self.task.model
        model.bert.embeddings.word_embeddings = nn.Embedding(1, model.config.hidden_size)  # not the provider's to run
        self.blocks = list(model.bert.encoder.layer[depth:])
        self.model = model

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def output_shape(self, batch: int) -> tuple[int | None, ...]:
        """What ``forward`` returns for ``batch`` texts (and the gradient ``/backward`` must carry)."""
        return (batch, self.num_labels)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.task.trainable_parameters()

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_labels]`` from the (privatized) hidden states of the user's bottom."""
        if self.input_clip is not None:
            hidden = hidden * (self.input_clip / hidden.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        out = _run_blocks(self.model, self.blocks, hidden, attention_mask)
        return self.model.classifier(self.model.bert.pooler(out))

    def save_adapter(self, path: Path) -> None:
        self.task.save_adapter(path)

    def load_adapter(self, path: Path) -> None:
        self.task.load_adapter(path)
