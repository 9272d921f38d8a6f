"""The user's side of a split causal LM (``task: causal-lm``): train against a split server that hosts the
middle of the model, and write the run directory.

Each step: the bottom's hidden states for a batch of instruction records → the dχ privatizer → the server's
blocks → the user's ``ln_f`` + LM head → the mean response NLL, computed here (the records never leave) →
the gradient of that loss with respect to the server's output goes back. Held-out perplexity is measured
through the same privatized pipeline. Run directory: ``config.yaml``, ``split.json`` (``task: causal-lm``,
depth, privatizer, held-out loss and perplexity, bytes on the wire) and ``metrics.jsonl``; the server keeps
the adapter (``/save``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch

from privlora.config import SplitConfig
from privlora.data.instructions import InstructionSet, load_instruction_dataset
from privlora.errors import UserError
from privlora.split.lm_models import LMSplitBottom
from privlora.split.privatizers import Privatizer, os_generator
from privlora.split.train import TopEndpoint, batches
from privlora.tasks.causal_lm import nll_summary


def lm_train_step(bottom: LMSplitBottom, privatizer: Privatizer, top: TopEndpoint, batch: dict[str, Any],
                  generator: torch.Generator) -> float:
    """One step; returns the batch's mean response NLL. Prompts, responses and labels stay here."""
    encoded = bottom.encode(batch)
    with torch.no_grad():
        hidden = bottom.forward(encoded["input_ids"], encoded["attention_mask"])
    noised = privatizer(hidden, encoded["input_ids"], generator)
    step_id, out = top.forward(noised, encoded["attention_mask"], train=True)
    out = out.detach().requires_grad_(True)
    nll, mask = bottom.token_nll(out, encoded)
    loss = (nll.sum(1) / mask.sum(1).clamp(min=1)).mean()
    loss.backward()
    assert step_id is not None and out.grad is not None
    top.backward(step_id, out.grad)
    return float(loss.detach())


@torch.no_grad()
def lm_evaluate(bottom: LMSplitBottom, privatizer: Privatizer, top: TopEndpoint, data: InstructionSet, *,
                batch_size: int, generator: torch.Generator) -> dict[str, float]:
    """Mean per-record response NLL, per-token NLL and perplexity of ``data`` through the privatized pipeline
    (the same figures as :meth:`CausalLMTask.score`, by :func:`~privlora.tasks.causal_lm.nll_summary`)."""
    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(data), batch_size):
            encoded = bottom.encode(data.batch(list(range(start, min(start + batch_size, len(data))))))
            noised = privatizer(bottom.forward(encoded["input_ids"], encoded["attention_mask"]),
                                encoded["input_ids"], generator)
            yield bottom.token_nll(top.forward(noised, encoded["attention_mask"], train=False)[1], encoded)

    summary = nll_summary(batches())
    if summary is None:
        raise UserError("no held-out records to evaluate; raise data.eval")
    return summary


def lm_split_train(config: SplitConfig, top: TopEndpoint, *, progress: bool = True) -> Any:
    """Train a split causal LM against ``top`` and write the user's run directory (a SplitRun whose
    ``accuracy`` is NaN: the held-out figures are ``loss`` and ``summary['eval_perplexity']``)."""
    from privlora.progress import progress_bar
    from privlora.split.run import SplitRun, check_server, hold_out, write_split_run

    data = load_instruction_dataset(config.data.source, limit=config.data.limit)
    train_data, eval_data = hold_out(data, config.data.eval, config.seed)
    info = top.info()
    depth = check_server(info, config)
    # records are cut to what the server accepts (its max_tokens; the task's 256 by default)
    bottom = LMSplitBottom(depth, base=config.base, seed=config.seed, max_length=int(info.get("max_tokens", 256)))
    options = config.privatizer
    privatizer = Privatizer(options.name, options.eta, 1.0, {})
    generator = os_generator()
    rows = []
    start = time.perf_counter()
    with progress_bar("split training", total=config.optim.steps, quiet=config.quiet or not progress) as bar:
        for step, idx in enumerate(batches(len(train_data), config.optim.batch_size, config.optim.steps,
                                           config.seed), start=1):
            loss = lm_train_step(bottom, privatizer, top, train_data.batch(idx), generator)
            rows.append({"step": step, "loss": round(loss, 5), "seconds": round(time.perf_counter() - start, 3)})
            bar.advance(loss=loss)
    seconds = time.perf_counter() - start
    held = lm_evaluate(bottom, privatizer, top, eval_data, batch_size=config.optim.batch_size, generator=generator)
    saved = top.save() if hasattr(top, "save") else {}
    summary = {
        "task": "causal-lm", "depth": depth, "base": config.base, "bottom": config.bottom,
        "privatizer": privatizer.describe(), "server": config.server, "server_adapter": saved.get("path"),
        "server_steps": saved.get("steps"), "train_records": len(train_data), "eval_records": len(eval_data),
        "eval_loss": round(held["loss"], 4), "eval_token_loss": round(held["token_loss"], 4),
        "eval_perplexity": round(held["perplexity"], 3), "train_seconds": round(seconds, 2),
        "samples_per_second": round(config.optim.steps * config.optim.batch_size / seconds, 2),
    }
    write_split_run(config, top, rows, summary)
    return SplitRun(config.out, math.nan, held["loss"], summary)
