"""Step time and peak memory of each training mode, side by side in one run (issue 3 targets).

Targets on the demo model, batch 16: plain LoRA ≤ 0.8× full fine-tuning, SMP ≤ 1.5× plain,
DP ≤ 2× plain, SMP with the calibrated attacker ≤ 2× SMP. Each mode runs in its own process (so peak
RSS is its own), rounds interleave the modes so machine noise hits them alike, and ratios use the
median step time.

    python benchmarks/step_time.py [--steps 30] [--rounds 3]

Writes benchmarks/results/step_time.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "step_time.json"
MODES = {  # name → config overrides
    "full": {"mode": "plain", "lora.full_finetune": True},
    "plain": {"mode": "plain"},
    "smp": {"mode": "smp"},
    "smp_calibrated": {"mode": "smp", "mp.attacker": "calibrated"},
    "mp": {"mode": "mp"},
    "dp": {"mode": "dp", "dp.noise_multiplier": 1.0},
}


def worker(name: str, steps: int, warmup: int) -> dict[str, float]:
    """Time ``steps`` training steps of one mode in this process (after ``warmup``)."""
    import torch

    from privlora.config import load_config
    from privlora.data.demo import faces
    from privlora.tasks.loading import load_task
    from privlora.train import loop
    from privlora.train.augment import Augmenter
    from privlora.train.dp import PrivateTraining, resolve
    from privlora.train.objectives import OBJECTIVES
    from privlora.train.precision import Precision

    torch.manual_seed(0)
    config = load_config(None, {**MODES[name], "optim.batch_size": 16, "quiet": True})
    task = load_task("embedded", loop._lora_spec(config), seed=0)
    data = faces(32)
    members, aux = data.subset(list(range(32))), data.subset(list(range(32, 64)))
    objective = OBJECTIVES[config.mode](task, members=members, aux=aux, options=config.mp, batch_size=16)
    params = task.trainable_parameters()
    optimizer = loop._make_optimizer(config, params)
    private = None
    if config.mode == "dp":
        # q = 1/2 over 32 members: expected batch 16, as for the other modes
        private = PrivateTraining(task, optimizer, resolve(config.dp, n=32, batch_size=16, steps=steps),
                                  n=32, seed=0)
    gen = torch.Generator().manual_seed(0)
    sampler = loop._Sampler(32, 16, gen, private)
    parts = loop._StepParts(task, objective, private, optimizer, params, sampler, members, gen,
                            precision=Precision(config.optim.mixed_precision, torch.device("cpu")),
                            augment=Augmenter(config.data, seed=0), chunk=16, grad_clip=config.optim.grad_clip)
    task.train()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loop._one_step(parts, check=False)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "mean_s": statistics.mean(times),
            "trainable_params": sum(p.numel() for p in params),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup)))
        return
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for name in MODES:
            out = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(args.steps),
                                  "--warmup", str(args.warmup)], capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: {runs[name][-1]['median_s'] * 1000:.1f} ms/step", file=sys.stderr)
    summary = {m: {"median_step_s": statistics.median(x["median_s"] for x in v),
                   "peak_rss_mb": max(x["peak_rss_mb"] for x in v),
                   "trainable_params": v[0]["trainable_params"]} for m, v in runs.items()}
    t = {m: s["median_step_s"] for m, s in summary.items()}
    ratios = {"plain_vs_full": t["plain"] / t["full"], "smp_vs_plain": t["smp"] / t["plain"],
              "mp_vs_plain": t["mp"] / t["plain"], "dp_vs_plain": t["dp"] / t["plain"],
              "smp_calibrated_vs_smp": t["smp_calibrated"] / t["smp"]}
    targets = {"plain_vs_full": 0.8, "smp_vs_plain": 1.5, "dp_vs_plain": 2.0, "smp_calibrated_vs_smp": 2.0}
    result = {"benchmark": "step_time", "batch_size": 16, "steps_per_round": args.steps, "rounds": args.rounds,
              "machine": {"cpu_count": __import__("os").cpu_count(), "python": platform.python_version()},
              "modes": summary, "ratios": ratios,
              "targets": {k: {"target": v, "met": ratios[k] <= v} for k, v in targets.items()},
              "raw": runs}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratios": ratios, "modes": summary}, indent=2))


if __name__ == "__main__":
    main()
