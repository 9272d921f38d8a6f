"""Step time and peak RSS of each training mode on a Stable-Diffusion-1.5-size model, on the CPU (issue 21).

The UNet, VAE and CLIP text encoder are built from SD 1.5's published configs with random weights
(nothing is downloaded; step cost does not depend on the weights), at 256 px (32×32 latents). Each
config — mode (full fine-tuning, LoRA r64 on to_q/to_k/to_v/to_out.0, SMP, DP) × precision (fp32,
bf16 autocast) × gradient checkpointing (off, on) — runs in its own process so its peak RSS is its
own, and trains with privlora's own step (``privlora.train.loop._one_step``), not a copy of it. DP with
gradient checkpointing is refused by privlora (Opacus) and recorded as skipped.

    python benchmarks/sd15_step.py [--steps 5] [--batch-size 2] [--configs lora-fp32,dp-fp32]
    python benchmarks/sd15_step.py --tiny --steps 1 --out /tmp/sd15_step.json   # seconds: for the test

The full size needs ~15 GB of RAM and a long time per config on a CPU. Writes
benchmarks/results/sd15_step.json (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _sd15_models import all_configs, config_name, parse_config, privlora_steps, train_config  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "sd15_step.json"


def ratios(rows: dict[str, dict[str, Any]], precision: str, checkpointing: bool) -> dict[str, float | None]:
    """The issue's ratios in one (precision, checkpointing) setting; None where a config did not run."""

    def get(mode: str, key: str) -> float | None:
        row = rows.get(config_name(mode, precision, checkpointing), {})
        return row.get(key)

    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = get(a, key), get(b, key)
        return x / y if x is not None and y else None

    return {"lora_vs_full_step": ratio("lora", "full", "median_step_s"),
            "lora_vs_full_memory": ratio("lora", "full", "peak_rss_mb"),
            "smp_vs_plain_step": ratio("smp", "lora", "median_step_s"),
            "dp_vs_plain_step": ratio("dp", "lora", "median_step_s"),
            "dp_vs_plain_memory": ratio("dp", "lora", "peak_rss_mb")}


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    refused = train_config(name, batch=args.batch_size, device="cpu")
    if isinstance(refused, str):  # known without starting a process
        return {"config": name, "skipped": refused}
    command = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--batch-size", str(args.batch_size), "--resolution", str(args.resolution)]
    if args.tiny:
        command.append("--tiny")
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"config": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per config")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 256; --tiny 16)")
    parser.add_argument("--configs", default=",".join(all_configs()),
                        help="comma-separated mode-precision[-gc] names, e.g. lora-fp32,dp-bf16")
    parser.add_argument("--tiny", action="store_true", help="tiny models, for the test (seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch_size < 2:
        parser.error("--batch-size must be at least 2")
    args.resolution = args.resolution or (16 if args.tiny else 256)
    if args.worker:
        print(json.dumps(privlora_steps(args.worker, tiny=args.tiny, resolution=args.resolution,
                                        batch=args.batch_size, steps=args.steps, warmup=args.warmup,
                                        device="cpu")))
        return
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    for name in names:
        parse_config(name)  # fail before any run on a typo
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        rows[name] = run_child(name, args)
        row = rows[name]
        shown = f"{row['median_step_s']:.3f} s/step, {row['peak_rss_mb']:.0f} MB" if "median_step_s" in row \
            else row.get("skipped") or row.get("error")
        print(f"{name}: {shown}", file=sys.stderr)
    by_setting = {config_name("x", p, gc)[2:]: ratios(rows, p, gc) for p in ("fp32", "bf16") for gc in (False, True)}
    result = {"benchmark": "sd15_step", "model": "tiny" if args.tiny else "sd15 (random weights)",
              "resolution": args.resolution, "batch_size": args.batch_size, "steps": args.steps,
              "warmup": args.warmup, "device": "cpu",
              "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                          "torch_threads": os.environ.get("OMP_NUM_THREADS")},
              "ratios": by_setting["fp32"], "ratios_by_setting": by_setting, "configs": rows,
              "notes": "each config in its own process (peak RSS its own, model building included); every "
                       "mode processes the same fixed batch per step (DP's Poisson draw replaced, timing only)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratios": result["ratios"]}, indent=2))


if __name__ == "__main__":
    main()
