"""White-box one-run DP audit (Dirac gradient canaries, Steinke, Nasr & Jagielski 2023) of the demo DP recipe.

Trains configs/demo-dp.yaml (target ε = 8, 100 steps; one eval timestep, no FD samples) into --work
(reused when present), then ONE gradient-canary run of its mechanism with M = --m canaries
(:func:`privlora.audit.gradient_canaries.gradient_canary_audit`). The bound is also reported for the
first 1000 canaries of the same run — a valid audit on its own (the other canaries are just more data).
A σ-small control (--control-sigma, 20 steps) shows the audit's power where ε is large (what a perfect
auditor can prove with M canaries); ``eps2`` audits the same recipe at target ε = 2.

    python benchmarks/dp_gradient_canaries.py [--work /tmp/dp_gradient] [--m 5000]

Writes benchmarks/results/dp_gradient_canaries.json. CPU, OMP_NUM_THREADS=1.
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "dp_gradient_canaries.json"
FAST = {"eval.timesteps": [200], "eval.samples": 0, "quiet": True}


def _source(work: Path, name: str, overrides: dict, dp: dict | None = None) -> Path:
    from privlora.config import load_config
    from privlora.train.loop import train

    out = work / name
    if not (out / "privacy.json").is_file():
        config = load_config(ROOT / "configs" / "demo-dp.yaml", {**FAST, **overrides, "out": str(out)})
        if dp is not None:
            config = config.model_copy(update={"dp": config.dp.model_copy(update=dp)})
        train(config)
    return out


def _subset(result: dict, k: int) -> dict:
    from privlora.audit.gradient_canaries import audit_delta
    from privlora.audit.one_run import audit_bound
    from privlora.train import accounting

    canaries = result["canaries"][:k]
    delta = audit_delta(result["run_delta"], m=k, beta=result["beta"])
    bound = audit_bound(np.array([c["score"] for c in canaries]), np.array([c["included"] for c in canaries]),
                        delta=delta, beta=result["beta"])
    eps = accounting.epsilon(noise_multiplier=result["noise_multiplier"], sample_rate=result["sample_rate"],
                             steps=result["steps"], delta=delta, accountant=result["accountant"])
    return {"m": k, "delta": delta, "epsilon_lower_bound": bound["epsilon_lower_bound"], "guesses": bound["guesses"],
            "correct": bound["correct"], "accountant_epsilon": eps}


def _row(result: dict) -> dict:
    from sklearn.metrics import roc_auc_score

    inc = [c["included"] for c in result["canaries"]]
    auc = roc_auc_score(inc, [c["score"] for c in result["canaries"]])
    keep = {k: result[k] for k in ("m", "included", "delta", "run_delta", "noise_multiplier", "sample_rate", "steps",
                                   "epsilon_lower_bound", "guesses", "correct", "accountant_epsilon", "run_epsilon",
                                   "ratio_to_accountant", "seconds", "candidates")}
    return {**keep, "canary_auc": auc, "subset_1000": _subset(result, min(1000, result["m"]))}


def main() -> None:
    from privlora.audit.gradient_canaries import gradient_canary_audit

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/dp_gradient"))
    ap.add_argument("--m", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--control-sigma", type=float, default=0.3)
    ap.add_argument("--sections", default="dp,control")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "omp_threads": os.environ.get("OMP_NUM_THREADS")}
    sections = args.sections.split(",")
    if "dp" in sections:
        t = time.perf_counter()
        run = _source(args.work, "demo-dp", {})
        source_s = time.perf_counter() - t
        results["dp"] = {**_row(gradient_canary_audit(run, m=args.m, seed=args.seed)), "source_train_s": source_s}
        RESULTS.write_text(json.dumps(results, indent=2))
    if "eps2" in sections:  # the same recipe at target ε = 2 (σ recalibrated): where the audit can be tight
        run = _source(args.work, "demo-dp-eps2", {"dp.target_epsilon": 2.0})
        results["eps2"] = _row(gradient_canary_audit(run, m=args.m, seed=args.seed))
        RESULTS.write_text(json.dumps(results, indent=2))
    if "control" in sections:
        run = _source(args.work, f"demo-dp-sigma{args.control_sigma}", {"optim.max_steps": 20},
                      {"target_epsilon": None, "noise_multiplier": args.control_sigma})
        results["control"] = _row(gradient_canary_audit(run, m=args.m, seed=args.seed))
        RESULTS.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: {kk: v.get(kk) for kk in ("m", "epsilon_lower_bound", "accountant_epsilon", "canary_auc",
                                                  "subset_1000")} for k, v in results.items() if k != "machine"},
                     indent=1))


if __name__ == "__main__":
    main()
