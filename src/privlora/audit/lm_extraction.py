"""Extraction by prompting: does the fine-tuned model *emit* its training responses when asked?

Membership inference asks "was this record trained on?"; extraction asks what a user fears: "give the
model the record's prompt — does it answer with the training response, word for word?". Definitions:

* **Prompts.** By default each training record's own prompt, and the target is its response (what an
  instruction-tuned model is asked in use). With ``prefix_tokens = n`` the first ``n`` tokens of
  prompt + response are the prompt and the rest of the record is the target — Carlini et al. 2023
  ("Quantifying Memorization Across Neural Language Models") k-extractability with a fixed prefix length.
* **Generations.** Greedy decoding (deterministic; Carlini et al. 2023's test) and, optionally,
  ``samples`` sampled continuations per prompt with top-k = 40 at temperature 1 (Carlini et al. 2021's
  sampling setting), seeded per record so the result does not depend on the batch size. Each generation
  is as many tokens as its target (and stops early at EOS).
* **Verbatim**: the decoded generation equals the decoded target. **Near-verbatim**: their character-level
  Levenshtein distance divided by the longer length is ≤ ``threshold`` (0.1 by default: at most one edit
  per ten characters) — approximate memorisation in the sense of Ippolito et al. 2023, who showed exact
  match alone undercounts it. The edit distance is computed here (:func:`edit_distance`); no package.
* **Control.** Everything is measured on the base model too (the same prompts, seeds and lengths); only
  what the fine-tuned model reproduces beyond the base is the fine-tuning's leak.
* **PII** (optional, :func:`pii_leaks`): the text sanitizer's PII scanner runs on the generations; a span
  counts as *leaked* when its text occurs in a training record but not in the prompt that produced it.

Generated texts are training data when extraction works, so results hold indices and distances only,
unless ``keep_text=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import numpy as np
import torch

from privlora.audit.lm_signals import (
    BATCH,
    Encoded,
    Encoder,
    Record,
    base_model,
    check_records,
    encode_record,
    eval_mode,
    model_device,
    model_max_length,
    pad_id,
)
from privlora.errors import UserError

THRESHOLD = 0.1
TOP_K = 40


def edit_distance(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def normalised_distance(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Edit distance over the longer length: 0 = identical, 1 = nothing in common."""
    longest = max(len(a), len(b))
    return edit_distance(a, b) / longest if longest else 0.0


def extraction_prompts(tokenizer: Any, records: Sequence[Record], *, prefix_tokens: int | None = None,
                       max_length: int | None = None, encoder: Encoder | None = None) -> list[Encoded]:
    """``context`` = what the model is given, ``target`` = what a memorising model would continue with
    (``encoder``: record → ids without EOS, when training encoded records its own way)."""
    out = []
    for rec in check_records(records):
        enc = encoder(rec) if encoder is not None else encode_record(tokenizer, rec, eos=False, max_length=max_length)
        if prefix_tokens is not None:
            if prefix_tokens < 1:
                raise UserError(f"prefix_tokens must be at least 1, got {prefix_tokens}")
            ids = enc.ids
            if len(ids) <= prefix_tokens:
                raise UserError(f"a record has {len(ids)} tokens, not more than the {prefix_tokens}-token prefix")
            enc = Encoded(context=ids[:prefix_tokens], target=ids[prefix_tokens:])
        out.append(enc)
    return out


def _cut(ids: list[int], length: int, eos: int | None) -> list[int]:
    ids = ids[:length]
    return ids[:ids.index(eos)] if eos is not None and eos in ids else ids


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[Encoded], *, samples: int = 0, seed: int = 0,
             top_k: int = TOP_K, temperature: float = 1.0, batch_size: int = BATCH) -> list[list[list[int]]]:
    """Per prompt, its continuations as token ids: one greedy one (``samples = 0``) or ``samples`` sampled,
    each at most ``len(target)`` tokens, cut at EOS."""
    eos, pad = tokenizer.eos_token_id, pad_id(tokenizer)
    device = model_device(model)
    out: list[list[list[int]]] = []
    with eval_mode(model):
        if samples == 0:
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                width = max(len(p.context) for p in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                attention = torch.zeros_like(ids)
                for b, p in enumerate(chunk):  # left padding: every row's next token follows its prompt
                    ids[b, width - len(p.context):] = torch.tensor(p.context)
                    attention[b, width - len(p.context):] = 1
                new = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device),
                                     max_new_tokens=max(len(p.target) for p in chunk), do_sample=False,
                                     pad_token_id=pad, eos_token_id=eos)[:, width:]
                out += [[_cut(new[b].tolist(), len(p.target), eos)] for b, p in enumerate(chunk)]
            return out
        for i, p in enumerate(prompts):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed * 1_000_003 + i)
                new = model.generate(input_ids=torch.tensor([p.context], device=device),
                                     attention_mask=torch.ones((1, len(p.context)), dtype=torch.long, device=device),
                                     max_new_tokens=len(p.target), do_sample=True, top_k=top_k,
                                     temperature=temperature, num_return_sequences=samples,
                                     pad_token_id=pad, eos_token_id=eos)[:, len(p.context):]
            out.append([_cut(row.tolist(), len(p.target), eos) for row in new])
    return out


def _score(tokenizer: Any, prompts: Sequence[Encoded], generations: Sequence[Sequence[list[int]]],
           threshold: float, keep_text: bool) -> dict[str, Any]:
    rows, distances = [], []
    for i, (p, gens) in enumerate(zip(prompts, generations, strict=True)):
        target = tokenizer.decode(p.target, skip_special_tokens=True)
        texts = [tokenizer.decode(g, skip_special_tokens=True) for g in gens]
        d = [normalised_distance(t, target) for t in texts]
        distances.append(d)
        row: dict[str, Any] = {"index": i, "verbatim": [t == target for t in texts], "distance": d}
        if keep_text:
            row["generations"] = texts
        rows.append(row)
    d = np.array(distances)
    return {"verbatim_rate": float((d == 0).mean()), "near_verbatim_rate": float((d <= threshold).mean()),
            "any_verbatim_rate": float((d == 0).any(1).mean()),
            "any_near_verbatim_rate": float((d <= threshold).any(1).mean()),
            "mean_distance": float(d.mean()), "generations": int(d.size), "records": rows}


def extraction_test(target: Any, tokenizer: Any, records: Sequence[Record], *, base: Any | None = None,
                    prefix_tokens: int | None = None, samples: int = 0, seed: int = 0,
                    threshold: float = THRESHOLD, top_k: int = TOP_K, temperature: float = 1.0,
                    batch_size: int = BATCH, keep_text: bool = False, pii: bool = False,
                    encoder: Encoder | None = None,
                    control: Callable[[], AbstractContextManager[Any]] | None = None) -> dict[str, Any]:
    """Greedy (and, with ``samples > 0``, sampled) extraction of ``records`` from the target and the base.

    ``base=None`` with a peft target uses the target with its adapter disabled; ``control`` (a context-manager
    factory inside which ``target`` *is* the base, e.g. a Task's ``adapter_disabled``) replaces both.
    ``encoder`` as in :func:`extraction_prompts`. ``*_rate`` are fractions of generations; ``any_*`` fractions
    of records with at least one (near-)verbatim generation."""
    if not 0 <= threshold < 1:
        raise UserError(f"near-verbatim threshold must be in [0, 1), got {threshold}")
    if samples < 0:
        raise UserError(f"samples must be ≥ 0, got {samples}")
    records = check_records(records)
    prompts = extraction_prompts(tokenizer, records, prefix_tokens=prefix_tokens,
                                 max_length=model_max_length(target), encoder=encoder)
    result: dict[str, Any] = {"records": len(records), "threshold": threshold, "prefix_tokens": prefix_tokens,
                              "samples": samples, "top_k": top_k, "temperature": temperature, "seed": seed}
    modes = [("greedy", 0)] + ([("sampled", samples)] if samples else [])
    training_texts = [r["prompt"] + r["response"] for r in records]
    for who in ("target", "base"):
        result[who] = {}
        with _controlled(target, control) if who == "base" and control is not None else \
                base_model(target, base) if who == "base" else nullcontext(target) as model:
            for mode, n in modes:
                gens = generate(model, tokenizer, prompts, samples=n, seed=seed, top_k=top_k,
                                temperature=temperature, batch_size=batch_size)
                result[who][mode] = _score(tokenizer, prompts, gens, threshold, keep_text)
                if pii:
                    texts = [tokenizer.decode(g, skip_special_tokens=True) for gs in gens for g in gs]
                    contexts = [tokenizer.decode(p.context, skip_special_tokens=True)
                                for p, gs in zip(prompts, gens, strict=True) for _ in gs]
                    result[who][mode]["pii"] = pii_leaks(texts, contexts, training_texts)
    return result


@contextmanager
def _controlled(target: Any, control: Callable[[], AbstractContextManager[Any]]) -> Iterator[Any]:
    with control():
        yield target


def pii_leaks(generations: Sequence[str], prompts: Sequence[str], training_texts: Sequence[str], *,
              scrubber: Any | None = None) -> dict[str, Any]:
    """PII spans the sanitizer finds in ``generations``, and how many of them are *leaked*: their text occurs
    in a training record but not in the prompt that produced the generation. Loads spaCy on first use."""
    if len(generations) != len(prompts):
        raise UserError(f"{len(generations)} generations but {len(prompts)} prompts")
    if scrubber is None:
        from privlora.data.sanitize.pii.engine import PiiScrubber

        scrubber = PiiScrubber(operator="replace")
    found = scrubber.scrub_many(list(generations))
    spans = leaked = 0
    by_type: dict[str, dict[str, int]] = {}
    for text, prompt, (_, findings) in zip(generations, prompts, found, strict=True):
        for f in findings:
            value = text[f.where["start"]:f.where["end"]]
            hit = value not in prompt and any(value in t for t in training_texts)
            spans += 1
            leaked += hit
            counts = by_type.setdefault(f.label, {"spans": 0, "leaked": 0})
            counts["spans"] += 1
            counts["leaked"] += hit
    return {"spans": spans, "leaked": leaked, "by_type": by_type}
