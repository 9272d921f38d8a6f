"""Open a split (SAP) run (``privlora split train``) for the membership audit.

**What is audited.** The trained parts composed into one classifier: the user's bottom (frozen base blocks,
or with its ``bottom_adapter/``) and the provider's top (its LoRA blocks and head, the adapter the split
server saved). The audit scores the *clean* composition ``top(bottom(x))`` — no privatizer noise. That is
the white-box adversary of a membership audit: the provider holds the top and, for a frozen bottom, can
compute the public bottom of any candidate text itself; the privatizer protects texts in transit, not the
membership of the weights. Noise at scoring time would only blur the signal an adversary need not add.

**Where the top adapter is.** The provider keeps it (``privlora split serve --out``). The audit reads
``RUN/server_adapter/`` (copy the server's ``--out`` folder there) or, failing that, the path split.json
recorded when the server saved it, if this machine can read it.

**Members and non-members.** The run's data are split again exactly as ``split_train`` did (seeded
hold-out); members are the training texts that the seeded batch order actually used in its ``steps``
batches (a short run does not see all of them), non-members the held-out texts, which it never trained on.

**Control.** The model training started from: LoRA bypassed in both halves and the top's head back at a
seeded initialisation. **No reference adapters**: each would be a whole split training (bottom, noise,
top); ``--references`` is refused (:data:`privlora.audit.kinds.SPLIT`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from privlora.errors import UserError

SERVER_ADAPTER = "server_adapter"


class ComposedSplitModel:
    """``top(bottom(x))`` with the text Task's batch interface (``logits``, ``per_sample_loss``)."""

    def __init__(self, bottom: Any, top: Any) -> None:
        self.bottom, self.top = bottom, top

    @torch.no_grad()
    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        input_ids, mask = self.bottom.encode(batch["texts"])
        return self.top.forward(self.bottom.forward(input_ids, mask), mask)

    def per_sample_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        labels = torch.as_tensor(batch["labels"], dtype=torch.long)
        return nn.functional.cross_entropy(self.logits(batch), labels, reduction="none")


def server_adapter(run: Path, summary: dict[str, Any]) -> Path:
    """The provider's top adapter for this run (see the module docstring), or a UserError saying where to put it."""
    from privlora.tasks.lora import PEFT_CONFIG

    candidates = [run / SERVER_ADAPTER]
    if summary.get("server_adapter"):
        candidates.append(Path(summary["server_adapter"]))
    for path in candidates:
        if (path / PEFT_CONFIG).is_file():
            return path
    raise UserError(f"{run}: the split server's top adapter is needed to audit a split run; copy the server's "
                    f"--out folder to {run / SERVER_ADAPTER}")


def seen_members(n_train: int, config: Any) -> list[int]:
    """Indices of the training texts the run's seeded batches used (``split.train.batches``)."""
    from privlora.split.train import batches

    used = {i for batch in batches(n_train, config.optim.batch_size, config.optim.steps, config.seed) for i in batch}
    return sorted(used)


def _control(bottom: Any, top: Any, initial_head: dict[str, torch.Tensor]) -> Any:
    from privlora.tasks.lora import lora_bypassed

    head = top.model.classifier

    @contextmanager
    def control() -> Iterator[None]:
        saved = {k: v.detach().clone() for k, v in head.state_dict().items()}
        with torch.no_grad():
            head.load_state_dict(initial_head)
        try:
            with lora_bypassed(top.model), lora_bypassed(bottom.model):  # a frozen bottom has none: no-op
                yield
        finally:
            with torch.no_grad():
                head.load_state_dict(saved)

    return control


def open_split_run(run: Path) -> Any:
    """A :class:`privlora.audit.runner.LoadedRun` for a split run directory."""
    from privlora.audit.runner import LoadedRun
    from privlora.config import SplitConfig, load_config
    from privlora.data.text import load_text_dataset
    from privlora.split.models import SplitBottom, SplitTop
    from privlora.split.run import BOTTOM_ADAPTER, SPLIT_JSON, base_path, hold_out
    from privlora.tasks.lora import read_spec
    from privlora.tasks.text import TextLora

    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a split run directory (no config.yaml)")
    config = load_config(run / "config.yaml", model=SplitConfig)
    try:
        summary = json.loads((run / SPLIT_JSON).read_text())
        depth, classes = int(summary["depth"]), list(summary["classes"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UserError(f"{run / SPLIT_JSON} is not a valid split summary") from None
    data = load_text_dataset(config.data.source, limit=config.data.limit)
    train_data, eval_data = hold_out(data, config.data.eval, config.seed)
    if (summary.get("train_texts"), summary.get("eval_texts")) != (len(train_data), len(eval_data)) \
            or data.classes != classes:
        raise UserError(f"{config.data.source} no longer splits into the {summary.get('train_texts')} training "
                        f"and {summary.get('eval_texts')} held-out texts of {run}; was the data changed after "
                        "training?")
    top_dir = server_adapter(run, summary)
    spec = read_spec(top_dir)
    base = base_path(config.base)
    top = SplitTop(depth, len(classes), lora=TextLora(spec.rank, spec.alpha), seed=config.seed, base=base)
    initial_head = {k: v.detach().clone() for k, v in top.model.classifier.state_dict().items()}
    top.load_adapter(top_dir)
    trainable = config.bottom == "trainable"
    bottom = SplitBottom(depth, trainable=trainable, lora=TextLora(config.lora.rank, config.lora.alpha),
                         seed=config.seed, base=base)
    if trainable:
        bottom.load_adapter(run / BOTTOM_ADAPTER)
    top.model.eval()
    bottom.model.eval()
    privatizer = summary.get("privatizer", {})
    details = {"split": {"depth": depth, "bottom": config.bottom, "privatizer": privatizer.get("name"),
                         "eta": privatizer.get("eta"), "scored": "clean top(bottom(x)), no privatizer noise",
                         "training_texts_unused": len(train_data) - len(seen_members(len(train_data), config))}}
    utility = {"accuracy_heldout": summary.get("eval_accuracy"), "loss_heldout": summary.get("eval_loss")}
    return LoadedRun(path=run, config=config, task=ComposedSplitModel(bottom, top),
                     members=train_data.subset(seen_members(len(train_data), config)), held_out=eval_data,
                     aux=eval_data.subset([]), delta=0.0, privacy={}, base_control=_control(bottom, top, initial_head),
                     utility=utility,
                     kind_name="split", mode=f"split {privatizer.get('name', '?')}", adapter_dir=top_dir,
                     details=details)
