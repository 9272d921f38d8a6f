"""``synthesize()``: a replacement dataset from a run's adapter, as an image folder ``privlora train`` reads.

Why it can be shared: images sampled from a DP-trained adapter are a function of the adapter alone
(plus public randomness and a public prompt), and differential privacy is closed under
post-processing — the synthetic set carries the adapter's (ε, δ), no more and no less. The output's
``privacy.json`` states exactly that, copied from the run's own ``privacy.json``. Two things break
the argument, and both are said loudly rather than hidden:

* a non-DP source (plain, MP/SMP): there is no ε to carry; ``privacy.json`` says ``mechanism: none``;
* ControlNet conditions: they are inputs besides the adapter. Edge maps of private images carry the
  layout and often the identity of those images into the output, and ε does not cover them.

Prompts come from ``--prompt`` or the run's configured prompt — never from the training captions,
which are private data that reading directly would not be post-processing.

Image ``i`` starts from noise drawn from ``(seed, i)`` alone (the audit's per-generation seeding), so the
set depends on the seed, never on ``batch_size``.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from privlora.audit.extraction import initial_noise
from privlora.audit.provenance import sha256_file
from privlora.errors import UserError
from privlora.generate import adapter_base, grid_image
from privlora.progress import progress_bar
from privlora.runs import atomic_dir, write_json_atomic
from privlora.synthesize import conditions as cond
from privlora.synthesize.samplers import SAMPLERS, Batch, SamplerOptions, sampler_kind
from privlora.tasks.lora import PEFT_CONFIG, PEFT_WEIGHTS

PRIVACY = "privacy.json"
MANIFEST = "synthesize.json"
METADATA = "metadata.jsonl"
DP_NOTE = ("generated from a DP adapter: the same (epsilon, delta) covers the synthetic set; "
           "a non-DP source gives no guarantee")
NON_DP_NOTE = ("generated from an adapter trained without differential privacy: the synthetic set has no "
               "formal guarantee and can reproduce training images; audit it before sharing")
CONDITION_NOTE = ("ControlNet conditions are inputs besides the adapter and are NOT covered by epsilon: "
                  "edge maps of private images leak their layout, silhouettes and often identity into "
                  "every image generated from them")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def _check_run(run: Path) -> None:
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist; give a folder written by `privlora train`")
    for name, why in (("config.yaml", "not a run directory"), (f"adapter/{PEFT_CONFIG}", "has no adapter"),
                      (f"adapter/{PEFT_WEIGHTS}", "has no safetensors adapter weights"),
                      (PRIVACY, "has no privacy.json, so the synthetic set's guarantee cannot be stated")):
        if not (run / name).is_file():
            raise UserError(f"{run} {why} (missing {name})")


def is_dp(privacy: dict[str, Any]) -> bool:
    """A formal (ε, δ) from an accountant, as DP training writes it."""
    eps = privacy.get("epsilon")
    return privacy.get("mode") == "dp" and isinstance(eps, int | float) and eps == eps and eps > 0


def derived_privacy(source: dict[str, Any], run: Path, conditioning: dict[str, Any] | None) -> dict[str, Any]:
    """The synthetic set's ``privacy.json``: the source's guarantee carried over, or an explicit none."""
    if is_dp(source):
        out: dict[str, Any] = {**source, "derived_from": str(run), "post_processing": True, "note": DP_NOTE}
    else:
        out = {"mechanism": "none", "epsilon": None, "source_mode": source.get("mode"),
               "source_mechanism": source.get("mechanism"), "derived_from": str(run),
               "post_processing": True, "note": NON_DP_NOTE}
    if conditioning is not None:
        out["post_processing"] = False  # the output depends on the condition images too
        out["conditioning"] = {**conditioning, "covered_by_epsilon": False, "note": CONDITION_NOTE}
    return out


def _prompts(prompt: str | Sequence[str] | None, config_prompt: str | None, *, sd: bool) -> list[str]:
    given = [prompt] if isinstance(prompt, str) else list(prompt or [])
    if any(not p.strip() for p in given):
        raise UserError("--prompt must not be empty")
    if given:
        return given
    if config_prompt:
        return [config_prompt]
    if sd:
        raise UserError("this is a text-to-image run with no configured prompt: give --prompt (repeatable); "
                        "training captions are private and are not used as prompts")
    return [""]


def _load_conditions(controlnet: Path | None, conditions: Path | None, edges_from: Path | None,
                     *, resolution: int) -> tuple[list[Any], dict[str, Any] | None]:
    if conditions is not None and edges_from is not None:
        raise UserError("give --conditions DIR or --edges-from DIR, not both")
    if controlnet is None:
        if conditions is not None or edges_from is not None:
            raise UserError("--conditions/--edges-from need --controlnet DIR")
        return [], None
    if conditions is None and edges_from is None:
        raise UserError("--controlnet needs condition images: --conditions DIR or --edges-from DIR")
    if edges_from is not None:
        images = cond.canny_edges(edges_from, resolution=resolution)
        info = {"kind": "controlnet", "conditions": "canny edges (OpenCV)", "canny": [cond.CANNY_LOW, cond.CANNY_HIGH],
                "from": str(edges_from)}
    else:
        assert conditions is not None
        images = cond.condition_images(conditions, resolution=resolution)
        info = {"kind": "controlnet", "conditions": "condition images", "from": str(conditions)}
    info.update({"count": len(images), "sha256": cond.digest(images), "controlnet": str(controlnet),
                 "controlnet_sha256": {p.name: sha256_file(p) for p in sorted(Path(controlnet).glob("*.safetensors"))}})
    return images, info


def synthesize(run: Path, n: int, out: Path, *, seed: int = 0, steps: int = 50, batch_size: int = 32,
               prompt: str | Sequence[str] | None = None, controlnet: Path | None = None,
               conditions: Path | None = None, edges_from: Path | None = None, guidance_scale: float = 7.5,
               conditioning_scale: float = 1.0, device: str | None = None, audit: bool = False,
               quiet: bool = False) -> dict[str, Any]:
    """Generate ``n`` images from the adapter in ``run`` into the image folder ``out`` (written atomically).

    ``out`` gets ``00000.png …``, ``metadata.jsonl`` (captions: the prompt each image was made with),
    ``privacy.json`` (see :func:`derived_privacy`) and ``synthesize.json`` (settings, the adapter's
    sha256, timing). Prompts cycle over images; ControlNet conditions (SD path) cycle likewise.
    Returns ``synthesize.json``'s content with ``privacy`` added. ``audit``: also run
    :func:`privlora.synthesize.measure.audit_synthetic` (nearest-synthetic membership AUC and Carlini's
    rule against the run's members and evaluation non-members) and write it to
    ``RUN/audit/synthetic-<out name>.json`` — beside the private run, never into the shareable folder,
    since it names members.
    """
    from privlora.config import load_config
    from privlora.tasks.loading import load_task
    from privlora.tasks.lora import read_spec

    run, out = Path(run), Path(out)
    for name, value in (("--n", n), ("--steps", steps), ("--batch-size", batch_size)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if not guidance_scale >= 0:
        raise UserError(f"--guidance-scale must be 0 or more, got {guidance_scale}")
    if out.exists():
        raise UserError(f"{out} already exists; choose a new --out folder (nothing is overwritten)")
    _check_run(run)
    config = load_config(run / "config.yaml", {"resume": False})
    if config.task != "image":
        raise UserError(f"{run} is a {config.task} run; synthesize makes images from image (diffusion) runs")
    source_privacy = _read_json(run / PRIVACY)
    kind = sampler_kind_for_base(adapter_base(run / "adapter"), controlnet=controlnet is not None)
    if controlnet is not None and not kind.startswith("sd"):
        raise UserError(f"--controlnet needs a Stable Diffusion run; {run} was trained on the "
                        f"{adapter_base(run / 'adapter')!r} base (no text-conditioned UNet to control)")
    task = load_task(adapter_base(run / "adapter"), read_spec(run / "adapter"), seed=config.seed,
                     trust_pickle=config.trust_pickle, device=device or config.device)
    task.load_adapter(run / "adapter")
    task.model.eval()
    kind = sampler_kind(task, controlnet=controlnet is not None)
    prompts = _prompts(prompt, config.prompt, sd=task.needs_captions)
    images, conditioning = _load_conditions(controlnet, conditions, edges_from, resolution=int(task.resolution))
    options = SamplerOptions(steps=steps, guidance_scale=guidance_scale, conditioning_scale=conditioning_scale,
                             controlnet=cond.load_controlnet(controlnet, unet=task.model) if controlnet else None)
    sample = SAMPLERS[kind](task, options)
    privacy = derived_privacy(source_privacy, run, conditioning)
    if not is_dp(source_privacy):
        warnings.warn(f"{run} was not trained with differential privacy (mode {source_privacy.get('mode')!r}): "
                      "the synthetic set has NO privacy guarantee and may copy training images", stacklevel=2)
    if conditioning is not None:
        warnings.warn(CONDITION_NOTE, stacklevel=2)

    width = max(5, len(str(n - 1)))
    shape = tuple(task.sample_shape())
    start_time = time.perf_counter()
    with atomic_dir(out) as tmp, progress_bar("synthesize", total=n, quiet=quiet) as bar:
        rows = []
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            index = range(start, start + count)
            batch = Batch(noise=initial_noise(shape, seed, start, count),
                          prompts=[prompts[i % len(prompts)] for i in index],
                          conditions=[images[i % len(images)] for i in index] if images else [])
            pixels = sample(batch)
            for j, i in enumerate(index):
                name = f"{i:0{width}d}.png"
                grid_image(pixels[j:j + 1], columns=1).save(tmp / name, format="PNG")
                row: dict[str, Any] = {"file_name": name, "text": batch.prompts[j]}
                if images:
                    row["condition"] = i % len(images)
                rows.append(json.dumps(row))
            bar.advance(count)
        seconds = time.perf_counter() - start_time
        (tmp / METADATA).write_text("\n".join(rows) + "\n")
        adapter = run / "adapter"
        manifest: dict[str, Any] = {
            "n": n, "seed": seed, "steps": steps, "batch_size": batch_size, "sampler": kind,
            "scheduler": "DDIM eta=0, per-image noise seeds (seed, index)",
            "guidance_scale": guidance_scale if kind.startswith("sd") else None,
            "prompts": prompts, "source": {
                "run": str(run), "base": adapter_base(adapter), "mode": config.mode,
                "adapter_sha256": sha256_file(adapter / PEFT_WEIGHTS),
                "adapter_files": {p.name: sha256_file(p) for p in sorted(adapter.iterdir()) if p.is_file()}},
            "conditioning": conditioning, "image_shape": list(pixels.shape[1:]),
            "seconds": seconds, "images_per_second": n / seconds if seconds > 0 else None}
        if conditioning is not None:
            manifest["conditioning_scale"] = conditioning_scale
        write_json_atomic(tmp / PRIVACY, privacy)
        write_json_atomic(tmp / MANIFEST, manifest)
    result = {**manifest, "out": str(out), "privacy": privacy}
    if audit:
        from privlora.synthesize.measure import audit_synthetic

        report = audit_synthetic(run, out, seed=seed)
        path = run / "audit" / f"synthetic-{out.name}.json"
        write_json_atomic(path, {**report, "synthetic_folder": str(out)})
        result["audit"] = {"path": str(path), "dcr_auc": report["dcr"]["auc"],
                           "normalised_auc": report["normalised"]["auc"], "extraction": report["extraction"]}
    return result


def sampler_kind_for_base(base: str, *, controlnet: bool) -> str:
    """The sampler kind a base will get, known before loading it (SD: a pipeline folder or a hub id)."""
    path = Path(base)
    sd = (path / "model_index.json").is_file() or (not path.exists() and "/" in base and base != "embedded"
                                                   and not base.startswith((".", "/")))
    kind = "sd" if sd else "pixel"
    return f"{kind}+controlnet" if controlnet else kind
