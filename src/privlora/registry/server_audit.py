"""The registry's own audit of an adapter it stores, so that the export policy decides on numbers the
registry measured rather than the ones the pusher uploaded (issue 18).

It rebuilds a run directory from the stored bytes (weights, adapter_config.json, the run's config.yaml and
splits.json, :func:`privlora.registry.reaudit.write_run`), runs :func:`privlora.audit.runner.audit_run` with a
few cheap attacks (default ``loss``: one forward per image against the base model as control; no
extraction), and returns results.json. It runs once per adapter, when an export is first approved (a push
stays fast; most adapters are never exported), and only when no auditor has attached an audit already.
The data and base are read from what the run's config names — the pusher's input, so the registry reads
only built-in data (``demo:…``) and bases (``embedded``, ``minilm``) or folders under the roots its operator
allowed (``serve --audit-data DIR``): a pushed config must not make the server read arbitrary files of its
own machine. When it cannot run, the export is refused with the reason.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from privlora.errors import UserError
from privlora.registry.store import Store

DEFAULT_ATTACKS = ("loss",)
BUILT_IN_BASES = ("embedded", "minilm")


def check_sources(config_yaml: str, allowed_roots: tuple[Path, ...]) -> None:
    """Refuse (UserError) a pushed config whose data or base is neither built in nor under an allowed root."""
    from privlora.config import safe_yaml

    config = safe_yaml(config_yaml) or {}
    data = config.get("data") if isinstance(config, dict) else None
    named = {"data": str((data or {}).get("source", "demo:faces")) if isinstance(data, dict) else "demo:faces",
             "base": str(config.get("base", "embedded")) if isinstance(config, dict) else "embedded"}
    roots = [r.resolve() for r in allowed_roots]
    for what, value in named.items():
        if value.startswith("demo:") or (what == "base" and value in BUILT_IN_BASES):
            continue
        path = Path(value).resolve()
        if not any(path == r or r in path.parents for r in roots):
            raise UserError(f"the run's {what} {value[:200]!r} is not built in and not under a folder the registry "
                            "may read for its own audit (serve --audit-data DIR); an auditor can audit it instead")


def audit_stored(store: Store, adapter: dict[str, Any], *, attacks: tuple[str, ...] = DEFAULT_ATTACKS,
                 seed: int = 0, data_roots: tuple[Path, ...] = ()) -> dict[str, Any]:
    """results.json of the registry's audit of ``adapter`` (a store row); UserError when it cannot run.
    ``data_roots``: the folders beside built-in data and bases that a pushed config may name."""
    from privlora.registry.reaudit import write_run

    files = store.adapter_files(adapter["id"])
    missing = [f for f in ("config.yaml", "splits.json") if f not in files]
    if missing:
        raise UserError(f"it was pushed without its run's {' and '.join(missing)} (push the run folder), and no "
                        "auditor has attached an audit")
    config_yaml = store.blob(files["config.yaml"], ".file").decode()
    check_sources(config_yaml, data_roots)
    with tempfile.TemporaryDirectory(prefix="privlora-registry-audit-") as tmp:
        run = write_run(Path(tmp) / "run", config_yaml=config_yaml,
                        splits_json=store.blob(files["splits.json"], ".file"), privacy=adapter["privacy"],
                        adapter_config=adapter["config"], weights=store.weights(adapter["id"]))
        from privlora.audit.runner import audit_run  # torch and diffusers: only when an audit runs

        try:
            results = audit_run(run, attacks=tuple(attacks), seed=seed, quiet=True)
        except UserError:
            raise
        except Exception as e:  # the config and base are the pusher's input: any failure is a refusal, not a 500
            raise UserError(f"the audit could not run on the pushed run ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    results["run"] = f"registry:{adapter['id']}"
    results["audited_by"] = "registry"
    return results
