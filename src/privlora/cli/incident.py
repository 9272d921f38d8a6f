"""The ``incident`` group: quarantine, re-audit and close incidents on registered adapters."""

from __future__ import annotations

from typing import Any

import typer

from privlora.cli.common import QUIET, REG_TOKEN, REG_URL, group, names, one_line_errors, registry_client
from privlora.errors import UserError

incident_app = group(help="Incident response: quarantine an adapter, re-audit it (membership + extraction), "
                     "attach the report, close with a resolution.")
REAUDIT_ATTACKS = typer.Option("loss,pia", "--attacks", help="Membership attacks of the re-audit (privlora audit's "
                               "names).")
REAUDIT_EXTRACTION = typer.Option(64, "--extraction", help="Generations for the extraction check (0: none).")
REAUDIT_DATA = typer.Option(None, "--data", help="Your copy of the full training data, if not at the source the "
                            "run's config names.")


def _reaudit(client: Any, incident: int, attacks: str, extraction: int, data: str | None, seed: int,
             quiet: bool) -> None:
    from privlora.registry.client import RegistryRefusal
    from privlora.registry.reaudit import reaudit_incident, summary_lines

    try:
        report = reaudit_incident(client, incident, attacks=names(attacks), extraction=extraction,
                                  data=data, seed=seed, quiet=quiet)
    except RegistryRefusal as e:
        if e.status != 403:
            raise
        raise UserError(f"incident {incident} stays open; the re-audit needs an auditor (`privlora incident audit "
                        f"{incident}` with an auditor's token): {e}") from None
    typer.echo(f"re-audit attached to incident {incident} (now the adapter's latest audit):")
    for line in summary_lines(report):
        typer.echo(f"  {line}")


@incident_app.command("open")
@one_line_errors
def incident_open(adapter: str = typer.Option(..., "--adapter", help="Adapter id."),
                  reason: str = typer.Option(..., help="What happened."),
                  reaudit: bool = typer.Option(True, "--reaudit/--no-reaudit", help="Re-run the audit (auditors: "
                                               "they alone may pull the quarantined adapter and read full data)."),
                  attacks: str = REAUDIT_ATTACKS, extraction: int = REAUDIT_EXTRACTION, data: str = REAUDIT_DATA,
                  seed: int = typer.Option(0, help="Seed of the re-audit."),
                  quiet: bool = QUIET,
                  url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Quarantine an adapter (only auditors can pull it), record the incident, re-audit the adapter
    (membership attacks + extraction, against the base as control) and attach the report."""
    client = registry_client(url, token)
    result = client.post("/incidents", {"adapter": adapter, "reason": reason})
    typer.echo(f"incident {result['incident']} open; adapter {adapter[:16]} quarantined")
    if reaudit:
        _reaudit(client, result["incident"], attacks, extraction, data, seed, quiet)


@incident_app.command("audit")
@one_line_errors
def incident_audit(incident: int = typer.Argument(..., help="Incident number."),
                   attacks: str = REAUDIT_ATTACKS, extraction: int = REAUDIT_EXTRACTION, data: str = REAUDIT_DATA,
                   seed: int = typer.Option(0, help="Seed of the re-audit."),
                   quiet: bool = QUIET,
                   url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Re-audit an open incident's adapter and attach the report (auditors), e.g. for an incident a
    researcher opened."""
    _reaudit(registry_client(url, token), incident, attacks, extraction, data, seed, quiet)


@incident_app.command("show")
@one_line_errors
def incident_show(incident: int = typer.Argument(..., help="Incident number."),
                  url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """An incident: adapter, reason, who opened/closed it, and every report attached to it."""
    import datetime

    from privlora.registry.reaudit import summary_lines

    def when(t: float) -> str:
        return datetime.datetime.fromtimestamp(t, tz=datetime.UTC).isoformat(timespec="seconds")

    i = registry_client(url, token).get(f"/incidents/{incident}")
    typer.echo(f"incident {i['id']} on adapter {i['adapter']}: {'closed' if i['closed'] else 'OPEN'}")
    typer.echo(f"  opened by {i['opened_by']} at {when(i['opened'])}: {i['reason']}")
    if i["closed"]:
        typer.echo(f"  closed by {i['closed_by']} at {when(i['closed'])}: {i['resolution']}")
    if not i["reports"]:
        typer.echo("  no report attached (re-audit: `privlora incident audit N`)")
    for r in i["reports"]:
        typer.echo(f"  report {r['id']} by {r['by']} at {when(r['created'])} ({r['status']}):")
        for line in summary_lines(r["report"]):
            typer.echo(f"    {line}")


@incident_app.command("list")
@one_line_errors
def incident_list(url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Incidents: number, adapter, open/closed, reason."""
    for i in registry_client(url, token).get("/incidents"):
        typer.echo(f"{i['id']:>4} {i['adapter'][:16]}  {'closed' if i['closed'] else 'OPEN':<7} {i['reason'][:60]}")


@incident_app.command("close")
@one_line_errors
def incident_close(incident: int = typer.Argument(..., help="Incident number."),
                   resolution: str = typer.Option(..., help="How it was resolved (e.g. replaced by an unlearned "
                                                  "version)."),
                   url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Record the resolution; the quarantine lifts when no incident on the adapter stays open."""
    registry_client(url, token).post(f"/incidents/{incident}/close", {"resolution": resolution})
    typer.echo(f"incident {incident} closed")
