"""Peak memory of training-data extraction at 1 000 vs 10 000 generations: it must not grow with n.

``privlora.audit.extraction.extract`` streams: each batch is generated, reduced to three scalars per
generation and dropped. If that holds, peak RSS above the loaded baseline is the same for 1 000 and
10 000 generations apart from O(n) scalars (24 bytes each: 240 KB at 10 000). Each size runs in its own
process (so peak RSS is its own); RSS is sampled every 5 ms by a thread (psutil) from just before
``extract`` until it returns, and compared with the RSS after the model and data are loaded.
Asserts nothing; read ``growth_ratio`` (≈1 when streaming, ≈10 if generations were kept).

Sampling uses 2 DDIM steps so 10 000 generations finish in minutes (≈3–4 min at 1 thread on the 2-core
CPU machine, ≈0.55 s per batch-64 denoiser pass); memory does not depend on the step count, time does
linearly. Model: the embedded base with a fresh LoRA adapter; training set: 32 demo faces.

    python benchmarks/extraction_memory.py [--sizes 1000 10000] [--steps 2] [--batch 64] [--threads 1]

Writes benchmarks/results/extraction_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "extraction_memory.json"


class _PeakRSS:
    """Largest RSS seen by a sampling thread while the ``with`` block runs."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._process, self._interval = psutil.Process(), interval
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> _PeakRSS:
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def worker(n: int, steps: int, batch: int, threads: int) -> dict[str, float]:
    """Run one extraction of ``n`` generations in this process and measure it."""
    import psutil
    import torch

    from privlora.audit.extraction import extract
    from privlora.config import load_config
    from privlora.data.demo import faces
    from privlora.tasks.loading import load_task
    from privlora.train import loop

    torch.set_num_threads(threads)
    config = load_config(None, {"quiet": True})
    task = load_task("embedded", loop._lora_spec(config), seed=0)
    task.model.eval()
    members = faces(32).subset(list(range(32)))
    extract(task, members, n=batch, seed=1, batch=batch, sample_steps=1, gallery=8)  # warm-up: allocator, kernels
    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    with _PeakRSS() as peak:
        result = extract(task, members, n=n, seed=0, batch=batch, sample_steps=steps, gallery=8)
    seconds = time.perf_counter() - start
    mb = 1024 * 1024
    return {"n": n, "seconds": seconds, "ms_per_generation": 1000 * seconds / n,
            "baseline_rss_mb": baseline / mb, "peak_rss_mb": peak.peak / mb,
            "growth_mb": (peak.peak - baseline) / mb,
            "process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "result_scalars_mb": (result.nearest.nbytes + result.tiled_l2.nbytes + result.normalised.nbytes) / mb,
            "extracted": int(result.extracted.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch, args.threads)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    runs = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--worker", str(n), "--steps", str(args.steps),
                              "--batch", str(args.batch), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True, env=env)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"n={n}: {runs[-1]['seconds']:.0f} s, growth {runs[-1]['growth_mb']:.1f} MB over "
              f"{runs[-1]['baseline_rss_mb']:.0f} MB baseline", file=sys.stderr)
    small, large = min(runs, key=lambda r: r["n"]), max(runs, key=lambda r: r["n"])
    result = {"benchmark": "extraction_memory", "sample_steps": args.steps, "batch": args.batch,
              "threads": args.threads, "training_images": 32, "gallery": 8,
              "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
              "runs": runs,
              "growth_ratio": large["growth_mb"] / max(small["growth_mb"], 1e-9),
              "peak_rss_ratio": large["peak_rss_mb"] / small["peak_rss_mb"],
              "note": "growth = peak RSS during extract minus RSS after loading and a warm-up extract; "
                      "streaming means growth does not scale with n (only 24 bytes of scalars per generation)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("growth_ratio", "peak_rss_ratio")} | {"runs": runs}, indent=2))


if __name__ == "__main__":
    main()
