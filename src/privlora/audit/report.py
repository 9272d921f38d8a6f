"""The audit report: one self-contained ``report.html`` (plots and images inlined) and a terminal table.

Everything shown is read back from the runs' ``audit/`` folders (``results.json``, ``scores.csv``,
optional ``extraction.json`` / gallery / ``canary.json``), so a report can be rebuilt at any time
without re-running an attack, and every figure in it can be traced to a file an auditor can check.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import shlex
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privlora.audit.metrics import sweep
from privlora.audit.provenance import adapter_sha256, privlora_version
from privlora.registry.policy import ExportPolicy, attack_aucs, auc_gain, strongest_attack
from privlora.runs import atomic_file


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def run_label(results: dict[str, Any]) -> str:
    return f"{Path(results['run']).name} ({results['mode']})"


def _epsilon(results: dict[str, Any]) -> str:
    eps = results.get("epsilon")
    return "∞ (no DP)" if eps is None else f"{eps:.2f}"


def table_rows(all_results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per run and attack, adapter figures beside the base-model control."""
    header = ["run", "mode", "ε", "held-out loss", "attack", "AUC [95% CI]", "base AUC [95% CI]",
              "TPR@1%FPR", "bal. acc.", "ε lower bd"]
    rows = []
    for r in all_results:
        first = True
        for name, a in r["attacks"].items():
            ad, bc = a["adapter"], a["base_control"]
            rows.append([Path(r["run"]).name if first else "", r["mode"] if first else "",
                         _epsilon(r) if first else "", _fmt((r.get("utility") or {}).get("loss_heldout"), 4)
                         if first else "", name,
                         f"{ad['auc']:.3f} [{ad['auc_ci_low']:.2f}, {ad['auc_ci_high']:.2f}]",
                         f"{bc['auc']:.3f} [{bc['auc_ci_low']:.2f}, {bc['auc_ci_high']:.2f}]",
                         _fmt(ad.get("tpr_at_0.01_fpr")), _fmt(ad["balanced_accuracy"]),
                         _fmt(ad["epsilon_lower_bound"], 2)])
            first = False
    return header, rows


def print_table(all_results: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    header, rows = table_rows(all_results)
    table = Table(title="privlora audit — members vs evaluation non-members (base model = control)")
    for h in header:
        table.add_column(h, justify="left" if h in ("run", "mode", "attack") else "right")
    for row in rows:
        table.add_row(*row)
    console = Console(width=160)
    console.print(table)
    for r in all_results:
        v = verdict(r)
        console.print(Text.assemble(f"{Path(r['run']).name}: ", (v.line, "green" if v.passed else "bold red")))
    if any(ad["adapter"].get("tpr_at_0.01_fpr") is None for r in all_results for ad in r["attacks"].values()):
        print("TPR@1%FPR is n/a where there are fewer than 100 evaluation non-members (an FPR of 1% cannot "
              "be measured on fewer); the ROC curves in the report show the low-FPR region that can.")


# --- plots -------------------------------------------------------------------------------------------
def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _read_scores(run: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    with (run / "audit" / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    labels = np.array([int(r["member"]) for r in rows])
    columns = {k: np.array([float(r[k]) for r in rows]) for k in rows[0] if k not in ("id", "member")}
    return labels, columns


def _roc_groups(results: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Attacks per plot: reference-free ones together, reference-calibrated ones (LiRA, RMIA) apart, so a
    plot holds at most a handful of curve pairs and stays legible."""
    from privlora.audit.runner import REFERENCE_ATTACKS

    groups = (("reference-free attacks", [a for a in results["attacks"] if a not in REFERENCE_ATTACKS]),
              ("reference-adapter attacks", [a for a in results["attacks"] if a in REFERENCE_ATTACKS]))
    return [(title, names) for title, names in groups if names]


def roc_figure(results: dict[str, Any], attacks: list[str] | None = None, title: str = "") -> str:
    """ROC curves on log-log axes (low FPR is what matters, Carlini et al. 2022), control dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    labels, columns = _read_scores(Path(results["run"]))
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    floor = 0.5 / max(1, int((labels == 0).sum()))
    for i, name in enumerate(attacks or list(results["attacks"])):
        color, a = f"C{i}", results["attacks"][name]
        for suffix, style in (("", "-"), ("_base", ":")):
            s = sweep(columns[name + suffix], labels)
            ax.step(np.maximum(s.fpr, floor), np.maximum(s.tpr, floor), style, color=color, where="post",
                    label=(f"{name}: AUC {a['adapter']['auc']:.2f} (control {a['base_control']['auc']:.2f})"
                           if not suffix else None))
    ax.plot([floor, 1], [floor, 1], color="grey", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1.05)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{run_label(results)}{': ' + title if title else ''}", fontsize=9)
    handles, names = ax.get_legend_handles_labels()
    styles = [Line2D([], [], color="k", ls="-", label="solid: adapter"),
              Line2D([], [], color="k", ls=":", label="dotted: base-model control")]
    ax.legend(handles=[*handles, *styles], labels=[*names, *(h.get_label() for h in styles)], fontsize=7,
              loc="lower right")
    return _png(fig)


def roc_figures(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, image) per attack group of one run."""
    return [(title, roc_figure(results, names, title)) for title, names in _roc_groups(results)]


def _strongest(results: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    name = max(results["attacks"], key=lambda a: results["attacks"][a]["adapter"]["auc"])
    return name, results["attacks"][name]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (loss, AUC) that no other point beats in both (lower loss and lower AUC), by loss."""
    front: list[tuple[float, float]] = []
    for loss, auc_value in sorted(points):
        if not front or auc_value < front[-1][1]:
            front.append((loss, auc_value))
    return front


def frontier_figure(all_results: list[dict[str, Any]]) -> str | None:
    """Privacy–utility frontier: strongest attack's AUC (and base control) against held-out loss."""
    points = [(r, (r.get("utility") or {}).get("loss_heldout")) for r in all_results]
    points = [(r, u) for r, u in points if u is not None]
    if len(points) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    front = pareto_front([(u, _strongest(r)[1]["adapter"]["auc"]) for r, u in points])
    ax.plot(*zip(*front, strict=True), color="tab:green", lw=1, ls="--", label="frontier (no run better in both)")
    for r, u in points:
        best = max(r["attacks"], key=lambda a: r["attacks"][a]["adapter"]["auc"])
        a = r["attacks"][best]["adapter"]
        ax.errorbar([u], [a["auc"]], yerr=[[a["auc"] - a["auc_ci_low"]], [a["auc_ci_high"] - a["auc"]]],
                    fmt="o", capsize=3)
        ax.annotate(f"{Path(r['run']).name}\n({best})", (u, a["auc"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
        b = r["attacks"][best]["base_control"]
        ax.axhspan(b["auc_ci_low"], b["auc_ci_high"], color="grey", alpha=0.08)
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_xlabel("held-out denoising loss (lower = better utility)")
    ax.set_ylabel("strongest attack's AUC (lower = more private)")
    ax.set_title("privacy–utility frontier (grey: base-model control intervals)", fontsize=9)
    return _png(fig)


# --- verdict and provenance --------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """The export policy's decision on one run's audit, with the figures it was decided on."""

    passed: bool
    line: str  # "PASS — strongest attack …" as shown in the report and the terminal


def _low_fpr_tpr(attack: dict[str, Any]) -> str:
    """TPR at the lowest FPR the non-members could resolve, beside the control's."""
    measured = sorted((float(k.removeprefix("tpr_at_").removesuffix("_fpr")), k)
                      for k, v in attack["adapter"].items()
                      if k.startswith("tpr_at_") and k.endswith("_fpr") and v is not None)
    if not measured:
        return "TPR at low FPR n/a (too few non-members to measure a 1% FPR)"
    fpr, key = measured[0]
    control = (attack.get("base_control") or {}).get(key)
    return (f"TPR@{fpr * 100:g}%FPR {attack['adapter'][key] * 100:.1f}%"
            + (f" (control {control * 100:.1f}%)" if control is not None else ""))


def verdict(results: dict[str, Any], policy: ExportPolicy = ExportPolicy()) -> Verdict:
    """PASS/FAIL by the registry's own export rule (:class:`~privlora.registry.policy.ExportPolicy`) on this
    audit and the run's recorded ε, with the strongest attack's numbers so the decision can be checked."""
    aucs = attack_aucs(results)
    name = strongest_attack(aucs)
    if name is None:
        return Verdict(False, "FAIL — no attack AUCs in this audit")
    auc, base = aucs[name]
    gain = auc_gain(auc, base)
    why = policy.attack_violation(aucs) or policy.epsilon_violation(results.get("epsilon"),
                                                                    source="as the run's privacy.json records it")
    control = "chance" if base is None else f"control {base:.3f}"
    bound = ("" if policy.max_auc_gain is None else
             f" {'≤' if gain <= policy.max_auc_gain + 1e-9 else '>'} +{policy.max_auc_gain:g}")
    line = (f"{'FAIL' if why else 'PASS'} — strongest attack {name}: AUC {auc:.3f} vs {control} "
            f"({gain:+.3f}{bound}); {_low_fpr_tpr(results['attacks'][name])}")
    if why and not why.startswith(f"attack {name}: AUC {auc:.3f} is"):  # another bound failed: say which
        line += f" — {why}"
    return Verdict(why is None, line)


def provenance_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """What the audit recorded about itself, and whether the adapter on disk is still the audited one."""
    recorded = results.get("provenance") or {}
    now = adapter_sha256(Path(results["run"]))
    was = recorded.get("adapter_sha256")
    if now is None:
        check = "adapter weights not found in the run directory"
    elif was is None:
        check = "not recorded at audit time"
    else:
        check = "matches the audited adapter" if now == was else f"DIFFERS from the audited adapter ({was})"
    argv = recorded.get("argv")
    return [("adapter sha256", f"{now or 'n/a'} — {check}"),
            ("privlora", f"{recorded.get('privlora', 'not recorded')} (audit), {privlora_version()} (this report)"),
            ("command line", shlex.join(argv) if argv else "not recorded"),
            ("audited at", recorded.get("date") or "not recorded")]


# --- HTML ----------------------------------------------------------------------------------------------
MIN_IMAGE_PX = 256  # sample grids and galleries are shown at least this wide, scaled by whole pixels


def _image(path: Path) -> dict[str, Any] | None:
    """An inlined PNG and the width to show it at: small grids are enlarged by an integer factor."""
    if not path.exists():
        return None
    data = path.read_bytes()
    width = struct.unpack(">I", data[16:20])[0] if data[:8] == b"\x89PNG\r\n\x1a\n" else MIN_IMAGE_PX
    return {"src": "data:image/png;base64," + base64.b64encode(data).decode(),
            "width": width * max(1, math.ceil(MIN_IMAGE_PX / max(1, width)))}


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _text(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def _card(r: dict[str, Any], policy: ExportPolicy) -> dict[str, Any]:
    """Everything the template shows for one run, read from its directory."""
    run = Path(r["run"])
    audit = run / "audit"
    refs = r.get("references")
    return {"label": run_label(r), "name": run.name, "verdict": verdict(r, policy),
            "epsilon": _epsilon(r), "delta": _fmt(r.get("delta")), "members": r["members"],
            "nonmembers": r["nonmembers"],
            "refs": (f"{refs['k']} reference adapters ({refs['directory']})" if refs else
                     "no reference adapters (LiRA/RMIA off; use --references K)"),
            "rocs": roc_figures(r), "provenance": provenance_rows(r),
            "extraction": _read_json(audit / "extraction.json"), "gallery": _image(audit / "extraction_gallery.png"),
            "canary": _read_json(audit / "canary.json"), "samples": _image(run / "samples.png"),
            "exposure": r.get("canary_exposure"),  # causal-lm: secret-sharer canaries (results.json)
            "prompting": e if isinstance(e := r.get("extraction"), dict) and e.get("kind") == "prompting" else None,
            "config": _text(run / "config.yaml"), "privacy": _text(run / "privacy.json")}


def _template() -> Any:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    return env.get_template("report.html.j2")


def write_report(all_results: list[dict[str, Any]], path: Path, *, extra_images: dict[str, str] | None = None,
                 policy: ExportPolicy = ExportPolicy()) -> Path:
    """Write the self-contained HTML report (atomically) and return its path."""
    header, rows = table_rows(all_results)
    doc = _template().render(header=header, rows=rows, frontier=frontier_figure(all_results),
                             extra_images=extra_images or {}, cards=[_card(r, policy) for r in all_results],
                             policy=policy)
    with atomic_file(path) as tmp:
        tmp.write_text(doc)
    return Path(path)
