"""``privlora audit --run DIR``: score a run's members against its evaluation non-members.

Reads the run directory (config.yaml, splits.json, adapter/), scores every member and every
evaluation non-member with each attack — once with the adapter and once with the adapter disabled
(the base model: the control every result must be read against) — and writes ``<run>/audit/``
atomically: ``scores.csv`` (one row per image: id, member label, one column per attack and control)
and ``results.json`` (the metrics of :mod:`privlora.audit.metrics` for each, plus extraction when
asked). Reference attacks (LiRA, RMIA) join when ``references`` > 0. What differs between image and
text runs (loading, attacks, base control, reference signal) comes from :data:`privlora.audit.kinds.AUDIT_KINDS`.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privlora.audit import references as refs_mod
from privlora.audit.kinds import AUDIT_KINDS, AuditKind, kind_of
from privlora.audit.metrics import summarize
from privlora.audit.provenance import provenance, sha256_file
from privlora.audit.reference_pool import ReferencePool
from privlora.errors import UserError
from privlora.progress import progress_bar
from privlora.runs import atomic_file, require_run_dir, write_json_atomic

REFERENCE_ATTACKS = {"lira": "Carlini et al. 2022 (LiRA, online)", "rmia": "Zarifzadeh et al. 2024 (RMIA)"}
DEFAULT_FPRS = (0.01, 0.001)


@dataclass
class LoadedRun:
    """Everything an audit needs from a run directory (data sets are ImageSet or TextSet)."""

    path: Path
    config: Any
    task: Any
    members: Any
    held_out: Any
    aux: Any
    delta: float
    privacy: dict[str, Any]
    utility: dict[str, Any]
    base_control: Callable[[], AbstractContextManager[None]]  # inside it the task is the control model
    kind_name: str = ""  # key in AUDIT_KINDS ("" : config.task, a `privlora train` run)
    mode: str = ""  # what results.json and the report call the run ("" : config.mode)
    reference_config: Any = None  # TrainConfig the reference adapters train with (None: config)
    adapter_dir: Path | None = None  # the audited adapter (None: path/adapter)
    details: dict[str, Any] | None = None  # extra results.json keys (e.g. which federated client)

    def __post_init__(self) -> None:
        self.kind_name = self.kind_name or self.config.task
        self.mode = self.mode or self.config.mode
        self.reference_config = self.reference_config if self.reference_config is not None else self.config
        self.adapter_dir = self.adapter_dir or self.path / "adapter"

    @property
    def kind(self) -> AuditKind:
        return AUDIT_KINDS[self.kind_name]


def read_json_if_present(path: Path) -> dict[str, Any]:
    """A run's optional JSON file (privacy.json, utility.json): {} when absent, a UserError when broken."""
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def load_run(run: Path, *, tasks: tuple[str, ...] = ("image",), client: str | None = None) -> LoadedRun:
    """Load base + adapter + the three splits of a run, refusing anything that would void the audit.

    ``tasks``: the run kinds the caller handles. Image only by default — the one-run DP audit, synthetic
    data and unlearning read pixels from what this returns; the membership audit passes every kind.
    Federated and split run directories are recognised by :func:`privlora.audit.kinds.kind_of` and opened
    by their kind; ``client`` (federated only) picks whose data are the members: an index or "all"."""
    name = kind_of(Path(run))
    if name is not None:
        if name not in tasks:
            raise UserError(f"{run} is a {name} run; this command covers {' and '.join(tasks)} runs only")
        kind = AUDIT_KINDS[name]
        assert kind.open is not None
        if client is not None and not kind.client_option:
            raise UserError(f"--client picks a federated client; {run} is a {name} run")
        return kind.open(Path(run), client)
    if client is not None:
        raise UserError(f"--client picks a federated client; {run} is not a federated run")
    return _load_training_run(run, tasks)


def _load_training_run(run: Path, tasks: tuple[str, ...]) -> LoadedRun:
    """A ``privlora train`` run directory: config.yaml (TrainConfig), splits.json and adapter/."""
    from privlora.config import load_config
    from privlora.data.splits import Splits
    from privlora.tasks.lora import PEFT_CONFIG

    run = require_run_dir(run, adapter_file=PEFT_CONFIG, purpose="to audit")
    config = load_config(run / "config.yaml", {"resume": False})
    if config.task not in tasks:
        raise UserError(f"{run} is a {config.task} run; this command covers {' and '.join(tasks)} runs only")
    kind = AUDIT_KINDS[config.task]
    splits = Splits.load(run)
    overlap = set(splits.members) & set(splits.eval)
    if overlap:
        raise UserError(f"splits.json lists {len(overlap)} {kind.samples} as both member and evaluation "
                        f"non-member (e.g. {sorted(overlap)[0]}); the audit would be meaningless")
    task, data, control = kind.load(config, run)
    known = set(data.ids)
    missing = [i for i in [*splits.members, *splits.eval, *splits.aux] if i not in known]
    if missing:
        raise UserError(f"{len(missing)} {kind.samples} of splits.json are not in {config.data.source} "
                        f"(e.g. {missing[0]}); was the data changed after training?")
    privacy = read_json_if_present(run / "privacy.json")
    return LoadedRun(path=run, config=config, task=task, members=data.by_ids(splits.members),
                     held_out=data.by_ids(splits.eval), aux=data.by_ids(splits.aux),
                     delta=float(privacy.get("delta") or 0.0), privacy=privacy,
                     utility=read_json_if_present(run / "utility.json"), base_control=control)


def _check_attacks(attacks: tuple[str, ...] | None, references: int, kind: AuditKind) -> tuple[str, ...]:
    """The attacks to run (None: every model-only attack of the run's kind), reference ones added with K."""
    attacks = tuple(kind.attacks) if attacks is None else attacks
    known = {**kind.attacks, **REFERENCE_ATTACKS}
    if references and kind.no_references:
        raise UserError(kind.no_references)
    for a in attacks:
        if a not in known:
            raise UserError(f"unknown attack {a!r} for {kind.samples}; available: {', '.join(known)}")
        if a in REFERENCE_ATTACKS and references == 0:
            raise UserError(f"attack {a!r} needs reference adapters: add --references K (e.g. 2)")
    if references and not any(a in REFERENCE_ATTACKS for a in attacks):
        attacks = (*attacks, *REFERENCE_ATTACKS)
    return attacks


def check_request(loaded: LoadedRun, attacks: tuple[str, ...] | None, *, references: int,
                  extraction: int, pii: bool = False) -> tuple[str, ...]:
    """The attacks an audit of ``loaded`` will run, or a UserError for options that do not fit its task
    (checked before any reference adapter is trained)."""
    attacks = _check_attacks(None if attacks is None else tuple(attacks), references, loaded.kind)
    if extraction and not loaded.kind.extraction:
        raise UserError(f"--extraction generates images (or, for causal-lm runs, answers); it does not apply to "
                        f"a {loaded.kind_name} run")
    if pii and loaded.kind.extras is None:
        raise UserError(f"--pii scans a causal LM's answers for PII; it does not apply to a {loaded.kind_name} run")
    if pii and not extraction:
        raise UserError("--pii scans the --extraction answers: add --extraction N")
    return attacks


def _check_fprs(fprs: tuple[float, ...] | None, nonmembers: int) -> tuple[float, ...]:
    """Asked-for FPRs must be measurable; the defaults are reported as n/a when they are not."""
    if fprs is None:
        return DEFAULT_FPRS
    for f in fprs:
        if not 0 < f < 1:
            raise UserError(f"FPR must be in (0, 1), got {f}")
        if nonmembers * f < 1:
            raise UserError(f"TPR at {f:g} FPR needs at least {int(np.ceil(1 / f))} evaluation non-members; "
                            f"this run has {nonmembers}")
    return fprs


def score_run(loaded: LoadedRun, attacks: tuple[str, ...], *, seed: int, refs: refs_mod.References | None,
              quiet: bool = True) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Score columns (``name`` and ``name_base``) for every attack, and seconds spent per attack.

    Progress counts samples scored (each attack scores every sample twice: adapter and base control), so a
    minute-long audit shows where it is."""
    task, members, held_out, kind = loaded.task, loaded.members, loaded.held_out, loaded.kind
    both = kind.join(members, held_out)
    columns: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    model_only = [a for a in attacks if a in kind.attacks]
    z = loaded.aux if len(loaded.aux) else both  # RMIA's population samples: known non-members
    # the reference phase: target and base signals, then each reference's (cached ones cost nothing)
    work = 2 * len(both) * len(model_only) + (0 if refs is None else (2 + len(refs.inside)) * (len(both) + len(z)))
    with progress_bar(f"audit {loaded.path.name}", total=work, quiet=quiet) as bar:
        def scored(values: np.ndarray, n: int) -> np.ndarray:
            bar.advance(n)
            return values

        for name in model_only:
            start = time.perf_counter()
            score = kind.attacks[name].score
            columns[name] = np.r_[scored(score(task, members, seed=seed), len(members)),
                                  scored(score(task, held_out, seed=seed + 1), len(held_out))]
            with loaded.base_control():
                columns[f"{name}_base"] = np.r_[scored(score(task, members, seed=seed), len(members)),
                                                scored(score(task, held_out, seed=seed + 1), len(held_out))]
            seconds[name] = time.perf_counter() - start
        if refs is not None:
            start = time.perf_counter()
            target = scored(kind.signal(task, both, seed=seed), len(both))
            target_z = scored(kind.signal(task, z, seed=seed + 7), len(z))
            with loaded.base_control():
                base = scored(kind.signal(task, both, seed=seed), len(both))
                base_z = scored(kind.signal(task, z, seed=seed + 7), len(z))
            ref, ref_z = (scored(refs_mod.reference_signals(task, data, refs, seed=s,
                                                            target_adapter=loaded.adapter_dir, signal=kind.signal,
                                                            signal_key=kind.signal_key), len(refs.inside) * len(data))
                          for data, s in ((both, seed), (z, seed + 7)))
            inside = refs.membership(both.ids)
            lira, rmia = kind.lira_signal, kind.rmia_signal
            for name, t, tz in (("", target, target_z), ("_base", base, base_z)):
                if "lira" in attacks:
                    columns[f"lira{name}"] = refs_mod.lira_scores(lira(t), lira(ref), inside)
                if "rmia" in attacks:
                    columns[f"rmia{name}"] = refs_mod.rmia_scores(rmia(t), rmia(ref), rmia(tz), rmia(ref_z))
            seconds["references"] = time.perf_counter() - start
    order = [c for a in attacks for c in (a, f"{a}_base")]
    return {c: columns[c] for c in order}, seconds


def audit_run(run: Path, *, attacks: tuple[str, ...] | None = None, references: int = 0,
              reference_dir: Path | None = None, fprs: tuple[float, ...] | None = None, seed: int = 0,
              quiet: bool = True, loaded: LoadedRun | None = None, extraction: int = 0,
              pool: ReferencePool | None = None, pii: bool = False) -> dict[str, Any]:
    """Score, summarise and write ``<run>/audit/``; returns the contents of results.json.

    ``attacks`` None: every model-only attack of the run's task (image: loss, secmi, pia, sima; text: loss).
    ``pool``: how missing reference adapters train (one after another, or on Ray; the same adapters).
    ``pii``: with ``extraction`` on a causal LM, scan the answers for PII that a training record holds."""
    run = Path(run)
    loaded = loaded or load_run(run, tasks=tuple(AUDIT_KINDS))
    kind = loaded.kind
    attacks = check_request(loaded, attacks, references=references, extraction=extraction, pii=pii)
    members, held_out = loaded.members, loaded.held_out
    if len(members) < 2 or len(held_out) < 2:
        raise UserError(f"the audit needs at least 2 members and 2 evaluation non-members "
                        f"(this run has {len(members)} and {len(held_out)}; set data.eval > 0 when training)")
    fprs = _check_fprs(fprs, len(held_out))
    refs = None
    if references:
        population = [*members.ids, *held_out.ids]
        refs = refs_mod.ensure_references(loaded.reference_config, population, k=references,
                                          directory=Path(reference_dir or run / "references"), seed=seed,
                                          quiet=quiet, pool=pool)
    labels = np.r_[np.ones(len(members), int), np.zeros(len(held_out), int)]
    columns, seconds = score_run(loaded, attacks, seed=seed, refs=refs, quiet=quiet)
    results: dict[str, Any] = {
        "run": str(run), "mode": loaded.mode, "members": len(members), "nonmembers": len(held_out),
        "seed": seed, "epsilon": loaded.privacy.get("epsilon"), "delta": loaded.delta or None,
        "task": kind.task, "run_kind": loaded.kind_name, **(loaded.details or {}),
        "utility": {k: loaded.utility.get(k) for k in kind.utility_keys},
        "references": None if refs is None else {"k": references, "directory": str(refs.directory),
                                                 "recipe": refs.recipe},
        "attacks": {}}
    for name in attacks:
        info = kind.attacks.get(name)
        results["attacks"][name] = {
            "paper": info.paper if info else REFERENCE_ATTACKS[name],
            "queries_per_image": info.queries if info else kind.signal_queries * (references + 1),
            "adapter": summarize(columns[name], labels, delta=loaded.delta, fprs=fprs, seed=seed),
            "base_control": summarize(columns[f"{name}_base"], labels, delta=loaded.delta, fprs=fprs, seed=seed)}
    results["seconds"] = seconds
    results["provenance"] = provenance(run)  # which adapter bytes, code, command line and date
    if loaded.adapter_dir != run / "adapter":  # a split run: the provider's top adapter lives elsewhere
        results["provenance"].update(adapter=str(loaded.adapter_dir), adapter_sha256=sha256_file(
            Path(loaded.adapter_dir) / "adapter_model.safetensors"))
    if kind.extras is not None:  # the kind's own results (causal-lm: canary exposure, extraction by prompting)
        results.update(kind.extras(loaded, extraction=extraction, seed=seed, quiet=quiet, pii=pii))
    elif extraction:
        from privlora.audit.extraction_run import run_extraction

        results["extraction"] = run_extraction(loaded, n=extraction, seed=seed, quiet=quiet)
    # File by file (each via a temporary name and a rename), not the whole folder: canary.json and
    # extraction results written by other commands live in audit/ too and must survive a re-audit.
    with atomic_file(run / "audit" / "scores.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "member", *columns])
        for i, sample_id in enumerate([*members.ids, *held_out.ids]):
            writer.writerow([sample_id, int(labels[i]), *(repr(float(c[i])) for c in columns.values())])
    write_json_atomic(run / "audit" / "results.json", results)
    return results
