"""``privlora audit --run DIR``: score a run's members against its evaluation non-members.

Reads the run directory (config.yaml, splits.json, adapter/), scores every member and every
evaluation non-member with each attack — once with the adapter and once with the adapter disabled
(the base model: the control every result must be read against) — and writes ``<run>/audit/``
atomically: ``scores.csv`` (one row per image: id, member label, one column per attack and control)
and ``results.json`` (the metrics of :mod:`privlora.audit.metrics` for each).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from privlora.audit.attacks import ATTACKS
from privlora.audit.metrics import summarize
from privlora.errors import UserError
from privlora.runs import atomic_dir


def _load_run(run: Path) -> tuple[Any, Any, Any]:
    from privlora.config import load_config
    from privlora.data.splits import Splits
    from privlora.tasks.loading import load_task
    from privlora.tasks.lora import read_spec
    from privlora.train.data import load_training_data

    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run directory (no config.yaml)")
    if not (run / "adapter").is_dir():
        raise UserError(f"{run} has no adapter/ to audit")
    config = load_config(run / "config.yaml", {"resume": False})
    splits = Splits.load(run)
    overlap = set(splits.members) & set(splits.eval)
    if overlap:
        raise UserError(f"splits.json lists {len(overlap)} images as both member and evaluation non-member "
                        f"(e.g. {sorted(overlap)[0]}); the audit would be meaningless")
    task = load_task(config.base, read_spec(run / "adapter"), seed=config.seed,
                     trust_pickle=config.trust_pickle)
    task.load_adapter(run / "adapter")
    task.model.eval()
    data = load_training_data(config, task)
    return config, task, (data.by_ids(splits.members), data.by_ids(splits.eval))


def audit_run(run: Path, *, attacks: tuple[str, ...] = ("loss",), seed: int = 0) -> dict[str, Any]:
    """Score, summarise and write ``<run>/audit/``; returns the contents of results.json."""
    run = Path(run)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise UserError(f"unknown attack {unknown[0]!r}; available: {', '.join(ATTACKS)}")
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist")
    config, task, (members, held_out) = _load_run(run)
    if len(members) == 0 or len(held_out) == 0:
        raise UserError("the audit needs members and evaluation non-members (data.eval > 0)")
    labels = np.r_[np.ones(len(members), int), np.zeros(len(held_out), int)]
    columns: dict[str, np.ndarray] = {}
    results: dict[str, Any] = {"run": str(run), "mode": config.mode, "members": len(members),
                               "nonmembers": len(held_out), "seed": seed, "attacks": {}}
    privacy = run / "privacy.json"
    delta = float(json.loads(privacy.read_text()).get("delta") or 0.0) if privacy.exists() else 0.0
    for name in attacks:
        attack = ATTACKS[name]
        adapter = np.r_[attack(task, members, seed=seed), attack(task, held_out, seed=seed + 1)]
        with task.adapter_disabled():
            base = np.r_[attack(task, members, seed=seed), attack(task, held_out, seed=seed + 1)]
        columns[name], columns[f"{name}_base"] = adapter, base
        results["attacks"][name] = {"adapter": summarize(adapter, labels, delta=delta, seed=seed),
                                    "base_control": summarize(base, labels, delta=delta, seed=seed)}
    with atomic_dir(run / "audit") as tmp:
        with (tmp / "scores.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "member", *columns])
            ids = [*members.ids, *held_out.ids]
            for i, sample_id in enumerate(ids):
                writer.writerow([sample_id, int(labels[i]), *(repr(float(c[i])) for c in columns.values())])
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
