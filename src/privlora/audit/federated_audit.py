"""Open a federated run (``privlora federate``) for the membership audit.

The audited model is the global adapter the server wrote (a text classifier). Members are the training
data of one chosen client (``--client N``) or of every client (``--client all``, the default); the
non-members are the server's held-out test set, which no client ever trained on. Who held what comes from
the run's ``splits.json`` (written by ``federate``; a deterministic function of the config's data, seed
and Dirichlet partitioner); a run written before it existed is split again from its config, the same way
the server and clients did.

Reference adapters (``--references K``) are trained *centrally* on random halves of members ∪ held-out,
with the federated recipe translated to one ``privlora train`` run (same base, LoRA shape, learning rate
and batch size; ``rounds × local_steps`` steps). That is the standard approximation in federated
membership audits — a reference per half would otherwise be a whole federation — and it makes LiRA/RMIA
calibrate against "a model trained on this sample", not against this federation's exact dynamics.

The base control is the run's starting point: LoRA bypassed and the head back at its seeded init
(:func:`privlora.audit.text_attacks.untrained_control`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from privlora.errors import UserError


def is_federated_run(run: Path) -> bool:
    """A federated run's config.yaml names ``clients`` and a ``strategy`` (a TrainConfig has neither)."""
    from privlora.config import read_yaml

    path = run / "config.yaml"
    if not path.is_file():
        return False
    try:
        tree = read_yaml(path)
    except UserError:
        return False
    return isinstance(tree, dict) and "clients" in tree and "strategy" in tree


def parse_client(client: str | None, clients: int) -> int | None:
    """``--client``: None or "all" → None (every client), else an index in 0..clients-1."""
    if client is None or str(client).strip().lower() == "all":
        return None
    try:
        index = int(str(client).strip())
    except ValueError:
        index = -1
    if not 0 <= index < clients:
        raise UserError(f"--client {client}: this federated run has {clients} clients (0..{clients - 1}) "
                        "or 'all'")
    return index


def read_splits(run: Path, config: Any) -> dict[str, Any]:
    """The run's splits.json, or the same record recomputed from its config (runs older than the file)."""
    path = run / "splits.json"
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            clients = [list(c) for c in record["clients"]]
            held_out = list(record["eval_nonmembers"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not a federated splits file: {e}") from None
        return {"clients": clients, "eval_nonmembers": held_out, "recorded": True}
    from privlora.federated.data import federated_data

    record = federated_data(config).record(config)
    return {"clients": record["clients"], "eval_nonmembers": record["eval_nonmembers"], "recorded": False}


def reference_recipe(config: Any, spec: Any) -> Any:
    """The central ``privlora train`` config reference adapters are trained with (see the module docstring)."""
    from privlora.config import TrainConfig

    return TrainConfig.model_validate({
        "name": f"{config.name}-reference", "task": "text", "base": config.base, "mode": "plain", "seed": config.seed,
        "quiet": True, "data": {"source": config.data.source, "limit": config.data.limit},
        "lora": {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets)},
        "optim": {"lr": config.client.lr, "batch_size": config.client.batch_size, "grad_clip": None,
                  "max_steps": config.rounds * config.client.local_steps}})


def _utility(run: Path) -> dict[str, Any]:
    from privlora.federated.run import read_metrics

    rounds = [m for m in read_metrics(run / "metrics.jsonl") if m.get("round", 0) > 0]
    final = rounds[-1] if rounds else {}
    return {"accuracy_heldout": final.get("accuracy"), "loss_heldout": final.get("loss")}


def open_federated_run(run: Path, client: str | None) -> Any:
    """A :class:`privlora.audit.runner.LoadedRun` for a federated run directory."""
    from privlora.audit import text_attacks
    from privlora.audit.runner import LoadedRun, read_json_if_present
    from privlora.config import FederatedConfig, load_config
    from privlora.data.text import load_text_dataset
    from privlora.generate import adapter_base
    from privlora.runs import require_run_dir
    from privlora.tasks.lora import PEFT_CONFIG, read_spec
    from privlora.tasks.text import TextClassificationTask, TextLora

    run = require_run_dir(run, adapter_file=PEFT_CONFIG, purpose="to audit (was the federated run finished?)")
    config = load_config(run / "config.yaml", model=FederatedConfig)
    if config.task != "text":
        raise UserError(f"{run} is a federated {config.task} run; the federated audit covers the text task only "
                        "(audit a causal LM trained centrally with privlora train --task causal-lm)")
    index = parse_client(client, config.clients)
    splits = read_splits(run, config)
    if len(splits["clients"]) != config.clients:
        raise UserError(f"{run / 'splits.json'} lists {len(splits['clients'])} clients, the config "
                        f"{config.clients}")
    members = splits["clients"][index] if index is not None else [i for c in splits["clients"] for i in c]
    held_out = splits["eval_nonmembers"]
    overlap = set(members) & set(held_out)
    if overlap:
        raise UserError(f"{len(overlap)} texts are both a client's and the server's held-out data "
                        f"(e.g. {sorted(overlap)[0]}); the audit would be meaningless")
    data = load_text_dataset(config.data.source, limit=config.data.limit)
    known = set(data.ids)
    missing = [i for i in [*members, *held_out] if i not in known]
    if missing:
        raise UserError(f"{len(missing)} texts of {run / 'splits.json'} are not in {config.data.source} "
                        f"(e.g. {missing[0]}); was the data changed after training?")
    spec = read_spec(run / "adapter")
    base = None if config.base == "minilm" else Path(config.base)
    task = TextClassificationTask(len(data.classes), lora=TextLora(spec.rank, spec.alpha, tuple(spec.targets)),
                                  seed=config.seed, base=base)
    trained_on = adapter_base(run / "adapter")
    if Path(trained_on).parts[-2:] != task.base.parts[-2:]:
        raise UserError(f"the global adapter in {run} was trained on base {trained_on!r}, the run's config says "
                        f"{config.base!r}: it cannot be audited against this base")
    control = text_attacks.untrained_control(task)  # the seeded head the federation started from
    task.load_adapter(run / "adapter")
    task.model.eval()
    privacy = read_json_if_present(run / "privacy.json")
    dp = privacy.get("mechanism", "none") != "none"
    details = {"federated": {"client": "all" if index is None else index, "clients": config.clients,
                             "strategy": config.strategy, "splits_recorded": splits["recorded"],
                             "privacy_unit": privacy.get("unit")}}
    return LoadedRun(path=run, config=config, task=task, members=data.by_ids(members),
                     held_out=data.by_ids(held_out), aux=data.by_ids([]),
                     delta=float(privacy.get("delta") or 0.0), privacy=privacy, utility=_utility(run),
                     base_control=control, kind_name="federated",
                     mode=f"federated {config.strategy}{' dp' if dp else ''}",
                     reference_config=reference_recipe(config, spec), details=details)
