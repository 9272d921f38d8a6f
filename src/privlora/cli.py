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

app = typer.Typer(add_completion=False, rich_markup_mode="markdown", no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  help="Fine-tune with LoRA without leaking the training data, and measure what still leaks.")
base_app = typer.Typer(no_args_is_help=True, help="The embedded base model: how it was made.")
app.add_typer(base_app, name="base")

F = TypeVar("F", bound=Callable[..., Any])


def _one_line_errors(fn: F) -> F:
    """Print a :class:`UserError` as one line on stderr and exit with its code (2; 130 on Ctrl-C); a failed
    file operation (full or read-only disk, no permission: :func:`privlora.errors.file_error`) likewise."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(code=e.exit_code) from None
        except Exception as e:  # noqa: BLE001 - only file failures are handled, the rest re-raised
            from privlora.errors import file_error

            failure = file_error(e)
            if failure is None:
                raise
            typer.echo(f"error: {failure}", err=True)
            raise typer.Exit(code=failure.exit_code) from None
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


def _overrides(named: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Config overrides from named flags and ``--set KEY=VALUE``: named flags win over --set, which wins
    over the config file. σ and a target ε are alternatives: naming one drops the other from the file."""
    from privlora.config import CLEAR, parse_assignment

    named = dict(named)
    sigma, target = named.get("dp.noise_multiplier"), named.get("dp.target_epsilon")
    if sigma is not None and target is None:
        named["dp.target_epsilon"] = CLEAR
    if target is not None and sigma is None:
        named["dp.noise_multiplier"] = CLEAR
    overrides: dict[str, Any] = dict(parse_assignment(a) for a in assignments)
    overrides.update({k: v for k, v in named.items() if v is not None})
    return overrides


def _names(value: str) -> tuple[str, ...]:
    """A comma-separated option → names; 'none' (or empty) → no names."""
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    return () if names in ((), ("none",)) else names


@app.command()
@_one_line_errors
def sanitize(
    src: Path = typer.Argument(..., metavar="IN", help="Dataset folder to clean (images with captions, "
                               "CSV/TSV/JSONL/TXT), or one such file."),
    out: Path = typer.Argument(None, metavar="OUT", help="Folder for the cleaned copy (must not exist; not "
                               "needed with --dry-run)."),
    faces: str = typer.Option("mtcnn", help="Face detectors, comma-separated (mtcnn, haar) or 'none'; boxes "
                              "of all of them are redacted. haar,mtcnn finds ~1 % more faces at ~3× the time."),
    face_confidence: float = typer.Option(None, "--face-confidence", help="Minimum MTCNN score for a face "
                                          "(default 0.9; lower finds more faces and more false ones)."),
    text: str = typer.Option("rapidocr", help="Printed-text detectors (rapidocr) or 'none'."),
    text_confidence: float = typer.Option(None, "--text-confidence", help="Minimum OCR reading score that "
                                          "confirms a text box (default 0.7; lower also blanks text-like "
                                          "texture such as fur or foliage)."),
    keep_text: bool = typer.Option(False, "--keep-text", help="Also read detected text and list it in the "
                                   "report (off by default: the report would then hold what was redacted)."),
    redaction: str = typer.Option("fill", help="fill (solid box, removes everything) | pixelate | blur "
                                  "(weakest: partly invertible)."),
    margin: float = typer.Option(0.1, help="Grow each box by this fraction of its size on every side."),
    dedup: bool = typer.Option(False, "--dedup", help="Keep one image per near-duplicate cluster and list the "
                               "rest (default: only report clusters)."),
    dedup_distance: int = typer.Option(6, "--dedup-distance", help="pHash bits (of 64) within which two "
                                       "images are near-duplicates."),
    pii: bool = typer.Option(True, "--pii/--no-pii", help="Scrub PII from tables and captions."),
    entities: str = typer.Option(None, help="PII types to find, comma-separated (default: the built-in set)."),
    operator: str = typer.Option("replace", help="What replaces PII: replace (type tag) | mask | hash "
                                 "(salted pseudonym, the same value → the same pseudonym)."),
    salt: str = typer.Option(None, envvar="PRIVLORA_SALT", help="Secret salt for --operator hash (or "
                             "PRIVLORA_SALT); keep it to get the same pseudonyms in the next export."),
    columns: str = typer.Option(None, help="Only these columns/keys of CSV/TSV/JSONL (default: every text one)."),
    max_pixels: int = typer.Option(8192 * 8192, "--max-pixels", help="Skip images above this many pixels "
                                   "(decompression bombs)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Report what would be done; write nothing."),
    report: Path = typer.Option(None, "--report", help="Also write the JSON report here (works with --dry-run)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it is an earlier sanitize output."),
    workers: int = typer.Option(None, "--workers", help="Processes for images (default: one per core, up to 8)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Make a cleaned copy of a dataset and a report of everything found (the input is never modified).

    Images: faces and printed text are redacted, all metadata (EXIF/GPS, XMP, IPTC, ICC, comments, PNG
    text) is dropped by re-encoding the pixels, near-duplicates are found by perceptual hash. Text tables
    and image captions: PII (names, places, e-mails, phones, cards, IDs, handles, URLs) is replaced.
    Corrupt, truncated, oversized and unknown files are reported and skipped. OUT holds the copy and
    OUT/sanitize_report.json, and is directly usable by `privlora train --data OUT`.

    Example: privlora sanitize photos/ photos-clean/ --dedup
    """
    from privlora.data.sanitize import ImageOptions, SanitizeOptions, TextOptions
    from privlora.data.sanitize import sanitize as run_sanitize
    from privlora.data.sanitize.summary import summary_lines
    from privlora.runs import write_json_atomic

    _offline_defaults()
    if out is None and not dry_run:
        raise UserError("give an output folder OUT, or --dry-run to only report")
    if not 0 <= margin <= 2:
        raise UserError(f"--margin must be between 0 and 2, got {margin}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if pii and operator == "hash" and salt is None:
        typer.echo("warning: --operator hash without --salt (or PRIVLORA_SALT): pseudonyms agree within this "
                   "run only, not with a later export", err=True)
    options = SanitizeOptions(
        images=ImageOptions(faces=_names(faces), face_confidence=face_confidence, text=_names(text),
                            text_confidence=text_confidence,
                            keep_text=keep_text, redaction=redaction, margin=margin, max_pixels=max_pixels),
        text=TextOptions(enabled=pii, entities=_names(entities) if entities else None, operator=operator,
                         salt=salt, columns=_names(columns) if columns else None),
        dedup=dedup, dedup_distance=dedup_distance, dry_run=dry_run, overwrite=overwrite,
        **({"workers": workers} if workers else {}))
    result = run_sanitize(src, out, options=options, quiet=quiet)
    for line in summary_lines(result):
        typer.echo(line)
    if report is not None:
        write_json_atomic(report, result.to_json())
        typer.echo(f"wrote {report}")


@app.command()
@_one_line_errors
def train(
    config: Path = typer.Option(None, "--config", "-c", help="YAML config (see configs/); flags override it."),
    mode: str = typer.Option(None, help="plain | dp | mp | smp"),
    task: str = typer.Option(None, help="image (diffusion, default) | text (MiniLM sentence classifier on "
                             "demo:tweets or a CSV/JSONL with text,label)."),
    out: Path = typer.Option(None, help="Run directory to create (written atomically)."),
    max_steps: int = typer.Option(None, "--max-steps", help="Number of LoRA updates."),
    base: str = typer.Option(None, help="'embedded', a diffusers folder or model id (UNet2DModel or SD)."),
    data: str = typer.Option(None, help="demo:faces | demo:digits | image folder with captions; text: "
                             "demo:tweets | CSV/JSONL file."),
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
    from privlora.config import load_config

    _offline_defaults()
    named: dict[str, Any] = {
        "mode": mode, "task": task, "out": str(out) if out else None, "optim.max_steps": max_steps, "base": base,
        "data.source": data, "seed": seed, "optim.batch_size": batch_size, "optim.lr": lr, "lora.rank": rank,
        "dp.noise_multiplier": noise_multiplier, "dp.target_epsilon": target_epsilon,
        "dp.max_grad_norm": max_grad_norm, "dp.delta": delta, "mp.alpha": alpha, "mp.beta": beta,
        "prompt": prompt, "device": device, "resume": resume or None, "trust_pickle": trust_pickle or None,
        "quiet": quiet or None,
    }
    settings = load_config(config, _overrides(named, set_))  # bad keys fail here, before torch is imported
    from privlora.train.loop import train as run_training

    result = run_training(settings)
    eps = result.privacy.get("epsilon")
    privacy = (f"ε={eps:.3g} (δ={result.privacy['delta']:.2g})" if isinstance(eps, float)
               else result.privacy["mechanism"])
    u = result.utility
    ran = (f"ran {result.steps_run} steps (resumed at step {result.resumed_at}, {result.steps} in total)"
           if result.resumed_at is not None else f"{result.steps} steps")
    typer.echo(f"{result.mode}: {ran} in {result.seconds:.0f}s → {result.run_dir}")
    typer.echo(f"  privacy: {privacy}")
    def loss(key: str) -> str:
        return "n/a" if u.get(key) is None else f"{u[key]:.4f}"

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


@app.command()
@_one_line_errors
def federate(
    config: Path = typer.Option(None, "--config", "-c", help="YAML config (e.g. configs/fed-ffa.yaml); "
                                "options below override it."),
    strategy: str = typer.Option(None, help="ffa (A frozen from a shared seed, exact, half the upload) | "
                                 "fedit (average A and B) | flora (stacking; clients may use different ranks)."),
    rounds: int = typer.Option(None, help="Federated rounds."),
    clients: int = typer.Option(None, help="Number of clients (partitions of the data)."),
    per_round: int = typer.Option(None, "--clients-per-round", help="Clients sampled per round (default: all)."),
    out: Path = typer.Option(None, help="Run directory to write (replaced atomically)."),
    data: str = typer.Option(None, help="demo:tweets or a CSV/TSV/JSONL file with text,label."),
    alpha: float = typer.Option(None, "--dirichlet-alpha", help="Non-IID label skew (smaller: more skewed)."),
    secagg: bool = typer.Option(None, "--secagg/--no-secagg", help="Flower SecAgg+: the server sees only the sum."),
    dp: str = typer.Option(None, "--dp", help="none | gaussian | laplace (client-level, on each client)."),
    noise_multiplier: float = typer.Option(None, "--noise-multiplier", help="Gaussian DP: σ."),
    target_epsilon: float = typer.Option(None, "--target-epsilon", help="Gaussian DP: calibrate σ to this ε."),
    clip: float = typer.Option(None, help="DP: bound on one client's upload (L2 gaussian, L1 laplace)."),
    compression: str = typer.Option(None, help="none | int8 (per-tensor scale, about 4× fewer bytes up)."),
    deployment: bool = typer.Option(False, "--deployment", help="Run on Flower's deployment engine: a real "
                                    "SuperLink and one SuperNode process per client on localhost (gRPC)."),
    seed: int = typer.Option(None, help="Seed for data split, client sampling and initial adapter."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    set_: list[str] = typer.Option([], "--set", help="Any config key, e.g. --set client.local_steps=20."),
) -> None:
    """Federated LoRA on Flower: clients train on their own data, only clipped/noised/compressed (or
    securely aggregated) LoRA updates reach the server; writes a run directory."""
    from privlora.config import FederatedConfig, load_config

    _offline_defaults()
    named: dict[str, Any] = {
        "strategy": strategy, "rounds": rounds, "clients": clients, "clients_per_round": per_round,
        "out": str(out) if out else None, "data.source": data, "data.alpha": alpha, "secagg.enabled": secagg,
        "dp.mechanism": dp, "dp.noise_multiplier": noise_multiplier, "dp.target_epsilon": target_epsilon,
        "dp.clip": clip, "compression": compression, "engine": "deployment" if deployment else None,
        "seed": seed, "quiet": quiet or None,
    }
    settings = load_config(config, _overrides(named, set_), model=FederatedConfig)
    from privlora.federated.run import federate as run_federated

    try:
        result = run_federated(settings)
    except KeyboardInterrupt:
        # the engine's processes are stopped and the partial run removed; its threads cannot be joined,
        # so leave now instead of waiting for them at interpreter exit
        typer.echo("interrupted: nothing was written", err=True)
        sys.stderr.flush()
        os._exit(130)
    first, last = result.rounds[0], result.final
    eps = result.privacy.get("epsilon")
    privacy = f"client-level ε={eps:.3g}" + (f" (δ={result.privacy['delta']:.2g})"
                                             if result.privacy["mechanism"] == "gaussian" else " (pure)") \
        if isinstance(eps, float) else "no DP"
    typer.echo(f"{settings.strategy}: {settings.rounds} rounds × {settings.per_round()} of {settings.clients} "
               f"clients → {result.run_dir}")
    typer.echo(f"  server test accuracy {first['accuracy']:.3f} → {last['accuracy']:.3f}, loss "
               f"{first['loss']:.3f} → {last['loss']:.3f}; {privacy}")
    typer.echo(f"  per client per round: {last.get('bytes_up_per_client', 0) / 1024:.0f} KiB up, "
               f"{last.get('bytes_down_per_client', 0) / 1024:.0f} KiB down; rejected updates: "
               f"{sum(len(m.get('rejected', [])) for m in result.rounds)}, failed clients: "
               f"{sum(m.get('failures', 0) for m in result.rounds)}")


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
    run: list[Path] = typer.Option(None, "--run", help="Run directory written by `privlora train`; repeat to "
                                   "compare several runs in one report (they share the reference adapters)."),
    sweep: Path = typer.Option(None, "--sweep", help="Audit every run directory inside this folder (e.g. one "
                               "per α, σ or step budget) and draw their privacy–utility frontier."),
    attacks: str = typer.Option("loss,secmi,pia,sima", help="Comma-separated model-only attacks "
                                "(loss, secmi, pia, sima); lira and rmia join with --references."),
    references: int = typer.Option(0, "--references", help="Train K reference adapters on random halves of "
                                   "members ∪ evaluation non-members for LiRA and RMIA (K even; 0: none)."),
    reference_dir: Path = typer.Option(None, "--reference-dir", help="Where reference adapters live and are "
                                       "reused (default: FIRST_RUN/references)."),
    fpr: str = typer.Option(None, help="FPRs for TPR@FPR, e.g. 0.01,0.001 (default: those the data allows)."),
    extraction: int = typer.Option(0, "--extraction", help="Also generate N images and look for training-image "
                                   "copies (Carlini et al. 2023); 0: skip."),
    report: Path = typer.Option(None, help="HTML report (default: RUN_DIR/audit/report.html, or report.html "
                                "beside the runs when several are given)."),
    dp_canaries: int = typer.Option(0, "--dp-canaries", metavar="M", help="Instead of the membership audit: "
                                    "one-run DP audit (Steinke et al. 2023) — train ONE run of RUN_DIR's config "
                                    "with M canaries each included w.p. ½, guess which were, and print the ε "
                                    "lower bound beside that run's accountant ε (RUN_DIR/audit/dp_canaries.json)."),
    dp_canary_kind: str = typer.Option("noise", "--dp-canary-kind", help="Canary images: noise (i.i.d. "
                                       "pixels; the strongest measured), blocks (random 8×8 black/white grid), "
                                       "coarse (4×4); gradient: white-box Dirac gradient canaries injected into "
                                       "every DP-SGD step of a DP run (RUN_DIR/audit/dp_gradient_canaries.json)."),
    dp_guesses: str = typer.Option(None, "--dp-guesses", help="Guess counts fixed in advance, comma-separated "
                                   "(half in, half out; several → Bonferroni; default 10,20,50,100 % of M)."),
    dp_beta: float = typer.Option(0.05, "--dp-beta", help="1 − confidence of the ε lower bound."),
    canary_dir: Path = typer.Option(None, "--canary-dir", help="Where the canary run goes and is reused "
                                    "(default RUN_DIR/audit/dp-canary-run; one run only)."),
    seed: int = typer.Option(0, help="Seed for the attacks' noise, the reference halves and the DP canaries."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Audit runs for membership leakage and memorisation; writes RUN_DIR/audit/ and a report.

    Each attack scores the run's training images against its evaluation non-members twice: with the
    adapter and with the base model alone (the control: what chance and image difficulty give). Writes
    RUN_DIR/audit/scores.csv (one row per image) and results.json (AUC with bootstrap interval, balanced
    accuracy, TPR at low FPR, empirical ε lower bound), prints a table and writes one HTML report.
    Reference adapters (--references) are trained once, with a plain run's recipe when one is audited, and reused.

    Example: privlora audit --run runs/plain --run runs/dp --references 2

    One-run DP audit: privlora audit --run runs/dp --dp-canaries 64
    """
    from privlora.audit.session import audit_session, sweep_runs

    _offline_defaults()
    runs = list(run or [])
    if sweep is not None:
        runs += sweep_runs(sweep)
    if not runs:
        raise UserError("nothing to audit: give --run RUN_DIR (repeatable) or --sweep FOLDER")
    if dp_canaries:
        from privlora.audit.dp_audit_kinds import run_dp_audit

        if canary_dir is not None and len(runs) > 1:
            raise UserError("--canary-dir names one canary run: give one --run with it")
        if references or extraction or report is not None:
            raise UserError("--dp-canaries runs the one-run DP audit alone: drop --references, --extraction "
                            "and --report, and run the membership audit as a separate command")
        try:
            guesses = [int(g) for g in dp_guesses.split(",")] if dp_guesses else None
        except ValueError:
            raise UserError(f"--dp-guesses expects whole numbers like 8,16, got {dp_guesses!r}") from None
        for r in runs:
            _, line, written = run_dp_audit(r, kind=dp_canary_kind, m=dp_canaries, seed=seed, beta=dp_beta,
                                            guesses=guesses, quiet=quiet, canary_dir=canary_dir)
            typer.echo(f"{r}: {line} → {written}")
        return
    names = tuple(a.strip() for a in attacks.split(",") if a.strip())
    fprs = None
    if fpr:
        try:
            fprs = tuple(float(f) for f in fpr.split(","))
        except ValueError:
            raise UserError(f"--fpr expects numbers like 0.01,0.001, got {fpr!r}") from None
    audit_session(runs, attacks=names, references=references, reference_dir=reference_dir, fprs=fprs,
                  extraction=extraction, report=report, seed=seed, quiet=quiet, echo=typer.echo)


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


canary_app = typer.Typer(no_args_is_help=True,
                         help="Canaries: plant an invisible watermark in training images, look for it in generations.")
app.add_typer(canary_app, name="canary")


@canary_app.command("embed")
@_one_line_errors
def canary_embed(
    src: Path = typer.Argument(..., help="Image folder (metadata.jsonl or .txt captions); never modified."),
    out: Path = typer.Argument(..., help="New folder for the marked copy (written atomically)."),
    key: int = typer.Option(..., "--key", help="Secret integer key; detection needs it. Use a large random one."),
    fraction: float = typer.Option(0.5, help="Fraction of the images to mark."),
    strength: float = typer.Option(3.0, help="RMS change per pixel in grey levels (3 ≈ 38.6 dB PSNR)."),
    seed: int = typer.Option(0, help="Seed for which images are marked."),
    resolution: int = typer.Option(32, help="Training resolution the DCT band is chosen for."),
    band: str = typer.Option(None, help="DCT band LO,HI (lo ≤ u+v < hi); default resolution/4,resolution."),
) -> None:
    """Copy an image folder with a key-seeded DCT watermark in a fraction of its images; writes canary.json."""
    from privlora.audit.canary import embed_folder, parse_band

    _offline_defaults()
    m = embed_folder(src, out, key=key, fraction=fraction, strength=strength, seed=seed, resolution=resolution,
                     band=parse_band(band) if band else None)
    zs = sorted(e["z_at_resolution"] for e in m["marked"])
    typer.echo(f"marked {m['marked_count']} of {m['images']} images → {out} (manifest {out / 'canary.json'})")
    typer.echo(f"  PSNR min {m['psnr']['min']:.1f} dB, mean {m['psnr']['mean']:.1f} dB; "
               f"z at {resolution}px median {zs[len(zs) // 2]:.2f} (min {zs[0]:.2f}); keep the key secret")


@canary_app.command("detect")
@_one_line_errors
def canary_detect(
    run: Path = typer.Option(..., "--run", help="Run directory written by `privlora train`."),
    key: int = typer.Option(..., "--key", help="The key the images were marked with."),
    manifest: Path = typer.Option(..., "--manifest", help="canary.json written by `privlora canary embed`."),
    n: int = typer.Option(64, help="Generations with the adapter (and as many without)."),
    seed: int = typer.Option(0, help="Sampling seed (the same for adapter and clean generations)."),
    fpr: float = typer.Option(0.01, help="Largest false-positive rate allowed (analytic and on clean generations)."),
    steps: int = typer.Option(50, help="DDIM steps."),
    prompt: str = typer.Option(None, help="Text-to-image bases: prompt (default: the marked images' captions)."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
) -> None:
    """Look for the canary in a run's generations; writes RUN_DIR/audit/canary.json."""
    from privlora.audit.canary import detect_run

    _offline_defaults()
    r = detect_run(run, key=key, manifest=manifest, n=n, seed=seed, fpr=fpr, steps=steps, prompt=prompt,
                   device=device)
    lo, hi = r["detection_rate_ci95"]
    typer.echo(f"canary detected in {r['detected']}/{r['n']} generations (rate {r['detection_rate']:.3f} "
               f"[{lo:.3f}, {hi:.3f}]) at z > {r['threshold']:.2f} → {run / 'audit' / 'canary.json'}")
    typer.echo(f"  false positives: clean generations {r['fpr_clean']:.3f}, analytic {r['fpr_analytic']:.2g}; "
               f"mean z adapter {r['z_adapter']['mean']:.2f} vs clean {r['z_clean']['mean']:.2f}"
               + (f" (paired p={r['paired']['p_value']:.2g})" if r["paired"] else ""))


@app.command()
@_one_line_errors
def spectrum(
    sources: list[Path] = typer.Argument(..., help="Run or adapter directories (safetensors only)."),
    out: Path = typer.Option(None, "--out", help="PNG comparing the adapters' spectra."),
    json_out: Path = typer.Option(None, "--json", help="JSON with every layer's singular values and figures."),
    top_k: int = typer.Option(4, "--top-k", help="k of the top-k energy share."),
) -> None:
    """Singular-value spectrum of each LoRA update ΔW: effective rank, energy shares, suspicious layers."""
    from privlora.audit.spectrum import adapter_spectrum, spectrum_plot
    from privlora.runs import write_json_atomic

    _offline_defaults()
    spectra = {str(s): adapter_spectrum(s, top_k=top_k) for s in dict.fromkeys(sources)}
    for label, sp in spectra.items():
        s = sp["summary"]
        eff, top1 = s["mean_effective_rank"], s["mean_energy_top1"]
        typer.echo(f"{label}: {s['layers']} layers (rank {sp['rank']}, {s['zero_layers']} zero), "
                   f"mean effective rank {'n/a' if eff is None else f'{eff:.2f}'}, "
                   f"mean top-1 energy {'n/a' if top1 is None else f'{top1:.3f}'}, "
                   f"suspicious layers {len(s['suspicious_layers'])}"
                   + (f" (e.g. {s['suspicious_layers'][0]})" if s["suspicious_layers"] else ""))
    if out is not None:
        typer.echo(f"wrote {spectrum_plot(spectra, out)}")
    if json_out is not None:
        write_json_atomic(json_out, spectra)
        typer.echo(f"wrote {json_out}")

split_app = typer.Typer(no_args_is_help=True, help="Split-and-privatize (SAP): the user keeps the bottom of the "
                        "model and the labels, the provider's server trains the top on dχ-noised hidden states.")
app.add_typer(split_app, name="split")
TOKEN_HELP = "Bearer token shared by server and client (or set PRIVLORA_SPLIT_TOKEN)."


@split_app.command("serve")
@_one_line_errors
def split_serve(
    depth: int = typer.Option(1, "--split-depth", "--depth", help="Blocks on the user's side (MiniLM: 0..3)."),
    port: int = typer.Option(8765, help="TCP port."),
    host: str = typer.Option("127.0.0.1", help="Interface (0.0.0.0 to accept other machines; put TLS in front)."),
    token: str = typer.Option(None, envvar="PRIVLORA_SPLIT_TOKEN", show_envvar=False, help=TOKEN_HELP),
    num_labels: int = typer.Option(3, "--num-labels", help="Classes of the head (demo:tweets has 3)."),
    base: str = typer.Option("minilm", help="Base encoder: minilm (offline, from PyPI) or a local model folder."),
    out: Path = typer.Option(Path("runs/split-server/adapter"), help="Where /save and shutdown write the adapter."),
    lr: float = typer.Option(1e-3, help="The top LoRA's learning rate (AdamW)."),
    rank: int = typer.Option(8, help="LoRA rank on the top blocks."),
    max_batch: int = typer.Option(64, "--max-batch", help="Largest batch a request may carry."),
    max_body_mb: float = typer.Option(16.0, "--max-body-mb", help="Largest request body (MiB); larger ones get 413."),
    input_clip: float = typer.Option(14.0, "--input-clip", help="Scale received token vectors longer than this "
                                     "down to it (clean MiniLM states are < 13.4; 0 = off)."),
    seed: int = typer.Option(0, help="Seed of the LoRA and head initialisation."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level (info shows each request)."),
) -> None:
    """Start the provider's server: the top of the model with its LoRA, trained through /forward and /backward."""
    import socket

    from privlora.split.models import SplitTop
    from privlora.split.run import base_path
    from privlora.split.server import serve
    from privlora.split.service import TopService
    from privlora.tasks.text import TextLora

    _offline_defaults()
    if not token:
        raise UserError("give the server a token: --token T or PRIVLORA_SPLIT_TOKEN=T")
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    top = SplitTop(depth, num_labels, lora=TextLora(rank=rank, alpha=2 * rank), seed=seed, base=base_path(base),
                   input_clip=input_clip or None)
    service = TopService(top, lr=lr, max_batch=max_batch, base_name=base)
    typer.echo(f"split server on http://{host}:{port}: {base} cut after block {depth} "
               f"({len(top.blocks)} blocks + head here, {num_labels} labels); adapter → {out}", err=True)
    serve(service, token, host=host, port=port, out=out, log_level=log_level, max_body=int(max_body_mb * 2**20))


@split_app.command("train")
@_one_line_errors
def split_train_cmd(
    config: Path = typer.Option(None, "--config", "-c", help="YAML config (e.g. configs/split-cti.yaml)."),
    server: str = typer.Option(None, help="Server URL (default http://127.0.0.1:8765)."),
    token: str = typer.Option(None, envvar="PRIVLORA_SPLIT_TOKEN", show_envvar=False, help=TOKEN_HELP),
    data: str = typer.Option(None, help="demo:tweets or a CSV/TSV/JSONL file with text,label."),
    limit: int = typer.Option(None, help="Use a seeded sample of this many texts."),
    privatizer: str = typer.Option(None, help="cti (default: dχ noise, less on label-carrying tokens) | dchi | none."),
    eta: float = typer.Option(None, help="dχ privacy parameter η (smaller: more noise; mean noise norm 384/η)."),
    bottom: str = typer.Option(None, help="frozen (default) | trainable (LoRA on the user's blocks too)."),
    steps: int = typer.Option(None, help="Training steps."),
    batch_size: int = typer.Option(None, "--batch-size", help="Texts per step."),
    out: Path = typer.Option(None, help="Run directory to write (replaced atomically)."),
    seed: int = typer.Option(None, help="Seed of the data split and batch order (noise is never seeded)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    set_: list[str] = typer.Option([], "--set", help="Any config key, e.g. --set privatizer.cti_boost=5."),
) -> None:
    """Train against a running split server: texts and labels stay here, only noised hidden states and the
    gradient of the logits are sent. Writes a run directory for `split predict`."""
    from privlora.config import SplitConfig, load_config
    from privlora.split.client import HttpTop
    from privlora.split.run import split_train

    _offline_defaults()
    named = {"server": server, "data.source": data, "data.limit": limit, "privatizer.name": privatizer,
             "privatizer.eta": eta, "bottom": bottom, "optim.steps": steps, "optim.batch_size": batch_size,
             "out": str(out) if out else None, "seed": seed, "quiet": quiet or None}
    settings = load_config(config, _overrides(named, set_), model=SplitConfig)
    with HttpTop(settings.server, token or "") as top:
        run = split_train(settings, top)
    s = run.summary
    p = s["privatizer"]
    spared = f", {p['contributing_count']} tokens spared (CTI)" if p["name"] == "cti" else ""
    typer.echo(f"split training ({p['name']}, η={p['eta']}{spared}; depth {s['depth']}, {s['bottom']} bottom) "
               f"→ {run.run_dir}")
    typer.echo(f"  held-out accuracy {run.accuracy:.3f} (loss {run.loss:.3f}) on {s['eval_texts']} texts; "
               f"{s['samples_per_second']:.1f} texts/s; {s.get('bytes_sent', 0) / 2**20:.1f} MiB sent")


@split_app.command("predict")
@_one_line_errors
def split_predict_cmd(
    texts: list[str] = typer.Argument(None, help="Texts to classify (or --input)."),
    run: Path = typer.Option(..., "--run", help="The run directory `split train` wrote."),
    server: str = typer.Option("http://127.0.0.1:8765", help="Server URL."),
    token: str = typer.Option(None, envvar="PRIVLORA_SPLIT_TOKEN", show_envvar=False, help=TOKEN_HELP),
    input_file: Path = typer.Option(None, "--input", help="CSV/TSV/JSONL with a text column, or a .txt file "
                                    "with one text per line."),
) -> None:
    """Classify texts through the server with the same privatization as training; prints `label<TAB>text`."""
    from privlora.split.client import HttpTop
    from privlora.split.run import read_texts, split_predict

    _offline_defaults()
    items = list(texts or []) + (read_texts(input_file) if input_file else [])
    if not items:
        raise UserError("nothing to classify: give texts as arguments or --input FILE")
    with HttpTop(server, token or "") as top:
        labels = split_predict(run, items, top)
    for label, text in zip(labels, items, strict=True):
        typer.echo(f"{label}\t{text}")


@split_app.command("sweep")
@_one_line_errors
def split_sweep_cmd(
    depths: str = typer.Option("0,1", help="Split depths, comma-separated (MiniLM: 0..3)."),
    etas: str = typer.Option("6,3", help="dχ η values, comma-separated (smaller: more noise; mean noise norm "
                             "384/η against clean states of norm 8–13)."),
    privatizers: str = typer.Option("dchi,cti", help="Privatizers besides the no-noise baseline: dchi, cti."),
    bottoms: str = typer.Option("frozen", help="frozen, trainable or both (comma-separated)."),
    data: str = typer.Option("demo:tweets", help="demo:tweets or a CSV/TSV/JSONL text,label file (AIA needs the "
                             "tweets: it infers the airline a tweet addresses)."),
    limit: int = typer.Option(2000, help="Texts used (seeded sample)."),
    steps: int = typer.Option(150, help="Training steps per point."),
    attack_texts: int = typer.Option(16, "--attack-texts", help="Held-out texts the EIA inverts per point."),
    eia_steps: int = typer.Option(100, "--eia-steps", help="Optimisation steps of the EIA at depth ≥ 1."),
    cti_boost: float = typer.Option(100.0, "--cti-boost", help="CTI: spared tokens get η·boost."),
    cti_top_k: str = typer.Option("50,150", "--cti-top-k", help="CTI: how many label-carrying tokens are spared "
                                  "(comma-separated: one CTI point per value)."),
    out: Path = typer.Option(Path("runs/split-sweep"), help="Folder for sweep.json, sweep.md and sweep.png."),
    seed: int = typer.Option(0, help="Seed (data split, batches, noise: the sweep is reproducible)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Privacy–utility table: accuracy and empirical privacy (1 − attack success) against EIA and AIA for every
    η × depth × privatizer × bottom mode, trained in-process (no server needed). Takes minutes per point."""
    from privlora.split.sweep import SweepSettings, run_sweep

    _offline_defaults()
    try:
        settings = SweepSettings(
            depths=tuple(int(d) for d in _names(depths)), etas=tuple(float(e) for e in _names(etas)),
            privatizers=_names(privatizers), bottoms=_names(bottoms), source=data, limit=limit, steps=steps,
            attack_texts=attack_texts, eia_steps=eia_steps, cti_boost=cti_boost,
            cti_top_ks=tuple(int(k) for k in _names(cti_top_k)), seed=seed)
    except ValueError as e:
        raise UserError(f"--depths/--etas/--cti-top-k take comma-separated numbers ({e})") from None
    unknown = set(settings.privatizers) - {"dchi", "cti"} or set(settings.bottoms) - {"frozen", "trainable"}
    if unknown:
        raise UserError(f"unknown sweep value(s) {', '.join(sorted(unknown))}: privatizers dchi/cti, "
                        "bottoms frozen/trainable")
    rows = run_sweep(settings, out, quiet=quiet)
    from privlora.split.sweep import markdown

    typer.echo(markdown(rows), nl=False)
    typer.echo(f"wrote {out}/sweep.json, sweep.md, sweep.png")


registry_app = typer.Typer(no_args_is_help=True, help="Governed adapter registry: content-addressed adapters, "
                           "roles enforced on every call, export approvals, a hash-chained action log.")
app.add_typer(registry_app, name="registry")
incident_app = typer.Typer(no_args_is_help=True, help="Incident response: quarantine an adapter, re-audit it "
                           "(membership + extraction), attach the report, close with a resolution.")
app.add_typer(incident_app, name="incident")
dataset_app = typer.Typer(no_args_is_help=True, help="Dataset versions: sanitized (researchers and auditors read) "
                          "or full (auditors only).")
registry_app.add_typer(dataset_app, name="dataset")
generation_app = typer.Typer(no_args_is_help=True, help="Generation logs: full for researchers and auditors, "
                             "metadata only (no prompt, no image) for engineers.")
registry_app.add_typer(generation_app, name="generation")
REG_URL = typer.Option("http://127.0.0.1:8770", "--url", envvar="PRIVLORA_REGISTRY_URL", show_envvar=False,
                       help="Registry URL (or PRIVLORA_REGISTRY_URL).")
REG_TOKEN = typer.Option(None, "--token", envvar="PRIVLORA_REGISTRY_TOKEN", show_envvar=False,
                         help="Your API token (or PRIVLORA_REGISTRY_TOKEN).")


def _registry(url: str, token: str | None) -> Any:
    from privlora.registry.client import RegistryClient

    return RegistryClient(url, token or "")


def _echo_json(value: Any) -> None:
    import json

    typer.echo(json.dumps(value, indent=2, default=str))


@registry_app.command("init")
@_one_line_errors
def registry_init(
    root: Path = typer.Option(Path("registry"), help="Folder for registry.db and the adapter blobs."),
    admin: str = typer.Option(..., help="Name of the first admin (manages users only, reads no data)."),
    db: str = typer.Option(None, help="SQLAlchemy URL instead of root/registry.db (e.g. "
                           "postgresql+psycopg://user@host/db); give `serve` the same."),
    log_key: Path = typer.Option(None, "--log-key", envvar="PRIVLORA_REGISTRY_LOG_KEY", show_envvar=False,
                                 help="Ed25519 key signing the log's checkpoints (created 0600 if absent; default "
                                 "root/log-signing.key). Keep it off the database host; give `serve` the same."),
    token_days: float = typer.Option(30.0, "--token-days", help="Lifetime of the admin's token (days)."),
) -> None:
    """Create a registry and its first admin; prints the admin's token once (stored hashed)."""
    from privlora.registry.service import Refused, Registry

    try:
        token = Registry(root, url=db, log_key=log_key, token_days=token_days).bootstrap_admin(admin)
    except Refused as e:
        raise UserError(e.message) from None
    typer.echo(token)


@registry_app.command("serve")
@_one_line_errors
def registry_serve(
    root: Path = typer.Option(Path("registry"), help="Folder of `registry init`."),
    db: str = typer.Option(None, help="SQLAlchemy URL instead of root/registry.db (e.g. "
                           "postgresql+psycopg://user@host/db); blobs stay under --root."),
    host: str = typer.Option("127.0.0.1", help="Interface (put TLS in front for other machines)."),
    port: int = typer.Option(8770, help="TCP port."),
    max_auc_gain: float = typer.Option(0.05, "--max-auc-gain", help="Export policy: largest rise of an attack's "
                                       "AUC over the base model (the audit's control) in the latest audit."),
    max_auc: float = typer.Option(None, "--max-auc", help="Export policy, optional: largest attack AUC itself."),
    max_epsilon: float = typer.Option(10.0, "--max-epsilon", help="Export policy: largest ε in privacy.json."),
    max_body_mb: float = typer.Option(64.0, "--max-body-mb", help="Largest request body (MiB); larger get 413."),
    log_key: Path = typer.Option(None, "--log-key", envvar="PRIVLORA_REGISTRY_LOG_KEY", show_envvar=False,
                                 help="Ed25519 key signing the log's checkpoints (default root/log-signing.key)."),
    token_days: float = typer.Option(30.0, "--token-days", help="Default lifetime of new tokens (days)."),
    audit_attacks: str = typer.Option("loss", "--audit-attacks", help="Attacks of the registry's own audit of an "
                                      "adapter before its first export ('' = only auditors' audits count)."),
    audit_data: list[Path] = typer.Option([], "--audit-data", help="A folder the registry's own audit may read a "
                                          "pushed run's data or base from (repeatable); built-in demo data and "
                                          "bases are always allowed, nothing else is."),
) -> None:
    """Serve the registry; every call but /health and /openapi.json needs a token."""
    import socket

    import uvicorn

    from privlora.registry.server import create_app
    from privlora.registry.service import ExportPolicy, Registry

    if not (root / "registry.db").exists() and db is None:
        raise UserError(f"{root} holds no registry: run `privlora registry init --root {root} --admin NAME`")
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    registry = Registry(root, url=db, policy=ExportPolicy(max_auc_gain, max_auc, max_epsilon), log_key=log_key,
                        token_days=token_days, audit_attacks=_names(audit_attacks) if audit_attacks else (),
                        audit_data=tuple(audit_data))
    typer.echo(f"registry on http://{host}:{port} ({root})", err=True)
    uvicorn.run(create_app(registry, max_body=int(max_body_mb * 2**20)), host=host, port=port, log_level="warning",
                access_log=False)


@registry_app.command("push")
@_one_line_errors
def registry_push(adapter: Path = typer.Argument(..., help="Run or adapter folder (safetensors)."),
                  name: str = typer.Option(None, help="Name (default: the run folder's)."),
                  url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Store an adapter with its privacy.json, audit results and (from a run folder) the config.yaml and
    splits.json a re-audit needs; prints its id (sha256). Refused if unsafe (pickle, malformed header, shapes
    that do not fit its base)."""
    result = _registry(url, token).push(adapter, name)
    typer.echo(result["id"])
    for warning in result.get("warnings", []):
        typer.echo(f"warning: {warning}", err=True)
    if not result.get("base_checked", True):
        typer.echo("note: the adapter's base is not one this registry holds; shapes were checked for structure "
                   "only", err=True)
    if "files" in result and "splits.json" not in result["files"]:
        typer.echo("note: pushed without the run's config.yaml/splits.json: an incident cannot re-audit it "
                   "(push the run folder)", err=True)


@registry_app.command("list")
@_one_line_errors
def registry_list(url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Adapters: id, name, owner, quarantine."""
    for a in _registry(url, token).get("/adapters"):
        typer.echo(f"{a['id'][:16]}  {a['name']:<24} {a['owner']:<12} {'QUARANTINED' if a['quarantined'] else ''}")


@registry_app.command("show")
@_one_line_errors
def registry_show(adapter_id: str, url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """One adapter's record: config, privacy, latest audit, open incidents."""
    _echo_json(_registry(url, token).get(f"/adapters/{adapter_id}"))


@registry_app.command("pull")
@_one_line_errors
def registry_pull(adapter_id: str, out: Path = typer.Option(..., help="File to write (safetensors)."),
                  url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Download an adapter's weights (auditors only while it is quarantined)."""
    typer.echo(f"wrote {_registry(url, token).download(f'/adapters/{adapter_id}/weights', out)}")


@registry_app.command("export")
@_one_line_errors
def registry_export(adapter_id: str = typer.Argument(None, help="Adapter to request an export of."),
                    download: int = typer.Option(None, help="Download an approved export by its number."),
                    out: Path = typer.Option(None, help="File for --download."),
                    url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Request an export (someone else must approve it), or download an approved one."""
    client = _registry(url, token)
    if download is not None:
        if out is None:
            raise UserError("--download needs --out FILE")
        typer.echo(f"wrote {client.download(f'/exports/{download}/download', out)}")
    elif adapter_id:
        typer.echo(f"export request {client.post('/exports', {'adapter': adapter_id})['export']}")
    else:
        raise UserError("give an adapter id to request an export, or --download N --out FILE")


@registry_app.command("approve")
@_one_line_errors
def registry_approve(export_id: int, url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Approve an export request (not your own; the adapter's latest audit must meet the policy)."""
    result = _registry(url, token).post(f"/exports/{export_id}/approve")
    typer.echo(f"export {result['export']} approved by {result['approver']}")


users_app = typer.Typer(help="Users (admins only): list, add (`--add NAME`), `revoke NAME`.")
registry_app.add_typer(users_app, name="users")


@users_app.callback(invoke_without_command=True)
@_one_line_errors
def registry_users(ctx: typer.Context,
                   add: str = typer.Option(None, help="Add a user with this name (admin); prints its token."),
                   role: str = typer.Option("researcher", help="researcher | engineer | auditor | admin."),
                   expires_days: float = typer.Option(None, "--expires-days", help="Lifetime of the new token in "
                                                      "days (default: the server's --token-days)."),
                   url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """List users, or add one (admins only)."""
    import datetime

    if ctx.invoked_subcommand is not None:
        return
    client = _registry(url, token)
    if add:
        body: dict[str, Any] = {"name": add, "role": role}
        if expires_days is not None:
            body["expires_days"] = expires_days
        typer.echo(client.post("/users", body)["token"])
    else:
        for u in client.get("/users"):
            state = "revoked" if u.get("revoked") else "expires " + (datetime.datetime.fromtimestamp(
                u["expires"], tz=datetime.UTC).strftime("%Y-%m-%d") if u.get("expires") else "(legacy token)")
            typer.echo(f"{u['name']:<16} {u['role']:<11} {state}")


@users_app.command("revoke")
@_one_line_errors
def registry_users_revoke(name: str = typer.Argument(..., help="User whose token stops working now."),
                          url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Revoke a user's token (admins only): every later call with it is refused (401)."""
    _registry(url, token).post(f"/users/{name}/revoke")
    typer.echo(f"revoked {name}'s token")


@registry_app.command("log")
@_one_line_errors
def registry_log(url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """The action log (auditors): who, what, when, result."""
    import datetime

    for e in _registry(url, token).get("/log"):
        when = datetime.datetime.fromtimestamp(e["time"], tz=datetime.UTC).isoformat(timespec="seconds")
        typer.echo(f"{e['seq']:>5} {when} {e['actor']:<12} {e['action']:<22} {e['target'][:20]:<20} {e['result']}")


@registry_app.command("verify-log")
@_one_line_errors
def registry_verify_log(expect_head: str = typer.Option(None, "--expect-head", help="A head printed earlier and "
                                                      "published elsewhere: it must still be in the log."),
                        url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Recompute the hash chain and check the latest signed checkpoint; exit 1 if any entry was edited, removed
    or moved, entries were cut off or the log rewritten (the signed head is gone), or, with --expect-head, the
    published head is no entry of the log. Publish the printed head."""
    result = _registry(url, token).get("/log/verify", params={"expect_head": expect_head} if expect_head else None)
    if result["intact"]:
        signed = result.get("checkpoint")
        typer.echo(f"log intact; head {result['head']}"
                   + (f"; signed checkpoint at entry {signed['count']} verified" if signed else "")
                   + (" (published head found)" if expect_head else ""))
        return
    for p in result["problems"]:
        typer.echo(f"entry {p['seq']}: {p['message']}", err=True)
    raise typer.Exit(1)


@dataset_app.command("push")
@_one_line_errors
def registry_dataset_push(path: Path = typer.Argument(..., help="A data file, or a folder (uploaded as a tar)."),
                          kind: str = typer.Option(..., help="sanitized (the output of `privlora sanitize`) | "
                                                   "full (auditors only may read it)."),
                          name: str = typer.Option(None, help="Name (default: the file or folder name)."),
                          url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Upload a dataset version (researchers); prints its id (sha256 of the bytes)."""
    typer.echo(_registry(url, token).push_dataset(path, name=name, kind=kind)["id"])


@dataset_app.command("list")
@_one_line_errors
def registry_dataset_list(url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """The dataset versions you may read: id, name, kind, owner."""
    for d in _registry(url, token).get("/datasets"):
        typer.echo(f"{d['id'][:16]}  {d['name']:<24} {d['kind']:<10} {d['owner']:<12} {d.get('format') or 'file'}")


@dataset_app.command("pull")
@_one_line_errors
def registry_dataset_pull(dataset_id: str = typer.Argument(..., help="Dataset id (from `dataset list`)."),
                          out: Path = typer.Option(..., help="File to write, or a new folder for a pushed folder."),
                          url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Download a dataset version (sanitized: researchers and auditors; full: auditors)."""
    typer.echo(f"wrote {_registry(url, token).pull_dataset(dataset_id, out)}")


@generation_app.command("log")
@_one_line_errors
def registry_generation_log(adapter: str = typer.Option(..., "--adapter", help="Adapter id that generated."),
                            prompt: str = typer.Option(..., help="The prompt (content: hidden from engineers)."),
                            image: Path = typer.Option(None, help="The generated image (stored by its sha256)."),
                            param: list[str] = typer.Option([], "--param", help="Metadata KEY=VALUE (seed, steps, "
                                                            "…); repeatable."),
                            url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Record one generation (researchers, engineers); prints its number."""
    from privlora.config import parse_assignment

    params = dict(parse_assignment(p) for p in param)
    result = _registry(url, token).log_generation(adapter=adapter, prompt=prompt, params=params, image=image)
    typer.echo(f"generation {result['generation']}")


@generation_app.command("list")
@_one_line_errors
def registry_generation_list(url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Generation logs: number, adapter, who, metadata — and prompt and image hash for full readers."""
    import json

    for g in _registry(url, token).get("/generations"):
        line = f"{g['id']:>5} {g['adapter'][:16]}  {g['actor']:<12} {json.dumps(g['params'], sort_keys=True)}"
        if "prompt" in g:
            line += f"  prompt={g['prompt']!r} image={(g['image_sha256'] or '-')[:16]}"
        typer.echo(line)


REAUDIT_ATTACKS = typer.Option("loss,pia", "--attacks", help="Membership attacks of the re-audit (privlora audit's "
                               "names).")
REAUDIT_EXTRACTION = typer.Option(64, "--extraction", help="Generations for the extraction check (0: none).")
REAUDIT_DATA = typer.Option(None, "--data", help="Your copy of the full training data, if not at the source the "
                            "run's config names.")


def _reaudit(client: Any, incident: int, attacks: str, extraction: int, data: str | None, seed: int,
             quiet: bool) -> None:
    from privlora.registry.client import RegistryRefusal
    from privlora.registry.reaudit import reaudit_incident, summary_lines

    try:
        report = reaudit_incident(client, incident, attacks=_names(attacks), extraction=extraction,
                                  data=data, seed=seed, quiet=quiet)
    except RegistryRefusal as e:
        if e.status != 403:
            raise
        raise UserError(f"incident {incident} stays open; the re-audit needs an auditor (`privlora incident audit "
                        f"{incident}` with an auditor's token): {e}") from None
    typer.echo(f"re-audit attached to incident {incident} (now the adapter's latest audit):")
    for line in summary_lines(report):
        typer.echo(f"  {line}")


@incident_app.command("open")
@_one_line_errors
def incident_open(adapter: str = typer.Option(..., "--adapter", help="Adapter id."),
                  reason: str = typer.Option(..., help="What happened."),
                  reaudit: bool = typer.Option(True, "--reaudit/--no-reaudit", help="Re-run the audit (auditors: "
                                               "they alone may pull the quarantined adapter and read full data)."),
                  attacks: str = REAUDIT_ATTACKS, extraction: int = REAUDIT_EXTRACTION, data: str = REAUDIT_DATA,
                  seed: int = typer.Option(0, help="Seed of the re-audit."),
                  quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
                  url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Quarantine an adapter (only auditors can pull it), record the incident, re-audit the adapter
    (membership attacks + extraction, against the base as control) and attach the report."""
    client = _registry(url, token)
    result = client.post("/incidents", {"adapter": adapter, "reason": reason})
    typer.echo(f"incident {result['incident']} open; adapter {adapter[:16]} quarantined")
    if reaudit:
        _reaudit(client, result["incident"], attacks, extraction, data, seed, quiet)


@incident_app.command("audit")
@_one_line_errors
def incident_audit(incident: int = typer.Argument(..., help="Incident number."),
                   attacks: str = REAUDIT_ATTACKS, extraction: int = REAUDIT_EXTRACTION, data: str = REAUDIT_DATA,
                   seed: int = typer.Option(0, help="Seed of the re-audit."),
                   quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
                   url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Re-audit an open incident's adapter and attach the report (auditors), e.g. for an incident a
    researcher opened."""
    _reaudit(_registry(url, token), incident, attacks, extraction, data, seed, quiet)


@incident_app.command("show")
@_one_line_errors
def incident_show(incident: int = typer.Argument(..., help="Incident number."),
                  url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """An incident: adapter, reason, who opened/closed it, and every report attached to it."""
    import datetime

    from privlora.registry.reaudit import summary_lines

    def when(t: float) -> str:
        return datetime.datetime.fromtimestamp(t, tz=datetime.UTC).isoformat(timespec="seconds")

    i = _registry(url, token).get(f"/incidents/{incident}")
    typer.echo(f"incident {i['id']} on adapter {i['adapter']}: {'closed' if i['closed'] else 'OPEN'}")
    typer.echo(f"  opened by {i['opened_by']} at {when(i['opened'])}: {i['reason']}")
    if i["closed"]:
        typer.echo(f"  closed by {i['closed_by']} at {when(i['closed'])}: {i['resolution']}")
    if not i["reports"]:
        typer.echo("  no report attached (re-audit: `privlora incident audit N`)")
    for r in i["reports"]:
        typer.echo(f"  report {r['id']} by {r['by']} at {when(r['created'])} ({r['status']}):")
        for line in summary_lines(r["report"]):
            typer.echo(f"    {line}")


@incident_app.command("list")
@_one_line_errors
def incident_list(url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Incidents: number, adapter, open/closed, reason."""
    for i in _registry(url, token).get("/incidents"):
        typer.echo(f"{i['id']:>4} {i['adapter'][:16]}  {'closed' if i['closed'] else 'OPEN':<7} {i['reason'][:60]}")


@incident_app.command("close")
@_one_line_errors
def incident_close(incident: int = typer.Argument(..., help="Incident number."),
                   resolution: str = typer.Option(..., help="How it was resolved (e.g. replaced by an unlearned "
                                                  "version)."),
                   url: str = REG_URL, token: str = REG_TOKEN) -> None:
    """Record the resolution; the quarantine lifts when no incident on the adapter stays open."""
    _registry(url, token).post(f"/incidents/{incident}/close", {"resolution": resolution})
    typer.echo(f"incident {incident} closed")


# --- synthesize (issue 9: synthetic replacement data) -------------------------------------------------
@app.command()
@_one_line_errors
def synthesize(
    run: Path = typer.Argument(..., help="Run directory written by `privlora train` (a DP run to share)."),
    n: int = typer.Option(256, "--n", help="Number of images to generate."),
    out: Path = typer.Option(..., help="Image folder to create (must not exist; written atomically)."),
    steps: int = typer.Option(50, help="DDIM steps per image."),
    seed: int = typer.Option(0, help="Seed: image i starts from noise of (seed, i); same seed, same images."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass (memory only; the images "
                                   "do not depend on it)."),
    prompt: list[str] = typer.Option(None, "--prompt", help="SD path: prompt, repeat to cycle several (default: "
                                     "the run's configured prompt; training captions are never used)."),
    guidance_scale: float = typer.Option(7.5, "--guidance-scale", help="SD path: classifier-free guidance."),
    controlnet: Path = typer.Option(None, help="SD path: a diffusers ControlNetModel folder (safetensors)."),
    conditions: Path = typer.Option(None, help="ControlNet condition images (e.g. edge maps), cycled over images."),
    edges_from: Path = typer.Option(None, "--edges-from", help="Compute Canny edge maps (OpenCV) of these images "
                                    "as the conditions. Edges of private images leak their layout and identity "
                                    "and are NOT covered by ε."),
    conditioning_scale: float = typer.Option(1.0, "--conditioning-scale", help="ControlNet strength."),
    device: str = typer.Option(None, help="cpu | cuda (default: the run's device)."),
    audit: bool = typer.Option(False, "--audit", help="Then audit the set against the run's members and evaluation "
                               "non-members (nearest-synthetic AUC, Carlini's rule) into RUN/audit/."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Generate a replacement dataset from a run's adapter: an image folder `privlora train --data` reads.

    Sampling from a DP adapter is post-processing, so the folder's privacy.json carries the run's (ε, δ).
    A non-DP source gives no guarantee (said in privacy.json and here). ControlNet conditions are extra
    inputs: edge maps of private images leak those images and are not covered by ε.

    Example: privlora synthesize runs/dp-digits --n 256 --steps 20 --out synthetic/dp-digits
    """
    from privlora.synthesize import synthesize as run_synthesize

    _offline_defaults()
    result = run_synthesize(run, n, out, seed=seed, steps=steps, batch_size=batch_size, prompt=prompt or None,
                            controlnet=controlnet, conditions=conditions, edges_from=edges_from,
                            guidance_scale=guidance_scale, conditioning_scale=conditioning_scale, device=device,
                            audit=audit, quiet=quiet)
    privacy = result["privacy"]
    typer.echo(f"wrote {result['n']} images to {result['out']} in {result['seconds']:.0f}s ({result['sampler']})")
    if privacy["mechanism"] == "none":
        typer.echo(f"warning: {run} is not a DP run: the synthetic set has NO privacy guarantee", err=True)
    else:
        typer.echo(f"  privacy: ε={privacy['epsilon']:.3g} (δ={privacy['delta']:.2g}) carried over by post-processing")
    if privacy.get("conditioning"):
        typer.echo("warning: ControlNet conditions are not covered by ε (edge maps of private images leak them)",
                   err=True)
    if "audit" in result:
        a, x = result["audit"], result["audit"]["extraction"]
        typer.echo(f"  audit: nearest-synthetic membership AUC {a['dcr_auc']:.3f} "
                   f"(normalised {a['normalised_auc']:.3f}; 0.5 = no leak); Carlini-rule copies: "
                   f"{x['flagged_on_members']} of members, "
                   f"{x['flagged_on_nonmembers']} of non-members → {a['path']}")


@app.command()
@_one_line_errors
def unlearn(
    run: Path = typer.Argument(..., help="Run directory written by `privlora train` (image or text)."),
    out: Path = typer.Option(..., help="New run directory for the unlearned adapter (written atomically)."),
    method: str = typer.Option("target", help="target (raise each forget sample's loss to a non-member's, no "
                               "further; descent on the retained) | neggrad+ (unbounded ascent on the forget set, "
                               "descent on the retained) | salun (neggrad+ on the salient weights only) | retrain "
                               "(exact: train again without the forget set)."),
    forget: Path = typer.Option(None, "--forget", help="File with the ids to forget, one per line (ids from the "
                                "run's splits.json members)."),
    forget_ids: str = typer.Option(None, "--forget-ids", help="Ids to forget, comma-separated."),
    forget_fraction: float = typer.Option(None, "--forget-fraction", help="Forget a seeded random share of the "
                                          "members, e.g. 0.25."),
    steps: int = typer.Option(None, help="Most unlearning steps (default 100; ascent stops earlier once the "
                              "forget set looks like the auxiliary non-members, see --fixed-steps)."),
    lr: float = typer.Option(None, help="Learning rate of the unlearning steps (default: target 1e-3, neggrad+ "
                             "and salun 2e-4 — unbounded ascent at 1e-3 wrecked both demo adapters)."),
    alpha: float = typer.Option(None, help="Retain weight α in α·L_retain + (1−α)·L_forget-term (default: "
                                "target 0.5, neggrad+ and salun 0.8)."),
    saliency: float = typer.Option(0.5, help="SalUn: share of the weights updated (top |∇ L_forget|)."),
    fixed_steps: bool = typer.Option(False, "--fixed-steps", help="Run all --steps; do not stop when the forget "
                                     "set's loss reaches the auxiliary non-members'."),
    attack: str = typer.Option("loss", help="Membership attack of the verification (image: loss, secmi, pia, "
                               "sima; text: loss)."),
    draws: int = typer.Option(8, help="Noise draws averaged by the image loss attack."),
    reference: Path = typer.Option(None, "--reference", help="Reuse a retrained reference (a --method retrain "
                                   "output for the same forget set) instead of retraining one."),
    no_reference: bool = typer.Option(False, "--no-reference", help="Skip the retrained reference (faster; no "
                                      "reference AUC or time ratio)."),
    concept: str = typer.Option(None, "--concept", help="Erase a prompt's concept from an SD LoRA run instead "
                                "(ESD); no forget set."),
    eta: float = typer.Option(None, help="--concept: negative-guidance scale η."),
    seed: int = typer.Option(0, help="Seed for the forget draw, batches, noise and the attack."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Remove training samples from an adapter and show with the membership audit that they are gone.

    Measures the attack's AUC on the forget set against the run's evaluation non-members before and after,
    and for an exactly retrained reference (trained into OUT/reference unless --reference or
    --no-reference); efficacy = 1 − (AUC_after − 0.5)/(AUC_before − 0.5). Writes OUT as a run directory
    (members = retained) with unlearn.json holding every figure.

    Example: privlora unlearn runs/demo-plain --out runs/demo-unlearn --forget-fraction 0.25
    """
    _offline_defaults()
    if concept is not None:
        try:
            from privlora.unlearn.concept import erase_concept
        except ImportError:
            raise UserError("concept erasure is not available in this installation") from None
        given = {"steps": steps, "lr": lr, "eta": eta}
        result = erase_concept(run, concept, out, seed=seed, quiet=quiet,
                               **{k: v for k, v in given.items() if v is not None})
        import json

        typer.echo(f"erased {concept!r} from {run} → {out}")
        typer.echo(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}, default=str))
        return
    from privlora.unlearn.run import format_table
    from privlora.unlearn.run import unlearn as run_unlearn

    result = run_unlearn(run, out, method=method, forget_file=forget, forget_ids=forget_ids,
                         forget_fraction=forget_fraction, steps=100 if steps is None else steps,
                         lr=lr, alpha=alpha, saliency=saliency,
                         stop="none" if fixed_steps else "aux", attack=attack, draws=draws, reference=reference,
                         train_reference=not no_reference, seed=seed, quiet=quiet)
    for line in format_table(result):
        typer.echo(line)
    typer.echo(f"wrote {out}")


tee_app = typer.Typer(no_args_is_help=True, help="Trusted execution: run `privlora train` inside an Intel SGX "
                      "enclave with Gramine (trusted files, encrypted data and outputs, fixed command line).")
app.add_typer(tee_app, name="tee")


@tee_app.command("manifest")
@_one_line_errors
def tee_manifest(
    config: Path = typer.Option(..., "--config", "-c", help="Train config (YAML) the enclave will run."),
    data: Path = typer.Option(None, help="Host folder (or file) of training data, encrypted with "
                              "gramine-sgx-pf-crypt; mounted encrypted. Not needed for demo:* data."),
    out_dir: Path = typer.Option(None, "--out-dir", help="Host folder that receives the encrypted run directory "
                                 "(default: the config's out folder's parent /sgx, e.g. runs/sgx)."),
    base: str = typer.Option(None, help="Override the config's base: embedded | minilm | a model folder."),
    output: Path = typer.Option(Path("privlora.manifest"), "--output", "-o",
                                help="Manifest to write, NAME.manifest (gramine-sgx NAME runs it; atomic)."),
    enclave_size: str = typer.Option("16G", "--enclave-size", help="SGX enclave size, a power of two (K/M/G)."),
    threads: int = typer.Option(4, help="torch/OpenMP threads inside the enclave (OMP_NUM_THREADS)."),
    max_threads: int = typer.Option(None, "--max-threads", help="SGX thread slots (default 2·threads + 16)."),
    edmm: bool = typer.Option(False, "--edmm", help="Enable EDMM (memory added on demand; Linux ≥ 6.0, SGX2)."),
    debug: bool = typer.Option(False, "--debug", help="Debug enclave (its memory is readable by a debugger: "
                               "never for real data)."),
    keys: str = typer.Option("sealed", help="Key of the encrypted mounts: sealed (SGX sealing key of this enclave, "
                             "no data folder) | provisioned (the data owner's key via RA-TLS secret provisioning)."),
    key_server: str = typer.Option("127.0.0.1:4433", "--key-server", help="provisioned: secret-provisioning "
                                   "server, IP:PORT."),
    ca_cert: Path = typer.Option(None, "--ca-cert", help="provisioned: CA certificate that verifies the server."),
    gramine_dir: Path = typer.Option(None, "--gramine-dir", help="Gramine's library folder (holds libsysdb.so); "
                                     "default: found in the standard install locations."),
) -> None:
    """Write a Gramine manifest that runs `privlora train --config CONFIG` inside SGX, and print the next steps
    (gramine-sgx-sign, gramine-sgx). Validates the config first (unknown keys are errors).

    Example: privlora tee manifest --config configs/demo-dp.yaml
    """
    from privlora.tee import TeeOptions, next_steps, write_manifest

    opts = TeeOptions(config=config, output=output, data=data, out_dir=out_dir, base=base,
                      enclave_size=enclave_size, threads=threads, max_threads=max_threads, edmm=edmm, debug=debug,
                      keys=keys, key_server=key_server, ca_cert=ca_cert, gramine_dir=gramine_dir)
    plan = write_manifest(opts)
    sgx = plan.manifest["sgx"]
    typer.echo(f"wrote {output}: {len(sgx['trusted_files'])} trusted entries, "
               f"{len(plan.manifest['fs']['mounts'])} mounts, enclave {sgx['enclave_size']}, "
               f"{sgx['max_threads']} threads, key {plan.key.key_name}")
    typer.echo(f"  runs: {' '.join(plan.manifest['loader']['argv'][1:])}")
    typer.echo(f"  run directory (encrypted): {plan.run_dir}")
    typer.echo("next:")
    for step in next_steps(plan, opts):
        typer.echo(f"  {step}")


def main() -> None:
    """Console entry point."""
    app(prog_name="privlora")


if __name__ == "__main__":
    sys.exit(main())
