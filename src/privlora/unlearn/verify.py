"""Did the forgetting work? The audit's membership attacks on the forget set, and utility.

* **Membership**: an attack scores the forget set (label 1) against the run's evaluation non-members
  (label 0) — the same non-members ``privlora audit`` uses, never touched by training or unlearning. Its
  AUC is measured on the source adapter (before), the unlearned one (after) and the exactly retrained one
  (the gold reference: an adapter that never saw the forget set). Image attacks are the audit's
  (:data:`privlora.audit.attacks.ATTACKS`); the loss attack draws fresh noise per call, so its scores are
  averaged over ``draws`` seeds (the AUC of one draw on 8 images swings by ±0.1). Text: the loss attack is
  −cross-entropy (deterministic; :mod:`privlora.audit.text_attacks`).
* **Efficacy** = 1 − (AUC_after − 0.5)/(AUC_before − 0.5): 1 when the attack is back at chance, 0 when
  nothing changed; above 1 means "forgot too much" (the forget set now looks *less* like members than
  non-members do, which an attacker can detect too), so ``|AUC_after − AUC_retrain|`` is reported beside it.
* **Utility**: image — denoising loss at the run's evaluation timesteps with fixed noise (lower is better),
  plus the share of the adapter's gain over the base kept; text — accuracy (higher is better). On retained
  members and on held-out data; the drop is relative to the source adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from privlora.audit.metrics import summarize
from privlora.audit.text_attacks import text_loss_attack  # the audit's text loss attack: one implementation
from privlora.errors import UserError


def _image_attacks() -> dict[str, Callable[..., np.ndarray]]:
    from privlora.audit.attacks import ATTACKS

    return {name: attack.score for name, attack in ATTACKS.items()}


#: config.task → {attack name → scorer(task, data, seed=...)}
ATTACKS_BY_TASK: dict[str, Callable[[], dict[str, Callable[..., np.ndarray]]]] = {
    "image": _image_attacks, "text": lambda: {"loss": text_loss_attack}}
#: attacks whose scores depend on the seed (fresh noise): averaged over several draws
NOISY = {"loss"}


def check_attack(kind: str, attack: str) -> None:
    known = ATTACKS_BY_TASK[kind]()
    if attack not in known:
        raise UserError(f"unknown attack {attack!r} for a {kind} run; available: {', '.join(known)}")


def attack_scores(task: Any, data: Any, *, kind: str, attack: str, seed: int, draws: int) -> np.ndarray:
    """Scores for every sample of ``data``, averaged over ``draws`` noise seeds for noisy attacks."""
    score = ATTACKS_BY_TASK[kind]()[attack]
    task.model.eval()
    n = draws if attack in NOISY and kind == "image" else 1
    return np.mean([score(task, data, seed=seed + 7919 * k) for k in range(n)], axis=0)


def membership(task: Any, forget: Any, retain: Any, held_out: Any, *, kind: str, attack: str, seed: int,
               draws: int) -> dict[str, Any]:
    """AUC (with bootstrap interval) of forget vs held-out and of retained vs held-out members."""
    out = attack_scores(task, held_out, kind=kind, attack=attack, seed=seed + 1, draws=draws)
    result: dict[str, Any] = {}
    scores = {"heldout": out.tolist()}
    for name, data in (("forget", forget), ("retain", retain)):
        s = attack_scores(task, data, kind=kind, attack=attack, seed=seed, draws=draws)
        labels = np.r_[np.ones(len(s), int), np.zeros(len(out), int)]
        summary = summarize(np.r_[s, out], labels, fprs=(), seed=seed)
        result[name] = {k: summary[k] for k in ("auc", "auc_ci_low", "auc_ci_high", "balanced_accuracy")}
        scores[name] = s.tolist()
    result["scores"] = scores  # per sample, in the order of the forget / retain / held-out id lists
    return result


def _image_utility(task: Any, retain: Any, held_out: Any, *, options: Any, seed: int) -> dict[str, Any]:
    from privlora.train.utility import denoising_loss

    ts = tuple(options.timesteps)
    out = {"metric": "denoising loss (lower is better)", "timesteps": list(ts),
           "retain": denoising_loss(task, retain, timesteps=ts, seed=seed),
           "heldout": denoising_loss(task, held_out, timesteps=ts, seed=seed)}
    with task.adapter_disabled():
        out["base_retain"] = denoising_loss(task, retain, timesteps=ts, seed=seed)
        out["base_heldout"] = denoising_loss(task, held_out, timesteps=ts, seed=seed)
    return out


def _text_utility(task: Any, retain: Any, held_out: Any, *, options: Any, seed: int) -> dict[str, Any]:
    task.model.eval()
    acc_r, loss_r = task.score(retain)
    acc_h, loss_h = task.score(held_out)
    return {"metric": "accuracy (higher is better)", "retain": acc_r, "heldout": acc_h,
            "loss_retain": loss_r, "loss_heldout": loss_h}


#: config.task → utility measure; ``higher_is_better`` says which way a drop goes
UTILITY = {"image": (_image_utility, False), "text": (_text_utility, True)}


def utility(task: Any, retain: Any, held_out: Any, *, kind: str, options: Any, seed: int) -> dict[str, Any]:
    task.model.eval()
    return UTILITY[kind][0](task, retain, held_out, options=options, seed=seed)


def relative_drop(before: float | None, after: float | None, *, higher_is_better: bool) -> float | None:
    """How much worse ``after`` is than ``before``, as a fraction of ``before`` (negative: better)."""
    if before is None or after is None or before == 0:
        return None
    return (before - after) / abs(before) if higher_is_better else (after - before) / abs(before)


def efficacy(auc_before: float, auc_after: float) -> float | None:
    """1 − (AUC_after − 0.5)/(AUC_before − 0.5); None when the attack saw nothing to forget (AUC ≤ 0.5)."""
    if auc_before <= 0.5:
        return None
    return 1.0 - (auc_after - 0.5) / (auc_before - 0.5)


def measure(task: Any, forget: Any, retain: Any, held_out: Any, *, kind: str, attack: str, options: Any,
            seed: int, draws: int) -> dict[str, Any]:
    """Membership and utility of one adapter, on inputs fixed by ``seed`` (paired across adapters)."""
    return {"membership": membership(task, forget, retain, held_out, kind=kind, attack=attack, seed=seed,
                                     draws=draws),
            "utility": utility(task, retain, held_out, kind=kind, options=options, seed=seed)}


def compare(kind: str, before: dict[str, Any], after: dict[str, Any], reference: dict[str, Any] | None
            ) -> dict[str, Any]:
    """The headline figures: efficacy, AUC gap to the retrained reference, utility drops."""
    higher = UTILITY[kind][1]
    a0, a1 = before["membership"]["forget"]["auc"], after["membership"]["forget"]["auc"]
    out: dict[str, Any] = {
        "auc_before": a0, "auc_after": a1, "efficacy": efficacy(a0, a1),
        "auc_reference": None if reference is None else reference["membership"]["forget"]["auc"],
        "utility_drop_retain": relative_drop(before["utility"]["retain"], after["utility"]["retain"],
                                             higher_is_better=higher),
        "utility_drop_heldout": relative_drop(before["utility"]["heldout"], after["utility"]["heldout"],
                                              higher_is_better=higher)}
    if reference is not None:
        r = reference["membership"]["forget"]["auc"]
        out["auc_gap_to_reference"] = abs(a1 - r)
        out["within_0.05_of_reference"] = abs(a1 - r) <= 0.05
        out["efficacy_reference"] = efficacy(a0, r)
    if kind == "image":  # the share of the adapter's improvement over the base that survives
        u0, u1 = before["utility"], after["utility"]
        gain0 = u0["base_heldout"] - u0["heldout"]
        out["heldout_gain_kept"] = None if gain0 <= 0 else (u1["base_heldout"] - u1["heldout"]) / gain0
    return out
