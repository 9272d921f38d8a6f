"""``privlora unlearn``: remove training samples (or a concept) from an adapter and verify it."""

from __future__ import annotations

from pathlib import Path

import typer

from privlora.cli.choices import ATTACKS, UNLEARN_METHODS
from privlora.cli.common import QUIET, choice, offline_defaults, one_line_errors
from privlora.errors import UserError


@one_line_errors
def unlearn(
    run: Path = typer.Argument(..., help="Run directory written by `privlora train` (image or text)."),
    out: Path = typer.Option(..., help="New run directory for the unlearned adapter (written atomically)."),
    method: str = typer.Option("target", click_type=choice(UNLEARN_METHODS),
                               help="target (raise each forget sample's loss to a non-member's, no "
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
    attack: str = typer.Option("loss", click_type=choice(ATTACKS),
                               help="Membership attack of the verification (image: loss, secmi, pia, "
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
    quiet: bool = QUIET,
) -> None:
    """Remove training samples from an adapter and show with the membership audit that they are gone.

    Measures the attack's AUC on the forget set against the run's evaluation non-members before and after,
    and for an exactly retrained reference (trained into OUT/reference unless --reference or
    --no-reference); efficacy = 1 − (AUC_after − 0.5)/(AUC_before − 0.5). Writes OUT as a run directory
    (members = retained) with unlearn.json holding every figure.

    Example: privlora unlearn runs/demo-plain --out runs/demo-unlearn --forget-fraction 0.25
    """
    offline_defaults()
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
