"""Every registry action as one method: decide (access table) → log (allowed or denied) → do.

The HTTP layer only authenticates and maps requests here, so the access table is enforced in exactly
one place and every attempt, allowed or denied, lands in the hash-chained log before anything happens.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privlora.extras import missing_extra

try:  # the 'registry' extra
    import sqlalchemy.exc as sa_exc
except ModuleNotFoundError as e:
    raise (missing_extra(e) or e) from None

from privlora.errors import UserError
from privlora.httpapi import Refusal
from privlora.registry.access import ROLES, decide
from privlora.registry.bases import base_shapes
from privlora.registry.claims import ClaimError, compare_audits, verify_privacy
from privlora.registry.ledger import Ledger, verify
from privlora.registry.policy import ExportPolicy, attack_aucs  # re-exported: callers import them from here
from privlora.registry.safety import inspect_adapter
from privlora.registry.signing import LogSigner, key_path
from privlora.registry.store import Store


class Refused(Refusal):
    """An action the registry will not do: HTTP status and a one-line reason."""


#: the run files an audit needs, stored beside the adapter: name → check of the bytes (None when fine)
RUN_FILES = ("config.yaml", "splits.json")
REPORT_STATUSES = ("audited", "not_audited")
DEFAULT_TOKEN_DAYS = 30.0
MAX_TOKEN_DAYS = 3650.0
MAX_ROW_ID = 2**63 - 1  # ids are SQL integers: larger ones are no row (and would overflow the driver)


def _check_run_file(name: str, data: bytes) -> str | None:
    import yaml

    from privlora.config import AliasBomb, safe_yaml

    try:
        text = data.decode()
        # safe_yaml: a pushed alias bomb or a self-referring document is refused here, not expanded later
        parsed = safe_yaml(text) if name == "config.yaml" else json.loads(text)
    except (UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError, RecursionError) as e:
        if isinstance(e, RecursionError | AliasBomb):
            return f"{name} is refused: it nests or aliases too deeply to be a run's config"
        return f"{name} is not valid {'YAML' if name == 'config.yaml' else 'JSON'}"
    if not isinstance(parsed, dict):
        return f"{name} must hold a mapping"
    if name == "splits.json" and not isinstance(parsed.get("members"), list):
        return "splits.json has no members list"
    if name == "config.yaml" and not isinstance(parsed.get("data"), dict):
        return "config.yaml has no data section (is it a run's config.yaml?)"
    return None


@dataclass(frozen=True)
class Principal:
    name: str
    role: str


def _row_id(value: int, what: str) -> int:
    """A path id as a row id: one beyond what SQL integers hold names no row (404, not an overflow)."""
    if not 0 < value <= MAX_ROW_ID:
        raise Refused(404, f"no {what} {value}")
    return value


class Registry:
    def __init__(self, root: Path, *, url: str | None = None, policy: ExportPolicy = ExportPolicy(),
                 log_key: Path | str | None = None, token_days: float = DEFAULT_TOKEN_DAYS,
                 audit_attacks: tuple[str, ...] = ("loss",), audit_data: tuple[Path, ...] = ()) -> None:
        """``log_key``: the Ed25519 key signing the log's checkpoints (default ``$PRIVLORA_REGISTRY_LOG_KEY``
        or ``<root>/log-signing.key``); ``token_days``: default lifetime of new tokens; ``audit_attacks``:
        the attacks of the registry's own audit before an export (empty: only auditors' audits count);
        ``audit_data``: folders that audit may read data or a base from, beside the built-in ones."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        url = url or f"sqlite:///{root / 'registry.db'}"
        if not 0 < token_days <= MAX_TOKEN_DAYS:
            raise UserError(f"token lifetime must be in (0, {MAX_TOKEN_DAYS:g}] days, got {token_days:g}")
        self.token_days, self.audit_attacks = token_days, tuple(audit_attacks)
        self.audit_data = tuple(Path(p) for p in audit_data)
        signer = LogSigner(key_path(root, log_key))
        try:
            self.ledger = Ledger(url, signer)
            self.store = Store(url, root)
        except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError) as e:
            raise UserError(f"--db {url.split('@')[-1]!r} is not a database URL SQLAlchemy can open ({e}); e.g. "
                            "postgresql+psycopg://user@host:5432/registry") from None
        except sa_exc.OperationalError as e:
            raise UserError(f"cannot open the registry database: {str(e.orig).strip().splitlines()[0]}") from None
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
        self.store.add_user(name, "admin", token, expires=time.time() + self.token_days * 86400)
        self.ledger.append("(local)", "users.bootstrap", name, "allowed")
        return token

    def authenticate(self, token: str) -> Principal:
        """The token's user; 401 when it is unknown, revoked or past its expiry (tokens issued before expiry
        existed expire ``token_days`` after their creation)."""
        user = self.store.user_by_token(token) if token else None
        reason = None
        if user is None:
            reason = "missing or unknown token"
        elif user["revoked"] is not None:
            reason = "token revoked"
        else:
            expires = user["expires"] if user["expires"] is not None else user["created"] + self.token_days * 86400
            if time.time() >= expires:
                when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires))
                reason = f"token expired on {when}; ask an admin for a new one"
        if reason is not None:
            self.ledger.append(user["name"] if user else "(unknown)", "authenticate", "-", "denied",
                               {"reason": reason})
            raise Refused(401, reason)
        return Principal(user["name"], user["role"])

    def add_user(self, who: Principal, name: str, role: str, expires_days: float | None = None) -> str:
        self._gate(who, "users", "manage", name)
        if role not in ROLES:
            raise Refused(422, f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        days = self.token_days if expires_days is None else expires_days
        if not 0 < days <= MAX_TOKEN_DAYS:
            raise Refused(422, f"expires_days must be in (0, {MAX_TOKEN_DAYS:g}]")
        if self.store.has_user(name):
            raise Refused(409, f"user {name!r} exists")
        token = secrets.token_urlsafe(24)
        self.store.add_user(name, role, token, expires=time.time() + days * 86400)
        return token

    def revoke_user(self, who: Principal, name: str) -> dict[str, Any]:
        """Revoke a user's token at once (every later call with it is a 401)."""
        self._gate(who, "users", "manage", f"revoke:{name}")
        if not self.store.has_user(name):
            raise Refused(404, f"no user {name!r}")
        self.store.revoke_user(name)
        return {"name": name, "revoked": True}

    def list_users(self, who: Principal) -> list[dict[str, Any]]:
        self._gate(who, "users", "manage", "*")
        return self.store.users()

    # --- adapters ---------------------------------------------------------------------------------------
    def push(self, who: Principal, weights: bytes, *, name: str, config: dict[str, Any],
             privacy: dict[str, Any] | None = None, audit: dict[str, Any] | None = None,
             files: dict[str, bytes] | None = None) -> dict[str, Any]:
        """Store an adapter after the safety checks; shapes are checked against its base (from
        ``config['base_model_name_or_path']``) when the base ships with this installation."""
        self._gate(who, "adapters", "write", name)
        files = files or {}
        for file_name, data in files.items():
            if file_name not in RUN_FILES:
                raise Refused(422, f"unknown run file {file_name!r}; a push carries {', '.join(RUN_FILES)}")
            problem = _check_run_file(file_name, data)
            if problem:
                raise Refused(422, problem)
        known, shapes = base_shapes(str(config.get("base_model_name_or_path") or ""))
        report = inspect_adapter(weights, base_shapes=shapes)
        if report.nonfinite:
            raise Refused(400, next(e for e in report.errors if e.startswith("adapter has non-finite weights")))
        if not report.ok:
            more = f" (and {len(report.errors) - 3} more)" if len(report.errors) > 3 else ""
            raise Refused(422, "; ".join(report.errors[:3]) + more)
        try:
            verified = verify_privacy(privacy or {})
        except ClaimError as e:
            self.ledger.append(who.name, "adapters.claim", name, "denied", {"reason": str(e)})
            raise Refused(422, f"privacy claim refused: {e}") from None
        adapter_id, created = self.store.put_adapter(weights, name=name, owner=who.name, config=config,
                                                     privacy=privacy or {}, claimed_audit=audit or {},
                                                     epsilon=verified.epsilon, files=files)
        return {"id": adapter_id, "created": created, "rank": report.rank, "layers": report.layers,
                "warnings": report.warnings, "base": known, "base_checked": known is not None,
                "files": sorted(self.store.adapter_files(adapter_id)), "privacy": verified.record(),
                "audit": "claimed (the export policy reads only an audit the registry or an auditor establishes)"}

    def list(self, who: Principal) -> list[dict[str, Any]]:
        self._gate(who, "adapters", "read", "*")
        return self.store.adapters()

    def show(self, who: Principal, adapter_id: str) -> dict[str, Any]:
        self._gate(who, "adapters", "read", adapter_id)
        adapter = self._adapter(adapter_id)
        adapter["open_incidents"] = self.store.open_incidents(adapter_id)
        adapter["files"] = sorted(self.store.adapter_files(adapter_id))
        return adapter

    def pull(self, who: Principal, adapter_id: str, fmt: str | None = None) -> tuple[dict[str, Any], bytes]:
        """The adapter's weights; ``fmt`` (peft | diffusers | kohya, :mod:`privlora.export`) converts them,
        peft (the default) is the stored file byte for byte (its sha256 is the id)."""
        adapter = self.store.adapter(adapter_id)
        self._gate(who, "adapters", "read", adapter_id, quarantined=bool(adapter and adapter["quarantined"]))
        if adapter is None:
            raise Refused(404, f"no adapter {adapter_id}")
        return adapter, self._formatted(adapter, self.store.weights(adapter_id), fmt)

    def _formatted(self, adapter: dict[str, Any], weights: bytes, fmt: str | None) -> bytes:
        """``weights`` converted on the fly to ``fmt`` (small: milliseconds for an adapter); 422 when the format
        is unknown or does not fit the adapter (a text adapter as kohya)."""
        from privlora.export import FORMATS, convert, source_from_bytes

        if fmt is None or fmt == "peft":
            return weights
        if fmt not in FORMATS:
            raise Refused(422, f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        config = adapter["config"] if isinstance(adapter.get("config"), dict) else {}
        try:
            source = source_from_bytes(weights, config, where=f"adapter {adapter['id'][:16]}", probe_base=False)
            return convert(source, fmt)
        except UserError as e:
            raise Refused(422, str(e)) from None

    def adapter_file(self, who: Principal, adapter_id: str, name: str) -> bytes:
        """A run file stored with the adapter. Read like the adapter (auditors only under quarantine);
        splits.json names the training records, so it also needs training-data read access."""
        adapter = self.store.adapter(adapter_id)
        self._gate(who, "adapters", "read", adapter_id, quarantined=bool(adapter and adapter["quarantined"]))
        if name == "splits.json":
            self._gate(who, "training_data", "read_sanitized", f"{adapter_id}/splits.json")
        if adapter is None:
            raise Refused(404, f"no adapter {adapter_id}")
        sha = self.store.adapter_files(adapter_id).get(name)
        if sha is None:
            raise Refused(404, f"adapter {adapter_id[:16]} was pushed without {name}")
        return self.store.blob(sha, ".file")

    # --- export: request, approval by someone else, download by the requester -------------------------------
    def request_export(self, who: Principal, adapter_id: str) -> dict[str, Any]:
        self._gate(who, "export", "request", adapter_id)
        self._adapter(adapter_id)
        return {"export": self.store.request_export(adapter_id, who.name), "status": "requested"}

    def attach_audit(self, who: Principal, adapter_id: str, results: dict[str, Any]) -> dict[str, Any]:
        """An auditor's audit results.json for this adapter (bound to its sha256 by the path), outside any
        incident: it becomes the adapter's established audit, and a disagreeing claim is flagged."""
        adapter = self.store.adapter(adapter_id)
        self._gate(who, "adapters", "audit", adapter_id)
        if adapter is None:
            raise Refused(404, f"no adapter {adapter_id}")
        if not isinstance(results.get("attacks"), dict) or not attack_aucs(results):
            raise Refused(422, "an audit is an audit results.json with attack AUCs")
        return self._establish(adapter, results, by=who.name)

    def _establish(self, adapter: dict[str, Any], results: dict[str, Any], *, by: str) -> dict[str, Any]:
        flags = compare_audits(adapter["claimed_audit"], results)
        self.store.set_audit(adapter["id"], results, by=by, flags=flags)
        if flags:
            self.ledger.append(by, "adapters.claim", adapter["id"], "disputed", {"flags": flags})
        return {"adapter": adapter["id"], "audit_by": by, "claim_disagrees": flags}

    def _server_audit(self, who: Principal, adapter: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """The registry's own audit when nobody has established one (once per adapter): the adapter as it
        is then, and why the audit could not run (None when it ran or was not needed)."""
        if adapter.get("audit_by") or not self.audit_attacks:
            return adapter, None
        from privlora.registry.server_audit import audit_stored

        try:
            results = audit_stored(self.store, adapter, attacks=self.audit_attacks, data_roots=self.audit_data)
        except UserError as e:
            self.ledger.append("registry", "adapters.audit", adapter["id"], "failed", {"reason": str(e)})
            return adapter, str(e)
        self.ledger.append("registry", "adapters.audit", adapter["id"], "allowed",
                           {"requested_by": who.name, "attacks": list(self.audit_attacks)})
        self._establish(adapter, results, by="registry")
        return self._adapter(adapter["id"]), None

    def approve_export(self, who: Principal, export_id: int) -> dict[str, Any]:
        export = self.store.export(_row_id(export_id, "export request"))
        self._gate(who, "export", "approve", str(export_id), requester=export["requester"] if export else None)
        if export is None:
            raise Refused(404, f"no export request {export_id}")
        adapter = self._adapter(export["adapter"])
        if adapter["quarantined"]:
            raise Refused(409, "adapter is quarantined (incident open)")
        adapter, failed = self._server_audit(who, adapter)
        why = self.policy.check(adapter)
        if why is not None and failed is not None:
            why += f"; the registry could not audit it itself: {failed}"
        if why is not None:
            self.ledger.append(who.name, "export.policy", str(export_id), "denied", {"reason": why})
            raise Refused(409, f"export policy not met: {why}")
        self.store.approve_export(export_id, who.name)
        return {"export": export_id, "status": "approved", "approver": who.name}

    def download_export(self, who: Principal, export_id: int, fmt: str | None = None) -> bytes:
        export = self.store.export(_row_id(export_id, "export request"))
        self._gate(who, "export", "request", str(export_id))
        if export is None or export["requester"] != who.name:
            raise Refused(403, "only the requester downloads an export")
        if export["status"] != "approved":
            raise Refused(409, "export not approved yet")
        adapter = self._adapter(export["adapter"])
        if adapter["quarantined"]:
            raise Refused(409, "adapter is quarantined (incident open)")
        data = self._formatted(adapter, self.store.weights(export["adapter"]), fmt)
        self.ledger.append(who.name, "export.download", export["adapter"], "allowed")
        return data

    # --- dataset versions and generation logs --------------------------------------------------------------
    def push_dataset(self, who: Principal, data: bytes, *, name: str, kind: str, fmt: str = "file"
                     ) -> dict[str, Any]:
        """``fmt`` 'tar' marks a folder packed by the client (unpacked again on pull)."""
        self._gate(who, "training_data", "write", name)
        if kind not in ("sanitized", "full"):
            raise Refused(422, "dataset kind must be 'sanitized' or 'full'")
        if fmt not in ("file", "tar"):
            raise Refused(422, "dataset format must be 'file' or 'tar'")
        return {"id": self.store.put_dataset(data, name=name, kind=kind, owner=who.name, fmt=fmt), "kind": kind,
                "format": fmt}

    def list_datasets(self, who: Principal) -> list[dict[str, Any]]:
        """The versions this role may read (sanitized for researchers, all for auditors)."""
        full = decide(who.role, "training_data", "read_full").allowed
        self._gate(who, "training_data", "read_full" if full else "read_sanitized", "*")
        return [d for d in self.store.datasets() if full or d["kind"] == "sanitized"]

    def pull_dataset(self, who: Principal, dataset_id: str) -> tuple[dict[str, Any], bytes]:
        dataset = self.store.dataset(dataset_id)
        kind = dataset["kind"] if dataset else "sanitized"
        self._gate(who, "training_data", "read_full" if kind == "full" else "read_sanitized", dataset_id)
        if dataset is None:
            raise Refused(404, f"no dataset {dataset_id}")
        return dataset, self.store.blob(dataset_id, ".data")

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
        incident = self.store.incident(_row_id(incident_id, "incident"))
        if incident is None:
            raise Refused(404, f"no incident {incident_id}")
        self.store.close_incident(incident_id, resolution, who.name)
        if self.store.open_incidents(incident["adapter"]) == 0:
            self.store.set_quarantine(incident["adapter"], False)
        return {"incident": incident_id, "closed": True, "resolution": resolution}

    def list_incidents(self, who: Principal) -> list[dict[str, Any]]:
        self._gate(who, "incidents", "read", "*")
        return self.store.incidents()

    def show_incident(self, who: Principal, incident_id: int) -> dict[str, Any]:
        """The incident with every report attached to it, oldest first."""
        self._gate(who, "incidents", "read", str(incident_id))
        incident = self.store.incident(_row_id(incident_id, "incident"))
        if incident is None:
            raise Refused(404, f"no incident {incident_id}")
        return {**incident, "reports": self.store.reports(incident_id)}

    def report_incident(self, who: Principal, incident_id: int, *, status: str, report: dict[str, Any]
                        ) -> dict[str, Any]:
        """Attach a re-audit to an open incident; an ``audited`` report becomes the adapter's latest audit
        (what the export policy reads), a ``not_audited`` one records why the audit could not run."""
        self._gate(who, "incidents", "report", str(incident_id))
        incident = self.store.incident(_row_id(incident_id, "incident"))
        if incident is None:
            raise Refused(404, f"no incident {incident_id}")
        if incident["closed"] is not None:
            raise Refused(409, f"incident {incident_id} is closed")
        if status not in REPORT_STATUSES:
            raise Refused(422, f"report status must be one of {', '.join(REPORT_STATUSES)}")
        if status == "audited" and not isinstance(report.get("attacks"), dict):
            raise Refused(422, "an audited report is an audit results.json (it has no attacks)")
        if status == "not_audited" and not isinstance(report.get("reason"), str):
            raise Refused(422, "a not_audited report says why (reason)")
        number = self.store.add_report(incident_id, by=who.name, status=status, report=report)
        if status == "audited":
            self._establish(self._adapter(incident["adapter"]), report, by=who.name)
        return {"incident": incident_id, "report": number, "status": status, "latest_audit": status == "audited"}

    # --- the log --------------------------------------------------------------------------------------------
    def log(self, who: Principal) -> list[dict[str, Any]]:
        self._gate(who, "log", "read", "*")
        return self.ledger.entries()

    def verify_log(self, who: Principal, expect_head: str | None = None) -> dict[str, Any]:
        """Recompute the chain. ``expect_head``: a head published earlier (a ticket, a signed mail) must
        still be an entry of the chain — what a chain alone cannot show (its last entries cut off, or the
        whole log rewritten by someone holding the database) then shows as a missing anchor."""
        self._gate(who, "log", "read", "verify")
        with self.ledger.lock:  # no append between reading the entries and the checkpoints
            entries = self.ledger.entries()
            signed, checkpoint = self.ledger.checkpoint_problems(entries)
        problems = [p.__dict__ for p in verify(entries)]
        problems += [p.__dict__ for p in signed]
        if expect_head is not None:
            at = next((e["seq"] for e in entries if e["hash"] == expect_head.strip().lower()), None)
            if at is None:
                problems.append({"seq": 0, "kind": "anchor", "message": f"the published head {expect_head[:16]}… "
                                 "is no entry of this log (entries cut off or the log rewritten)"})
        return {"intact": not problems, "head": self.ledger.head(), "problems": problems,
                "checkpoint": checkpoint and {"count": checkpoint["count"], "head": checkpoint["head"]},
                "public_key": self.ledger.signer.public_hex() if self.ledger.signer else None}
