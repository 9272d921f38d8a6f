"""Audit throughput (images/s) of each model-only attack vs the raw batched denoiser forward pass.

Issue 4's target: the one-query attacks (loss, SimA) run at ≥ 0.9× the throughput of one raw batched
UNet forward pass on the same batch — the attack code adds little beyond the query itself. Multi-query
attacks (PIA: 2 queries, SecMI: 12) are reported too, with their throughput × queries, which should
also be near the raw pass if the extra work is only the queries.

Everything runs in one process, rounds interleave the variants so machine noise hits them alike, and
the median over rounds is reported. Model: the embedded base with a fresh LoRA adapter (r16, the demo
targets); data: 64 demo faces, one batch of 64 (the attacks' batch size).

    python benchmarks/audit_throughput.py [--rounds 5] [--images 64]

Writes benchmarks/results/audit_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "audit_throughput.json"
TARGET = 0.9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()

    import torch

    from privlora.audit.attacks import ATTACKS, BATCH
    from privlora.config import load_config
    from privlora.data.demo import faces
    from privlora.tasks.loading import load_task
    from privlora.train import loop

    torch.manual_seed(0)
    config = load_config(Path(__file__).parents[1] / "configs" / "demo-plain.yaml", {"quiet": True})
    task = load_task("embedded", loop._lora_spec(config), seed=0)
    task.model.eval()
    data = faces(32).subset(list(range(args.images)))

    @torch.no_grad()
    def raw(seed: int) -> None:
        """One batched denoiser query per image on fixed noised inputs — the floor an attack cannot beat."""
        gen = torch.Generator().manual_seed(seed)
        for batch in data.batches(BATCH):
            x0 = task.encode(batch)
            t = torch.full((x0.shape[0],), 100, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=gen)
            task.denoise(task.scheduler.add_noise(x0, noise, t), t, batch)

    variants: dict[str, Callable[[int], object]] = {"raw_forward": raw}
    for name, attack in ATTACKS.items():
        variants[name] = lambda seed, score=attack.score: score(task, data, seed=seed)
    for fn in variants.values():  # warm-up
        fn(0)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn(r)
            times[name].append(time.perf_counter() - start)
    raw_rate = len(data) / statistics.median(times["raw_forward"])
    summary = {}
    for name, ts in times.items():
        rate = len(data) / statistics.median(ts)
        queries = ATTACKS[name].queries if name in ATTACKS else 1
        summary[name] = {"images_per_s": rate, "queries_per_image": queries, "vs_raw_forward": rate / raw_rate,
                         "queries_per_s_vs_raw": rate * queries / raw_rate, "median_s": statistics.median(ts)}
        print(f"{name:12s} {rate:8.1f} images/s  {rate / raw_rate:5.2f}× raw  ({queries} queries/image: "
              f"{rate * queries / raw_rate:4.2f}× raw query rate)")
    one_query = [n for n, a in ATTACKS.items() if a.queries == 1]
    result = {"benchmark": "audit_throughput", "images": len(data), "batch": BATCH, "rounds": args.rounds,
              "threads": torch.get_num_threads(),
              "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
              "attacks": summary,
              "target": {"one_query_attacks": one_query, "min_vs_raw": TARGET,
                         "met": all(summary[n]["vs_raw_forward"] >= TARGET for n in one_query)},
              "raw": times}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
