"""DP-SGD step time and peak memory: ghost clipping against materialised per-sample gradients.

``dp.clipping: ghost`` (Opacus' fast gradient clipping with ghost norms, train/dp_clipping.py) computes
each sample's gradient norm without forming the gradient, for ``nn.Linear`` layers — every attention
LoRA tensor — and falls back to functorch per-sample gradients for the conv LoRA tensors; it pays a
second backward pass. ``per-sample`` (the default) materialises B × every LoRA tensor. Same mechanism,
same ε (tests/test_dp_clipping.py checks the noised gradients agree).

Cases (embedded demo UNet, 32 × 32): the frontier's DP recipe (attention-only LoRA r4) at batch 16 and
64, and the demo's LoRA (r16, attention + resnet convs) at batch 16. Each (case, mode) runs in its own
process (peak RSS is its own: ``ru_maxrss``), rounds interleave the modes so machine noise hits both alike,
and the ratio uses the median step time. Fixed-size batches (Poisson sampling does not change the cost of
a step of a given size).

    python benchmarks/dp_clipping.py [--steps 5] [--rounds 2]   # ~6 min on 2 cores

Writes benchmarks/results/dp_clipping.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "dp_clipping.json"
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CASES = {  # name → (LoRA targets, rank, batch)
    "attn-r4-b16": (ATTENTION, 4, 16),
    "attn-r4-b64": (ATTENTION, 4, 64),
    "attn+conv-r16-b16": (ATTENTION + ("conv1", "conv2"), 16, 16),
}
MODES = ("per-sample", "ghost")


def worker(case: str, mode: str, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per DP-SGD step of one (case, mode) in this process, and its peak RSS."""
    import torch

    from privlora.tasks.loading import load_task
    from privlora.tasks.lora import LoraSpec
    from privlora.train.dp import DPParameters, PrivateTraining

    targets, rank, batch = CASES[case]
    torch.manual_seed(0)
    task = load_task("embedded", LoraSpec(rank=rank, alpha=rank, targets=targets), seed=0)
    n = 4 * batch
    params = DPParameters(noise_multiplier=1.0, max_grad_norm=0.02, sample_rate=batch / n, delta=1e-5,
                          steps=steps + warmup, accountant="rdp")
    private = PrivateTraining(task, torch.optim.Adam(task.trainable_parameters(), lr=5e-3), params, n=n, seed=0,
                              clipping=mode)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand((batch, 1, 32, 32), generator=gen) * 2 - 1
    task.train()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        private.zero_grad()
        private.backward(task.per_sample_loss({"pixels": pixels}, gen))
        private.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in task.trainable_parameters())
    return {"median_s": statistics.median(times), "trainable_params": trainable,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.warmup)))
        return
    runs: dict[str, dict[str, list[dict[str, float]]]] = {c: {m: [] for m in MODES} for c in CASES}
    for r in range(args.rounds):
        for case in CASES:
            for mode in MODES:
                out = subprocess.run([sys.executable, __file__, "--worker", case, mode, "--steps", str(args.steps),
                                      "--warmup", str(args.warmup)], capture_output=True, text=True, check=True)
                runs[case][mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1} {case} {mode}: {runs[case][mode][-1]['median_s'] * 1000:.0f} ms/step, "
                      f"{runs[case][mode][-1]['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    summary = {}
    for case, by_mode in runs.items():
        modes = {m: {"median_step_s": statistics.median(x["median_s"] for x in v),
                     "peak_rss_mb": max(x["peak_rss_mb"] for x in v),
                     "trainable_params": v[0]["trainable_params"]} for m, v in by_mode.items()}
        ghost, per_sample = modes["ghost"], modes["per-sample"]
        summary[case] = {"modes": modes,
                         "ghost_vs_per_sample_time": ghost["median_step_s"] / per_sample["median_step_s"],
                         "ghost_vs_per_sample_rss": ghost["peak_rss_mb"] / per_sample["peak_rss_mb"]}
    result = {"benchmark": "dp_clipping", "steps_per_round": args.steps, "rounds": args.rounds,
              "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
              "cases": {c: {"targets": list(t), "rank": r, "batch": b} for c, (t, r, b) in CASES.items()},
              "summary": summary, "raw": runs}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
