"""Throughput and GPU memory of privlora's training step on a Stable-Diffusion-1.5-size model at 512 px,
against a minimal diffusers-style reference loop on the same model, batch and precision (issue 21).

The models are SD 1.5's published configs with random weights (see ``_sd15_models.py``; nothing is
downloaded), 512 px → 64×64 latents. Per mode (full fine-tuning, LoRA r64 on to_q/to_k/to_v/to_out.0,
SMP, DP) and precision (fp32, bf16 autocast) it measures samples/s and
``torch.cuda.max_memory_allocated`` of privlora's own step (``privlora.train.loop._one_step``). The
reference is the step of diffusers' ``examples/text_to_image/train_text_to_image_lora.py``, written out
below: VAE-encode (×0.18215), noise, random timesteps, text-encoder states, UNet, MSE on the noise,
backward, clip, AdamW step — LoRA attached with ``unet.add_adapter`` as that script does. The ratio
``privlora_plain_vs_reference`` is privlora LoRA samples/s over the reference's in the same precision.
Two known differences, both kept on purpose: privlora caches each caption's text-encoder states
(the reference re-encodes every step, as the script does) and encodes with the VAE posterior's mean
(the script samples it); the frozen weights stay fp32 under autocast in both.

    python benchmarks/sd15_gpu.py [--steps 20] [--batch-size 4]
    python benchmarks/sd15_gpu.py --tiny --device cpu --steps 1 --out /tmp/sd15_gpu.json  # the test

Each config runs in its own process. Writes benchmarks/results/sd15_gpu.json (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _sd15_models import (  # noqa: E402
    LORA_TARGETS,
    MODES,
    PRECISIONS,
    build_pipeline,
    config_name,
    images,
    peak_rss_mb,
    privlora_steps,
    train_config,
)

RESULTS = Path(__file__).parent / "results" / "sd15_gpu.json"
REFERENCE = "reference"


def all_configs() -> list[str]:
    return [config_name(m, p, False) for m in (*MODES, REFERENCE) for p in PRECISIONS]


def reference_steps(precision: str, *, tiny: bool, resolution: int, batch: int, steps: int, warmup: int,
                    device: str) -> dict[str, Any]:
    """The diffusers LoRA script's training step, on the same model, data and precision."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig

    torch.manual_seed(0)
    pipe = build_pipeline(tiny)
    unet, vae, text_encoder, tokenizer, scheduler = (pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                                     pipe.scheduler)
    for frozen in (unet, vae, text_encoder):
        frozen.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=64, lora_alpha=32, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS)))
    for module in (unet, vae, text_encoder):
        module.to(device)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    data = images(4 * batch, resolution, 0)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    unet.train()
    times = []
    for i in range(warmup + steps):
        idx = [(i * batch + k) % len(data) for k in range(batch)]
        pixels = data.pixels[idx].to(device)
        input_ids = tokenizer([data.captions[k] for k in idx], max_length=tokenizer.model_max_length,
                              padding="max_length", truncation=True, return_tensors="pt").input_ids.to(device)
        if cuda and i == warmup:
            torch.cuda.reset_peak_memory_stats()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device).long()
            noisy = scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
            model_pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"config": config_name(REFERENCE, precision, False), "mode": REFERENCE, "precision": precision,
            "batch_size": batch, "resolution": resolution, "steps": steps, "warmup": warmup,
            "median_step_s": statistics.median(times), "samples_per_s": batch / statistics.median(times),
            "trainable_params": sum(p.numel() for p in params), "peak_rss_mb": peak_rss_mb(),
            "cuda_max_memory_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {"tiny": args.tiny, "resolution": args.resolution, "batch": args.batch_size, "steps": args.steps,
              "warmup": args.warmup, "device": args.device}
    mode, precision = name.split("-")[:2]
    if mode == REFERENCE:
        return reference_steps(precision, **kwargs)
    return privlora_steps(name, **kwargs)


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    if not name.startswith(REFERENCE):
        refused = train_config(name, batch=args.batch_size, device="cpu")
        if isinstance(refused, str):
            return {"config": name, "skipped": refused}
    command = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--batch-size", str(args.batch_size), "--resolution", str(args.resolution),
               "--device", args.device]
    if args.tiny:
        command.append("--tiny")
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:  # e.g. out of GPU memory in full fine-tuning: recorded, the others still run
        return {"config": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per precision: privlora LoRA vs the reference (throughput), and each mode vs privlora LoRA."""

    def get(mode: str, precision: str, key: str) -> float | None:
        return rows.get(config_name(mode, precision, False), {}).get(key)

    def ratio(x: float | None, y: float | None) -> float | None:
        return x / y if x is not None and y else None

    out = {}
    for p in PRECISIONS:
        out[p] = {"privlora_plain_vs_reference": ratio(get("lora", p, "samples_per_s"),
                                                       get(REFERENCE, p, "samples_per_s")),
                  "privlora_plain_vs_reference_memory": ratio(get("lora", p, "cuda_max_memory_allocated_mb"),
                                                              get(REFERENCE, p, "cuda_max_memory_allocated_mb")),
                  **{f"{m}_vs_plain_throughput": ratio(get(m, p, "samples_per_s"), get("lora", p, "samples_per_s"))
                     for m in ("full", "smp", "dp")}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per config")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 512; --tiny 16)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--configs", default=",".join(all_configs()),
                        help="comma-separated mode-precision names, mode in full/lora/smp/dp/reference")
    parser.add_argument("--tiny", action="store_true", help="tiny models, for the test (seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.resolution = args.resolution or (16 if args.tiny else 512)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in all_configs()]
    if unknown:
        parser.error(f"unknown config {unknown[0]!r}; choose from {', '.join(all_configs())}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda but no CUDA GPU is available (use --tiny --device cpu to try it)")
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        rows[name] = row = run_child(name, args)
        shown = f"{row['samples_per_s']:.2f} samples/s" if "samples_per_s" in row \
            else row.get("skipped") or row.get("error")
        print(f"{name}: {shown}", file=sys.stderr)
    gpu = None
    if args.device.startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name(0)
    result = {"benchmark": "sd15_gpu", "model": "tiny" if args.tiny else "sd15 (random weights)",
              "resolution": args.resolution, "batch_size": args.batch_size, "steps": args.steps,
              "warmup": args.warmup, "device": args.device, "gpu": gpu,
              "machine": {"python": platform.python_version()},
              "ratios": summarise(rows), "configs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratios": result["ratios"]}, indent=2))


if __name__ == "__main__":
    main()
