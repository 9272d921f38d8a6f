"""``privlora export``: write a run's adapter in the layout another tool reads (peft, diffusers, kohya)."""

from __future__ import annotations

from pathlib import Path

import typer

from privlora.cli.choices import EXPORT_FORMATS
from privlora.cli.common import choice, offline_defaults, one_line_errors


@one_line_errors
def export(
    run: Path = typer.Argument(..., help="Run directory written by `privlora train` (or unlearn, federate)."),
    fmt: str = typer.Option(..., "--format", click_type=choice(EXPORT_FORMATS),
                            help="peft: peft's adapter_model.safetensors layout (PeftModel.from_pretrained, "
                            "privlora) | diffusers: pytorch_lora_weights.safetensors (pipe.load_lora_weights) | "
                            "kohya: lora_unet_… keys with .alpha (AUTOMATIC1111/Forge, ComfyUI, kohya sd-scripts, "
                            "and diffusers' load_lora_weights too)."),
    out: Path = typer.Option(..., "--out", help="File to write (safetensors; written atomically)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
) -> None:
    """Write RUN's adapter as one safetensors file in another tool's format.

    kohya needs a Stable Diffusion (UNet2DConditionModel) run; the embedded UNet2DModel exports
    as diffusers or peft (no kohya-format reader loads a UNet2DModel); text runs export as peft only. The
    header records privlora's version, the base, rank, alpha and the sha256 of the run's
    adapter_model.safetensors (kohya files also carry ss_network_dim / ss_network_alpha).

    Example: privlora export runs/sd-lora --format kohya --out my_lora.safetensors
    """
    offline_defaults()
    from privlora.export import export_run

    typer.echo(f"wrote {export_run(run, fmt, out, force=force)}")
