"""``--dp-canary-kind`` → which one-run DP audit runs: black-box image canaries or white-box gradient canaries.

One registry so the CLI has no if/elif on kinds: every image generator of
:data:`privlora.audit.dp_canaries.CANARY_KINDS` is the black-box audit of any run (a canary *run* is
trained and kept; the final adapter is attacked), and ``gradient`` is the white-box audit of a DP run
(:mod:`privlora.audit.gradient_canaries`: canaries injected into every DP-SGD step, noisy gradients observed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from privlora.audit import dp_canaries, gradient_canaries
from privlora.errors import UserError


@dataclass(frozen=True)
class DPAuditKind:
    audit: Callable[..., dict[str, Any]]  # (run, *, m, seed, beta, guesses, quiet, **options) → result
    summary: Callable[[dict[str, Any]], str]
    result_file: str  # under RUN_DIR/audit/
    options: tuple[str, ...] = ()  # extra keyword options this kind accepts (e.g. canary_dir)


DP_AUDIT_KINDS: dict[str, DPAuditKind] = {
    **{kind: DPAuditKind(partial(dp_canaries.dp_canary_audit, kind=kind), dp_canaries.summary_line,
                         dp_canaries.RESULT, ("canary_dir",)) for kind in dp_canaries.CANARY_KINDS},
    gradient_canaries.KIND: DPAuditKind(gradient_canaries.gradient_canary_audit, gradient_canaries.summary_line,
                                        gradient_canaries.RESULT),
}


def run_dp_audit(run: Path, *, kind: str, m: int, seed: int = 0, beta: float = 0.05,
                 guesses: Sequence[int] | None = None, quiet: bool = True,
                 **options: Any) -> tuple[dict[str, Any], str, Path]:
    """Run the ``kind`` audit; return (result, its one-line summary, where the JSON was written)."""
    if kind not in DP_AUDIT_KINDS:
        raise UserError(f"unknown canary kind {kind!r}; available: {', '.join(DP_AUDIT_KINDS)}")
    spec = DP_AUDIT_KINDS[kind]
    given = {k: v for k, v in options.items() if v is not None}
    unsupported = sorted(set(given) - set(spec.options))
    if unsupported:
        flag = "--" + unsupported[0].replace("_", "-")
        raise UserError(f"{flag} does not apply to --dp-canary-kind {kind} (it keeps no canary run); drop it")
    result = spec.audit(Path(run), m=m, seed=seed, beta=beta, guesses=guesses, quiet=quiet, **given)
    return result, spec.summary(result), Path(run) / "audit" / spec.result_file
