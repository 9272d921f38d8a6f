"""The export policy as pure rules: what an adapter's audit (and ε) must stay under to leave the registry.

Why a module of its own: the registry (:mod:`privlora.registry.service`, which pulls SQLAlchemy) decides
exports with it, and the audit report (:mod:`privlora.audit.report`) shows the same verdict per run, so an
auditor reads PASS/FAIL by the very rule the registry will apply — one function, no second copy to drift.
Only the standard library is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CHANCE_AUC = 0.5  # the control of an attack reported without a base-model run
_SLACK = 1e-9  # a figure equal to its bound passes, whatever the float rounding


def attack_aucs(audit: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    """attack → (AUC on the adapter, AUC on the base control or None) from an audit results.json
    (``attacks.<name>.adapter.auc`` / ``.base_control.auc``, or a bare ``attacks.<name>.auc``)."""
    out: dict[str, tuple[float, float | None]] = {}
    attacks = audit.get("attacks") if isinstance(audit, dict) else None
    for name, result in (attacks or {}).items():
        if not isinstance(result, dict):
            continue
        adapter, base = result.get("adapter", result), result.get("base_control")
        auc = adapter.get("auc") if isinstance(adapter, dict) else None
        if isinstance(auc, int | float):
            control = base.get("auc") if isinstance(base, dict) else None
            out[name] = (float(auc), float(control) if isinstance(control, int | float) else None)
    return out


def auc_gain(auc: float, base: float | None) -> float:
    """What the adapter adds: its AUC minus the base model's on the same images (chance when no control)."""
    return auc - (CHANCE_AUC if base is None else base)


def strongest_attack(aucs: dict[str, tuple[float, float | None]]) -> str | None:
    """The attack with the largest AUC gain over its control: the one the gain bound is decided on."""
    return max(aucs, key=lambda name: auc_gain(*aucs[name]), default=None)


@dataclass(frozen=True)
class ExportPolicy:
    """An adapter may leave only if its latest audit is under these bounds (None: not required).

    Only numbers the registry established count: the audit it ran itself or an auditor attached
    (``audit_by`` set), never the pusher's ``claimed_audit``; ε as recomputed from the recorded mechanism
    (``epsilon``, claims.py), never the number in privacy.json.

    ``max_auc_gain`` bounds what the adapter *adds*: each attack's AUC on the adapter minus its AUC on the
    base model (the audit's control, same images, noise and batches). An absolute AUC bound alone would
    also judge the data: on the 68 demo faces the untouched base model already scores 0.60 with PIA, so
    ``max_auc`` 0.6 would refuse every adapter, DP or not. Attacks reported without a control are
    measured against chance (0.5).
    """

    max_auc_gain: float | None = 0.05
    max_auc: float | None = None
    max_epsilon: float | None = 10.0

    def check(self, adapter: dict[str, Any]) -> str | None:
        """None when the adapter passes; else why not."""
        aucs = attack_aucs(adapter["audit"]) if adapter.get("audit_by") else {}
        if self.needs_audit and not aucs:
            return ("no audit established by the registry or an auditor (the pusher's own audit is only a claim; "
                    "an export needs an audit with attack AUCs)")
        return self.attack_violation(aucs) or self.epsilon_violation(adapter.get("epsilon"))

    @property
    def needs_audit(self) -> bool:
        return self.max_auc is not None or self.max_auc_gain is not None

    def attack_violation(self, aucs: dict[str, tuple[float, float | None]]) -> str | None:
        """The first attack over a bound, as one line; None when every attack is within them."""
        for name, (auc, base) in aucs.items():
            if self.max_auc is not None and auc > self.max_auc + _SLACK:
                return f"attack {name}: AUC {auc:.3f} > policy {self.max_auc}"
            gain = auc_gain(auc, base)
            if self.max_auc_gain is not None and gain > self.max_auc_gain + _SLACK:
                control = "chance (0.5)" if base is None else f"the base model's {base:.3f}"
                return f"attack {name}: AUC {auc:.3f} is {gain:+.3f} over {control} (policy ≤ +{self.max_auc_gain})"
        return None

    def epsilon_violation(self, epsilon: float | None, *, source: str = "recomputed from the recorded mechanism"
                          ) -> str | None:
        """Why ε breaks the bound, or None (no ε — no DP claim — is not judged by this bound)."""
        if self.max_epsilon is not None and epsilon is not None and epsilon > self.max_epsilon:
            return f"ε {epsilon:.3g} ({source}) > policy {self.max_epsilon}"
        return None
