"""Per-token log-probabilities of a response given its prompt, for causal language models.

Every causal-LM attack (:mod:`privlora.audit.lm_attacks`), the secret-sharer exposure
(:mod:`privlora.audit.lm_canaries`) and the extraction test read the same quantity: for a record
``{"prompt": p, "response": r}``, the log-probability ``log P(r_t | p, r_<t)`` of each response token.
Prompt tokens are context only, never scored — instruction tuning trains on the response, and a prompt
the model was merely conditioned on is not what it memorised.

Why these choices:

* **Prompt and response are tokenised separately** and concatenated, so the boundary is exact (a BPE
  merge across it would otherwise move a character from the response into the prompt). Training should
  encode records the same way (:func:`encode_record`), so the audit scores what training optimised.
* **An end-of-sequence token closes the response** when the tokenizer has one (``eos=True``): a model that
  memorised a response also knows where it stops. An empty prompt gets the BOS (or EOS) token as context,
  so the first response token is still scored; a tokenizer whose default encoding starts with BOS (Llama)
  gets it before the prompt too, as the model saw in pre-training.
* **Right padding with an attention mask** (positions then start at 0 for every row, as in training) and
  a mask over response positions; the log-softmax is taken in float32 from ``logsumexp`` and a gather, so
  no second ``[B, T, V]`` tensor is allocated.
* Works for any ``AutoModelForCausalLM`` and for a peft-wrapped one (called as ``model(input_ids=…,
  attention_mask=…)``); always under ``torch.no_grad()`` and in eval mode (restored afterwards).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from privlora.errors import UserError

BATCH = 16
Record = Mapping[str, str]


@dataclass(frozen=True)
class Encoded:
    """One record as token ids: ``context`` (the prompt, never scored) and ``target`` (the scored response)."""

    context: list[int]
    target: list[int]

    @property
    def ids(self) -> list[int]:
        return self.context + self.target


#: a record → its token ids, for callers whose training encodes records its own way
Encoder = Callable[[Record], Encoded]


def check_records(records: Sequence[Record], what: str = "records") -> list[dict[str, str]]:
    """Records as plain ``{"prompt", "response"}`` dicts of strings, or a UserError that names the first bad one."""
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping) or not isinstance(rec.get("prompt"), str) \
                or not isinstance(rec.get("response"), str):
            raise UserError(f"{what}[{i}] must be a mapping with string 'prompt' and 'response', got {rec!r:.80}")
        if not rec["response"]:
            raise UserError(f"{what}[{i}] has an empty response: there is nothing to score")
        out.append({"prompt": rec["prompt"], "response": rec["response"]})
    return out


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's own default encoding starts with its BOS token (Llama yes, GPT-2 no)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def encode_record(tokenizer: Any, record: Record, *, eos: bool = True, max_length: int | None = None) -> Encoded:
    """Token ids of one record; longer than ``max_length`` → the prompt loses tokens on the left first
    (keeping one), then the response on the right."""
    context = _ids(tokenizer, record["prompt"])
    if context and _adds_bos(tokenizer):  # Llama-style tokenizers: the model expects its BOS first
        context = [int(tokenizer.bos_token_id)] + context
    target = _ids(tokenizer, record["response"])
    if eos and tokenizer.eos_token_id is not None:
        target = target + [int(tokenizer.eos_token_id)]
    if not context:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise UserError("a record has an empty prompt and the tokenizer has no BOS/EOS token to start from")
        context = [int(start)]
    if not target:
        raise UserError(f"response {record['response']!r:.60} encodes to no tokens")
    if max_length is not None and len(context) + len(target) > max_length:
        if max_length < 2:
            raise UserError(f"max_length must be at least 2 (one context and one scored token), got {max_length}")
        keep = max(1, max_length - len(target))
        context = context[-keep:]
        target = target[: max_length - len(context)]
    return Encoded(context=context, target=target)


def model_max_length(model: Any) -> int | None:
    """The longest sequence the model's position table holds (GPT-2 ``n_positions``), if it says."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def pad_batch(encoded: Sequence[Encoded], pad_id: int, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``scored`` ``[B, T]``: ``scored[b, t]`` is True where
    token ``t`` of row ``b`` is a response token (so its log-prob is read from position ``t − 1``).

    Training uses the same mask for its labels (``labels = ids`` where scored, −100 elsewhere)."""
    width = max(len(e.ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    scored = torch.zeros((len(encoded), width), dtype=torch.bool)
    for b, e in enumerate(encoded):
        n = len(e.ids)
        ids[b, :n] = torch.tensor(e.ids)
        attention[b, :n] = 1
        scored[b, len(e.context):n] = True
    return ids.to(device), attention.to(device), scored.to(device)


def pad_id(tokenizer: Any) -> int:
    """Any valid id works under the attention mask; the tokenizer's pad, else EOS, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Dropout off while scoring; the model's own mode is put back afterwards."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def encoded_logprobs(model: Any, encoded: Sequence[Encoded], *, pad: int, batch_size: int = BATCH
                     ) -> list[np.ndarray]:
    """Per record, the float64 log-probabilities of its target tokens (``len(e.target)`` values each)."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    device = model_device(model)
    out: list[np.ndarray] = []
    with eval_mode(model):
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            ids, attention, scored = pad_batch(chunk, pad, device)
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
            targets = ids[:, 1:]
            picked = logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)
            mask = scored[:, 1:]
            for b in range(len(chunk)):
                out.append(picked[b][mask[b]].double().cpu().numpy())
    return out


def token_logprobs(model: Any, tokenizer: Any, records: Sequence[Record], *, batch_size: int = BATCH,
                   eos: bool = True, encoder: Encoder | None = None) -> list[np.ndarray]:
    """``log P(response token | prompt, earlier response tokens)`` for every record (response tokens only).

    ``encoder`` replaces :func:`encode_record` when training encoded records its own way (a chat template's
    end-of-turn tokens, a task's ``encode_pair``): the audit must score exactly the tokens training saw."""
    records = check_records(records)
    limit = model_max_length(model)
    encoded = [encoder(r) if encoder is not None else encode_record(tokenizer, r, eos=eos, max_length=limit)
               for r in records]
    return encoded_logprobs(model, encoded, pad=pad_id(tokenizer), batch_size=batch_size)


def mean_nll(logprobs: Sequence[np.ndarray]) -> np.ndarray:
    """Per record, the mean negative log-likelihood per response token (log-perplexity, in nats)."""
    return np.array([-float(lp.mean()) for lp in logprobs])


@contextmanager
def base_model(target: Any, base: Any | None) -> Iterator[Any]:
    """The base model to score: ``base`` itself, or the peft ``target`` with its adapter disabled."""
    if base is not None:
        yield base
        return
    if not hasattr(target, "disable_adapter"):
        raise UserError("no base model given and the target is not a peft model whose adapter can be disabled")
    with target.disable_adapter():
        yield target
