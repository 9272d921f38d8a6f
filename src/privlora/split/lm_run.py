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
from typing import Any

import torch

from privlora.config import SplitConfig
from privlora.data.instructions import InstructionSet, load_instruction_dataset
from privlora.errors import UserError
from privlora.split.lm_models import LMSplitBottom
from privlora.split.privatizers import Privatizer, os_generator
from privlora.split.train import TopEndpoint, batches


def lm_train_step(bottom: LMSplitBottom, privatizer: Privatizer, top: TopEndpoint, batch: dict[str, Any],
                  generator: torch.Generator) -> float:
    """One step; returns the batch's mean response NLL. Prompts, responses and labels stay here."""
    encoded = bottom.encode(batch)
    with torch.no_grad():
        hidden = bottom.forward(encoded["input_ids"], encoded["attention_mask"])
    noised = privatizer(hidden, encoded["input_ids"], generator)
    step_id, out = top.forward(noised, encoded["attention_mask"], train=True)
    out = out.detach().requires_grad_(True)
    nll, tokens = bottom.loss(out, encoded)
    loss = (nll / tokens.clamp(min=1)).mean()
    loss.backward()
    assert step_id is not None and out.grad is not None
    top.backward(step_id, out.grad)
    return float(loss.detach())


@torch.no_grad()
def lm_evaluate(bottom: LMSplitBottom, privatizer: Privatizer, top: TopEndpoint, data: InstructionSet, *,
                batch_size: int, generator: torch.Generator) -> dict[str, float]:
    """Mean per-record response NLL, per-token NLL and perplexity of ``data`` through the privatized pipeline."""
    records, total, tokens = [], 0.0, 0
    for start in range(0, len(data), batch_size):
        encoded = bottom.encode(data.batch(list(range(start, min(start + batch_size, len(data))))))
        noised = privatizer(bottom.forward(encoded["input_ids"], encoded["attention_mask"]), encoded["input_ids"],
                            generator)
        nll, count = bottom.loss(top.forward(noised, encoded["attention_mask"], train=False)[1], encoded)
        records.append(nll / count.clamp(min=1))
        total, tokens = total + float(nll.sum()), tokens + int(count.sum())
    token_loss = total / max(tokens, 1)
    return {"loss": float(torch.cat(records).mean()), "token_loss": token_loss,
            "perplexity": math.exp(min(token_loss, 700.0)), "tokens": tokens}


def check_lm_server(info: dict[str, Any], config: SplitConfig) -> int:
    """The server's split depth; refuses a server that does not host a causal LM of this client's base."""
    if info.get("task", "text") != "causal-lm":
        raise UserError(f"the split server hosts a {info.get('task', 'text')} model; this client trains a causal "
                        "LM: start the server with --task causal-lm")
    if info.get("base") != config.base:
        raise UserError(f"the split server runs base {info.get('base')!r} but this client is set to "
                        f"{config.base!r}; both halves must come from the same model")
    if config.optim.batch_size > int(info.get("max_batch", 64)):
        raise UserError(f"batch size {config.optim.batch_size} over the server's limit {info['max_batch']}")
    return int(info["depth"])


def lm_split_train(config: SplitConfig, top: TopEndpoint, *, progress: bool = True) -> Any:
    """Train a split causal LM against ``top`` and write the user's run directory (a SplitRun whose
    ``accuracy`` is NaN: the held-out figures are ``loss`` and ``summary['eval_perplexity']``)."""
    from privlora.progress import progress_bar
    from privlora.split.run import SplitRun, hold_out, write_split_run

    data = load_instruction_dataset(config.data.source, limit=config.data.limit)
    train_data, eval_data = hold_out(data, config.data.eval, config.seed)
    depth = check_lm_server(top.info(), config)
    # records are cut to what the server accepts (its max_tokens; the task's 256 by default)
    bottom = LMSplitBottom(depth, base=config.base, seed=config.seed, max_length=int(top.info().get("max_tokens", 256)))
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
