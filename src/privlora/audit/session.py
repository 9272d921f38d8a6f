"""One ``privlora audit`` invocation: check every run first, audit each, then report and tabulate.

All runs are loaded and validated before any attack starts, so a bad run directory given last does
not waste the minutes spent on the first ones; references are trained once and shared.
"""

from __future__ import annotations

import base64
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from privlora.audit.kinds import AUDIT_KINDS
from privlora.audit.reference_pool import ReferencePool
from privlora.audit.references import ensure_references
from privlora.audit.report import print_table, write_report
from privlora.audit.runner import audit_run, check_request, load_run
from privlora.audit.spectrum import adapter_spectrum, spectrum_plot
from privlora.errors import UserError


def spectrum_image(runs: list[Path], adapters: list[Path] | None = None) -> str:
    """The adapters' singular-value spectra in one figure, as a data URI for the report (``adapters``: each
    run's audited adapter when it is not ``run/adapter``, e.g. a split run's top)."""
    spectra = {r.name: adapter_spectrum(a) for r, a in zip(runs, adapters or [r / "adapter" for r in runs],
                                                              strict=True)}
    with tempfile.TemporaryDirectory() as tmp:
        png = spectrum_plot(spectra, Path(tmp) / "spectrum.png")
        return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()


def sweep_runs(folder: Path) -> list[Path]:
    """Run directories directly inside ``folder`` (a config.yaml and an adapter), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--sweep folder {folder} does not exist")
    runs = sorted(d for d in folder.iterdir() if (d / "config.yaml").is_file() and (d / "adapter").is_dir())
    if not runs:
        raise UserError(f"--sweep folder {folder} holds no run directories (sub-folders with config.yaml and adapter/)")
    return runs


def default_report_path(runs: list[Path]) -> Path:
    if len(runs) == 1:
        return runs[0] / "audit" / "report.html"
    parents = {r.resolve().parent for r in runs}
    return (parents.pop() if len(parents) == 1 else Path.cwd()) / "report.html"


def audit_session(runs: list[Path], *, attacks: tuple[str, ...] | None, references: int, reference_dir: Path | None,
                  fprs: tuple[float, ...] | None, extraction: int, report: Path | None, seed: int, quiet: bool,
                  echo: Callable[[str], Any] = print, pool: ReferencePool | None = None,
                  client: str | None = None, pii: bool = False) -> list[dict[str, Any]]:
    runs = [Path(r) for r in runs]
    if len({r.resolve() for r in runs}) != len(runs):
        raise UserError("the same run directory is given twice")
    if extraction < 0:
        raise UserError(f"--extraction must be ≥ 0, got {extraction}")
    loaded = [load_run(r, tasks=tuple(AUDIT_KINDS), client=client) for r in runs]
    tasks = sorted({lr.kind_name for lr in loaded})
    if len(tasks) > 1:  # they would share reference adapters trained on one task's population
        raise UserError(f"audit runs of one task at a time (got {' and '.join(tasks)} runs)")
    for lr in loaded:
        check_request(lr, attacks, references=references, extraction=extraction, pii=pii)
    reference_dir = reference_dir or (runs[0] / "references")
    if references:
        # references model "a plain adapter trained on this image": take the recipe of a plain run when
        # there is one (a sweep sorts by name, so the first run may be DP or SMP), else of the first run
        recipe = next((lr for lr in loaded if lr.mode == "plain"), loaded[0])
        ensure_references(recipe.reference_config, [*recipe.members.ids, *recipe.held_out.ids], k=references,
                          directory=reference_dir, seed=seed, quiet=quiet, pool=pool)
    all_results = []
    for run, lr in zip(runs, loaded, strict=True):
        if not quiet:
            echo(f"auditing {run} ({len(lr.members)} members vs {len(lr.held_out)} evaluation non-members)")
        results = audit_run(run, attacks=attacks, references=references, reference_dir=reference_dir,
                            fprs=fprs, seed=seed, quiet=quiet, loaded=lr, extraction=extraction, pool=pool,
                            pii=pii)
        all_results.append(results)
    path = write_report(all_results, report or default_report_path(runs),
                        extra_images={"LoRA spectrum (ΔW = B·A per layer)": spectrum_image(
                             runs, [Path(lr.adapter_dir) for lr in loaded])})
    print_table(all_results)
    echo(f"report: {path}")
    for r in all_results:
        echo(f"scores: {Path(r['run']) / 'audit' / 'scores.csv'}")
    return all_results
