"""What ``privlora audit`` does with a causal-lm run (the ``causal-lm`` entry of ``kinds.AUDIT_KINDS``).

The attacks are :mod:`privlora.audit.lm_attacks`' (loss, zlib, reference, Min-K%; LiRA/RMIA on the mean
response NLL), but every per-token log-prob comes from the run's own :class:`~privlora.tasks.causal_lm.CausalLMTask`
— ``encode`` and ``token_nll``, exactly the tokens and mask training optimised (chat template or privlora's
plain template, EOS closing the response). lm_signals' raw ``prompt + response`` encoder would score other
tokens than training saw. The scorers have the runner's signature ``(task, data, *, seed) → [N]`` (higher =
member); inside the runner's base control (``task.adapter_disabled``) they score the base model.

:func:`lm_extras` adds what only a language model has: the exposure of the run's secret-sharer canaries
(``canaries.json``, :mod:`privlora.train.lm_canaries`) for the adapter and the base, and — with
``--extraction N`` — extraction by prompting each member's prompt (greedy and N sampled continuations).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privlora.audit.lm_attacks import MIN_K, loss_scores, min_k_scores, reference_calibrated_scores, zlib_scores
from privlora.audit.lm_signals import Encoded, Encoder, mean_nll
from privlora.errors import UserError

BATCH = 16


@torch.no_grad()
def response_logprobs(task: Any, data: Any) -> list[np.ndarray]:
    """Per record, the log-probs of its response tokens as training scored them (``task.token_nll``)."""
    out: list[np.ndarray] = []
    for start in range(0, len(data), BATCH):
        nll, mask = task.token_nll(task.encode(data.batch(list(range(start, min(start + BATCH, len(data)))))))
        out += [-row[keep].double().cpu().numpy() for row, keep in zip(nll, mask, strict=True)]
    return out


def loss_attack(task: Any, data: Any, *, seed: int = 0) -> np.ndarray:
    return loss_scores(response_logprobs(task, data))


def zlib_attack(task: Any, data: Any, *, seed: int = 0) -> np.ndarray:
    return zlib_scores(response_logprobs(task, data), list(data.responses))


def min_k_attack(task: Any, data: Any, *, seed: int = 0) -> np.ndarray:
    return min_k_scores(response_logprobs(task, data), MIN_K)


def reference_attack(task: Any, data: Any, *, seed: int = 0) -> np.ndarray:
    """NLL_base − NLL_model; the base is the adapter disabled, so under the base control it is 0 (AUC ½)."""
    model = response_logprobs(task, data)
    with task.adapter_disabled():
        base = response_logprobs(task, data)
    return reference_calibrated_scores(model, base)


def nll_signal(task: Any, data: Any, *, seed: int = 0) -> np.ndarray:
    """LiRA/RMIA's signal: mean response NLL per record (lower = member)."""
    return mean_nll(response_logprobs(task, data))


def load_causal_lm(config: Any, run: Path) -> tuple[Any, Any, Callable[[], AbstractContextManager[None]]]:
    """The run's CausalLMTask with its adapter, the whole InstructionSet, and the base control."""
    from privlora.generate import adapter_base
    from privlora.tasks.lora import read_spec
    from privlora.train.data import load_task_and_data

    task, data = load_task_and_data(config, read_spec(run / "adapter"))
    trained_on = adapter_base(run / "adapter")
    # a folder base (embedded-lm is the package's) may move with the venv: its last two parts must match
    if trained_on != task.base and Path(trained_on).parts[-2:] != Path(task.base).parts[-2:]:
        raise UserError(f"the adapter in {run} was trained on base {trained_on!r}, the run's config says "
                        f"{config.base!r}: it cannot be audited against this base")
    task.load_adapter(run / "adapter")
    task.model.eval()
    return task, data, task.adapter_disabled


def join(a: Any, b: Any) -> Any:
    return a.concat(b)


def task_encoder(task: Any, prompts: dict[str, Any] | None = None, *, eos: bool) -> Encoder:
    """lm_signals' record → ids, through ``task.encode_pair``: a record's ``prompt`` text is looked up in
    ``prompts`` (rendered prompt → its messages), else taken as one user message (a canary's prefix, as
    :mod:`privlora.train.lm_canaries` trained it). ``eos=False`` drops the EOS the plain template appends."""
    def encode(record: Any) -> Encoded:
        messages = (prompts or {}).get(record["prompt"], (("user", record["prompt"]),))
        context, target = task.encode_pair(tuple(messages), record["response"])
        if not eos and len(target) > 1 and task.eos_id is not None and target[-1] == task.eos_id:
            target = target[:-1]
        return Encoded(context=list(context), target=list(target))
    return encode


def canary_exposure(loaded: Any, canaries: list[Any], fmt: Any, *, seed: int) -> dict[str, Any]:
    """Exposure (bits) of every planted canary with the adapter and with the base control, and the mean per
    insertion count (0 = never-inserted controls)."""
    from privlora.audit.lm_canaries import exposure, exposure_by_insertions

    task, encoder = loaded.task, task_encoder(loaded.task, eos=False)

    def measure() -> dict[str, Any]:
        rows = exposure(task.model, task.tokenizer, canaries, fmt=fmt, seed=seed, encoder=encoder)
        return {"by_insertions": {str(k): v for k, v in exposure_by_insertions(rows).items()}, "canaries": rows}

    adapter = measure()
    with loaded.base_control():
        base = measure()
    return {"paper": "Carlini et al. 2019 (The Secret Sharer)", "method": adapter["canaries"][0]["method"],
            "format": {"prefix": fmt.prefix, "alphabet": fmt.alphabet, "length": fmt.length,
                       "space": fmt.space_size},
            "max_exposure": float(np.log2(fmt.space_size)), "adapter": adapter, "base_control": base}


def prompt_extraction(loaded: Any, *, samples: int, seed: int, pii: bool = False) -> dict[str, Any]:
    """lm_extraction.extraction_test on the members' prompts (greedy + ``samples`` sampled), adapter vs base;
    ``pii``: each answer scanned by the text sanitizer's PII scanner (``pii`` per decoding: spans found, and
    ``leaked`` — those whose text is in a training record but not in the prompt)."""
    from privlora.audit.lm_extraction import extraction_test

    task, members = loaded.task, loaded.members
    rendered = [task.format_prompt(m) for m in members.prompts]
    records = [{"prompt": p, "response": r} for p, r in zip(rendered, members.responses, strict=True)]
    result = extraction_test(task.model, task.tokenizer, records, samples=samples, seed=seed, pii=pii,
                             encoder=task_encoder(task, dict(zip(rendered, members.prompts, strict=True)), eos=False),
                             control=loaded.base_control)
    result["adapter"], result["base_control"] = result.pop("target"), result.pop("base")
    result["kind"] = "prompting"  # the image audit's "extraction" is generation + nearest training image
    result["paper"] = "Carlini et al. 2023 (greedy); Carlini et al. 2021 (top-k sampling); Ippolito et al. 2023"
    return result


def lm_extras(loaded: Any, *, extraction: int, seed: int, quiet: bool = True, pii: bool = False) -> dict[str, Any]:
    """results.json keys only a language model has: ``canary_exposure`` (when the run planted canaries) and
    ``extraction`` (with ``--extraction N``: N sampled continuations per member prompt besides greedy)."""
    from privlora.train.lm_canaries import read_canaries

    out: dict[str, Any] = {}
    planted = read_canaries(loaded.path)
    if planted is not None and planted[0]:
        out["canary_exposure"] = canary_exposure(loaded, *planted, seed=seed)
    if extraction:
        out["extraction"] = prompt_extraction(loaded, samples=extraction, seed=seed, pii=pii)
    return out
