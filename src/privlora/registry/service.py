"""Every registry action as one method: decide (access table) → log (allowed or denied) → do.

The HTTP layer only authenticates and maps requests here, so the access table is enforced in exactly
one place and every attempt, allowed or denied, lands in the hash-chained log before anything happens.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privlora.httpapi import Refusal
from privlora.registry.access import ROLES, decide
from privlora.registry.ledger import Ledger, verify
from privlora.registry.safety import inspect_adapter
from privlora.registry.store import Store


class Refused(Refusal):
    """An action the registry will not do: HTTP status and a one-line reason."""


@dataclass(frozen=True)
class Principal:
    name: str
    role: str


@dataclass(frozen=True)
class ExportPolicy:
    """An adapter may leave only if its latest audit is under these bounds (None: not required)."""

    max_auc: float | None = 0.6
    max_epsilon: float | None = 10.0

    def check(self, adapter: dict[str, Any]) -> str | None:
        """None when the adapter passes; else why not."""
        audit, privacy = adapter["audit"], adapter["privacy"]
        if self.max_auc is not None:
            aucs = [float(v) for v in _find(audit, "auc")]
            if not aucs:
                return "no audit attached (export needs an audit with attack AUCs)"
            if max(aucs) > self.max_auc:
                return f"strongest attack AUC {max(aucs):.3f} > policy {self.max_auc}"
        if self.max_epsilon is not None:
            eps = [float(v) for v in _find(privacy, "epsilon") if isinstance(v, int | float)]
            if eps and max(eps) > self.max_epsilon:
                return f"ε {max(eps):.3g} > policy {self.max_epsilon}"
        return None


def _find(tree: Any, key: str) -> list[Any]:
    """Every value under ``key`` anywhere in a JSON tree (audit results nest per attack)."""
    out: list[Any] = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key and isinstance(v, int | float):
                out.append(v)
            else:
                out.extend(_find(v, key))
    elif isinstance(tree, list):
        for v in tree:
            out.extend(_find(v, key))
    return out


class Registry:
    def __init__(self, root: Path, *, url: str | None = None, policy: ExportPolicy = ExportPolicy()) -> None:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        url = url or f"sqlite:///{root / 'registry.db'}"
        self.ledger = Ledger(url)
        self.store = Store(url, root)
        self.policy = policy

    # --- the one gate ---------------------------------------------------------------------------------
    def _gate(self, who: Principal, resource: str, action: str, target: str, **conditions: Any) -> None:
        decision = decide(who.role, resource, action, actor=who.name, **conditions)
        self.ledger.append(who.name, f"{resource}.{action}", target, "allowed" if decision.allowed else "denied",
                           {"reason": decision.reason} if not decision.allowed else None)
        if not decision.allowed:
            raise Refused(403, decision.reason)

    def _adapter(self, adapter_id: str) -> dict[str, Any]:
        adapter = self.store.adapter(adapter_id)
        if adapter is None:
            raise Refused(404, f"no adapter {adapter_id}")
        return adapter

    # --- users ------------------------------------------------------------------------------------------
    def bootstrap_admin(self, name: str) -> str:
        """The first admin (local, no caller); refused once any user exists. Returns its token."""
        if self.store.users():
            raise Refused(409, "the registry already has users; ask an admin for an account")
        token = secrets.token_urlsafe(24)
        self.store.add_user(name, "admin", token)
        self.ledger.append("(local)", "users.bootstrap", name, "allowed")
        return token

    def authenticate(self, token: str) -> Principal:
        user = self.store.user_by_token(token) if token else None
        if user is None:
            self.ledger.append("(unknown)", "authenticate", "-", "denied", {"reason": "missing or unknown token"})
            raise Refused(401, "missing or unknown token")
        return Principal(user["name"], user["role"])

    def add_user(self, who: Principal, name: str, role: str) -> str:
        self._gate(who, "users", "manage", name)
        if role not in ROLES:
            raise Refused(422, f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        if self.store.has_user(name):
            raise Refused(409, f"user {name!r} exists")
        token = secrets.token_urlsafe(24)
        self.store.add_user(name, role, token)
        return token

    def list_users(self, who: Principal) -> list[dict[str, Any]]:
        self._gate(who, "users", "manage", "*")
        return self.store.users()

    # --- adapters ---------------------------------------------------------------------------------------
    def push(self, who: Principal, weights: bytes, *, name: str, config: dict[str, Any],
             privacy: dict[str, Any] | None = None, audit: dict[str, Any] | None = None) -> dict[str, Any]:
        self._gate(who, "adapters", "write", name)
        report = inspect_adapter(weights)
        if not report.ok:
            raise Refused(422, "; ".join(report.errors[:3]))
        adapter_id, created = self.store.put_adapter(weights, name=name, owner=who.name, config=config,
                                                     privacy=privacy or {}, audit=audit or {})
        return {"id": adapter_id, "created": created, "rank": report.rank, "layers": report.layers,
                "warnings": report.warnings}

    def list(self, who: Principal) -> list[dict[str, Any]]:
        self._gate(who, "adapters", "read", "*")
        return self.store.adapters()

    def show(self, who: Principal, adapter_id: str) -> dict[str, Any]:
        self._gate(who, "adapters", "read", adapter_id)
        adapter = self._adapter(adapter_id)
        adapter["open_incidents"] = self.store.open_incidents(adapter_id)
        return adapter

    def pull(self, who: Principal, adapter_id: str) -> tuple[dict[str, Any], bytes]:
        adapter = self.store.adapter(adapter_id)
        self._gate(who, "adapters", "read", adapter_id, quarantined=bool(adapter and adapter["quarantined"]))
        if adapter is None:
            raise Refused(404, f"no adapter {adapter_id}")
        return adapter, self.store.weights(adapter_id)

    # --- export: request, approval by someone else, download by the requester -------------------------------
    def request_export(self, who: Principal, adapter_id: str) -> dict[str, Any]:
        self._gate(who, "export", "request", adapter_id)
        self._adapter(adapter_id)
        return {"export": self.store.request_export(adapter_id, who.name), "status": "requested"}

    def approve_export(self, who: Principal, export_id: int) -> dict[str, Any]:
        export = self.store.export(export_id)
        self._gate(who, "export", "approve", str(export_id), requester=export["requester"] if export else None)
        if export is None:
            raise Refused(404, f"no export request {export_id}")
        adapter = self._adapter(export["adapter"])
        if adapter["quarantined"]:
            raise Refused(409, "adapter is quarantined (incident open)")
        why = self.policy.check(adapter)
        if why is not None:
            self.ledger.append(who.name, "export.policy", str(export_id), "denied", {"reason": why})
            raise Refused(409, f"export policy not met: {why}")
        self.store.approve_export(export_id, who.name)
        return {"export": export_id, "status": "approved", "approver": who.name}

    def download_export(self, who: Principal, export_id: int) -> bytes:
        export = self.store.export(export_id)
        self._gate(who, "export", "request", str(export_id))
        if export is None or export["requester"] != who.name:
            raise Refused(403, "only the requester downloads an export")
        if export["status"] != "approved":
            raise Refused(409, "export not approved yet")
        if self._adapter(export["adapter"])["quarantined"]:
            raise Refused(409, "adapter is quarantined (incident open)")
        self.ledger.append(who.name, "export.download", export["adapter"], "allowed")
        return self.store.weights(export["adapter"])

    # --- dataset versions and generation logs --------------------------------------------------------------
    def push_dataset(self, who: Principal, data: bytes, *, name: str, kind: str) -> dict[str, Any]:
        self._gate(who, "training_data", "write", name)
        if kind not in ("sanitized", "full"):
            raise Refused(422, "dataset kind must be 'sanitized' or 'full'")
        return {"id": self.store.put_dataset(data, name=name, kind=kind, owner=who.name), "kind": kind}

    def list_datasets(self, who: Principal) -> list[dict[str, Any]]:
        """The versions this role may read (sanitized for researchers, all for auditors)."""
        full = decide(who.role, "training_data", "read_full").allowed
        self._gate(who, "training_data", "read_full" if full else "read_sanitized", "*")
        return [d for d in self.store.datasets() if full or d["kind"] == "sanitized"]

    def pull_dataset(self, who: Principal, dataset_id: str) -> bytes:
        dataset = self.store.dataset(dataset_id)
        kind = dataset["kind"] if dataset else "sanitized"
        self._gate(who, "training_data", "read_full" if kind == "full" else "read_sanitized", dataset_id)
        if dataset is None:
            raise Refused(404, f"no dataset {dataset_id}")
        return self.store.blob(dataset_id, ".data")

    def log_generation(self, who: Principal, *, adapter: str, prompt: str, params: dict[str, Any],
                       image: bytes | None) -> dict[str, Any]:
        self._gate(who, "generation_logs", "write", adapter)
        self._adapter(adapter)
        return {"generation": self.store.add_generation(adapter=adapter, actor=who.name, prompt=prompt,
                                                        params=params, image=image)}

    def generation_logs(self, who: Principal) -> list[dict[str, Any]]:
        """Full entries (prompt, image hash) for full readers; metadata only (no prompt or image) otherwise."""
        full = decide(who.role, "generation_logs", "read_full").allowed
        self._gate(who, "generation_logs", "read_full" if full else "read_metadata", "*")
        rows = self.store.generations()
        if not full:
            rows = [{k: v for k, v in r.items() if k not in ("prompt", "image_sha256")} for r in rows]
        return rows

    # --- incidents ----------------------------------------------------------------------------------------
    def open_incident(self, who: Principal, adapter_id: str, reason: str) -> dict[str, Any]:
        self._gate(who, "incidents", "open", adapter_id)
        self._adapter(adapter_id)
        incident = self.store.open_incident(adapter_id, reason, who.name)
        self.store.set_quarantine(adapter_id, True)
        return {"incident": incident, "adapter": adapter_id, "quarantined": True}

    def close_incident(self, who: Principal, incident_id: int, resolution: str) -> dict[str, Any]:
        self._gate(who, "incidents", "close", str(incident_id))
        incident = self.store.incident(incident_id)
        if incident is None:
            raise Refused(404, f"no incident {incident_id}")
        self.store.close_incident(incident_id, resolution, who.name)
        if self.store.open_incidents(incident["adapter"]) == 0:
            self.store.set_quarantine(incident["adapter"], False)
        return {"incident": incident_id, "closed": True, "resolution": resolution}

    # --- the log --------------------------------------------------------------------------------------------
    def log(self, who: Principal) -> list[dict[str, Any]]:
        self._gate(who, "log", "read", "*")
        return self.ledger.entries()

    def verify_log(self, who: Principal) -> dict[str, Any]:
        self._gate(who, "log", "read", "verify")
        problems = verify(self.ledger.entries())
        return {"intact": not problems, "head": self.ledger.head(),
                "problems": [p.__dict__ for p in problems]}
