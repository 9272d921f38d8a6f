"""One-run DP audit (Steinke, Nasr & Jagielski 2023) of the demo's plain and DP recipes.

Sections (each resumable: finished runs in --work are reused; results are merged into the JSON):

* ``kinds`` — which canary images make the strongest input-space attack: ONE plain run (demo-plain's
  recipe, shortened to --kinds-steps) with 32 canaries of every kind in
  :data:`privlora.audit.dp_canaries.CANARY_KINDS`, each included w.p. ½; per kind the AUC of the
  score (base − adapter log error) against inclusion and the one-run ε lower bound of its 32 canaries.
* ``plain`` — ``dp_canary_audit`` of a demo-plain run (no DP): a working attack gives a bound > 0 here
  (measured: 0.00 with 64 noise canaries, AUC 0.66 — too weak for 64 canaries; see the kinds section).
* ``dp`` — ``dp_canary_audit`` of a demo-dp run (ε = 8 target): the bound must stay ≤ the canary
  run's accountant ε; its ratio to ε says how weak a black-box input-space attack is.

Results are keyed ``<section>_<kind>`` (e.g. ``plain_noise``, ``dp_blocks``).
Source runs are trained with the demo configs and one eval timestep / no FD samples (utility is not
measured here). CPU, OMP_NUM_THREADS=1.

    python benchmarks/dp_one_run.py [--work /tmp/dp_one_run] [--m 64] [--kind noise] [--sections kinds,plain,dp]

Writes benchmarks/results/dp_one_run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "dp_one_run.json"
FAST = {"eval.timesteps": [200], "eval.samples": 0, "quiet": True}


def _source_run(config: str, out: Path) -> Path:
    """The audited run: the demo config as it is (only its utility evaluation shortened)."""
    from privlora.config import load_config
    from privlora.train.loop import train

    if not (out / "adapter").is_dir():
        train(load_config(ROOT / "configs" / config, {**FAST, "out": str(out)}))
    return out


def _kinds(work: Path, per_kind: int, seed: int, steps: int) -> dict:
    """One plain run (demo-plain's recipe, ``steps`` steps) with ``per_kind`` canaries of every kind."""
    from sklearn.metrics import roc_auc_score

    from privlora.audit import dp_canaries as dc
    from privlora.audit.one_run import audit_bound
    from privlora.config import load_config
    from privlora.data.splits import Splits, make_splits
    from privlora.tasks.loading import load_task
    from privlora.train.data import load_training_data
    from privlora.train.loop import train

    out = work / "kinds-run"
    config = load_config(ROOT / "configs" / "demo-plain.yaml",
                         {**FAST, "out": str(out), "name": "dp-canary-kinds", "optim.max_steps": steps})
    data = load_training_data(config, load_task(config.base, None, seed=config.seed))
    splits = make_splits(data, members=config.data.members, aux=config.data.aux, eval=config.data.eval,
                         seed=config.seed, source=config.data.source)
    shape = tuple(data.pixels.shape[1:])
    sets = [dc.make_canaries(k, per_kind, shape, seed=seed) for k in dc.CANARY_KINDS]
    canaries = sets[0]
    for other in sets[1:]:
        canaries = canaries.concat(other)
    included = dc.draw_inclusion(len(canaries), seed=seed)
    start = time.perf_counter()
    if not (out / "adapter").is_dir():
        chosen = [c for c, inc in zip(canaries.ids, included, strict=True) if inc]
        train(config, splits=Splits(members=[*splits.members, *chosen], aux=splits.aux, eval=splits.eval,
                                    source=splits.source, seed=splits.seed), extra=canaries)
    trained = time.perf_counter() - start
    task = dc._load_adapter_task(type("Loaded", (), {"config": config})(), out)
    scores = dc.canary_scores(task, canaries, seed=seed)
    n = len(splits.members) + int(included.sum())
    rows = {}
    for i, kind in enumerate(dc.CANARY_KINDS):
        sl = slice(i * per_kind, (i + 1) * per_kind)
        bound = audit_bound(scores[sl], included[sl], delta=1 / (10 * n))
        rows[kind] = {"canaries": per_kind, "included": int(included[sl].sum()),
                      "auc": float(roc_auc_score(included[sl], scores[sl])),
                      "epsilon_lower_bound": bound["epsilon_lower_bound"], "guesses": bound["guesses"],
                      "correct": bound["correct"],
                      "mean_score_in": float(scores[sl][included[sl]].mean()),
                      "mean_score_out": float(scores[sl][~included[sl]].mean())}
    return {"recipe": "demo-plain.yaml", "steps": steps, "training_samples": n, "train_seconds": trained,
            "kinds": rows}


def _audit(work: Path, config: str, name: str, m: int, kind: str, seed: int) -> dict:
    from privlora.audit.dp_canaries import dp_canary_audit

    source = _source_run(config, work / name)
    r = dp_canary_audit(source, m=m, kind=kind, seed=seed, quiet=True,
                        canary_dir=source / "audit" / f"dp-canary-run-{kind}")
    keep = ("mode", "canary_kind", "m", "included", "training_samples", "beta", "delta", "epsilon_lower_bound",
            "guesses", "correct", "k_in", "k_out", "correction", "candidates", "accountant_epsilon",
            "ratio_to_accountant", "seconds")
    out = {k: r[k] for k in keep}
    p = r["canary_run_privacy"]
    out.update(recipe=config, accountant_epsilon_prv=p.get("epsilon_prv"), noise_multiplier=p.get("noise_multiplier"),
               sample_rate=p.get("sample_rate"), steps=p.get("steps"))
    scores = np.array([c["score"] for c in r["canaries"]])
    inc = np.array([c["included"] for c in r["canaries"]])
    from sklearn.metrics import roc_auc_score

    out["auc"] = float(roc_auc_score(inc, scores))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/dp_one_run"))
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--kind", default="noise")
    ap.add_argument("--per-kind", type=int, default=32)
    ap.add_argument("--kinds-steps", type=int, default=150, help="steps of the kinds pilot run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sections", default="kinds,plain,dp")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    for section in [s.strip() for s in args.sections.split(",") if s.strip()]:
        start = time.perf_counter()
        if section == "kinds":
            row = _kinds(args.work, args.per_kind, args.seed, args.kinds_steps)
        elif section == "plain":
            row = _audit(args.work, "demo-plain.yaml", "plain", args.m, args.kind, args.seed)
        elif section == "dp":
            row = _audit(args.work, "demo-dp.yaml", "dp", args.m, args.kind, args.seed)
        else:
            raise SystemExit(f"unknown section {section!r}")
        row["wall_seconds"] = time.perf_counter() - start
        # re-read before writing: sections may run in separate processes, each adds its own entry
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": 1,
                              "note": "2 shared cores; wall times include contention"}
        results[section if section == "kinds" else f"{section}_{args.kind}"] = row
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        print(section, json.dumps({k: v for k, v in row.items() if k != "candidates"}, indent=1))


if __name__ == "__main__":
    main()
