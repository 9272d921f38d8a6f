"""A causal LM cut for split learning (SAP): the user keeps the embeddings, the first ``depth`` blocks
*and* the final norm with the LM head; the provider runs the blocks in between with its LoRA.

U-shaped on purpose. A classifier's labels are a few classes, so the text split sends the server hidden
states and gets logits back; a language model's labels are the record itself, so a server that computed
the loss would read every response. Here the server returns the hidden states after its blocks, the user
applies ``ln_f`` and the (tied) LM head, scores the response tokens and sends back the gradient of the loss
with respect to those states — the same ``/forward`` and ``/backward`` protocol as the text split, with
``[B, T, H]`` where the text split has ``[B, num_labels]``. The same dχ privatizer noises the bottom's
hidden states (:mod:`privlora.split.privatizers`).

Both halves are built from the same :class:`~privlora.tasks.causal_lm.CausalLMTask` (dropout 0), so
without noise ``head(top(bottom(x)))`` is the full model's logits (tested). The top's LoRA targets are
full module names of its own blocks: its adapter is a peft CAUSAL_LM adapter for the *whole* base, which
``PeftModel.from_pretrained`` loads on the plain model. GPT-2-family bases (``transformer.h`` blocks, the
embedded tiny LM among them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from privlora.errors import UserError
from privlora.tasks.causal_lm import MAX_LENGTH, CausalLMTask, response_nll
from privlora.tasks.lora import LoraSpec

GPT2_ATTENTION = ("attn.c_attn", "attn.c_proj")
#: the top's input clip is this many times the largest clean token norm at the cut, measured by the provider
#: on public text (Python's own pydoc topics, the embedded LM's pre-training corpus): clean states pass
#: untouched, dχ-noised ones (norm ≈ H/η) are brought back to the scale the blocks expect. Measured on the
#: embedded LM: clean norms ≤ 1.2 at depth 0 (embeddings), ≤ 33 at depths 1–3 — one constant cannot serve both
CLIP_OVER_PUBLIC_MAX = 1.25
PUBLIC_TEXTS = 32


def public_input_clip(depth: int, base: str | Path = "embedded-lm", *, texts: int = PUBLIC_TEXTS,
                      max_tokens: int = 128) -> float:
    """:data:`CLIP_OVER_PUBLIC_MAX` × the largest clean token norm after ``depth`` blocks on public text (no
    user data: the provider computes it before any client connects)."""
    from pydoc_data.topics import topics

    bottom = LMSplitBottom(depth, base=base)
    chunks = [str(t) for _, t in sorted(topics.items())[:texts]]
    enc = bottom.tokenizer(chunks, truncation=True, max_length=max_tokens, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bottom.forward(enc["input_ids"], enc["attention_mask"])
    return CLIP_OVER_PUBLIC_MAX * float(hidden.norm(dim=-1)[enc["attention_mask"].bool()].max())


def lm_block_targets(blocks: range) -> tuple[str, ...]:
    """Full peft target names for LoRA on the attention of these GPT-2 blocks."""
    return tuple(f"transformer.h.{i}.{part}" for i in blocks for part in GPT2_ATTENTION)


def _gpt2(task: CausalLMTask, depth: int) -> nn.Module:
    if task.model_type != "gpt2":
        raise UserError(f"split learning of a causal LM supports GPT-2-family bases (transformer.h blocks); "
                        f"{task.base} is a {task.model_type!r} model")
    layers = len(task.model.transformer.h)
    if not 0 <= depth < layers:
        raise UserError(f"split depth must be in 0..{layers - 1} for a {layers}-block causal LM (got {depth})")
    return task.model


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # right padding: 0..T-1


def _run_blocks(model: nn.Module, blocks: list[nn.Module], hidden: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
    """GPT-2 blocks over ``hidden`` with the causal mask GPT2Model builds (padding masked too)."""
    from transformers.masking_utils import create_causal_mask

    positions = _positions(hidden)
    mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=attention_mask,
                              cache=None, position_ids=positions)
    for block in blocks:
        out = block(hidden, None, mask, position_ids=positions)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


class LMSplitBottom:
    """The user's half: tokenizer, embeddings, the first ``depth`` blocks, ``ln_f`` and the LM head (frozen)."""

    kind = "causal-lm"
    trainable = False

    def __init__(self, depth: int, *, base: str | Path = "embedded-lm", seed: int = 0,
                 max_length: int = MAX_LENGTH, keep_top: bool = False) -> None:
        # the task injects LoRA (B = 0: a no-op); everything here stays frozen, the bottom is not trained
        self.task = CausalLMTask(base, lora=LoraSpec(rank=1, alpha=1, targets=("auto",)), seed=seed,
                                 max_length=max_length)
        model = _gpt2(self.task, depth)
        for p in model.parameters():
            p.requires_grad_(False)
        if not keep_top:  # the provider's blocks are not the user's to run
            model.transformer.h = nn.ModuleList(list(model.transformer.h)[:depth])
        self.depth, self.model, self.tokenizer = depth, model, self.task.tokenizer
        self.special_ids = frozenset(self.tokenizer.all_special_ids)
        self.task.model.eval()

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.n_embd)

    @property
    def word_embeddings(self) -> torch.Tensor:
        return self.model.transformer.wte.weight

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    def encode(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The task's encoding of instruction records: ids, attention and response masks, labels."""
        return self.task.encode(batch)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states after the embeddings and ``depth`` blocks, ``[B, T, H]``."""
        t = self.model.transformer
        hidden = t.drop(t.wte(input_ids) + t.wpe(_positions(input_ids)))
        return _run_blocks(self.model, list(t.h[:self.depth]), hidden, attention_mask)

    def forward_embeds(self, word_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The same from (relaxed) word embeddings ``[B, T, H]`` — what the inversion attack optimises
        (:func:`privlora.split.attacks.eia_optimize`)."""
        t = self.model.transformer
        hidden = t.drop(word_embeds + t.wpe(_positions(word_embeds)))
        return _run_blocks(self.model, list(t.h[:self.depth]), hidden, attention_mask)

    @torch.no_grad()
    def nearest_tokens(self, observed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per position, the token whose depth-0 state ``wte[v] + wpe[p]`` is nearest (L2) to ``observed``,
        ``[B, T]``: the exact inversion at depth 0, the residual starting guess behind blocks."""
        words = self.model.transformer.wte.weight.float()
        shifted = observed.float() - self.model.transformer.wpe.weight[:observed.shape[1]].float()[None]
        scores = (words ** 2).sum(dim=1) - 2 * shifted @ words.T  # ‖w_v‖² − 2 w_v·(o − pos)  [B, T, V]
        out = scores.argmin(dim=-1)
        return out.masked_fill(~attention_mask.bool(), int(self.task.pad_id))

    def head(self, top_hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` from the server's hidden states: ``ln_f`` and the LM head, on the user's side."""
        return self.model.lm_head(self.model.transformer.ln_f(top_hidden))

    def token_nll(self, top_hidden: torch.Tensor,
                  encoded: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token response NLL of the user's head on the server's states and its mask, ``[B, T-1]`` each."""
        return response_nll(self.head(top_hidden), encoded)


class LMSplitTop:
    """The provider's half: blocks ``depth..`` of a causal LM with LoRA on their attention; returns the
    hidden states after the last block (before ``ln_f``, which the user holds).

    ``input_clip``: every received token vector longer than this is scaled down to it (post-processing of
    privatized data, as :class:`privlora.split.models.SplitTop` does); ``"public"`` (default): measured on
    public text at this depth (:func:`public_input_clip`); None: no clip.
    """

    kind = "causal-lm"
    num_labels = None

    def __init__(self, depth: int, *, lora: LoraSpec = LoraSpec(rank=8, alpha=16, targets=("auto",)), seed: int = 0,
                 base: str | Path = "embedded-lm", input_clip: float | str | None = "public") -> None:
        from transformers import AutoConfig

        from privlora.tasks.embedded_lm import resolve_lm_base

        source, _ = resolve_lm_base(base)
        try:
            layers = int(getattr(AutoConfig.from_pretrained(source, local_files_only=True), "n_layer", 0))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load causal-LM base {base!r} offline: {str(e).splitlines()[0]}") from None
        if layers < 1:
            raise UserError(f"split learning of a causal LM supports GPT-2-family bases; {base!r} is not one")
        targets = lm_block_targets(range(depth, layers)) if 0 <= depth < layers else ("auto",)
        self.task = CausalLMTask(base, lora=LoraSpec(rank=lora.rank, alpha=lora.alpha, targets=targets), seed=seed)
        model = _gpt2(self.task, depth)
        model.transformer.wte = nn.Embedding(1, model.config.n_embd)  # the user's: embeddings and LM head
        model.lm_head = nn.Identity()
        if input_clip == "public":
            input_clip = public_input_clip(depth, base)
        self.depth, self.model, self.max_tokens = depth, model, self.task.max_length
        self.input_clip = None if input_clip is None else float(input_clip)
        self.blocks = list(model.transformer.h[depth:])

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.n_embd)

    def output_shape(self, batch: int) -> tuple[int | None, ...]:
        """What ``forward`` returns for ``batch`` texts (and the gradient ``/backward`` must carry)."""
        return (batch, None, self.hidden_size)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.task.trainable_parameters()

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, T, H]`` after the provider's blocks, from the user's (privatized) ones."""
        if self.input_clip is not None:
            hidden = hidden * (self.input_clip / hidden.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        return _run_blocks(self.model, self.blocks, hidden, attention_mask)

    def save_adapter(self, path: Path) -> None:
        self.task.save_adapter(path)

    def load_adapter(self, path: Path) -> None:
        self.task.load_adapter(path)
