"""Cost and effect of privacy-aware early stopping (``privacy_stop``) on the demo's plain LoRA.

Cost: wall time of a whole ``privlora train`` process on configs/demo-plain.yaml (FD sampling off) without
and with a probe check every 25 steps, interleaved round by round so machine noise hits both alike; the
check run uses bound 1.0 so it trains all 300 steps, like the baseline. On a loaded machine the
pair's wall ratio drifts with the load; the in-process ratio (wall / (wall − seconds spent in checks))
does not. Effect: where the rule stops for
bounds 0.2 and 0.5, and — as a check on the probe — the same attack's advantage on the evaluation split
(members vs evaluation non-members, the final audit's view) for the adapter each run kept.

    python benchmarks/privacy_stop_cost.py [--rounds 2] [--every 25] [--bounds 0.2 0.5]

Writes benchmarks/results/privacy_stop_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "privacy_stop_cost.json"
CONFIG = ROOT / "configs" / "demo-plain.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def train(out: Path, *sets: str) -> float:
    """Seconds of one ``privlora train`` process (interpreter start and evaluation included)."""
    args = [sys.executable, "-m", "privlora", "train", "--config", str(CONFIG), "--out", str(out), "-q",
            "--set", "eval.samples=0", *(a for s in sets for a in ("--set", s))]
    start = time.perf_counter()
    subprocess.run(args, check=True, env=ENV, capture_output=True, text=True)
    return time.perf_counter() - start


def heldout_advantage(run: Path) -> dict[str, float]:
    """The probe's attack (base-calibrated loss signal, 2·AUC − 1) on members vs evaluation non-members,
    with the audit's seed: what the final audit would see of the kept adapter."""
    import numpy as np
    import torch

    from privlora.audit.metrics import auc
    from privlora.audit.references import loss_signal
    from privlora.audit.runner import load_run
    from privlora.data.imageset import ImageSet

    loaded = load_run(run)
    both = ImageSet(ids=[*loaded.members.ids, *loaded.held_out.ids],
                    pixels=torch.cat([loaded.members.pixels, loaded.held_out.pixels]),
                    captions=[*loaded.members.captions, *loaded.held_out.captions])
    target = loss_signal(loaded.task, both, seed=0)
    with loaded.task.adapter_disabled():
        base = loss_signal(loaded.task, both, seed=0)
    labels = np.r_[np.ones(len(loaded.members), int), np.zeros(len(loaded.held_out), int)]
    area = auc(base - target, labels)
    return {"auc": area, "advantage": 2 * area - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--bounds", type=float, nargs="+", default=[0.2, 0.5])
    args = parser.parse_args()
    check = [f"privacy_stop.every={args.every}", "privacy_stop.max_advantage=1.0"]
    times: dict[str, list[float]] = {"plain": [], "privacy_stop": []}
    check_seconds: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for r in range(args.rounds):
            times["plain"].append(train(root / f"plain-{r}"))
            times["privacy_stop"].append(train(root / f"stop-{r}", *check))
            record = json.loads((root / f"stop-{r}" / "privacy.json").read_text())["early_stop"]
            check_seconds.append(record["seconds"])
            print(f"round {r + 1}: plain {times['plain'][-1]:.1f}s, with checks {times['privacy_stop'][-1]:.1f}s "
                  f"({record['seconds']:.1f}s in {len(record['checks'])} checks + the base)", file=sys.stderr)
        full = json.loads((root / "stop-0" / "privacy.json").read_text())["early_stop"]
        stops = {}
        for bound in args.bounds:
            out = root / f"bound-{bound:g}"
            seconds = train(out, f"privacy_stop.every={args.every}", f"privacy_stop.max_advantage={bound}")
            record = json.loads((out / "privacy.json").read_text())["early_stop"]
            stops[f"{bound:g}"] = {"stopped_at": record["stopped_at"], "kept_step": record["kept_step"],
                                   "checks": record["checks"], "wall_s": seconds,
                                   "heldout": heldout_advantage(out)}
            print(f"bound {bound:g}: stopped at {record['stopped_at']}, kept step {record['kept_step']}, "
                  f"held-out advantage {stops[f'{bound:g}']['heldout']['advantage']:.3f}", file=sys.stderr)
        unstopped = heldout_advantage(root / "plain-0")
    ratios = [s / p for s, p in zip(times["privacy_stop"], times["plain"], strict=True)]
    in_process = [w / (w - c) for w, c in zip(times["privacy_stop"], check_seconds, strict=True)]
    result = {
        "benchmark": "privacy_stop_cost", "config": "configs/demo-plain.yaml", "overrides": ["eval.samples=0"],
        "every": args.every, "rounds": args.rounds,
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "wall_s": {k: {"median": statistics.median(v), "runs": v} for k, v in times.items()},
        "ratio_with_checks": {"median": statistics.median(ratios), "pairs": ratios},
        "check_seconds_median": statistics.median(check_seconds),
        # the same run's time without its checks: a ratio that a loaded machine's drift between the two
        # processes of a pair cannot distort (both sides are measured inside one process)
        "ratio_in_process": {"median": statistics.median(in_process), "pairs": in_process},
        "probe_checks_all_steps": full["checks"],
        "heldout_at_max_steps": unstopped,
        "stops": stops}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("wall_s", "ratio_with_checks", "ratio_in_process",
                                              "check_seconds_median")}, indent=2))
    print(json.dumps({b: {k: s[k] for k in ("stopped_at", "kept_step", "heldout")} for b, s in stops.items()},
                     indent=2))


if __name__ == "__main__":
    main()
