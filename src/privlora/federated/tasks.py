"""What a federated run trains, keyed by ``FederatedConfig.task``: the one place the federated package
learns the difference between a text classifier and a causal LM.

Every other module (client, strategy, data, adapter, run, report, CLI) asks the entry of
:data:`FEDERATED_TASKS` for the run's task, instead of branching on it:

* ``load`` / ``partition`` — the corpus (``data.source``, ``data.limit``) and how its training part is
  dealt to the clients. Text: Dirichlet *label* skew (``data.alpha``; null: IID). Causal LM: the records
  have no label, so the same Dirichlet split over a single class — that is a *size* (quantity) skew:
  client ``k`` holds a ``Dir(alpha)``-drawn share of the records, each client at least one; ``data.alpha:
  null`` (the causal-lm default, as FlowerTune's IID partitioner) gives near-equal IID shares.
* ``head`` — how many arrays the wire state carries after the LoRA factors (text: the classifier's weight
  and bias; causal LM: none — the LM head is frozen). The LoRA rules take it as a parameter.
* ``model_key`` / ``build`` — the model: a hashable key of what fixes it besides LoRA (text: the number of
  labels, the data's unless the caller names it; causal LM: the base — it has no classifier), and the Task
  built from it (``TextClassificationTask`` on MiniLM; ``CausalLMTask`` on ``base``, default ``embedded-lm``).
* ``evaluate`` — the server's figures on its held-out set each round, written to metrics.jsonl. Text:
  ``accuracy``, ``loss`` (mean cross-entropy). Causal LM: ``loss`` (mean per-record response NLL),
  ``token_loss`` (response NLL per token), ``perplexity`` (exp of token_loss), ``tokens``. ``loss`` is
  always there (Flower's evaluate loss); ``headline`` names the figure progress and summaries show.

The saved global adapter is the Task's own ``save_adapter``: a peft SEQ_CLS folder (text) or a peft
CAUSAL_LM folder that ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)``
loads (causal LM).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from privlora.errors import UserError
from privlora.federated.partition import dirichlet_partition


@dataclass(frozen=True)
class FederatedTask:
    """One ``task:`` of a federated run (see the module docstring for each field's job)."""

    name: str
    head: int  # arrays after the LoRA factors in the wire state
    partitioner: str  # how splits.json names the split
    headline: str  # the metrics.jsonl figure progress bars and summaries show
    short: str  # its name on the progress bar
    load: Callable[[str, int | None], Any]  # (source, limit) → TextSet | InstructionSet
    partition: Callable[[Any, int, float | None, int], list[list[int]]]  # (train, clients, alpha, seed)
    model_key: Callable[[Any, Any, int | None], tuple]  # (config, train set, num_labels or None) → hashable
    build: Callable[[tuple, int, float, tuple[str, ...], int], Any]  # (key, rank, alpha, targets, seed)
    evaluate: Callable[[Any, Any], dict[str, float]]  # (task, held-out set) → metrics, "loss" included


# --- text: MiniLM sequence classification -------------------------------------------------------------
def _text_load(source: str, limit: int | None) -> Any:
    from privlora.data.text import load_text_dataset

    return load_text_dataset(source, limit=limit)


def _text_partition(train: Any, clients: int, alpha: float | None, seed: int) -> list[list[int]]:
    return dirichlet_partition(train.labels, clients, alpha, seed=seed)


def _text_key(config: Any, train: Any, num_labels: int | None) -> tuple:
    return (len(train.classes) if num_labels is None else int(num_labels),)


def _text_build(key: tuple, rank: int, alpha: float, targets: tuple[str, ...], seed: int) -> Any:
    from privlora.tasks.text import TextClassificationTask, TextLora

    (num_labels,) = key
    return TextClassificationTask(num_labels, lora=TextLora(rank=rank, alpha=alpha, targets=targets), seed=seed)


def _text_evaluate(task: Any, test: Any) -> dict[str, float]:
    accuracy, loss = task.score(test)
    return {"accuracy": accuracy, "loss": loss}


# --- causal-lm: instruction tuning ------------------------------------------------------------------
def _lm_load(source: str, limit: int | None) -> Any:
    from privlora.data.instructions import load_instruction_dataset

    return load_instruction_dataset(source, limit=limit)


def _lm_partition(train: Any, clients: int, alpha: float | None, seed: int) -> list[list[int]]:
    # no labels: one class, so Dirichlet(alpha) deals only the *amount* of data (quantity skew); None: IID
    return dirichlet_partition([0] * len(train), clients, alpha, seed=seed)


def _lm_build(key: tuple, rank: int, alpha: float, targets: tuple[str, ...], seed: int) -> Any:
    from privlora.tasks.causal_lm import CausalLMTask
    from privlora.tasks.lora import LoraSpec

    (base,) = key
    return CausalLMTask(base, lora=LoraSpec(rank=rank, alpha=alpha, targets=targets), seed=seed)


def _lm_evaluate(task: Any, test: Any) -> dict[str, float]:
    scores = task.score(test)
    if scores is None:
        raise UserError("the server's held-out set is empty; raise data.test")
    return scores


FEDERATED_TASKS: dict[str, FederatedTask] = {
    "text": FederatedTask("text", head=2, partitioner="dirichlet", headline="accuracy", short="acc",
                          load=_text_load,
                          partition=_text_partition, model_key=_text_key,
                          build=_text_build, evaluate=_text_evaluate),
    "causal-lm": FederatedTask("causal-lm", head=0, partitioner="dirichlet-size", headline="perplexity",
                               short="ppl", load=_lm_load, partition=_lm_partition,
                               model_key=lambda config, train, num_labels: (str(config.base),),
                               build=_lm_build, evaluate=_lm_evaluate),
}


def federated_task(config: Any) -> FederatedTask:
    """The registry entry for ``config.task`` (a FederatedConfig)."""
    try:
        return FEDERATED_TASKS[config.task]
    except KeyError:
        raise UserError(f"unknown federated task {config.task!r}; known: {', '.join(FEDERATED_TASKS)}") from None


def rule_for(config: Any) -> Any:
    """The LoRA rule of ``config.strategy`` with this task's head layout."""
    from privlora.federated.rules import get_rule

    return get_rule(config.strategy, config.lora.alpha, head=federated_task(config).head)
