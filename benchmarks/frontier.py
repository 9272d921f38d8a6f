"""The privacy–utility frontier on the ID-card benchmark set: every private mode, audited by the strongest
attacks, in one resumable script.

Rows: plain LoRA at three stopping points, SMP-LoRA at three α with the paper's proxy attacker and with the
calibrated one, DP-LoRA at ε = 1, 3, 8 (δ = 1e-5), and plain LoRA with privacy-aware early stopping. Each
run is trained by :func:`privlora.train.loop.train` and audited by :func:`privlora.audit.runner.audit_run`
with every attack and K reference adapters (LiRA, RMIA). The references are trained once, with the recipe
of the longest plain run (audited first), and shared by every row with that adapter shape: they are the
attacker's models, and an attacker who does not know the defence trains them the plain way. The DP rows'
attention-only rank-4 LoRA gets its own references (plain mode, the DP rows' recipe), because references of
another shape are refused by the audit. Their signals are cached beside them, so
each row pays only for its own adapter's queries.

    python benchmarks/frontier.py [--profile cpu|full] [--only NAME ...] [--work DIR] [--device cpu|cuda]

``--profile full`` is the issue's scale (5,000 cards: 2,000 members, 1,000 aux, 2,000 evaluation
non-members; 8 references) and wants a GPU; ``--profile cpu`` (the default without CUDA) keeps the set at
2,500 cards (1,000 / 500 / 1,000 — still enough non-members to resolve TPR at 0.1 % FPR), recipes short
enough for a 2-core machine, 2 references and no SecMI (12 denoiser queries per image, the weakest attack
on the demo: it alone would double the audit). Interrupt it at any time: finished runs and audits are reused, an
interrupted training resumes from its checkpoint.

Hyperparameters were chosen without the private members' audit: the DP recipe (targets, rank, clip, lr,
batch) on demo:digits (benchmarks/results/frontier_dp_tuning.json), the stopping points and α as a fixed
grid. ``epsilon_lower_bound`` is the one-run audit of Steinke et al. 2023 applied to RMIA's scores (fixed
in advance, not the best attack after the fact) with the run's random member/non-member split as the
canaries' coin flips.

Writes benchmarks/results/frontier.json (a list of rows), benchmarks/results/frontier.md (the table) and
docs/img/frontier.png (strongest-attack AUC against held-out loss).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from privlora.audit.metrics import bootstrap_strongest_auc_gap
from privlora.audit.one_run import audit_bound
from privlora.audit.reference_pool import ReferencePool
from privlora.audit.runner import audit_run
from privlora.config import load_config
from privlora.runs import write_json_atomic
from privlora.train.loop import train

HERE = Path(__file__).parent
ROOT = HERE.parent
CONFIG = ROOT / "configs" / "frontier-idcards.yaml"
RESULTS = HERE / "results" / "frontier.json"
TABLE = HERE / "results" / "frontier.md"
DOMINANCE = HERE / "results" / "frontier_dominance.json"
PLOT = ROOT / "docs" / "img" / "frontier.png"
DELTA = 1e-5


@dataclass(frozen=True)
class Profile:
    """The scale of one sweep: how many cards, how long each recipe trains, how many references."""

    limit: int | None
    plain_steps: tuple[int, int, int]
    smp_steps: int
    dp_steps: int
    dp_batch: int
    references: int
    #: model-only attacks beside LiRA/RMIA (None: all of them)
    attacks: tuple[str, ...] | None = None
    smp_alphas: tuple[float, ...] = (0.5, 1.0, 2.0)
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    #: a longer DP run at ε = 8 (the same recipe, σ raised by the accountant): the noise arithmetic, not the
    #: members, says more steps help — Σ_t B/σ, the signal summed over the run against one step's noise,
    #: grows 2.8× from 150 to 600 steps at B = 64 on 1,000 members (σ 0.875 → 1.255)
    dp_long_steps: int | None = None
    #: a larger-batch DP run at ε = 8, same steps as dp_steps: (batch,). The noise arithmetic again, fixed
    #: before the run: at B = 256, 150 steps on 1,000 members σ = 2.19, so one step's signal-to-noise B/σ is
    #: 117 (B = 64: 73; 600 steps at B = 64: 51) and the run's √T·B/σ 1,432 (896; 1,249), for the samples
    #: of the 600-step run. With Adam, whose step scales with the per-step noise, B/σ is the figure that counts
    dp_large_batch: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


PROFILES = {
    "cpu": Profile(limit=2500, plain_steps=(100, 200, 400), smp_steps=200, dp_steps=150, dp_batch=64, dp_long_steps=600,
                   dp_large_batch=256, references=2, attacks=("loss", "pia", "sima"), extra={"optim.batch_size": 16}),
    "full": Profile(limit=None, plain_steps=(500, 1000, 2000), smp_steps=1000, dp_steps=1000, dp_batch=256,
                    references=8),
}

#: the DP recipe, chosen on demo:digits (see the module docstring): attention-only LoRA of rank 4, the
#: per-sample clip near the median per-sample gradient norm, a larger Adam step than plain's
DP_RECIPE = {"lora.rank": 4, "lora.alpha": 8, "lora.targets": ["to_q", "to_k", "to_v", "to_out.0"],
             "dp.max_grad_norm": 0.02, "optim.lr": 5e-3, "dp.accountant": "rdp"}


def _dp_row(epsilon: float, steps: int, batch: int) -> dict[str, Any]:
    """The overrides of one DP row: the DP recipe at ``epsilon`` (δ = DELTA), ``steps`` Poisson batches of ``batch``."""
    return {"mode": "dp", "optim.max_steps": steps, "optim.batch_size": batch, "dp.target_epsilon": epsilon,
            "dp.delta": DELTA, **DP_RECIPE}


def runs(profile: Profile) -> list[tuple[str, dict[str, Any]]]:
    """(name, config overrides) of every row, the longest plain run first (it sets the references' recipe)."""
    longest = max(profile.plain_steps)
    rows: list[tuple[str, dict[str, Any]]] = [(f"plain-{longest}", {"mode": "plain", "optim.max_steps": longest})]
    rows += [(f"plain-{s}", {"mode": "plain", "optim.max_steps": s}) for s in sorted(profile.plain_steps)
             if s != longest]
    for attacker in ("paper", "calibrated"):
        for alpha in profile.smp_alphas:
            rows.append((f"smp-{attacker}-a{alpha:g}", {"mode": "smp", "optim.max_steps": profile.smp_steps,
                                                        "mp.alpha": alpha, "mp.attacker": attacker}))
    rows += [(f"dp-eps{eps:g}", _dp_row(eps, profile.dp_steps, profile.dp_batch)) for eps in profile.epsilons]
    if profile.dp_long_steps:
        rows.append((f"dp-eps8-{profile.dp_long_steps}", _dp_row(8.0, profile.dp_long_steps, profile.dp_batch)))
    if profile.dp_large_batch:
        rows.append((f"dp-eps8-b{profile.dp_large_batch}", _dp_row(8.0, profile.dp_steps, profile.dp_large_batch)))
    rows.append(("plain-privacy-stop", {"mode": "plain", "optim.max_steps": longest,
                                        "privacy_stop.every": max(25, longest // 12),
                                        "privacy_stop.max_advantage": 0.2, "privacy_stop.probe": 256}))
    return rows


def _scores(path: Path) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """(ids, member labels, one column per attack and ``<attack>_base`` control), sorted by id: one order for
    every run audited on the same samples."""
    with path.open() as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["id"])
    labels = np.array([int(r["member"]) for r in rows])
    columns = {k: np.array([float(r[k]) for r in rows]) for k in rows[0] if k not in ("id", "member")}
    return [r["id"] for r in rows], labels, columns


def _attacks(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The adapter's scores only (not the base-model controls)."""
    return {k: v for k, v in columns.items() if not k.endswith("_base")}


def dominance(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Every membership-privacy row against every plain stopping point: the paired bootstrap interval of the
    strongest-attack AUC gap (metrics.bootstrap_strongest_auc_gap) and whether the row *dominates* — a gap
    interval wholly below 0 at an equal or lower held-out loss. Pairs whose scores are no longer on disk keep
    the figures of the run that computed them."""
    out = json.loads(DOMINANCE.read_text()) if DOMINANCE.exists() else {}
    on_disk = {r["run"]: _scores(Path(r["scores_csv"])) for r in rows
               if r["mode"] in ("plain", "smp", "mp") and Path(r.get("scores_csv", "")).is_file()}
    plain = [r for r in rows if r["mode"] == "plain" and not r.get("early_stop")]
    for r in (r for r in rows if r["mode"] in ("smp", "mp")):
        for p in plain:
            if r["run"] not in on_disk or p["run"] not in on_disk:
                continue
            ids, labels, cols_a = on_disk[r["run"]]
            ids_b, labels_b, cols_b = on_disk[p["run"]]
            if ids != ids_b or not np.array_equal(labels, labels_b):
                raise SystemExit(f"{r['run']} and {p['run']} were audited on different samples")
            gap, lo, hi = bootstrap_strongest_auc_gap(_attacks(cols_a), _attacks(cols_b), labels)
            out[f"{r['run']} vs {p['run']}"] = {
                "gap": gap, "gap_ci": [lo, hi], "heldout_loss": [r["heldout_loss"], p["heldout_loss"]],
                "dominates": bool(hi < 0 and r["heldout_loss"] <= p["heldout_loss"])}
    write_json_atomic(DOMINANCE, out)
    return out


def dominance_table(pairs: dict[str, Any]) -> str:
    lines = ["| pair | strongest-AUC gap [95% paired CI] | held-out loss | dominates |", "|---|---|---|---|"]
    for name, d in pairs.items():
        lo, hi = d["gap_ci"]
        lines.append(f"| {name} | {d['gap']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {d['heldout_loss'][0]:.5f} vs "
                     f"{d['heldout_loss'][1]:.5f} | {'yes' if d['dominates'] else 'no'} |")
    return "\n".join(lines) + "\n"


def row(name: str, run: Path, results: dict[str, Any], privacy: dict[str, Any], utility: dict[str, Any],
        seconds: dict[str, float]) -> dict[str, Any]:
    """One frontier row from a run's privacy.json, utility.json and audit/results.json."""
    attacks = results["attacks"]
    strongest = max(attacks, key=lambda a: attacks[a]["adapter"]["auc"])
    best = attacks[strongest]
    _, labels, columns = _scores(run / "audit" / "scores.csv")
    one_run = audit_bound(columns["rmia"], labels.astype(bool), delta=DELTA) if "rmia" in columns else None
    early_stop = utility.get("early_stop") or privacy.get("early_stop")
    if early_stop and "probe" in early_stop:  # the probe's ids are in the run's privacy.json: counts here
        early_stop = {**early_stop, "probe": {k: len(v) for k, v in early_stop["probe"].items()}}
    return {
        "run": name, "mode": privacy.get("mode"), "epsilon": privacy.get("epsilon"),
        "delta": privacy.get("delta") if privacy.get("epsilon") is not None else None,
        "noise_multiplier": privacy.get("noise_multiplier"), "steps": privacy.get("training", {}).get("steps"),
        "early_stop": early_stop,
        "members": results["members"], "nonmembers": results["nonmembers"],
        "heldout_loss": utility.get("loss_heldout"), "base_heldout_loss": utility.get("base_loss_heldout"),
        "fd": utility.get("fd_heldout"), "base_fd": utility.get("base_fd_heldout"),
        "strongest_attack": strongest, "strongest_auc": best["adapter"]["auc"],
        "strongest_auc_ci": [best["adapter"]["auc_ci_low"], best["adapter"]["auc_ci_high"]],
        "strongest_base_auc": best["base_control"]["auc"],
        "tpr_at_0.01_fpr": best["adapter"].get("tpr_at_0.01_fpr"),
        "tpr_at_0.001_fpr": best["adapter"].get("tpr_at_0.001_fpr"),
        "epsilon_lower_bound": None if one_run is None else one_run["epsilon_lower_bound"],
        "auc_by_attack": {a: {"adapter": v["adapter"]["auc"], "base": v["base_control"]["auc"]}
                          for a, v in attacks.items()},
        "scores_csv": str(run / "audit" / "scores.csv"), "seconds": seconds,
    }


def _load_rows() -> list[dict[str, Any]]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else []


def _save_row(new: dict[str, Any]) -> None:
    rows = [r for r in _load_rows() if r["run"] != new["run"]] + [new]
    write_json_atomic(RESULTS, rows)


def _reference_dir(overrides: dict[str, Any]) -> str:
    """References must have the target's adapter shape (audit/references.py refuses others): rows that change
    the LoRA (DP's attention-only rank 4) get their own set, trained in plain mode with that row's recipe."""
    lora = {k: v for k, v in sorted(overrides.items()) if k.startswith("lora.")}
    if not lora:
        return "references"
    return "references-" + hashlib.sha256(json.dumps(lora).encode()).hexdigest()[:8]


def run_one(name: str, overrides: dict[str, Any], *, profile: Profile, work: Path, device: str,
            quiet: bool, train_only: bool = False, pool: ReferencePool | None = None) -> dict[str, Any] | None:
    """Train (or reuse, or resume) and audit one row (``train_only``: no audit, no row; ``pool``: how missing
    reference adapters train, one after another or on Ray — the same adapters either way)."""
    out = work / name
    seconds: dict[str, float] = {}
    if not (out / "utility.json").exists():
        settings = {**profile.extra, **overrides, "out": str(out), "name": name, "device": device,
                    "quiet": quiet, "data.limit": profile.limit}
        settings["resume"] = out.with_name(out.name + ".partial").exists()
        start = time.perf_counter()
        train(load_config(CONFIG, settings))
        seconds["train"] = time.perf_counter() - start
        write_json_atomic(out / "train_seconds.json", seconds)
    if train_only:
        return None
    if (out / "train_seconds.json").exists():
        seconds = json.loads((out / "train_seconds.json").read_text())
    results_file = out / "audit" / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else None
    if results is None or (results.get("references") or {}).get("k") != profile.references:
        start = time.perf_counter()
        attacks = (*profile.attacks, "lira", "rmia") if profile.attacks else None
        results = audit_run(out, attacks=attacks, references=profile.references,
                            reference_dir=work / _reference_dir(overrides), quiet=quiet, pool=pool)
        seconds["audit"] = time.perf_counter() - start
    privacy = json.loads((out / "privacy.json").read_text())
    utility = json.loads((out / "utility.json").read_text())
    return row(name, out, results, privacy, utility, seconds)


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of BENCHMARKS.md."""
    def f(v: Any, spec: str = ".3f") -> str:
        return "n/a" if v is None else format(v, spec)

    lines = ["| run | ε | held-out loss (base) | FD (base) | strongest attack | AUC [95% CI] | base AUC | "
             "TPR@1% | TPR@0.1% | ε lower bound |", "|" + "---|" * 10]
    for r in rows:
        lo, hi = r["strongest_auc_ci"]
        lines.append(f"| {r['run']} | {f(r['epsilon'], '.2f')} | {f(r['heldout_loss'], '.5f')} "
                     f"({f(r['base_heldout_loss'], '.5f')}) | {f(r['fd'], '.1f')} ({f(r['base_fd'], '.1f')}) | "
                     f"{r['strongest_attack']} | {r['strongest_auc']:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{r['strongest_base_auc']:.3f} | {f(r['tpr_at_0.01_fpr'])} | {f(r['tpr_at_0.001_fpr'])} | "
                     f"{f(r['epsilon_lower_bound'], '.2f')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"plain": "o", "smp": "s", "mp": "D", "dp": "^"}
    for r in rows:
        lo, hi = r["strongest_auc_ci"]
        ax.errorbar(r["heldout_loss"], r["strongest_auc"], yerr=[[r["strongest_auc"] - lo], [hi - r["strongest_auc"]]],
                    fmt=markers.get(r["mode"], "x"), capsize=2, label=r["run"])
    if rows:
        base = rows[0]
        ax.axvline(base["base_heldout_loss"], color="grey", ls=":", label="base model's held-out loss")
        ax.axhline(float(np.mean([r["strongest_base_auc"] for r in rows])), color="grey", ls="--",
                   label="base-model control (mean)")
    ax.set_xlabel("held-out denoising loss (lower is better)")
    ax.set_ylabel("strongest attack's AUC (lower is more private)")
    ax.set_title(f"privacy–utility frontier, demo:idcards ({rows[0]['members'] if rows else '?'} members)")
    ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=150)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help="cpu (2,500 cards, short recipes) or full (5,000 cards); default: full on CUDA")
    parser.add_argument("--only", nargs="*", default=None, help="row names to (re)compute; default: all")
    parser.add_argument("--work", type=Path, default=HERE / ".work" / "frontier", help="run directories")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--list", action="store_true", help="print the row names and exit")
    parser.add_argument("--train-only", action="store_true",
                        help="train the rows but audit none (a second process while the first trains the references)")
    parser.add_argument("--reference-workers", type=int, default=None, metavar="N",
                        help="train up to N reference adapters at once as Ray tasks (identical adapters)")
    parser.add_argument("--ray-address", default=None, help="train the references on this Ray cluster")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args()
    pool = ReferencePool(workers=args.reference_workers, address=args.ray_address)
    pool.check()
    profile_name = args.profile or ("full" if args.device.startswith("cuda") else "cpu")
    profile = PROFILES[profile_name]
    planned = runs(profile)
    if args.list:
        print("\n".join(name for name, _ in planned))
        return
    work = args.work / profile_name
    for name, overrides in planned:
        if args.only is not None and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        r = run_one(name, overrides, profile=profile, work=work, device=args.device, quiet=args.quiet,
                    train_only=args.train_only, pool=pool)
        if r is None:
            continue
        r["profile"] = profile_name
        _save_row(r)
        print(f"   strongest {r['strongest_attack']} AUC {r['strongest_auc']:.3f} (base {r['strongest_base_auc']:.3f});"
              f" held-out loss {r['heldout_loss']:.5f} (base {r['base_heldout_loss']:.5f})", flush=True)
    if args.train_only:
        return
    order = {name: i for i, (name, _) in enumerate(planned)}
    rows = sorted((r for r in _load_rows() if r.get("profile") == profile_name), key=lambda r: order.get(r["run"], 99))
    pairs = dominance(rows)
    TABLE.write_text(table(rows) + ("\n" + dominance_table(pairs) if pairs else ""))
    plot(rows)
    print(TABLE.read_text())


if __name__ == "__main__":
    main()
