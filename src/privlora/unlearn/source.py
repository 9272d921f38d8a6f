"""Load a trained run for unlearning: its config, Task with the adapter, and its three splits.

Image runs go through the audit's :func:`privlora.audit.runner.load_run` (the same checks an audit makes:
the adapter's base matches, splits are disjoint and present in the data). Text runs get the equivalent
here, since the audit covers image runs only: ``train`` writes the same ``splits.json`` for text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privlora.audit.runner import read_json_if_present
from privlora.data.splits import Splits
from privlora.errors import UserError


@dataclass
class Source:
    """A run seen by unlearning: the Task carries the run's adapter; data sets are ImageSet or TextSet."""

    path: Path
    config: Any
    task: Any
    splits: Splits
    members: Any
    aux: Any
    held_out: Any
    privacy: dict[str, Any]


def _load_image(run: Path, config: Any) -> Source:
    from privlora.audit.runner import load_run

    loaded = load_run(run)
    return Source(path=run, config=loaded.config, task=loaded.task, splits=Splits.load(run),
                  members=loaded.members, aux=loaded.aux, held_out=loaded.held_out, privacy=loaded.privacy)


def _load_text(run: Path, config: Any) -> Source:
    from privlora.tasks.lora import read_spec
    from privlora.train.data import load_task_and_data

    splits = Splits.load(run)
    overlap = set(splits.members) & set(splits.eval)
    if overlap:
        raise UserError(f"splits.json lists {len(overlap)} texts as both member and evaluation non-member "
                        f"(e.g. {sorted(overlap)[0]}); the verification would be meaningless")
    task, data = load_task_and_data(config, read_spec(run / "adapter"))
    task.load_adapter(run / "adapter")
    task.model.eval()
    known = set(data.ids)
    missing = [i for i in [*splits.members, *splits.eval, *splits.aux] if i not in known]
    if missing:
        raise UserError(f"{len(missing)} texts of splits.json are not in {config.data.source} "
                        f"(e.g. {missing[0]}); was the data changed after training?")
    return Source(path=run, config=config, task=task, splits=splits, members=data.by_ids(splits.members),
                  aux=data.by_ids(splits.aux), held_out=data.by_ids(splits.eval),
                  privacy=read_json_if_present(run / "privacy.json"))


#: config.task → loader of a run's Source
LOADERS = {"image": _load_image, "text": _load_text}


def load_source(run: Path) -> Source:
    """The run at ``run`` with its adapter loaded (image or text), refusing anything that is not a run."""
    from privlora.config import load_config
    from privlora.runs import require_run_dir
    from privlora.tasks.lora import PEFT_CONFIG

    run = require_run_dir(run, adapter_file=PEFT_CONFIG, purpose="to unlearn from")
    config = load_config(run / "config.yaml", {"resume": False})
    if config.lora.full_finetune:
        raise UserError(f"{run} is a full fine-tune; unlearning works on LoRA adapters")
    return LOADERS[config.task](run, config)
