"""One call that audits a causal language model: every membership attack, on the target and on its base.

:func:`audit_causal_lm` is the entry point ``privlora audit`` wires in for ``task: causal_lm`` runs. It
takes the models themselves (not run folders), so it serves a CLI run, a notebook and the tests alike:

* ``target``: the fine-tuned model (an ``AutoModelForCausalLM``, usually peft-wrapped);
* ``base``: the model fine-tuning started from — the reference of the ``reference`` attack and the
  **control** every attack is also scored on (it never saw a record, so its AUC is what chance and record
  difficulty give). ``None`` with a peft target means "the target with its adapter disabled"
  (``disable_adapter()``), the same model the image audit's control is;
* ``references`` (optional): reference models, each the base plus an adapter trained on a random half of
  members ∪ non-members, given as an *iterable* so a caller can load one adapter at a time into one model
  (a generator that loads and yields); ``reference_inside [K, N]`` says which of the audited records
  (members first, then non-members) each one trained on; ``population`` are records no reference saw,
  RMIA's ``z``.

It returns the scores (so anyone can recompute the figures, as ``scores.csv`` keeps them for images) and
the results dict of :func:`privlora.audit.metrics.summarize` per attack and model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privlora.audit.lm_attacks import MIN_K, MODEL_ATTACKS, REFERENCE_ATTACKS, Inputs, lm_lira, lm_rmia
from privlora.audit.lm_signals import BATCH, Encoder, Record, base_model, check_records, mean_nll, token_logprobs
from privlora.audit.metrics import summarize
from privlora.errors import UserError

ALL_ATTACKS = (*MODEL_ATTACKS, *REFERENCE_ATTACKS)


@dataclass
class LmAudit:
    """Per attack, the scores of the target and of the base control (``{"target": [N], "base": [N]}``),
    the member labels ``[N]`` (members first), and the results dict."""

    scores: dict[str, dict[str, np.ndarray]]
    labels: np.ndarray
    results: dict[str, Any] = field(default_factory=dict)


def _check_attacks(attacks: Sequence[str] | None, have_refs: bool, have_z: bool) -> list[str]:
    if attacks is None:
        chosen = list(MODEL_ATTACKS) + (["lira"] if have_refs else []) + (["rmia"] if have_refs and have_z else [])
        return chosen
    unknown = [a for a in attacks if a not in ALL_ATTACKS]
    if unknown:
        raise UserError(f"unknown language-model attack {', '.join(unknown)}; known: {', '.join(ALL_ATTACKS)}")
    if not have_refs and any(a in REFERENCE_ATTACKS for a in attacks):
        raise UserError("lira and rmia need reference models (references=… with reference_inside=…)")
    if "rmia" in attacks and not have_z:
        raise UserError("rmia needs population records no reference trained on (population=…)")
    return list(dict.fromkeys(attacks))


def reference_signals(references: Iterable[Any], tokenizer: Any, records: Sequence[Record], *,
                      batch_size: int = BATCH, encoder: Encoder | None = None) -> np.ndarray:
    """``[K, N]`` NLL signals (lower = member) of every reference model, consumed one model at a time."""
    rows = [mean_nll(token_logprobs(model, tokenizer, records, batch_size=batch_size, encoder=encoder))
            for model in references]
    if not rows:
        raise UserError("references gave no model")
    return np.stack(rows)


def audit_causal_lm(*, target: Any, tokenizer: Any, members: Sequence[Record], non_members: Sequence[Record],
                    base: Any | None = None, references: Iterable[Any] | None = None,
                    reference_inside: np.ndarray | None = None, population: Sequence[Record] = (),
                    attacks: Sequence[str] | None = None, min_k: float = MIN_K, batch_size: int = BATCH,
                    fprs: tuple[float, ...] = (0.01, 0.001), delta: float = 0.0, seed: int = 0,
                    encoder: Encoder | None = None) -> LmAudit:
    """Score every requested attack (default: the model-only ones, plus LiRA/RMIA when references are
    given) on ``members`` vs ``non_members``, with the target and with the base control.

    ``encoder`` (record → :class:`~privlora.audit.lm_signals.Encoded`) makes the audit score the tokens
    training saw when training encoded records its own way (e.g. the causal-LM task's ``encode_pair``)."""
    members = check_records(members, "members")
    non_members = check_records(non_members, "non_members")
    population = check_records(population, "population")
    if not members or not non_members:
        raise UserError("an audit needs at least one member and one non-member record")
    records = members + non_members
    labels = np.r_[np.ones(len(members)), np.zeros(len(non_members))].astype(int)
    have_refs = references is not None
    chosen = _check_attacks(attacks, have_refs, bool(population))
    texts = [r["response"] for r in records]

    def logprobs(model: Any, which: Sequence[Record]) -> list[np.ndarray]:
        return token_logprobs(model, tokenizer, which, batch_size=batch_size, encoder=encoder)

    wanted_refs = [a for a in chosen if a in REFERENCE_ATTACKS]
    target_lp = logprobs(target, records)
    target_z = mean_nll(logprobs(target, population)) if "rmia" in chosen else None
    with base_model(target, base) as control:
        base_lp = logprobs(control, records)
        base_z = mean_nll(logprobs(control, population)) if "rmia" in chosen else None

    scores: dict[str, dict[str, np.ndarray]] = {}
    for name in chosen:
        if name in MODEL_ATTACKS:
            attack = MODEL_ATTACKS[name].score
            scores[name] = {"target": attack(Inputs(target_lp, base_lp, texts, min_k)),
                            "base": attack(Inputs(base_lp, base_lp, texts, min_k))}

    reference_info: dict[str, Any] = {"count": 0}
    if wanted_refs:
        inside = _inside(reference_inside, len(records))
        signals = reference_signals(references or (), tokenizer, records + population, batch_size=batch_size,
                                    encoder=encoder)
        if signals.shape[0] != inside.shape[0]:
            raise UserError(f"{signals.shape[0]} reference models but reference_inside has {inside.shape[0]} rows")
        ref_x, ref_z = signals[:, :len(records)], signals[:, len(records):]
        nll_t, nll_b = mean_nll(target_lp), mean_nll(base_lp)
        if "lira" in wanted_refs:
            scores["lira"] = {"target": lm_lira(nll_t, ref_x, inside), "base": lm_lira(nll_b, ref_x, inside)}
        if "rmia" in wanted_refs:
            scores["rmia"] = {"target": lm_rmia(nll_t, ref_x, target_z, ref_z),
                              "base": lm_rmia(nll_b, ref_x, base_z, ref_z)}
        reference_info = {"count": int(inside.shape[0]), "population": len(population)}

    results = {
        "task": "causal_lm", "members": len(members), "non_members": len(non_members), "min_k": min_k,
        "references": reference_info,
        "attacks": {name: {"paper": MODEL_ATTACKS[name].paper if name in MODEL_ATTACKS else REFERENCE_ATTACKS[name],
                           "target": summarize(s["target"], labels, delta=delta, fprs=fprs, seed=seed),
                           "base": summarize(s["base"], labels, delta=delta, fprs=fprs, seed=seed)}
                    for name, s in scores.items()},
        "mean_nll": {"target": {"members": float(mean_nll(target_lp[:len(members)]).mean()),
                                "non_members": float(mean_nll(target_lp[len(members):]).mean())},
                     "base": {"members": float(mean_nll(base_lp[:len(members)]).mean()),
                              "non_members": float(mean_nll(base_lp[len(members):]).mean())}},
    }
    return LmAudit(scores=scores, labels=labels, results=results)


def _inside(reference_inside: np.ndarray | None, n: int) -> np.ndarray:
    if reference_inside is None:
        raise UserError("reference models need reference_inside: which audited records each one trained on")
    inside = np.asarray(reference_inside, dtype=bool)
    if inside.ndim != 2 or inside.shape[1] != n:
        raise UserError(f"reference_inside must be [K, {n}] (members then non-members), got {inside.shape}")
    return inside

