"""CausalLMTask: LoRA instruction tuning of any transformers ``AutoModelForCausalLM``, loaded offline.

The base is ``embedded-lm`` (privlora's tiny GPT-2, :mod:`privlora.tasks.embedded_lm`), a local model folder,
or a model name already in the local Hugging Face cache. LoRA goes in with the same ``add_lora`` as every other
task, on the attention projections the model family's entry in :data:`LM_FAMILIES` names (``lora.targets:
[auto]``, the causal-lm default) or on the targets the config gives.

One sample is one instruction record: its prompt (a list of chat messages) and the response to learn. The
loss of a sample is the mean next-token NLL over its *response* tokens only — the prompt is context, not a
target — so DP-SGD's per-sample gradient is one record's, and what the membership attacks score is the
response the model may have memorised. The prompt is rendered with the tokenizer's chat template when it has
one, else with privlora's plain ``### User:`` / ``### Assistant:`` template (the embedded model has none).

Dropout is switched off everywhere, as in the text task: per-sample losses are then deterministic (DP,
MP/SMP, audits) and train mode — which Opacus' hooks need — computes what eval mode does.

:meth:`save_adapter` writes a standard peft CAUSAL_LM folder:
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)`` loads it without privlora.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from privlora.errors import UserError
from privlora.tasks.lora import LoraSpec

Message = tuple[str, str]  # (role, content)
AUTO = "auto"
MAX_LENGTH = 256
#: the per-token NLL quantiles in :meth:`CausalLMTask.attack_features` (after mean, std and min; then max)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
FEATURES = ("mean", "std", "min", *(f"q{int(q * 100)}" for q in QUANTILES), "max")
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class LMFamily:
    """Where LoRA goes in one model family (peft suffix matching) and whether its layers store W as
    ``[in, out]`` (GPT-2's ``Conv1D``: peft needs ``fan_in_fan_out``)."""

    targets: tuple[str, ...]
    fan_in_fan_out: bool = False


_QKVO = LMFamily(("q_proj", "k_proj", "v_proj", "o_proj"))
#: config.model_type → the attention projections LoRA targets by default
LM_FAMILIES: dict[str, LMFamily] = {
    "gpt2": LMFamily(("c_attn", "attn.c_proj"), fan_in_fan_out=True),  # fused q/k/v and the attention output
    "llama": _QKVO, "mistral": _QKVO, "qwen2": _QKVO, "qwen3": _QKVO, "gemma": _QKVO, "gemma2": _QKVO,
    "opt": LMFamily(("q_proj", "k_proj", "v_proj", "out_proj")),
    "gpt_neox": LMFamily(("query_key_value", "dense")),
}


@dataclass(frozen=True)
class LMLoraSpec(LoraSpec):
    """A LoraSpec that also tells peft the weight layout and that the adapter is a CAUSAL_LM one."""

    fan_in_fan_out: bool = False

    def peft_config(self) -> Any:
        config = super().peft_config()
        config.fan_in_fan_out = self.fan_in_fan_out
        config.task_type = "CAUSAL_LM"
        return config


def family_spec(model_type: str, spec: LoraSpec | None) -> LMLoraSpec:
    """The LoRA to inject: ``spec``'s rank/alpha on its targets, or the family's when they are ``auto``."""
    spec = spec or LoraSpec(rank=8, alpha=16, targets=(AUTO,))
    family = LM_FAMILIES.get(model_type)
    if tuple(spec.targets) == (AUTO,):
        if family is None:
            raise UserError(f"no default LoRA targets for model family {model_type!r} (known: "
                            f"{', '.join(sorted(LM_FAMILIES))}); name them with lora.targets")
        targets = family.targets
    else:
        targets = tuple(spec.targets)
    return LMLoraSpec(rank=spec.rank, alpha=spec.alpha, targets=targets,
                      fan_in_fan_out=family.fan_in_fan_out if family else False)


def plain_prompt(messages: tuple[Message, ...] | list[Message]) -> str:
    """privlora's template for tokenizers without a chat template; ends where the assistant's answer starts."""
    turns = [f"### {PLAIN_ROLES.get(role, role.title())}:\n{content}\n\n" for role, content in messages]
    return "".join(turns) + "### Assistant:\n"


def _no_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0  # Llama-style attention passes it to sdpa in train mode


def response_nll(logits: torch.Tensor, encoded: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of ``logits`` ``[B, T, V]`` against the next tokens of ``encoded`` and the mask of the
    scored (response) positions, ``[B, T-1]`` each (:meth:`CausalLMTask.token_nll`; the split LM's client
    scores the logits of its own head with it)."""
    targets = encoded["labels"][:, 1:]
    mask = encoded["response_mask"][:, 1:] & (targets != -100)
    nll = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.clamp(min=0),
                                      reduction="none")
    return nll * mask, mask


def nll_summary(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float] | None:
    """Held-out figures from per-batch ``(nll·mask, mask)`` pairs (:func:`response_nll`): mean per-record
    response NLL, NLL per token, perplexity (exp of that) and tokens; None without any record."""
    records, total, tokens = [], 0.0, 0
    for nll, mask in batches:
        records.append(nll.sum(1) / mask.sum(1).clamp(min=1))
        total, tokens = total + float(nll.sum()), tokens + int(mask.sum())
    if not records:
        return None
    token_loss = total / max(tokens, 1)
    return {"loss": float(torch.cat(records).mean()), "token_loss": token_loss,
            "perplexity": float(torch.exp(torch.tensor(token_loss))), "tokens": tokens}


class CausalLMTask:
    """A frozen causal LM with LoRA on its attention; batches are ``{"prompts", "responses"}`` (lists of
    message tuples and strings, :class:`privlora.data.instructions.InstructionSet`)."""

    def __init__(self, base: str | Path = "embedded-lm", *, lora: LoraSpec | None = None, seed: int = 0,
                 max_length: int = MAX_LENGTH, device: str = "cpu") -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from privlora.tasks.embedded_lm import resolve_lm_base
        from privlora.tasks.lora import add_lora

        source, self.base = resolve_lm_base(base)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_pretrained(source, config=config, local_files_only=True,
                                                             dtype=torch.float32)
        except (OSError, ValueError) as e:  # not cached / files missing, or a config transformers cannot read
            raise UserError(f"cannot load causal-LM base {base!r} offline: {str(e).splitlines()[0]}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        _no_dropout(model)
        self.model_type = str(config.model_type)
        self.lora = family_spec(self.model_type, lora)
        add_lora(model, self.lora, seed=seed)  # freezes the base; B starts at zero: the adapter starts as a no-op
        self.model: nn.Module = model.to(device)
        self.denoiser: nn.Module = self.model  # what forward passes call (DP swaps in Opacus' wrapper)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.max_length = min(max_length, int(limit)) if limit else max_length
        self.eos_id = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.eos_id if self.eos_id is not None else 0))
        self._encoded: dict[tuple[Any, str], tuple[list[int], list[int]]] = {}

    # --- text → tokens -----------------------------------------------------------------------------
    @property
    def hf_model(self) -> nn.Module:
        """The transformers model itself, LoRA layers inside (what ``model`` is; named for the attacks)."""
        return self.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def format_prompt(self, messages: tuple[Message, ...] | list[Message]) -> str:
        """The prompt text the model sees before the response (chat template, else the plain one)."""
        if getattr(self.tokenizer, "chat_template", None):
            chat = [{"role": r, "content": c} for r, c in messages]
            return str(self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
        return plain_prompt(messages)

    def encode_pair(self, messages: tuple[Message, ...], response: str) -> tuple[list[int], list[int]]:
        """Token ids of the prompt and of the response (its end-of-turn / EOS included), cut to ``max_length``
        from the prompt's left first: the response is what is scored, and it keeps at least one prompt token
        to be predicted from."""
        key = (tuple(messages), response)
        if key in self._encoded:
            return self._encoded[key]
        prompt = self.format_prompt(messages)
        if getattr(self.tokenizer, "chat_template", None):
            chat = [{"role": r, "content": c} for r, c in messages] + [{"role": "assistant", "content": response}]
            full = str(self.tokenizer.apply_chat_template(chat, tokenize=False))
            tail = full[len(prompt):] if full.startswith(prompt) else response
            p_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            r_ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"]
        else:
            p_ids = self.tokenizer(prompt)["input_ids"]
            r_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
            if self.eos_id is not None:
                r_ids = [*r_ids, int(self.eos_id)]  # learn to stop after the answer
        if not r_ids:
            raise UserError(f"a record's response is empty after tokenization (prompt {prompt[:60]!r})")
        r_ids = r_ids[:self.max_length - 1]
        p_ids = (p_ids or [self.pad_id])[-(self.max_length - len(r_ids)):]
        self._encoded[key] = (list(p_ids), list(r_ids))
        return self._encoded[key]

    def encode(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (the ids themselves) and
        ``response_mask`` (True on response tokens), each ``[B, T]``."""
        pairs = [self.encode_pair(tuple(m), r) for m, r in zip(batch["prompts"], batch["responses"], strict=True)]
        width = max(len(p) + len(r) for p, r in pairs)
        ids = torch.full((len(pairs), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(pairs), width), dtype=torch.long)
        response = torch.zeros((len(pairs), width), dtype=torch.bool)
        for i, (p, r) in enumerate(pairs):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            attention[i, :len(p) + len(r)] = 1
            response[i, len(p):len(p) + len(r)] = True
        device = self.device
        return {"input_ids": ids.to(device), "attention_mask": attention.to(device), "labels": ids.clone().to(device),
                "response_mask": response.to(device)}

    # --- losses --------------------------------------------------------------------------------------
    def token_nll(self, encoded: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token NLL of each next token and the mask of scored ones (response tokens), ``[B, T-1]`` each.
        Position ``t``'s logits predict ``labels[t+1]``; only ``response_mask[t+1]`` positions count (and never
        a label of -100, Hugging Face's ignore value, should a caller pass such labels)."""
        logits = self.denoiser(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
        return response_nll(logits, encoded)

    def per_sample_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean NLL over each record's response tokens, ``[B]``."""
        nll, mask = self.token_nll(self.encode(batch))
        return nll.sum(1) / mask.sum(1).clamp(min=1)

    @staticmethod
    def nll_statistics(nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, len(FEATURES)]``: mean, std, min, quantiles and max of each row's scored per-token NLL."""
        q = torch.tensor(QUANTILES, dtype=nll.dtype, device=nll.device)
        rows = []
        for values, keep in zip(nll, mask, strict=True):
            v = values[keep]
            if v.numel() == 0:
                rows.append(nll.new_zeros(len(FEATURES)))
                continue
            rows.append(torch.cat([torch.stack([v.mean(), v.std(unbiased=False), v.min()]),
                                   torch.quantile(v, q), v.max()[None]]))
        return torch.stack(rows)

    def attack_features(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """What a loss-based attacker sees of each record: statistics of its response tokens' NLL
        (:data:`FEATURES`) — the mean is the loss; min/max/quantiles expose memorised spans (a planted
        account number goes to near-zero NLL while the rest stays high)."""
        return self.adaptation_and_features(batch, generator)[1]

    def adaptation_and_features(self, batch: dict[str, Any],
                                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass for MP/SMP: the batch's mean loss and the attacker's features, sharing the graph."""
        nll, mask = self.token_nll(self.encode(batch))
        loss = nll.sum(1) / mask.sum(1).clamp(min=1)
        return loss.mean(), self.nll_statistics(nll, mask)

    def train(self) -> None:
        """Train mode (dropout is 0 everywhere, so it computes what eval mode does)."""
        self.model.train()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """The base model alone (LoRA layers bypassed) inside the block: the reference a calibrated attack
        or the utility compares the adapter with."""
        from privlora.tasks.lora import lora_bypassed

        with lora_bypassed(self.model):
            yield

    @torch.no_grad()
    def score(self, data: Any, batch_size: int = 16) -> dict[str, float] | None:
        """Mean per-record loss, token-level loss and perplexity of an InstructionSet (None when empty)."""
        chunks = (list(range(start, min(start + batch_size, len(data)))) for start in range(0, len(data), batch_size))
        return nll_summary(self.token_nll(self.encode(data.batch(idx))) for idx in chunks)

    # --- adapters ------------------------------------------------------------------------------------
    def save_adapter(self, path: str | Path) -> None:
        """The peft CAUSAL_LM folder: adapter_model.safetensors + adapter_config.json (base named by path/id)."""
        from privlora.tasks.lora import PEFT_PREFIX, PEFT_WEIGHTS, lora_state_dict, write_safetensors

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = {PEFT_PREFIX + k: v for k, v in lora_state_dict(self.model).items()}
        write_safetensors(out / PEFT_WEIGHTS, state, {"format": "pt", "privlora_base": self.base})
        config = self.lora.peft_config()
        config.base_model_name_or_path = self.base
        config.save_pretrained(str(out))

    def load_adapter(self, path: str | Path) -> None:
        from privlora.tasks.lora import load_lora

        load_lora(self.model, Path(path))
