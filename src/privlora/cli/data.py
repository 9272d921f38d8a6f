"""Data commands: ``sanitize`` (a cleaned copy of a dataset) and ``synthesize`` (a replacement set from a DP run)."""

from __future__ import annotations

from pathlib import Path

import typer

from privlora.cli.choices import PII_OPERATORS, REDACTIONS
from privlora.cli.common import QUIET, choice, names, offline_defaults, one_line_errors
from privlora.errors import UserError


@one_line_errors
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
    scene_text: bool = typer.Option(True, "--scene-text/--no-scene-text", help="Also look for text in contrast-"
                                    "equalised, inverted and 2× upscaled copies (name tags, patches, signs; "
                                    "5-7× the text detector's time)."),
    read_back: bool = typer.Option(True, "--read-back/--no-read-back", help="Read each output image again and "
                                   "redact any word the OCR read in the input and can still read (up to 3 "
                                   "passes; listed in the report)."),
    redaction: str = typer.Option("fill", click_type=choice(REDACTIONS),
                                  help="fill (solid box, removes everything) | pixelate | blur "
                                  "(weakest: partly invertible)."),
    margin: float = typer.Option(0.1, help="Grow each box by this fraction of its size on every side."),
    dedup: bool = typer.Option(False, "--dedup", help="Keep one image per near-duplicate cluster and list the "
                               "rest (default: only report clusters)."),
    # default left to SanitizeOptions (dedup.DEFAULT_DISTANCE): importing the sanitizer here would load it
    # (scipy, OpenCV) on every CLI start; a test keeps the help's number equal to it
    dedup_distance: int = typer.Option(None, "--dedup-distance", help="pHash bits (of 64) within which two "
                                       "images are near-duplicates (default 8); mirrored copies and centre "
                                       "crops of up to 6 % per side are compared too."),
    pii: bool = typer.Option(True, "--pii/--no-pii", help="Scrub PII from tables and captions."),
    entities: str = typer.Option(None, help="PII types to find, comma-separated (default: the built-in set)."),
    operator: str = typer.Option("replace", click_type=choice(PII_OPERATORS),
                                 help="What replaces PII: replace (type tag) | mask | hash "
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
    quiet: bool = QUIET,
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

    offline_defaults()
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
        images=ImageOptions(faces=names(faces), face_confidence=face_confidence, text=names(text),
                            text_confidence=text_confidence,
                            keep_text=keep_text, scene_text=scene_text, read_back=read_back,
                            redaction=redaction, margin=margin, max_pixels=max_pixels),
        text=TextOptions(enabled=pii, entities=names(entities) if entities else None, operator=operator,
                         salt=salt, columns=names(columns) if columns else None),
        dedup=dedup, dry_run=dry_run, overwrite=overwrite,
        **({"workers": workers} if workers else {}),
        **({"dedup_distance": dedup_distance} if dedup_distance is not None else {}))
    result = run_sanitize(src, out, options=options, quiet=quiet)
    for line in summary_lines(result):
        typer.echo(line)
    if report is not None:
        write_json_atomic(report, result.to_json())
        typer.echo(f"wrote {report}")


@one_line_errors
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
    quiet: bool = QUIET,
) -> None:
    """Generate a replacement dataset from a run's adapter: an image folder `privlora train --data` reads.

    Sampling from a DP adapter is post-processing, so the folder's privacy.json carries the run's (ε, δ).
    A non-DP source gives no guarantee (said in privacy.json and here). ControlNet conditions are extra
    inputs: edge maps of private images leak those images and are not covered by ε.

    Example: privlora synthesize runs/dp-digits --n 256 --steps 20 --out synthetic/dp-digits
    """
    from privlora.synthesize import synthesize as run_synthesize

    offline_defaults()
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
