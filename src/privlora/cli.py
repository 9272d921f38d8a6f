"""The ``privlora`` command line: parses options and calls the library. No logic of its own."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from privlora.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune with LoRA without leaking the training data, and measure what still leaks.")
base_app = typer.Typer(no_args_is_help=True, help="The embedded base model: how it was made.")
app.add_typer(base_app, name="base")

F = TypeVar("F", bound=Callable[..., Any])


def _one_line_errors(fn: F) -> F:
    """Print a :class:`UserError` as one line on stderr and exit with its code (2; 130 on Ctrl-C)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(code=e.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def _offline_defaults() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"  # type: ignore[assignment]
    warnings.filterwarnings("ignore", message=".*Full backward hook.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


@app.command()
@_one_line_errors
def train(
    config: Path = typer.Option(None, "--config", "-c", help="YAML config (see configs/); flags override it."),
    mode: str = typer.Option(None, help="plain | dp | mp | smp"),
    out: Path = typer.Option(None, help="Run directory to create (written atomically)."),
    max_steps: int = typer.Option(None, "--max-steps", help="Number of LoRA updates."),
    base: str = typer.Option(None, help="'embedded', a diffusers folder or model id (UNet2DModel or SD)."),
    data: str = typer.Option(None, help="demo:faces | demo:digits | image folder with captions."),
    seed: int = typer.Option(None, help="Seed for splits, noise, timesteps and init; same seed, same numbers."),
    batch_size: int = typer.Option(None, "--batch-size", help="Batch (expected batch under DP)."),
    lr: float = typer.Option(None, help="Learning rate."),
    rank: int = typer.Option(None, help="LoRA rank."),
    noise_multiplier: float = typer.Option(None, "--noise-multiplier", help="DP: σ (or use --target-epsilon)."),
    target_epsilon: float = typer.Option(None, "--target-epsilon", help="DP: calibrate σ to this ε."),
    max_grad_norm: float = typer.Option(None, "--max-grad-norm", help="DP: per-sample clipping norm C."),
    delta: float = typer.Option(None, help="DP: δ (default 1/(10·N))."),
    alpha: float = typer.Option(None, help="MP/SMP: weight α of the attacker's loss."),
    beta: float = typer.Option(None, help="SMP: β in L_ada / (β + α·L_att)."),
    prompt: str = typer.Option(None, help="SD path: caption for images that have none."),
    device: str = typer.Option(None, help="cpu | cuda | cuda:N"),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its checkpoint."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow pickle weights for the base."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    set_: list[str] = typer.Option([], "--set", help="Any config key, e.g. --set optim.weight_decay=0.01."),
) -> None:
    """Train a LoRA adapter: plain, DP-LoRA (Opacus), MP-LoRA or SMP-LoRA; writes a run directory."""
    from privlora.config import CLEAR, load_config, parse_assignment

    _offline_defaults()
    named: dict[str, Any] = {
        "mode": mode, "out": str(out) if out else None, "optim.max_steps": max_steps, "base": base,
        "data.source": data, "seed": seed, "optim.batch_size": batch_size, "optim.lr": lr, "lora.rank": rank,
        "dp.noise_multiplier": noise_multiplier, "dp.target_epsilon": target_epsilon,
        "dp.max_grad_norm": max_grad_norm, "dp.delta": delta, "mp.alpha": alpha, "mp.beta": beta,
        "prompt": prompt, "device": device, "resume": resume or None, "trust_pickle": trust_pickle or None,
        "quiet": quiet or None,
    }
    # σ and a target ε are alternatives: naming one on the command line drops the other from the file
    if noise_multiplier is not None and target_epsilon is None:
        named["dp.target_epsilon"] = CLEAR
    if target_epsilon is not None and noise_multiplier is None:
        named["dp.noise_multiplier"] = CLEAR
    # named flags win over --set, which wins over the config file
    overrides: dict[str, Any] = dict(parse_assignment(s) for s in set_)
    overrides.update({k: v for k, v in named.items() if v is not None})
    settings = load_config(config, overrides)  # bad keys fail here, before torch is imported
    from privlora.train.loop import train as run_training

    result = run_training(settings)
    eps = result.privacy.get("epsilon")
    privacy = (f"ε={eps:.3g} (δ={result.privacy['delta']:.2g})" if isinstance(eps, float)
               else result.privacy["mechanism"])
    u = result.utility
    typer.echo(f"{result.mode}: {result.steps} steps in {result.seconds:.0f}s → {result.run_dir}")
    typer.echo(f"  privacy: {privacy}")
    typer.echo(f"  held-out denoising loss {u['loss_heldout']:.4f} (base {u['base_loss_heldout']:.4f}), "
               f"members {u['loss_members']:.4f} (base {u['base_loss_members']:.4f})")
    if "fd_heldout" in u:
        typer.echo(f"  Fréchet distance to held-out images {u['fd_heldout']:.3f} (base {u['base_fd_heldout']:.3f})")


@app.command()
@_one_line_errors
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

    _offline_defaults()
    result = run_generate(source, out=out, n=n, seed=seed, steps=steps, base=base, prompt=prompt,
                          device=device, trust_pickle=trust_pickle)
    typer.echo(f"wrote {result.count} images to {result.out}")


@app.command()
@_one_line_errors
def audit(
    run: Path = typer.Option(..., "--run", help="Run directory written by `privlora train`."),
    attacks: str = typer.Option("loss", help="Comma-separated attacks (available: loss)."),
    seed: int = typer.Option(0, help="Seed for the attacks' noise."),
) -> None:
    """Membership audit of a run: members vs evaluation non-members, adapter vs base-model control."""
    from privlora.audit.runner import audit_run

    _offline_defaults()
    results = audit_run(run, attacks=tuple(a.strip() for a in attacks.split(",") if a.strip()), seed=seed)
    typer.echo(f"audit of {run} ({results['members']} members vs {results['nonmembers']} non-members) "
               f"→ {run / 'audit'}")
    for name, r in results["attacks"].items():
        a, b = r["adapter"], r["base_control"]
        tpr = a["tpr_at_0.01_fpr"]
        typer.echo(f"  {name}: AUC {a['auc']:.3f} [{a['auc_ci_low']:.3f}, {a['auc_ci_high']:.3f}]  "
                   f"base control {b['auc']:.3f} [{b['auc_ci_low']:.3f}, {b['auc_ci_high']:.3f}]  "
                   f"TPR@1%FPR {'n/a (too few non-members)' if tpr is None else f'{tpr:.3f}'}  "
                   f"ε lower bound {a['epsilon_lower_bound']:.2f}")


@base_app.command("pretrain")
@_one_line_errors
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

    _offline_defaults()
    result = pretrain_base(out=out, steps=steps, batch_size=batch_size, lr=lr, seed=seed, quiet=quiet)
    typer.echo(f"pre-trained {result.steps} steps in {result.seconds:.0f}s, loss {result.final_loss:.4f} → {out}")


@base_app.command("info")
@_one_line_errors
def base_info() -> None:
    """Show the embedded base model's architecture and provenance."""
    import json

    from privlora.tasks.embedded import assets_dir, load_embedded

    unet, _, meta = load_embedded()
    size = (assets_dir() / "base_unet.safetensors").stat().st_size
    typer.echo(json.dumps({"parameters": sum(p.numel() for p in unet.parameters()), "file_bytes": size,
                           **meta}, indent=2))


def main() -> None:
    """Console entry point."""
    app(prog_name="privlora")


if __name__ == "__main__":
    sys.exit(main())
