"""Who may do what: the seed's access table as data, decided in one place.

| role | adapters | training data | generation logs | export |
|---|---|---|---|---|
| researcher | read/write | sanitized version only | full | needs approval |
| engineer | read only | none | partial (metadata, no prompts or images) | forbidden |
| auditor | read only | full | full | forbidden |
| admin | — (manages users only, reads no data) | — | — | — |

Decisions the table leaves open, made here: an export is *requested* by a researcher and *approved* by a
researcher or an auditor who is not the requester; a quarantined adapter can be pulled by auditors only;
incidents are opened and read by researchers or auditors, closed by auditors, and only auditors attach a
re-audit report (they alone may pull a quarantined adapter and read the full data it needs); a run's
splits.json (which records were trained on) is read like sanitized training data; the action log is read by auditors;
researchers upload dataset versions (a researcher may upload a full version it cannot read back);
researchers and engineers (who serve the adapters) append generation logs; only auditors attach an audit
to an adapter outside an incident (the pusher's own audit is a claim the export policy never reads).
Every endpoint asks :func:`decide`, which never raises: denials carry a reason for the log and the 403.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("researcher", "engineer", "auditor", "admin")

#: role → resource → actions. Actions: adapters read/write/audit (attach an audit: auditors);
#: training_data read_sanitized/read_full/write;
#: generation_logs read_metadata/read_full/write; export request/approve; users manage; incidents
#: open/read/close/report; log read.
TABLE: dict[str, dict[str, frozenset[str]]] = {
    "researcher": {"adapters": frozenset({"read", "write"}),
                   "training_data": frozenset({"read_sanitized", "write"}),
                   "generation_logs": frozenset({"read_metadata", "read_full", "write"}),
                   "export": frozenset({"request", "approve"}), "incidents": frozenset({"open", "read"})},
    "engineer": {"adapters": frozenset({"read"}), "generation_logs": frozenset({"read_metadata", "write"})},
    "auditor": {"adapters": frozenset({"read", "audit"}), "training_data": frozenset({"read_sanitized", "read_full"}),
                "generation_logs": frozenset({"read_metadata", "read_full"}), "export": frozenset({"approve"}),
                "incidents": frozenset({"open", "read", "close", "report"}), "log": frozenset({"read"})},
    "admin": {"users": frozenset({"manage"})},
}
RESOURCES = ("adapters", "training_data", "generation_logs", "export", "users", "incidents", "log")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


def decide(role: str, resource: str, action: str, *, quarantined: bool = False, actor: str | None = None,
           requester: str | None = None) -> Decision:
    """Allow or deny one action; ``quarantined`` (adapter under an incident) and the requester of an export
    (who may not approve it) are the two conditions beyond the table."""
    if role not in TABLE:
        return Decision(False, f"unknown role {role!r}")
    if resource not in RESOURCES:
        return Decision(False, f"unknown resource {resource!r}")
    if action not in TABLE[role].get(resource, frozenset()):
        return Decision(False, f"role {role} may not {action} {resource}")
    if quarantined and resource == "adapters" and role != "auditor":
        return Decision(False, "adapter is quarantined (incident open): auditors only")
    if resource == "export" and action == "approve" and actor is not None and actor == requester:
        return Decision(False, "an export must be approved by someone other than its requester")
    return Decision(True, "allowed")
