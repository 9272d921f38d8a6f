"""The audit report: one self-contained ``report.html`` (plots and images inlined) and a terminal table.

Everything shown is read back from the runs' ``audit/`` folders (``results.json``, ``scores.csv``,
optional ``extraction.json`` / gallery / ``canary.json``), so a report can be rebuilt at any time
without re-running an attack, and every figure in it can be traced to a file an auditor can check.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from privlora.audit.metrics import sweep
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

    header, rows = table_rows(all_results)
    table = Table(title="privlora audit — members vs evaluation non-members (base model = control)")
    for h in header:
        table.add_column(h, justify="left" if h in ("run", "mode", "attack") else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)
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


def roc_figure(results: dict[str, Any]) -> str:
    """ROC curves on log-log axes (low FPR is what matters, Carlini et al. 2022), control dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, columns = _read_scores(Path(results["run"]))
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    floor = 0.5 / max(1, int((labels == 0).sum()))
    for i, name in enumerate(results["attacks"]):
        color = f"C{i}"
        for suffix, style in (("", "-"), ("_base", ":")):
            s = sweep(columns[name + suffix], labels)
            ax.step(np.maximum(s.fpr, floor), np.maximum(s.tpr, floor), style, color=color, where="post",
                    label=f"{name} (AUC {results['attacks'][name]['adapter']['auc']:.2f})" if not suffix else None)
    ax.plot([floor, 1], [floor, 1], color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1.05)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{run_label(results)}: solid adapter, dotted base control", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


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


def _image(path: Path) -> str | None:
    if not path.exists():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


# --- HTML ----------------------------------------------------------------------------------------------
_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3}td.n{text-align:right}img{max-width:100%;border:1px solid #ddd;margin:4px}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #eee;padding:8px}
.note{color:#555;font-size:13px}"""


def _table_html(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class='n'>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _extras_html(run: Path) -> str:
    parts = []
    audit = run / "audit"
    extraction = audit / "extraction.json"
    if extraction.exists():
        e = json.loads(extraction.read_text())
        probe = e.get("latent_probe") or {}
        parts.append(f"<h4>Extraction</h4><p>{e.get('extracted', 'n/a')} of {e.get('generated', 'n/a')} "
                     f"generations are near-copies of a training image ({e.get('unique_extracted', 'n/a')} "
                     f"distinct images; base model on the same latents: {e.get('base_extracted', 'n/a')}). "
                     f"Latent probe AUC (members' closest generation nearer than non-members'): "
                     f"{_fmt((probe.get('adapter') or {}).get('auc'))}, base "
                     f"{_fmt((probe.get('base_control') or {}).get('auc'))}.</p>")
        gallery = _image(audit / "extraction_gallery.png")
        if gallery:
            parts.append(f"<p class='note'>closest generations (left) beside their nearest training image "
                         f"(right)</p><img alt='extraction gallery' src='{gallery}'>")
    canary = audit / "canary.json"
    if canary.exists():
        c = json.loads(canary.read_text())
        parts.append(f"<h4>Canary</h4><p>watermark detected in {c.get('detected', 'n/a')} of {c.get('n', 'n/a')} "
                     f"generations (rate {_fmt(c.get('detection_rate'))}) at z &gt; {_fmt(c.get('threshold'), 2)}; "
                     f"false positives on clean generations {_fmt(c.get('fpr_clean'))}, analytic "
                     f"{_fmt(c.get('fpr_analytic'), 4)}.</p>")
    samples = _image(run / "samples.png")
    if samples:
        parts.append(f"<h4>Samples</h4><img alt='samples' src='{samples}'>")
    return "".join(parts)


def _config_html(run: Path) -> str:
    """The exact config that produced the run (and its ε), folded away under the card."""
    config = run / "config.yaml"
    if not config.exists():
        return ""
    return (f"<details><summary>config.yaml (what ran)</summary><pre>{html.escape(config.read_text())}</pre>"
            "</details>")


def write_report(all_results: list[dict[str, Any]], path: Path, *, extra_images: dict[str, str] | None = None
                 ) -> Path:
    """Write the self-contained HTML report (atomically) and return its path."""
    header, rows = table_rows(all_results)
    sections = ["<h1>privlora audit report</h1><p class='note'>Members vs evaluation non-members of each run. "
                "Every attack is also run on the base model alone (adapter disabled) on the same images: "
                "that control shows how far the numbers move by chance or by image difficulty. "
                "Scores per image are in each run's <code>audit/scores.csv</code>.</p>",
                _table_html(header, rows)]
    frontier = frontier_figure(all_results)
    if frontier:
        sections.append(f"<h2>Privacy–utility frontier</h2><img alt='frontier' src='{frontier}'>")
    for name, src in (extra_images or {}).items():
        sections.append(f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' src='{src}'>")
    sections.append("<h2>Runs</h2><div class='grid'>")
    for r in all_results:
        run = Path(r["run"])
        refs = r.get("references")
        refs_line = (f"{refs['k']} reference adapters ({html.escape(refs['directory'])})" if refs else
                     "no reference adapters (LiRA/RMIA off; use --references K)")
        sections.append(f"<div class='card'><h3>{html.escape(run_label(r))}</h3>"
                        f"<p class='note'>ε = {html.escape(_epsilon(r))}, δ = {_fmt(r.get('delta'))}; "
                        f"{r['members']} members vs {r['nonmembers']} non-members; {refs_line}</p>"
                        f"<img alt='ROC {html.escape(run.name)}' src='{roc_figure(r)}'>{_extras_html(run)}"
                        f"{_config_html(run)}</div>")
    sections.append("</div>")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>privlora audit</title>"
           f"<style>{_CSS}</style></head><body>{''.join(sections)}</body></html>")
    with atomic_file(path) as tmp:
        tmp.write_text(doc)
    return Path(path)
