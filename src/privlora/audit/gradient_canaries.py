"""``privlora audit --run DIR --dp-canaries M --dp-canary-kind gradient``: white-box one-run DP audit.

The strongest setting of Steinke, Nasr & Jagielski (2023): "Dirac" gradient canaries. Each of ``m``
canaries is a gradient of norm exactly C (the clip bound) along its own coordinate of the trainable LoRA
parameters (coordinates drawn at random without replacement, seeded); each is included with probability
½ (:func:`privlora.audit.dp_canaries.draw_inclusion`). ONE DP-SGD run of the audited run's mechanism is
trained with :class:`DiracCanaries` hooked into every step (:class:`privlora.train.dp.GradientCanaryHook`):
an included canary joins each step's Poisson batch with the run's rate q, like any sample, and its
gradient is added to the sum of clipped per-sample gradients *before* the Gaussian noise. The auditor sees
the noisy summed gradients of every step (white-box access to the intermediate updates, which the
paper's threat model allows) and scores each canary by the sum over steps of the noisy gradient at its
coordinate; the top-scored guesses say "in", the bottom "out", and :func:`privlora.audit.one_run.audit_bound`
turns the correct guesses into an ε lower bound.

The claim under test. DP-SGD with Poisson sampling is (ε, δ)-DP per record for ε = accountant(σ, q, T, δ)
whatever the data set's size, so the canary run keeps the audited run's σ, q, C and T exactly (σ is taken
from its privacy.json, never recalibrated; the normalisation by the expected batch size, post-processing,
stays that of the members) — the audited run's own mechanism is what is checked. δ of the test: the δ term
of the theorem is 2·m·δ, which at the run's δ = 1/(10 n) and m in the thousands exceeds β and makes every
bound 0, so the hypothesis is tested at δ_audit = min(run δ, β / (200 m)) (δ term ≤ β/100) and compared with
the accountant's ε *at δ_audit* (the same mechanism's (ε, δ) curve; larger than the ε at the run's δ).

Output: ``<run>/audit/dp_gradient_canaries.json`` (atomic). The canary run itself is trained in a temporary
directory and discarded: the evidence is the observed noisy gradients, recorded in memory (no resume).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privlora.audit.dp_canaries import draw_inclusion
from privlora.audit.one_run import audit_bound
from privlora.errors import UserError
from privlora.privacy import History
from privlora.privacy import epsilon as history_epsilon
from privlora.runs import write_json_atomic

RESULT = "dp_gradient_canaries.json"
KIND = "gradient"


class DiracCanaries:
    """``m`` gradient canaries, one coordinate each, implementing :class:`privlora.train.dp.GradientCanaryHook`.

    Coordinates are drawn on the first step (when the parameter shapes are known) from ``seed``;
    per-step participation (each included canary w.p. q) from its own generator, so DP-SGD's noise and
    batch generators are untouched. After training: ``sums`` (the score), ``participated`` (steps each
    canary was in the batch), ``steps``.
    """

    def __init__(self, included: np.ndarray, *, seed: int) -> None:
        self.included = np.asarray(included, dtype=bool).ravel()
        self.m = self.included.size
        self.seed = seed
        self.rng = np.random.default_rng([seed, 0xD1AC])
        self.tensor: np.ndarray | None = None  # which trainable tensor each canary's coordinate is in
        self.offset: np.ndarray | None = None  # flat index inside that tensor
        self.sums = np.zeros(self.m)
        self.participated = np.zeros(self.m, dtype=np.int64)
        self.steps = 0

    def bind(self, shapes: Sequence[torch.Size]) -> None:
        """Draw the ``m`` distinct coordinates uniformly among all trainable parameters."""
        sizes = np.array([int(np.prod(s)) for s in shapes], dtype=np.int64)
        total = int(sizes.sum())
        if self.m > total:
            raise UserError(f"{self.m} gradient canaries need {self.m} distinct coordinates, the adapter has "
                            f"only {total} trainable parameters; use fewer canaries")
        flat = np.random.default_rng([self.seed, 0xC00D]).choice(total, size=self.m, replace=False)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.tensor = np.searchsorted(np.cumsum(sizes), flat, side="right")
        self.offset = flat - starts[self.tensor]

    def coordinates(self) -> list[tuple[int, int]]:
        assert self.tensor is not None and self.offset is not None, "bind() first"
        return [(int(t), int(o)) for t, o in zip(self.tensor, self.offset, strict=True)]

    def inject(self, summed: list[torch.Tensor], *, max_grad_norm: float, sample_rate: float) -> None:
        if self.tensor is None:
            self.bind([s.shape for s in summed])
        assert self.tensor is not None and self.offset is not None
        part = self.included & (self.rng.random(self.m) < sample_rate)
        self.participated += part
        for j in np.unique(self.tensor[part]):
            s = summed[j]
            add = torch.zeros(s.numel(), dtype=s.dtype, device=s.device)
            add[torch.as_tensor(self.offset[part & (self.tensor == j)], device=s.device)] = max_grad_norm
            s.add_(add.view_as(s))  # in place: p.summed_grad keeps Opacus' bookkeeping

    def observe(self, noisy: list[torch.Tensor]) -> None:
        assert self.tensor is not None and self.offset is not None
        for j in np.unique(self.tensor):
            where = self.tensor == j
            idx = torch.as_tensor(self.offset[where], device=noisy[j].device)
            self.sums[where] += noisy[j].detach().reshape(-1)[idx].double().cpu().numpy()
        self.steps += 1


def audit_delta(run_delta: float, *, m: int, beta: float) -> float:
    """δ the hypothesis is tested at: the run's, unless the theorem's 2·m·δ term would eat β (then β/(200 m))."""
    return min(float(run_delta), beta / (200.0 * m))


def _read_run(run: Path) -> tuple[Any, Any, dict[str, Any]]:
    from privlora.config import load_config
    from privlora.data.splits import Splits

    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist")
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run directory (no config.yaml)")
    config = load_config(run / "config.yaml", {"resume": False})
    if config.mode != "dp":
        raise UserError(f"gradient canaries audit DP-SGD: {run} is a {config.mode!r} run (no clipping or noise "
                        "to audit); use --dp-canary-kind noise for a black-box audit of any run")
    if not (run / "privacy.json").is_file():
        raise UserError(f"{run} has no privacy.json (an unfinished DP run?); its σ, q and steps are needed")
    privacy = json.loads((run / "privacy.json").read_text())
    missing = [k for k in ("noise_multiplier", "sample_rate", "steps", "delta") if k not in privacy]
    if missing:
        raise UserError(f"{run}/privacy.json lacks {', '.join(missing)}; retrain the run with this version")
    return config, Splits.load(run), privacy


def gradient_canary_audit(run: Path, *, m: int, seed: int = 0, beta: float = 0.05,
                          guesses: Sequence[int] | None = None, quiet: bool = True) -> dict[str, Any]:
    """White-box one-run DP audit of DP run ``run`` with ``m`` Dirac canaries; writes and returns the JSON."""
    from privlora.train.loop import train

    run = Path(run)
    if m < 2:
        raise UserError(f"--dp-canaries needs at least 2 canaries, got {m}")
    if not 0 < beta < 1:
        raise UserError(f"β must be in (0, 1), got {beta}")
    if guesses is not None and any(not 1 <= g <= m for g in guesses):
        raise UserError(f"guess counts must be between 1 and M = {m}, got {list(guesses)}")
    start = time.perf_counter()
    config, splits, privacy = _read_run(run)
    sigma, q, steps = float(privacy["noise_multiplier"]), float(privacy["sample_rate"]), int(privacy["steps"])
    included = draw_inclusion(m, seed=seed)
    hook = DiracCanaries(included, seed=seed)
    # the audited mechanism exactly: its σ (no recalibration), its q (same members), its number of steps
    canary_config = config.model_copy(update={
        "name": f"{config.name}-dp-gradient-canaries", "quiet": quiet, "resume": False, "report_to": "none",
        "dp": config.dp.model_copy(update={"noise_multiplier": sigma, "target_epsilon": None,
                                           "delta": float(privacy["delta"])}),
        "optim": config.optim.model_copy(update={"max_steps": steps}),
        "eval": config.eval.model_copy(update={"samples": 0, "timesteps": (200,)})})
    (run / "audit").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gradient-canary-run-", dir=run / "audit") as tmp:
        train(canary_config.model_copy(update={"out": Path(tmp) / "run"}), splits=splits, gradient_canaries=hook)
        canary_privacy = json.loads((Path(tmp) / "run" / "privacy.json").read_text())
    trained = time.perf_counter()
    same = {k: (canary_privacy[k], privacy[k]) for k in ("noise_multiplier", "sample_rate", "steps")
            if not np.isclose(float(canary_privacy[k]), float(privacy[k]), rtol=1e-9)}
    if same:
        raise RuntimeError(f"the canary run's mechanism differs from the audited run's: {same}")
    delta = audit_delta(float(privacy["delta"]), m=m, beta=beta)
    accountant = str(privacy.get("accountant") or "rdp")
    epsilon = history_epsilon(History.uniform(sigma, q, steps), delta, accountant)
    bound = audit_bound(hook.sums, included, delta=delta, beta=beta, guesses=guesses)
    coords = hook.coordinates()
    result = {
        "run": str(run), "mode": config.mode, "method": "Steinke, Nasr & Jagielski 2023 (one run)",
        "attack": "white-box Dirac gradient canaries: sum over steps of the noisy summed gradient at the "
                  "canary's coordinate", "canary_kind": KIND, "m": m, "included": int(included.sum()),
        "seed": seed, "beta": beta, "confidence": 1 - beta, "delta": delta,
        "delta_source": "min(run δ, β/(200 m)): keeps the theorem's 2mδ term ≤ β/100",
        "run_delta": float(privacy["delta"]), "noise_multiplier": sigma, "sample_rate": q, "steps": steps,
        "max_grad_norm": float(privacy["max_grad_norm"]),
        "epsilon_lower_bound": bound["epsilon_lower_bound"], "guesses": bound["guesses"],
        "correct": bound["correct"], "k_in": bound["k_in"], "k_out": bound["k_out"],
        "correction": bound["correction"], "candidates": bound["candidates"],
        "accountant_epsilon": epsilon, "accountant": accountant,
        "accountant_epsilon_note": "the audited run's mechanism (σ, q, steps) at the audit's δ",
        "run_epsilon": privacy.get("epsilon"),
        "ratio_to_accountant": bound["epsilon_lower_bound"] / epsilon if epsilon else None,
        "canary_run_privacy": canary_privacy,
        "canaries": [{"tensor": t, "offset": o, "included": bool(inc), "participated": int(n), "score": float(s)}
                     for (t, o), inc, n, s in zip(coords, included, hook.participated, hook.sums, strict=True)],
        "seconds": {"train": trained - start, "score": time.perf_counter() - trained}}
    if bound["epsilon_lower_bound"] > epsilon + 1e-9:
        result["violation"] = ("the empirical lower bound exceeds the accountant's ε: a bug in the DP "
                               "implementation or its accounting (or a 1-in-1/β false alarm)")
    write_json_atomic(run / "audit" / RESULT, result)
    return result


def summary_line(result: dict[str, Any]) -> str:
    """E.g. ``white-box one-run DP audit: ε lower bound 1.20 (95 %) vs accountant ε 9.10 at δ 1e-05, …``."""
    line = (f"white-box one-run DP audit: ε lower bound {result['epsilon_lower_bound']:.2f} "
            f"({result['confidence']:.0%}) vs accountant ε {result['accountant_epsilon']:.2f} at δ "
            f"{result['delta']:.1e}, {result['m']} gradient canaries ({result['included']} in), "
            f"{result['guesses']} guesses, {result['correct']} correct")
    return line + (f" — WARNING: {result['violation']}" if "violation" in result else "")
