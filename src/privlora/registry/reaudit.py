"""Re-audit of a quarantined adapter for an incident, run by an auditor on their own machine.

Why on the auditor's side and not in the server: the audit needs the full training data (members and
held-out records named by the run's splits.json), which only auditors may read, and minutes of compute
that would block the service. The registry keeps what an audit needs beside each adapter (its run's
``config.yaml`` and ``splits.json``, pushed with it); the auditor pulls the quarantined adapter (auditors
alone may), rebuilds a temporary run directory, runs :func:`privlora.audit.runner.audit_run` (membership
attacks + extraction, each against the base as control) with the data named in the config — or their own
copy (``data``) — and attaches the results to the incident (``POST /incidents/{n}/report``), where they
become the adapter's latest audit, the one the export policy reads. When the adapter cannot be audited
(pushed without its run files, a text run, data missing) a ``not_audited`` report records why, and the
incident stays open.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from privlora.errors import UserError
from privlora.registry.client import RUN_FILES, RegistryClient, RegistryRefusal

DEFAULT_ATTACKS = ("loss", "pia")
DEFAULT_EXTRACTION = 64


def write_run(folder: Path, *, config_yaml: str, splits_json: bytes, privacy: dict[str, Any],
              adapter_config: dict[str, Any], weights: bytes, data: str | None = None) -> Path:
    """Write ``folder`` as a run directory (config.yaml, splits.json, privacy.json, adapter/) from what the
    registry stores — shared by the auditor's re-audit and the registry's own audit (server_audit.py)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(config_yaml)
    if data is not None:
        config["data"]["source"] = str(data)  # the auditor's copy of the full data
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / "splits.json").write_bytes(splits_json)
    (folder / "privacy.json").write_text(json.dumps(privacy or {"mechanism": "none"}))
    adapter = folder / "adapter"  # peft's file names (as the client's push reads them; no peft import here)
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    (adapter / "adapter_model.safetensors").write_bytes(weights)
    return folder


def rebuild_run(client: RegistryClient, adapter_id: str, folder: Path, *, data: str | None = None) -> Path:
    """Write ``folder`` as a run directory from the registry over HTTP; raises UserError naming what is
    missing."""
    record = client.get(f"/adapters/{adapter_id}")
    missing = [f for f in RUN_FILES if f not in record.get("files", [])]
    if missing:
        raise UserError(f"adapter {adapter_id[:16]} was pushed without its run's {' and '.join(missing)}, so it "
                        "cannot be audited (push the run folder, not only its adapter/)")
    return write_run(folder, config_yaml=client.text(f"/adapters/{adapter_id}/files/config.yaml"),
                     splits_json=client.content(f"/adapters/{adapter_id}/files/splits.json"),
                     privacy=record.get("privacy") or {}, adapter_config=record["config"],
                     weights=client.content(f"/adapters/{adapter_id}/weights"), data=data)


def reaudit_incident(client: RegistryClient, incident_id: int, *, attacks: tuple[str, ...] = DEFAULT_ATTACKS,
                     extraction: int = DEFAULT_EXTRACTION, data: str | None = None, seed: int = 0,
                     quiet: bool = True) -> dict[str, Any]:
    """Audit the incident's adapter and attach the results; returns the attached results.json.

    Raises UserError when it cannot: after recording a ``not_audited`` report with the reason (when the
    caller may attach reports at all — an auditor), so the incident shows why.
    """
    incident = client.get(f"/incidents/{incident_id}")
    if incident.get("closed") is not None:
        raise UserError(f"incident {incident_id} is closed; open a new one to re-audit")
    adapter_id = incident["adapter"]
    with tempfile.TemporaryDirectory(prefix="privlora-reaudit-") as tmp:
        try:
            run = rebuild_run(client, adapter_id, Path(tmp) / "run", data=data)
            from privlora.audit.runner import audit_run  # torch and diffusers: only once there is a run to audit

            results = audit_run(run, attacks=tuple(attacks), extraction=extraction, seed=seed, quiet=quiet)
        except RegistryRefusal:
            raise  # not allowed (e.g. not an auditor) or gone: nothing to attach
        except UserError as e:
            client.post(f"/incidents/{incident_id}/report", {"status": "not_audited", "report": {"reason": str(e)}})
            raise UserError(f"incident {incident_id} stays open, its adapter could not be re-audited: {e}") from None
    results["run"] = f"registry:{adapter_id}"
    results["incident"] = incident_id
    client.post(f"/incidents/{incident_id}/report", {"status": "audited", "report": results})
    return results


def summary_lines(report: dict[str, Any]) -> list[str]:
    """An attached report in a few lines: each attack's AUC against the base control, then extraction."""
    if "attacks" not in report:
        return [f"not audited: {report.get('reason', '?')}"]
    lines = []
    for name, result in report["attacks"].items():
        adapter, base = result["adapter"].get("auc"), result["base_control"].get("auc")
        lines.append(f"{name:<6} AUC {adapter:.3f} (base model {base:.3f}; {report['members']} members vs "
                     f"{report['nonmembers']} held out)")
    extraction = report.get("extraction")
    if extraction:
        lines.append(f"extraction: {extraction['extracted']}/{extraction['generated']} generations copy a member "
                     f"(base model {extraction['base_extracted']}); latent probe AUC "
                     f"{extraction['latent_probe_auc']:.3f} (base {extraction['base_latent_probe_auc']:.3f})")
    return lines
