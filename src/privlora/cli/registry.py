"""The ``registry`` group and its ``users``, ``dataset`` and ``generation`` subgroups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from privlora.cli.choices import DATASET_KINDS, EXPORT_FORMATS, ROLES
from privlora.cli.common import REG_TOKEN, REG_URL, choice, group, names, one_line_errors, registry_client
from privlora.errors import UserError

registry_app = group(help="Governed adapter registry: content-addressed adapters, roles enforced on every call, "
                     "export approvals, a hash-chained action log.")
dataset_app = group(help="Dataset versions: sanitized (researchers and auditors read) or full (auditors only).")
registry_app.add_typer(dataset_app, name="dataset")
generation_app = group(help="Generation logs: full for researchers and auditors, metadata only (no prompt, no "
                       "image) for engineers.")
registry_app.add_typer(generation_app, name="generation")


def _echo_json(value: Any) -> None:
    import json

    typer.echo(json.dumps(value, indent=2, default=str))


@registry_app.command("init")
@one_line_errors
def registry_init(
    root: Path = typer.Option(Path("registry"), help="Folder for registry.db and the adapter blobs."),
    admin: str = typer.Option(..., help="Name of the first admin (manages users only, reads no data)."),
    db: str = typer.Option(None, help="SQLAlchemy URL instead of root/registry.db (e.g. "
                           "postgresql+psycopg://user@host/db); give `serve` the same."),
    log_key: Path = typer.Option(None, "--log-key", envvar="PRIVLORA_REGISTRY_LOG_KEY", show_envvar=False,
                                 help="Ed25519 key signing the log's checkpoints (created 0600 if absent; default "
                                 "root/log-signing.key). Keep it off the database host; give `serve` the same."),
    token_days: float = typer.Option(30.0, "--token-days", help="Lifetime of the admin's token (days)."),
) -> None:
    """Create a registry and its first admin; prints the admin's token once (stored hashed)."""
    from privlora.registry.service import Refused, Registry

    try:
        token = Registry(root, url=db, log_key=log_key, token_days=token_days).bootstrap_admin(admin)
    except Refused as e:
        raise UserError(e.message) from None
    typer.echo(token)


@registry_app.command("serve")
@one_line_errors
def registry_serve(
    root: Path = typer.Option(Path("registry"), help="Folder of `registry init`."),
    db: str = typer.Option(None, help="SQLAlchemy URL instead of root/registry.db (e.g. "
                           "postgresql+psycopg://user@host/db); blobs stay under --root."),
    host: str = typer.Option("127.0.0.1", help="Interface (put TLS in front for other machines)."),
    port: int = typer.Option(8770, help="TCP port."),
    max_auc_gain: float = typer.Option(0.05, "--max-auc-gain", help="Export policy: largest rise of an attack's "
                                       "AUC over the base model (the audit's control) in the latest audit."),
    max_auc: float = typer.Option(None, "--max-auc", help="Export policy, optional: largest attack AUC itself."),
    max_epsilon: float = typer.Option(10.0, "--max-epsilon", help="Export policy: largest ε in privacy.json."),
    max_body_mb: float = typer.Option(64.0, "--max-body-mb", help="Largest request body (MiB); larger get 413."),
    log_key: Path = typer.Option(None, "--log-key", envvar="PRIVLORA_REGISTRY_LOG_KEY", show_envvar=False,
                                 help="Ed25519 key signing the log's checkpoints (default root/log-signing.key)."),
    token_days: float = typer.Option(30.0, "--token-days", help="Default lifetime of new tokens (days)."),
    audit_attacks: str = typer.Option("loss", "--audit-attacks", help="Attacks of the registry's own audit of an "
                                      "adapter before its first export ('' = only auditors' audits count)."),
    audit_data: list[Path] = typer.Option([], "--audit-data", help="A folder the registry's own audit may read a "
                                          "pushed run's data or base from (repeatable); built-in demo data and "
                                          "bases are always allowed, nothing else is."),
) -> None:
    """Serve the registry; every call but /health and /openapi.json needs a token."""
    import socket

    import uvicorn

    from privlora.registry.server import create_app
    from privlora.registry.service import ExportPolicy, Registry

    if not (root / "registry.db").exists() and db is None:
        raise UserError(f"{root} holds no registry: run `privlora registry init --root {root} --admin NAME`")
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    registry = Registry(root, url=db, policy=ExportPolicy(max_auc_gain, max_auc, max_epsilon), log_key=log_key,
                        token_days=token_days, audit_attacks=names(audit_attacks) if audit_attacks else (),
                        audit_data=tuple(audit_data))
    typer.echo(f"registry on http://{host}:{port} ({root})", err=True)
    uvicorn.run(create_app(registry, max_body=int(max_body_mb * 2**20)), host=host, port=port, log_level="warning",
                access_log=False)


@registry_app.command("push")
@one_line_errors
def registry_push(adapter: Path = typer.Argument(..., help="Run or adapter folder (safetensors)."),
                  name: str = typer.Option(None, help="Name (default: the run folder's)."),
                  url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Store an adapter with its privacy.json, audit results and (from a run folder) the config.yaml and
    splits.json a re-audit needs; prints its id (sha256). Refused if unsafe (pickle, malformed header, shapes
    that do not fit its base)."""
    result = registry_client(url, token).push(adapter, name)
    typer.echo(result["id"])
    for warning in result.get("warnings", []):
        typer.echo(f"warning: {warning}", err=True)
    if not result.get("base_checked", True):
        typer.echo("note: the adapter's base is not one this registry holds; shapes were checked for structure "
                   "only", err=True)
    if "files" in result and "splits.json" not in result["files"]:
        typer.echo("note: pushed without the run's config.yaml/splits.json: an incident cannot re-audit it "
                   "(push the run folder)", err=True)


@registry_app.command("list")
@one_line_errors
def registry_list(url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Adapters: id, name, owner, quarantine."""
    for a in registry_client(url, token).get("/adapters"):
        typer.echo(f"{a['id'][:16]}  {a['name']:<24} {a['owner']:<12} {'QUARANTINED' if a['quarantined'] else ''}")


@registry_app.command("show")
@one_line_errors
def registry_show(adapter_id: str, url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """One adapter's record: config, privacy, latest audit, open incidents."""
    _echo_json(registry_client(url, token).get(f"/adapters/{adapter_id}"))


@registry_app.command("pull")
@one_line_errors
def registry_pull(adapter_id: str, out: Path = typer.Option(..., help="File to write (safetensors)."),
                  fmt: str = typer.Option("peft", "--format", click_type=choice(EXPORT_FORMATS),
                                          help="peft (the stored file) | diffusers | kohya (converted by the "
                                          "registry, as `privlora export` does)."),
                  url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Download an adapter's weights (auditors only while it is quarantined)."""
    query = "" if fmt == "peft" else f"?format={fmt}"
    typer.echo(f"wrote {registry_client(url, token).download(f'/adapters/{adapter_id}/weights{query}', out)}")


@registry_app.command("export")
@one_line_errors
def registry_export(adapter_id: str = typer.Argument(None, help="Adapter to request an export of."),
                    download: int = typer.Option(None, help="Download an approved export by its number."),
                    out: Path = typer.Option(None, help="File for --download."),
                    fmt: str = typer.Option("peft", "--format", click_type=choice(EXPORT_FORMATS),
                                            help="--download as peft (the stored file) | diffusers | kohya."),
                    url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Request an export (someone else must approve it), or download an approved one."""
    client = registry_client(url, token)
    if download is not None:
        if out is None:
            raise UserError("--download needs --out FILE")
        query = "" if fmt == "peft" else f"?format={fmt}"
        typer.echo(f"wrote {client.download(f'/exports/{download}/download{query}', out)}")
    elif adapter_id:
        typer.echo(f"export request {client.post('/exports', {'adapter': adapter_id})['export']}")
    else:
        raise UserError("give an adapter id to request an export, or --download N --out FILE")


@registry_app.command("approve")
@one_line_errors
def registry_approve(export_id: int, url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Approve an export request (not your own; the adapter's latest audit must meet the policy)."""
    result = registry_client(url, token).post(f"/exports/{export_id}/approve")
    typer.echo(f"export {result['export']} approved by {result['approver']}")


users_app = typer.Typer(help="Users (admins only): list, add (`--add NAME`), `revoke NAME`.")
registry_app.add_typer(users_app, name="users")


@users_app.callback(invoke_without_command=True)
@one_line_errors
def registry_users(ctx: typer.Context,
                   add: str = typer.Option(None, help="Add a user with this name (admin); prints its token."),
                   role: str = typer.Option("researcher", click_type=choice(ROLES),
                                            help="researcher | engineer | auditor | admin."),
                   expires_days: float = typer.Option(None, "--expires-days", help="Lifetime of the new token in "
                                                      "days (default: the server's --token-days)."),
                   url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """List users, or add one (admins only)."""
    import datetime

    if ctx.invoked_subcommand is not None:
        return
    client = registry_client(url, token)
    if add:
        body: dict[str, Any] = {"name": add, "role": role}
        if expires_days is not None:
            body["expires_days"] = expires_days
        typer.echo(client.post("/users", body)["token"])
    else:
        for u in client.get("/users"):
            state = "revoked" if u.get("revoked") else "expires " + (datetime.datetime.fromtimestamp(
                u["expires"], tz=datetime.UTC).strftime("%Y-%m-%d") if u.get("expires") else "(legacy token)")
            typer.echo(f"{u['name']:<16} {u['role']:<11} {state}")


@users_app.command("revoke")
@one_line_errors
def registry_users_revoke(name: str = typer.Argument(..., help="User whose token stops working now."),
                          url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Revoke a user's token (admins only): every later call with it is refused (401)."""
    registry_client(url, token).post(f"/users/{name}/revoke")
    typer.echo(f"revoked {name}'s token")


@registry_app.command("log")
@one_line_errors
def registry_log(url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """The action log (auditors): who, what, when, result."""
    import datetime

    for e in registry_client(url, token).get("/log"):
        when = datetime.datetime.fromtimestamp(e["time"], tz=datetime.UTC).isoformat(timespec="seconds")
        typer.echo(f"{e['seq']:>5} {when} {e['actor']:<12} {e['action']:<22} {e['target'][:20]:<20} {e['result']}")


@registry_app.command("verify-log")
@one_line_errors
def registry_verify_log(expect_head: str = typer.Option(None, "--expect-head", help="A head printed earlier and "
                                                      "published elsewhere: it must still be in the log."),
                        url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Recompute the hash chain and check the latest signed checkpoint; exit 1 if any entry was edited, removed
    or moved, entries were cut off or the log rewritten (the signed head is gone), or, with --expect-head, the
    published head is no entry of the log. Publish the printed head."""
    params = {"expect_head": expect_head} if expect_head else None
    result = registry_client(url, token).get("/log/verify", params=params)
    if result["intact"]:
        signed = result.get("checkpoint")
        typer.echo(f"log intact; head {result['head']}"
                   + (f"; signed checkpoint at entry {signed['count']} verified" if signed else "")
                   + (" (published head found)" if expect_head else ""))
        return
    for p in result["problems"]:
        typer.echo(f"entry {p['seq']}: {p['message']}", err=True)
    raise typer.Exit(1)


@dataset_app.command("push")
@one_line_errors
def registry_dataset_push(path: Path = typer.Argument(..., help="A data file, or a folder (uploaded as a tar)."),
                          kind: str = typer.Option(..., click_type=choice(DATASET_KINDS),
                                                   help="sanitized (the output of `privlora sanitize`) | "
                                                   "full (auditors only may read it)."),
                          name: str = typer.Option(None, help="Name (default: the file or folder name)."),
                          url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Upload a dataset version (researchers); prints its id (sha256 of the bytes)."""
    typer.echo(registry_client(url, token).push_dataset(path, name=name, kind=kind)["id"])


@dataset_app.command("list")
@one_line_errors
def registry_dataset_list(url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """The dataset versions you may read: id, name, kind, owner."""
    for d in registry_client(url, token).get("/datasets"):
        typer.echo(f"{d['id'][:16]}  {d['name']:<24} {d['kind']:<10} {d['owner']:<12} {d.get('format') or 'file'}")


@dataset_app.command("pull")
@one_line_errors
def registry_dataset_pull(dataset_id: str = typer.Argument(..., help="Dataset id (from `dataset list`)."),
                          out: Path = typer.Option(..., help="File to write, or a new folder for a pushed folder."),
                          url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Download a dataset version (sanitized: researchers and auditors; full: auditors)."""
    typer.echo(f"wrote {registry_client(url, token).pull_dataset(dataset_id, out)}")


@generation_app.command("log")
@one_line_errors
def registry_generation_log(adapter: str = typer.Option(..., "--adapter", help="Adapter id that generated."),
                            prompt: str = typer.Option(..., help="The prompt (content: hidden from engineers)."),
                            image: Path = typer.Option(None, help="The generated image (stored by its sha256)."),
                            param: list[str] = typer.Option([], "--param", help="Metadata KEY=VALUE (seed, steps, "
                                                            "…); repeatable."),
                            url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Record one generation (researchers, engineers); prints its number."""
    from privlora.config import parse_assignment

    params = dict(parse_assignment(p) for p in param)
    result = registry_client(url, token).log_generation(adapter=adapter, prompt=prompt, params=params, image=image)
    typer.echo(f"generation {result['generation']}")


@generation_app.command("list")
@one_line_errors
def registry_generation_list(url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Generation logs: number, adapter, who, metadata — and prompt and image hash for full readers."""
    import json

    for g in registry_client(url, token).get("/generations"):
        line = f"{g['id']:>5} {g['adapter'][:16]}  {g['actor']:<12} {json.dumps(g['params'], sort_keys=True)}"
        if "prompt" in g:
            line += f"  prompt={g['prompt']!r} image={(g['image_sha256'] or '-')[:16]}"
        typer.echo(line)
