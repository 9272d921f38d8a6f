"""What a pusher *claims* about an adapter, checked against what the registry can establish itself.

Why: the export policy decides on ε and audit AUCs, and a number typed into privacy.json or results.json
costs nothing to forge (issue 18: plain weights with a made-up audit and ε = 1 were approved). So

* ε is **recomputed** from the mechanism the run recorded (σ, q, steps, δ, accountant — the fields
  privacy.json already carries) with the same accountants training used; a claimed ε below the
  recomputed one, or a claimed ε with no mechanism to recompute it from, is refused. The policy reads the
  recomputed ε only. (What cannot be recomputed is whether that mechanism really ran: the audit is the
  check for that.)
* the pusher's audit is stored as ``claimed_audit`` and never read by the policy; the audit the policy
  reads comes from the registry's own run of the audit on the stored bytes, or from an auditor
  (:func:`compare_audits` flags a claim that disagrees with it).

Mechanisms are a registry (``RECOMPUTE``: a predicate on privacy.json → ε from its fields).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: a claimed ε may sit this far below the recomputed one (PRV is numerical; JSON round-trips floats)
RELATIVE_TOLERANCE = 0.01
#: a claimed audit AUC that differs from the registry's by more than this is flagged
AUC_DISAGREEMENT = 0.05


class ClaimError(ValueError):
    """A privacy claim the registry refuses (one line: why)."""


def _number(privacy: dict[str, Any], key: str, *, integer: bool = False, positive: bool = True) -> float:
    value = privacy.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ClaimError(f"privacy.json claims ε but its mechanism has no numeric {key!r} to recompute it from")
    if integer and int(value) != value:
        raise ClaimError(f"privacy.json: {key!r} must be a whole number")
    if (positive and value <= 0) or value < 0:
        raise ClaimError(f"privacy.json: {key!r} must be {'> 0' if positive else '≥ 0'}")
    return float(value)


def _dp_sgd(privacy: dict[str, Any]) -> float:
    from privlora.train import accounting

    accountant = privacy.get("accountant", "rdp")
    if accountant not in accounting.ACCOUNTANTS:
        raise ClaimError(f"privacy.json: unknown accountant {accountant!r} "
                         f"(known: {', '.join(accounting.ACCOUNTANTS)})")
    q = _number(privacy, "sample_rate")
    delta = _number(privacy, "delta")
    if q > 1 or delta >= 1:
        raise ClaimError("privacy.json: sample_rate must be ≤ 1 and delta < 1")
    return accounting.epsilon(noise_multiplier=_number(privacy, "noise_multiplier"), sample_rate=q,
                              steps=int(_number(privacy, "steps", integer=True, positive=False)), delta=delta,
                              accountant=accountant)


def _federated_gaussian(privacy: dict[str, Any]) -> float:
    from privlora.federated.client_privacy import gaussian_epsilons

    sigmas = privacy.get("effective_noise_multipliers")
    if not isinstance(sigmas, list) or not all(isinstance(s, int | float) and s > 0 for s in sigmas):
        raise ClaimError("privacy.json claims ε but has no effective_noise_multipliers list to recompute it from")
    q, delta = _number(privacy, "sample_rate"), _number(privacy, "delta")
    return gaussian_epsilons([(float(s), q) for s in sigmas], delta)[-1] if sigmas else 0.0


def _federated_laplace(privacy: dict[str, Any]) -> float:
    rounds = privacy.get("epsilon_per_round")
    if not isinstance(rounds, list) or not all(isinstance(e, int | float) and e >= 0 for e in rounds):
        raise ClaimError("privacy.json claims ε but has no epsilon_per_round list to recompute it from")
    return float(sum(rounds))  # basic composition, what the federated ledger reports as "epsilon"


def _mechanism(privacy: dict[str, Any]) -> str:
    value = privacy.get("mechanism")
    return value if isinstance(value, str) else ""


#: name → (does this privacy.json record that mechanism?, ε recomputed from its fields)
RECOMPUTE: dict[str, tuple[Callable[[dict[str, Any]], bool], Callable[[dict[str, Any]], float]]] = {
    "dp-sgd": (lambda p: _mechanism(p).startswith("DP-SGD"), _dp_sgd),
    "federated-gaussian": (lambda p: _mechanism(p) == "gaussian", _federated_gaussian),
    "federated-laplace": (lambda p: _mechanism(p) == "laplace", _federated_laplace),
}


@dataclass(frozen=True)
class VerifiedPrivacy:
    epsilon: float | None  # recomputed by the registry; None: no ε claimed (no formal guarantee)
    mechanism: str | None  # RECOMPUTE key, None without a claim

    def record(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "mechanism": self.mechanism, "recomputed": self.epsilon is not None}


def claimed_epsilons(privacy: dict[str, Any]) -> list[float]:
    """Every numeric ε a privacy.json states at its top level (``epsilon``, ``epsilon_rdp``, ``epsilon_prv``)."""
    return [float(v) for k, v in privacy.items() if k in ("epsilon", "epsilon_rdp", "epsilon_prv")
            and isinstance(v, int | float) and not isinstance(v, bool)]


def verify_privacy(privacy: dict[str, Any]) -> VerifiedPrivacy:
    """Recompute ε from the recorded mechanism; raise ClaimError when a claimed ε is lower than that, or
    when ε is claimed and no known mechanism with its parameters is recorded."""
    claims = claimed_epsilons(privacy)
    if not claims:
        return VerifiedPrivacy(None, None)
    if not all(math.isfinite(c) for c in claims):
        raise ClaimError("privacy.json claims a non-finite ε")
    name = next((key for key, (matches, _) in RECOMPUTE.items() if matches(privacy)), None)
    if name is None:
        raise ClaimError(f"privacy.json claims ε = {min(claims):g} but records no mechanism the registry can "
                         f"recompute it from (mechanism {privacy.get('mechanism')!r}; known: DP-SGD with "
                         "noise_multiplier, sample_rate, steps, delta, accountant; federated gaussian | laplace)")
    recomputed = RECOMPUTE[name][1](privacy)
    by_accountant = {"epsilon_rdp": "rdp", "epsilon_prv": "prv"}
    for key in ("epsilon", "epsilon_rdp", "epsilon_prv"):
        claim = privacy.get(key)
        if not isinstance(claim, int | float) or isinstance(claim, bool):
            continue
        expected = recomputed
        if name == "dp-sgd" and key in by_accountant and by_accountant[key] != privacy.get("accountant", "rdp"):
            expected = _dp_sgd({**privacy, "accountant": by_accountant[key]})
        if claim < expected * (1 - RELATIVE_TOLERANCE) - 1e-9:
            raise ClaimError(f"privacy.json claims {key} = {claim:g} but its recorded mechanism gives ε = "
                             f"{expected:.4g} (recomputed by the registry)")
    return VerifiedPrivacy(recomputed, name)


def compare_audits(claimed: dict[str, Any], established: dict[str, Any]) -> list[str]:
    """Attacks whose claimed AUC differs from the registry's (or an auditor's) by more than
    ``AUC_DISAGREEMENT``, one line each; attacks only one side ran are not compared."""
    from privlora.registry.policy import attack_aucs

    mine, theirs = attack_aucs(established), attack_aucs(claimed)
    return [f"attack {name}: claimed AUC {theirs[name][0]:.3f}, established {auc:.3f}"
            for name, (auc, _) in sorted(mine.items())
            if name in theirs and abs(theirs[name][0] - auc) > AUC_DISAGREEMENT]
