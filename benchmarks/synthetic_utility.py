"""Synthetic replacement data: what it is worth and what it leaks, from a DP and from a plain source.

For each pair of source runs (same data, same split, one DP-LoRA and one plain):

1. ``privlora synthesize`` ``n`` images from each source (20 DDIM steps, the embedded base);
2. **leakage** — for every member and every evaluation non-member, the tiled ℓ2 to its nearest synthetic
   image; AUC of "closer = member" (checked against ``sklearn.metrics.roc_auc_score``), Carlini's
   normalised-distance rule on every synthetic image over members ∪ non-members (flags on members vs
   the members' share of the pool), and the same AUC with the normalised score;
3. **utility** — one recipe (the pair's plain config, plain mode, ``--utility-steps`` updates) trained on
   each synthetic set and on the real members; held-out denoising loss on the source's evaluation
   non-members (lower is better; the base's loss is what learning nothing gives), plus a Fréchet
   distance of the images to those non-members.

Pairs: ``faces`` (configs/demo-plain.yaml vs configs/demo-dp.yaml: 32 members, where plain training
memorises) and ``digits`` (configs/dp-digits.yaml as DP vs the same recipe in plain mode: 627 members,
DP that learns). Source runs and synthetic sets are kept in ``--work`` and reused on a rerun.

    OMP_NUM_THREADS=1 python benchmarks/synthetic_utility.py [--pairs faces digits] [--work DIR]
        [--steps 20] [--utility-steps 150] [--source-steps N]

Writes benchmarks/results/synthetic_utility.json (merged per pair, so pairs can run separately).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "synthetic_utility.json"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST_EVAL = {"eval.samples": 0}

PAIRS: dict[str, dict[str, Any]] = {
    "faces": {"dp": (CONFIGS / "demo-dp.yaml", {}), "plain": (CONFIGS / "demo-plain.yaml", {}),
              "recipe": CONFIGS / "demo-plain.yaml", "n": 256},
    "digits": {"dp": (CONFIGS / "dp-digits.yaml", {}), "plain": (CONFIGS / "dp-digits.yaml", {"mode": "plain"}),
               "recipe": CONFIGS / "dp-digits.yaml", "n": 627},
}


def _source(config_file: Path, overrides: dict[str, Any], out: Path, *, steps: int | None) -> dict[str, Any]:
    """Train a source run once (reused when ``out`` exists)."""
    from privlora.config import load_config
    from privlora.train.loop import train

    if not out.exists():
        settings = {**overrides, **FAST_EVAL, "out": str(out), "quiet": True}
        if steps is not None:
            settings["optim.max_steps"] = steps
        start = time.perf_counter()
        train(load_config(config_file, settings))
        (out / "bench_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    privacy = json.loads((out / "privacy.json").read_text())
    utility = json.loads((out / "utility.json").read_text())
    seconds = out / "bench_seconds.txt"
    return {"run": str(out), "config": str(config_file), "overrides": overrides, "mode": privacy["mode"],
            "epsilon": privacy.get("epsilon"), "delta": privacy.get("delta"),
            "train_seconds": float(seconds.read_text()) if seconds.exists() else None,
            "loss_heldout": utility.get("loss_heldout"), "base_loss_heldout": utility.get("base_loss_heldout")}


def _pair(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import warnings

    from sklearn.metrics import roc_auc_score

    from privlora.synthesize import synthesize
    from privlora.synthesize.measure import audit_synthetic, fidelity, source_utility, trained_utility

    spec = PAIRS[name]
    n = args.n or spec["n"]
    out: dict[str, Any] = {"n": n, "sample_steps": args.steps, "utility_steps": args.utility_steps,
                           "recipe": str(spec["recipe"]) + " (mode plain)", "sources": {}}
    real = None
    for kind in args.kinds:
        config_file, overrides = spec[kind]
        steps = args.source_steps
        run = work / name / f"{kind}-run"
        source = _source(config_file, overrides, run, steps=steps)
        synth_dir = work / name / f"{kind}-synthetic-n{n}-s{args.steps}"
        if not synth_dir.exists():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                synthesize(run, n, synth_dir, seed=args.seed, steps=args.steps, batch_size=64, quiet=True)
        manifest = json.loads((synth_dir / "synthesize.json").read_text())
        privacy = json.loads((synth_dir / "privacy.json").read_text())
        audit = audit_synthetic(run, synth_dir, seed=args.seed)
        scores = audit.pop("scores")
        sk = {key: float(roc_auc_score(scores["member"], [-v for v in scores[key]])) for key in ("dcr", "normalised")}
        entry: dict[str, Any] = {
            "source": source, "synthetic_privacy": {"mechanism": privacy["mechanism"],
                                                    "epsilon": privacy.get("epsilon"),
                                                    "post_processing": privacy["post_processing"]},
            "synthesize_seconds": manifest["seconds"], "images_per_second": manifest["images_per_second"],
            "membership": audit, "auc_sklearn": sk,
            "source_adapter_heldout": source_utility(run), "fidelity": fidelity(run, synth_dir)}
        if args.utility_steps > 0:
            entry["trained_on_synthetic"] = trained_utility(run, work / name / f"{kind}-utility",
                                                            synthetic=synth_dir, steps=args.utility_steps,
                                                            seed=args.seed, recipe=spec["recipe"])
            if real is None:
                real = trained_utility(run, work / name / "real-utility", synthetic=None,
                                       steps=args.utility_steps, seed=args.seed, recipe=spec["recipe"])
        out["sources"][kind] = entry
        print(f"[{name}/{kind}] eps={source['epsilon']} AUC(dcr)={audit['dcr']['auc']:.3f} "
              f"(sklearn {sk['dcr']:.3f}) AUC(norm)={audit['normalised']['auc']:.3f} "
              f"flags {audit['extraction']['flagged_on_members']}/{audit['extraction']['flagged']} on members",
              flush=True)
        if real is not None:
            print(f"  synthetic-trained held-out loss {entry['trained_on_synthetic']['loss_heldout']:.5f} "
                  f"(base {entry['trained_on_synthetic']['base_loss_heldout']:.5f}, real {real['loss_heldout']:.5f})",
                  flush=True)
    out["trained_on_real"] = real
    return out


def _base_control(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The same audit for images from the base model alone (adapter disabled, same noise seeds): what
    the base and chance give. Both sources of a pair share base, split and seed, so one control serves
    both. Cached in ``work/<pair>/base-control.json``."""
    import torch

    from privlora.audit.extraction import initial_noise
    from privlora.audit.runner import load_run
    from privlora.synthesize.measure import nearest_synthetic_audit
    from privlora.synthesize.samplers import SAMPLERS, Batch, SamplerOptions

    cache = work / name / f"base-control-n{args.control_n}-s{args.steps}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    loaded = load_run(work / name / "dp-run")
    sample = SAMPLERS["pixel"](loaded.task, SamplerOptions(steps=args.steps))
    shape, pixels = tuple(loaded.task.sample_shape()), []
    start = time.perf_counter()
    with loaded.task.adapter_disabled():
        for first in range(0, args.control_n, 64):
            count = min(64, args.control_n - first)
            pixels.append(sample(Batch(noise=initial_noise(shape, args.seed, first, count), prompts=[""] * count)))
    seconds = time.perf_counter() - start
    # the same PNG round trip the synthetic folders go through (uint8 pixels)
    images = ((torch.cat(pixels) + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1
    audit = nearest_synthetic_audit(images, loaded.members, loaded.held_out, delta=loaded.delta, seed=args.seed)
    audit.pop("scores")
    result = {"n": args.control_n, "sample_steps": args.steps, "generation_seconds": seconds,
              "what": "base model alone (adapter disabled), same per-image noise seeds", "membership": audit}
    cache.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["faces", "digits"], choices=sorted(PAIRS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/privlora-synthetic-utility"))
    parser.add_argument("--n", type=int, default=None, help="synthetic images per source (default per pair)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per synthetic image")
    parser.add_argument("--utility-steps", type=int, default=150, help="0: skip the utility trainings")
    parser.add_argument("--kinds", nargs="+", default=["dp", "plain"], choices=["dp", "plain"],
                        help="which sources of each pair")
    parser.add_argument("--source-steps", type=int, default=None,
                        help="override the source configs' step counts (None: the configs' own)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--control-n", type=int, default=128,
                        help="images from the base alone for the audit's control (0: none)")
    parser.add_argument("--control-only", action="store_true",
                        help="only (compute and) add the base-model control to the existing results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    for name in args.pairs:
        start = time.perf_counter()
        pair = {} if args.control_only else {**_pair(name, args.work, args), "seconds": time.perf_counter() - start}
        control = _base_control(name, args.work, args) if args.control_n > 0 else None
        # re-read just before writing: pairs may run in separate processes and each keeps the others'
        results = json.loads(args.results.read_text()) if args.results.exists() else {
            "benchmark": "synthetic_utility", "pairs": {}}
        if args.control_only:
            pair = results["pairs"].get(name, {})
        if control is not None:
            pair["base_control"] = control
        results["pairs"][name] = pair
        results["machine"] = {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                              "threads": torch.get_num_threads(),
                              "note": "2 shared cores, other jobs running: times are upper bounds"}
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.results} ({name})", flush=True)


if __name__ == "__main__":
    main()
