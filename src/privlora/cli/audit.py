"""Audit commands: ``audit`` (membership, extraction, one-run DP), ``spectrum`` and the ``canary`` group."""

from __future__ import annotations

from pathlib import Path

import typer

from privlora.cli.choices import DP_AUDIT_KINDS
from privlora.cli.common import RUN_ALIAS_HELP, choice, group, offline_defaults, one_line_errors, one_run, run_list
from privlora.errors import UserError


@one_line_errors
def audit(
    run: list[Path] = typer.Argument(None, metavar="RUN...", show_default=False, help="Run directories written "
                                     "by `privlora train`, `federate` or `split train`; several are compared in "
                                     "one report (they share the "
                                     "reference adapters)."),
    run_alias: list[Path] = typer.Option(None, "--run", hidden=True, help=RUN_ALIAS_HELP),
    sweep: Path = typer.Option(None, "--sweep", help="Audit every run directory inside this folder (e.g. one "
                               "per α, σ or step budget) and draw their privacy–utility frontier."),
    attacks: str = typer.Option(None, help="Comma-separated model-only attacks (image runs: loss, secmi, "
                                "pia, sima; text runs: loss; default: all of the run's); lira and rmia join "
                                "with --references."),
    references: int = typer.Option(0, "--references", help="Train K reference adapters on random halves of "
                                   "members ∪ evaluation non-members for LiRA and RMIA (K even; 0: none)."),
    reference_dir: Path = typer.Option(None, "--reference-dir", help="Where reference adapters live and are "
                                       "reused (default: FIRST_RUN/references)."),
    reference_workers: int = typer.Option(None, "--reference-workers", metavar="N", show_default=False,
                                          help="Train up to N reference adapters at once as Ray tasks (a local "
                                          "Ray, or --ray-address); default 1: one after another here. Each "
                                          "reference keeps its seed and half, so the adapters and "
                                          "references.json are identical to training them one by one."),
    ray_address: str = typer.Option(None, "--ray-address", metavar="ADDRESS", help="Train the reference "
                                    "adapters on this Ray cluster (HOST:PORT, ray://HOST:PORT or auto), all at "
                                    "once unless --reference-workers; --reference-dir must be on storage every "
                                    "node shares. Same adapters as sequential training."),
    fpr: str = typer.Option(None, help="FPRs for TPR@FPR, e.g. 0.01,0.001 (default: those the data allows)."),
    extraction: int = typer.Option(0, "--extraction", help="Also generate N images and look for training-image "
                                   "copies (Carlini et al. 2023); causal-lm runs: prompt every member with its "
                                   "prompt, greedy + N sampled answers, verbatim and near-verbatim rates; 0: skip."),
    pii: bool = typer.Option(False, "--pii", help="With --extraction on a causal-lm run: scan every answer with "
                             "the text sanitizer's PII scanner and count the spans that occur in a training "
                             "record but not in the prompt (leaked), adapter vs base."),
    report: Path = typer.Option(None, help="HTML report (default: RUN_DIR/audit/report.html, or report.html "
                                "beside the runs when several are given)."),
    dp_canaries: int = typer.Option(0, "--dp-canaries", metavar="M", help="Instead of the membership audit: "
                                    "one-run DP audit (Steinke et al. 2023) — train ONE run of RUN_DIR's config "
                                    "with M canaries each included w.p. ½, guess which were, and print the ε "
                                    "lower bound beside that run's accountant ε (RUN_DIR/audit/dp_canaries.json)."),
    dp_canary_kind: str = typer.Option("noise", "--dp-canary-kind", click_type=choice(DP_AUDIT_KINDS),
                                       help="Canary images: noise (i.i.d. "
                                       "pixels; the strongest measured), blocks (random 8×8 black/white grid), "
                                       "coarse (4×4); gradient: white-box Dirac gradient canaries injected into "
                                       "every DP-SGD step of a DP run (RUN_DIR/audit/dp_gradient_canaries.json)."),
    dp_guesses: str = typer.Option(None, "--dp-guesses", help="Guess counts fixed in advance, comma-separated "
                                   "(half in, half out; several → Bonferroni; default 10,20,50,100 % of M)."),
    dp_beta: float = typer.Option(0.05, "--dp-beta", help="1 − confidence of the ε lower bound."),
    canary_dir: Path = typer.Option(None, "--canary-dir", help="Where the canary run goes and is reused "
                                    "(default RUN_DIR/audit/dp-canary-run; one run only)."),
    client: str = typer.Option(None, "--client", metavar="N|all", show_default=False, help="Federated runs: "
                               "members are client N's training data, or every client's (all, the default); "
                               "non-members are the server's held-out data."),
    seed: int = typer.Option(0, help="Seed for the attacks' noise, the reference halves and the DP canaries."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Audit runs for membership leakage and memorisation; writes RUN_DIR/audit/ and a report.

    Each attack scores the run's training images against its evaluation non-members twice: with the
    adapter and with the base model alone (the control: what chance and image difficulty give). Writes
    RUN_DIR/audit/scores.csv (one row per image) and results.json (AUC with bootstrap interval, balanced
    accuracy, TPR at low FPR, empirical ε lower bound), prints a table and writes one HTML report.
    Reference adapters (--references) are trained once, with a plain run's recipe when one is audited, and reused;
    --reference-workers N trains N at once on Ray (the same adapters as one after another).

    Example: privlora audit runs/plain runs/dp --references 2

    In parallel: privlora audit runs/plain --references 8 --reference-workers 4

    One-run DP audit: privlora audit runs/dp --dp-canaries 64

    Federated and split runs: privlora audit runs/fed-ffa --client 0 ; privlora audit runs/split-cti
    """
    from privlora.audit.reference_pool import ReferencePool
    from privlora.audit.session import audit_session, sweep_runs

    offline_defaults()
    pool = ReferencePool(workers=reference_workers, address=ray_address)
    if (reference_workers is not None or ray_address is not None) and not references:
        raise UserError("--reference-workers and --ray-address train reference adapters: add --references K")
    pool.check()
    runs = run_list(run, run_alias)
    if sweep is not None:
        runs += sweep_runs(sweep)
    if not runs:
        raise UserError("nothing to audit: give run directories (privlora audit RUN...) or --sweep FOLDER")
    if dp_canaries:
        from privlora.audit.dp_audit_kinds import run_dp_audit

        if canary_dir is not None and len(runs) > 1:
            raise UserError("--canary-dir names one canary run: give one RUN with it")
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
    names = None if attacks is None else tuple(a.strip() for a in attacks.split(",") if a.strip())
    fprs = None
    if fpr:
        try:
            fprs = tuple(float(f) for f in fpr.split(","))
        except ValueError:
            raise UserError(f"--fpr expects numbers like 0.01,0.001, got {fpr!r}") from None
    audit_session(runs, attacks=names, references=references, reference_dir=reference_dir, fprs=fprs,
                  extraction=extraction, report=report, seed=seed, quiet=quiet, echo=typer.echo, pool=pool,
                  client=client, pii=pii)


@one_line_errors
def spectrum(
    sources: list[Path] = typer.Argument(..., help="Run or adapter directories (safetensors only)."),
    out: Path = typer.Option(None, "--out", help="PNG comparing the adapters' spectra."),
    json_out: Path = typer.Option(None, "--json", help="JSON with every layer's singular values and figures."),
    top_k: int = typer.Option(4, "--top-k", help="k of the top-k energy share."),
) -> None:
    """Singular-value spectrum of each LoRA update ΔW: effective rank, energy shares, suspicious layers."""
    from privlora.audit.spectrum import adapter_spectrum, spectrum_plot
    from privlora.runs import write_json_atomic

    offline_defaults()
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


canary_app = group(help="Canaries: plant an invisible watermark in training images, look for it in generations.")


@canary_app.command("embed")
@one_line_errors
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

    offline_defaults()
    m = embed_folder(src, out, key=key, fraction=fraction, strength=strength, seed=seed, resolution=resolution,
                     band=parse_band(band) if band else None)
    zs = sorted(e["z_at_resolution"] for e in m["marked"])
    typer.echo(f"marked {m['marked_count']} of {m['images']} images → {out} (manifest {out / 'canary.json'})")
    typer.echo(f"  PSNR min {m['psnr']['min']:.1f} dB, mean {m['psnr']['mean']:.1f} dB; "
               f"z at {resolution}px median {zs[len(zs) // 2]:.2f} (min {zs[0]:.2f}); keep the key secret")


@canary_app.command("detect")
@one_line_errors
def canary_detect(
    run: Path = typer.Argument(None, metavar="RUN", show_default=False, help="Run directory written by "
                               "`privlora train`."),
    run_alias: Path = typer.Option(None, "--run", hidden=True, help=RUN_ALIAS_HELP),
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

    offline_defaults()
    run = one_run(run, run_alias, "canary detect")
    r = detect_run(run, key=key, manifest=manifest, n=n, seed=seed, fpr=fpr, steps=steps, prompt=prompt,
                   device=device)
    lo, hi = r["detection_rate_ci95"]
    typer.echo(f"canary detected in {r['detected']}/{r['n']} generations (rate {r['detection_rate']:.3f} "
               f"[{lo:.3f}, {hi:.3f}]) at z > {r['threshold']:.2f} → {run / 'audit' / 'canary.json'}")
    typer.echo(f"  false positives: clean generations {r['fpr_clean']:.3f}, analytic {r['fpr_analytic']:.2g}; "
               f"mean z adapter {r['z_adapter']['mean']:.2f} vs clean {r['z_clean']['mean']:.2f}"
               + (f" (paired p={r['paired']['p_value']:.2g})" if r["paired"] else ""))
