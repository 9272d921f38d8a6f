"""Training commands: ``train``, ``generate`` and the ``base`` group (the embedded base model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from privlora.cli.choices import DP_CLIPPINGS, LR_SCHEDULERS, MODES, PRECISIONS, REPORTERS, SPLITS, TASKS
from privlora.cli.common import QUIET, choice, group, offline_defaults, one_line_errors, overrides

base_app = group(help="The embedded base model: how it was made.")


def _crop(center: bool, random: bool) -> bool | None:
    """``data.center_crop`` from the two flags (None: neither given, the config decides)."""
    if center and random:
        from privlora.errors import UserError

        raise UserError("give --center-crop or --random-crop, not both")
    return True if center else False if random else None


@one_line_errors
def train(
    config: Path = typer.Option(None, "--config", "-c", help="YAML config (see configs/); flags override it."),
    mode: str = typer.Option(None, click_type=choice(MODES), help="plain (no privacy) | dp (DP-LoRA) | mp | "
                             "smp (MP-/SMP-LoRA against a membership attacker); default: the config's, else plain."),
    task: str = typer.Option(None, click_type=choice(TASKS), help="image (diffusion, default) | text (MiniLM "
                             "sentence classifier on demo:tweets or a CSV/JSONL with text,label) | causal-lm "
                             "(LoRA instruction tuning of a causal LM on demo:support or a prompt/response JSONL)."),
    out: Path = typer.Option(None, help="Run directory to create (written atomically)."),
    max_steps: int = typer.Option(None, "--max-steps", help="Number of LoRA updates."),
    num_train_epochs: int = typer.Option(
        None, "--num-train-epochs", help="Instead of --max-steps: N passes over the members, i.e. "
        "ceil(N × members / (K×B)) updates. dp: an epoch is the expected members/(K×B) Poisson batches "
        "(each member sampled once per epoch on average, not exactly once)."),
    base: str = typer.Option(None, help="'embedded', a diffusers folder or model id (UNet2DModel or SD); "
                             "causal-lm: 'embedded-lm', a transformers causal-LM folder or cached model name."),
    data: str = typer.Option(None, help="demo:faces | demo:digits | demo:idcards | image folder (metadata.jsonl/"
                             ".csv, .caption/.txt sidecars, kohya N_name repeat folders) | datasets save_to_disk "
                             "folder | dataset name in the local HF cache (offline); text: demo:tweets | CSV/JSONL "
                             "file | save_to_disk folder | cached dataset name; causal-lm: demo:support | JSONL "
                             "(prompt/response or messages)."),
    split: str = typer.Option(None, "--split", click_type=choice(SPLITS), help="Which share of the data trains: "
                              "train (default: 80 % members, 10 % aux non-members for MP/SMP's attacker, 10 % eval "
                              "non-members for the audit) | audit (32/32/36 %, the demo's and benchmarks' split). "
                              "Replaces the config's data.members/aux/eval; --set data.members=… still overrides it."),
    image_column: str = typer.Option(None, "--image-column", help="Hugging Face data: the image column "
                                     "(default: the Image feature, else 'image')."),
    caption_column: str = typer.Option(None, "--caption-column", help="Caption column of a Hugging Face "
                                       "dataset or metadata.jsonl/.csv (default: text, caption or prompt)."),
    text_column: str = typer.Option(None, "--text-column", help="Text task: the text column (default text)."),
    label_column: str = typer.Option(None, "--label-column", help="Text task: the label column (default label)."),
    seed: int = typer.Option(None, help="Seed for splits, noise, timesteps and init; same seed, same numbers."),
    batch_size: int = typer.Option(None, "--batch-size", help="Batch (expected batch under DP)."),
    lr: float = typer.Option(None, help="Learning rate."),
    gradient_accumulation_steps: int = typer.Option(
        None, "--gradient-accumulation-steps", help="K micro-batches of --batch-size per update (default 1). "
        "plain/mp/smp: one update of K×B samples. dp: ONE logical Poisson batch of expected size K×B "
        "(q = K·B/N, accounted so in privacy.json) processed in chunks of B, noised once per update."),
    lr_scheduler: str = typer.Option(None, "--lr-scheduler", click_type=choice(LR_SCHEDULERS),
                                     help="Learning-rate schedule (diffusers' get_scheduler), stepped per update; "
                                     "default constant."),
    lr_warmup_steps: int = typer.Option(None, "--lr-warmup-steps", help="Warmup updates for the schedule "
                                        "(constant ignores them)."),
    mixed_precision: str = typer.Option(None, "--mixed-precision", click_type=choice(PRECISIONS),
                                        help="Autocast the forward pass (LoRA weights stay fp32); fp16 adds a "
                                        "GradScaler and is refused under dp (use bf16)."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute the UNet's "
                                                "activations in backward (less memory, slower; not with dp)."),
    resolution: int = typer.Option(None, help="Image side in pixels (default: the base model's)."),
    center_crop: bool = typer.Option(False, "--center-crop", help="Resize the shorter side to --resolution, "
                                     "then crop the centre (the default; overrides a config's random crop)."),
    random_crop: bool = typer.Option(False, "--random-crop", help="Resize the shorter side to --resolution, "
                                     "then crop a random square each step (seeded from --seed)."),
    random_flip: bool = typer.Option(False, "--random-flip", help="Flip training images horizontally with "
                                     "probability ½ (seeded from --seed)."),
    rank: int = typer.Option(None, help="LoRA rank."),
    noise_multiplier: float = typer.Option(None, "--noise-multiplier", help="DP: σ (or use --target-epsilon)."),
    target_epsilon: float = typer.Option(None, "--target-epsilon", help="DP: calibrate σ to this ε."),
    max_grad_norm: float = typer.Option(None, "--max-grad-norm", help="DP: per-sample clipping norm C."),
    delta: float = typer.Option(None, help="DP: δ (default 1/(10·N))."),
    dp_clipping: str = typer.Option(None, "--dp-clipping", click_type=choice(DP_CLIPPINGS),
                                    help="DP: materialise per-sample gradients (per-sample, the default) or compute "
                                    "only their norms (Opacus ghost clipping: two backward passes, same ε)."),
    alpha: float = typer.Option(None, help="MP/SMP: weight α of the attacker's loss."),
    beta: float = typer.Option(None, help="SMP: β in L_ada / (β + α·L_att)."),
    mp_attacker: str = typer.Option(None, "--mp-attacker", click_type=choice(("paper", "calibrated")),
                                    help="MP/SMP: the proxy attacker reads the raw error map (paper) or the "
                                    "adapter's error relative to the base model's on the same noise (calibrated)."),
    privacy_stop_every: int = typer.Option(None, "--privacy-stop-every", help="Privacy-aware early stopping: "
                                           "attack a probe (members vs aux non-members) every N steps and stop "
                                           "before its advantage exceeds --max-advantage (not with dp)."),
    max_advantage: float = typer.Option(None, "--max-advantage", help="Privacy stop: bound on the probe attack's "
                                        "advantage 2·AUC−1 (default 0.1); the last adapter under it is kept."),
    prompt: str = typer.Option(None, help="SD path: caption for images that have none."),
    cache_latents: bool = typer.Option(False, "--cache-latents", help="SD path: keep the frozen VAE latents and "
                                       "text-encoder states on disk, keyed by image, caption and encoder weights, "
                                       "and reuse them across runs. Refused with --random-crop (every crop is new); "
                                       "--random-flip caches both orientations. The files decode back to the images: "
                                       "keep them where the private data may live."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Folder of the --cache-latents files (default "
                                   "$XDG_CACHE_HOME/privlora, i.e. ~/.cache/privlora)."),
    validation_prompt: str = typer.Option(None, "--validation-prompt", help="Every --validation-steps write "
                                          "<out>/validation/step-<k>.png sampled from the current adapter "
                                          "(unconditional bases: ignored, images sampled without it)."),
    validation_steps: int = typer.Option(None, "--validation-steps", help="Steps between validation grids "
                                         "(default 100)."),
    num_validation_images: int = typer.Option(None, "--num-validation-images", help="Images per validation "
                                              "grid (default 4)."),
    report_to: str = typer.Option(None, "--report-to", click_type=choice(REPORTERS),
                                  help="Also log metrics.jsonl's figures and the validation grids to tensorboard "
                                  "(<out>/tensorboard/) or mlflow (<out>/mlruns, pip install 'privlora[mlflow]'); "
                                  "default none."),
    device: str = typer.Option(None, help="cpu | cuda | cuda:N"),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its checkpoint."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow pickle weights for the base."),
    quiet: bool = QUIET,
    set_: list[str] = typer.Option([], "--set", help="Any config key, e.g. --set optim.weight_decay=0.01."),
) -> None:
    """Train a LoRA adapter: plain, DP-LoRA (Opacus), MP-LoRA or SMP-LoRA; writes a run directory."""
    from privlora.config import CLEAR, load_config

    offline_defaults()
    named: dict[str, Any] = {
        "mode": mode, "task": task, "out": str(out) if out else None, "optim.max_steps": max_steps, "base": base,
        "data.source": data, "data.image_column": image_column, "data.caption_column": caption_column,
        "data.text_column": text_column, "data.label_column": label_column, "data.split": split,
        "seed": seed, "optim.batch_size": batch_size, "optim.lr": lr, "lora.rank": rank,
        "dp.noise_multiplier": noise_multiplier, "dp.target_epsilon": target_epsilon,
        "dp.max_grad_norm": max_grad_norm, "dp.delta": delta, "dp.clipping": dp_clipping,
        "mp.alpha": alpha, "mp.beta": beta, "mp.attacker": mp_attacker, "privacy_stop.every": privacy_stop_every,
        "privacy_stop.max_advantage": max_advantage,
        "optim.gradient_accumulation_steps": gradient_accumulation_steps, "optim.lr_scheduler": lr_scheduler,
        "optim.lr_warmup_steps": lr_warmup_steps, "optim.mixed_precision": mixed_precision,
        "optim.gradient_checkpointing": gradient_checkpointing or None, "data.resolution": resolution,
        "data.center_crop": _crop(center_crop, random_crop), "data.random_flip": random_flip or None,
        # --max-steps replaces a config file's epochs, as --num-train-epochs replaces its max_steps
        "optim.num_train_epochs": CLEAR if max_steps is not None else num_train_epochs,
        "data.cache_latents": cache_latents or None,
        "data.cache_dir": str(cache_dir) if cache_dir else None, "validation.prompt": validation_prompt,
        "validation.steps": validation_steps, "validation.images": num_validation_images,
        "prompt": prompt, "device": device, "resume": resume or None, "trust_pickle": trust_pickle or None,
        "quiet": quiet or None, "report_to": report_to,
    }
    if max_steps is not None and num_train_epochs is not None:
        from privlora.errors import UserError

        raise UserError("give --max-steps or --num-train-epochs, not both")
    settings = load_config(config, overrides(named, set_))  # bad keys fail here, before torch is imported
    from privlora.train.loop import train as run_training

    result = run_training(settings)
    from privlora.train.distributed import is_main_process

    if not is_main_process():  # torchrun / accelerate launch: rank 0 reports, once
        return
    eps = result.privacy.get("epsilon")
    privacy = (f"ε={eps:.3g} (δ={result.privacy['delta']:.2g})" if isinstance(eps, float)
               else result.privacy["mechanism"])
    u = result.utility
    ran = (f"ran {result.steps_run} steps (resumed at step {result.resumed_at}, {result.steps} in total)"
           if result.resumed_at is not None else f"{result.steps} steps")
    typer.echo(f"{result.mode}: {ran} in {result.seconds:.0f}s → {result.run_dir}")
    typer.echo(f"  privacy: {privacy}")
    stop = result.privacy.get("early_stop")
    if stop and stop.get("stopped_at") is not None:
        typer.echo(f"  privacy stop: the probe attack passed the bound at step {stop['stopped_at']} "
                   f"(advantage > {stop['max_advantage']}); kept the adapter of step {stop['kept_step']}")
    def loss(key: str) -> str:
        return "n/a" if u.get(key) is None else f"{u[key]:.4f}"

    if "perplexity_heldout" in u:  # the causal-lm task
        typer.echo(f"  held-out response loss {loss('loss_heldout')} (base {loss('base_loss_heldout')}), "
                   f"perplexity {loss('perplexity_heldout')} (base {loss('base_perplexity_heldout')}); "
                   f"members {loss('loss_members')} (base {loss('base_loss_members')})")
        return
    if "accuracy_heldout" in u:  # the text task
        acc = "n/a" if u["accuracy_heldout"] is None else f"{u['accuracy_heldout']:.3f}"
        majority = "n/a" if u["majority_class_heldout"] is None else f"{u['majority_class_heldout']:.3f}"
        typer.echo(f"  held-out accuracy {acc} (majority class {majority}), loss {loss('loss_heldout')}; "
                   f"members {loss('accuracy_members')} accuracy")
        return
    typer.echo(f"  held-out denoising loss {loss('loss_heldout')} (base {loss('base_loss_heldout')}), "
               f"members {loss('loss_members')} (base {loss('base_loss_members')})")
    if "fd_heldout" in u:
        typer.echo(f"  Fréchet distance to held-out images {u['fd_heldout']:.3f} (base {u['base_fd_heldout']:.3f})")


@one_line_errors
def generate(
    source: Path = typer.Argument(None, help="Run directory or adapter directory (omit: base model alone)."),
    out: Path = typer.Option(Path("samples.png"), help="PNG grid to write."),
    n: int = typer.Option(16, help="Number of images."),
    seed: int = typer.Option(0, help="Sampling seed."),
    steps: int = typer.Option(50, help="DDIM steps."),
    base: str = typer.Option(None, help="Base model (default: the one the adapter was trained on)."),
    prompt: str = typer.Option(None, help="Prompt (text-to-image bases)."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle"),
) -> None:
    """Sample a grid of images from base + adapter, deterministic for a given seed."""
    from privlora.generate import generate as run_generate

    offline_defaults()
    result = run_generate(source, out=out, n=n, seed=seed, steps=steps, base=base, prompt=prompt,
                          device=device, trust_pickle=trust_pickle)
    typer.echo(f"wrote {result.count} images to {result.out}")


@base_app.command("pretrain")
@one_line_errors
def base_pretrain(
    out: Path = typer.Option(Path("base"), help="Folder for base_unet.safetensors + base_unet.json."),
    steps: int = typer.Option(3000, help="Training steps."),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(2e-3),
    seed: int = typer.Option(0),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Re-make the embedded base UNet from public images only (digits 0–4, non-faces, photo crops)."""
    from privlora.train.pretrain import pretrain_base

    offline_defaults()
    result = pretrain_base(out=out, steps=steps, batch_size=batch_size, lr=lr, seed=seed, quiet=quiet)
    typer.echo(f"pre-trained {result.steps} steps in {result.seconds:.0f}s, loss {result.final_loss:.4f} → {out}")


@base_app.command("info")
@one_line_errors
def base_info() -> None:
    """Show the embedded base model's architecture and provenance."""
    import json

    from privlora.tasks.embedded import assets_dir, load_embedded

    unet, _, meta = load_embedded()
    size = (assets_dir() / "base_unet.safetensors").stat().st_size
    typer.echo(json.dumps({"parameters": sum(p.numel() for p in unet.parameters()), "file_bytes": size,
                           **meta}, indent=2))
