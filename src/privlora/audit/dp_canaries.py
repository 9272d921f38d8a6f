"""``privlora audit --run DIR --dp-canaries M``: audit a run's recipe for DP in one training run.

An ε from the accountant is a proof about the DP-SGD algorithm, not about our code (Opacus wiring,
Poisson sampling, the LoRA gradients). This module measures it empirically with the one-run audit of
Steinke, Nasr & Jagielski (2023) (statistics in :mod:`privlora.audit.one_run`):

1. draw ``m`` canary images at the run's image shape (seeded; out-of-distribution patterns the base
   model was never trained on, see :data:`CANARY_KINDS`), include each with probability ½ (seeded);
2. train ONE new run with the run's own config on its members ∪ the included canaries (same σ
   calibration, so the accountant's ε of *that* run — its n is larger — is the claim under test);
3. score every canary by how much the adapter lowered its denoising error below the base model's, on
   the same fixed noise and timesteps (averaged over a few draws) — a black-box, final-model,
   input-space attack;
4. guess "in" for the top-scored canaries and "out" for the bottom ones (guess counts fixed in advance,
   Bonferroni-corrected), and turn the correct guesses into an ε lower bound at confidence 1 − β.

A lower bound above the accountant's ε would mean a bug in the DP implementation or accounting. A bound
far below it is expected: this attack sees only the final adapter and a few dozen canaries, while the
paper's tight bounds need white-box gradient canaries and thousands of them.

Outputs: the canary run in ``<run>/audit/dp-canary-run/`` (or ``canary_dir``; reused when it matches)
and ``<run>/audit/dp_canaries.json``, both written atomically.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from privlora.audit.one_run import audit_bound
from privlora.audit.references import loss_signal
from privlora.audit.runner import load_run
from privlora.data.imageset import ImageSet
from privlora.data.splits import Splits
from privlora.errors import UserError
from privlora.privacy import default_delta
from privlora.runs import write_json_atomic

RESULT = "dp_canaries.json"
MANIFEST = "dp_canaries_manifest.json"
DEFAULT_DIR = "dp-canary-run"
CAPTION = "a canary pattern"


def _noise(n: int, shape: tuple[int, int, int], gen: torch.Generator) -> torch.Tensor:
    """i.i.d. uniform pixels in [−1, 1]: maximal entropy, as far from natural images as it gets."""
    return torch.rand((n, *shape), generator=gen) * 2 - 1


def _blocks(cells: int) -> Callable[[int, tuple[int, int, int], torch.Generator], torch.Tensor]:
    def make(n: int, shape: tuple[int, int, int], gen: torch.Generator) -> torch.Tensor:
        c, h, w = shape
        grid = (torch.rand((n, c, cells, cells), generator=gen) < 0.5).float() * 2 - 1
        return F.interpolate(grid, size=(h, w), mode="nearest").contiguous()

    make.__doc__ = (f"A random black/white {cells}×{cells} grid blown up to the image size: out of "
                    f"distribution but only {cells * cells} bits per canary, so easy to memorise.")
    return make


#: canary kind → generator of ``n`` images ``[n, C, H, W]`` in [−1, 1]
#: (on a plain demo run: noise AUC 0.81; block patterns only 0.55 — the adapter learns the *style* of block
#: images, lowering every block canary's error alike, so the ones trained on hardly stand out)
CANARY_KINDS: dict[str, Callable[[int, tuple[int, int, int], torch.Generator], torch.Tensor]] = {
    "noise": _noise,
    "blocks": _blocks(8),
    "coarse": _blocks(4),
}
DEFAULT_KIND = "noise"  # measured strongest: benchmarks/results/dp_one_run.json "kinds"


def make_canaries(kind: str, m: int, shape: tuple[int, int, int], *, seed: int) -> ImageSet:
    """``m`` seeded canary images of ``kind`` with ids ``canary/<kind>/<i>`` (never a dataset's ids)."""
    if kind not in CANARY_KINDS:
        raise UserError(f"unknown canary kind {kind!r}; available: {', '.join(CANARY_KINDS)}")
    gen = torch.Generator().manual_seed(10_007 * seed + 3)
    pixels = CANARY_KINDS[kind](m, tuple(shape), gen)  # type: ignore[arg-type]
    ids = [f"canary/{kind}/{i:05d}" for i in range(m)]
    return ImageSet(ids=ids, pixels=pixels.float(), captions=[CAPTION] * m)


def draw_inclusion(m: int, *, seed: int) -> np.ndarray:
    """Each canary in the training set independently with probability ½ (the paper's S ∈ {±1}^m)."""
    return np.random.default_rng([seed, 0xCA9A]).random(m) < 0.5


@torch.no_grad()
def canary_scores(task: Any, canaries: ImageSet, *, seed: int, draws: int = 4) -> np.ndarray:
    """Per canary, log(base error) − log(adapter error), averaged over ``draws`` fixed noise draws.

    The base model never saw any canary, so it is the "out" reference every canary is measured
    against; the same noise for both cancels each draw's luck. Higher = more likely trained on.
    """
    total = np.zeros(len(canaries))
    for d in range(draws):
        s = 1_000 * seed + 101 + d
        adapter = loss_signal(task, canaries, seed=s)
        with task.adapter_disabled():
            base = loss_signal(task, canaries, seed=s)
        total += base - adapter
    return total / draws


def _manifest(run: Path, canaries: ImageSet, kind: str, seed: int, included: list[str]) -> dict[str, Any]:
    """What identifies a canary run: the audited run, the canaries (down to their pixels) and which were in."""
    digest = hashlib.sha256(canaries.pixels.numpy().tobytes()).hexdigest()
    return {"audited_run": str(Path(run).resolve()), "kind": kind, "m": len(canaries), "seed": seed,
            "pixels_sha256": digest, "included": included}


def _train_canary_run(loaded: Any, canaries: ImageSet, included: np.ndarray, out: Path, *, kind: str,
                      seed: int, quiet: bool) -> Path:
    """Train (or reuse) the one canary run: the audited run's config on members ∪ included canaries."""
    from privlora.train.loop import train

    chosen = [cid for cid, inc in zip(canaries.ids, included, strict=True) if inc]
    manifest = _manifest(loaded.path, canaries, kind, seed, chosen)
    if out.exists():
        saved = out / MANIFEST
        if saved.is_file() and json.loads(saved.read_text()) == manifest and (out / "adapter").is_dir():
            return out
        raise UserError(f"{out} exists but is not this audit's canary run (other run, kind, M or seed); "
                        "remove it or pass another --canary-dir")
    config = loaded.config
    partial = out.with_name(out.name + ".partial")
    # an interrupted canary run is resumed only with the very canaries it started with
    pending = out.with_name(f".{out.name}.manifest.json")
    if partial.exists():
        if not pending.is_file() or json.loads(pending.read_text()) != manifest:
            raise UserError(f"the interrupted canary run in {partial} is not this audit's (other run, kind, M "
                            "or seed); remove it or pass another --canary-dir")
    else:
        write_json_atomic(pending, manifest)
    canary_config = config.model_copy(update={
        "out": out, "name": f"{config.name}-dp-canaries", "quiet": quiet, "resume": partial.exists(),
        "report_to": "none",  # the audit's own training: nothing to mirror (nor a reporter to install)
        # utility is not what this run is for: one eval timestep, no samples for the FD
        "eval": config.eval.model_copy(update={"samples": 0, "timesteps": (200,)})})
    splits = Splits.load(loaded.path)
    canary_splits = Splits(members=[*splits.members, *chosen], aux=splits.aux, eval=splits.eval,
                           source=splits.source, seed=splits.seed)
    if not quiet:
        print(f"training the canary run on {len(splits.members)} members + {len(chosen)} of {len(canaries)} "
              f"canaries → {out}")
    train(canary_config, splits=canary_splits, extra=canaries)
    write_json_atomic(out / MANIFEST, manifest)
    pending.unlink(missing_ok=True)
    return out


def _load_adapter_task(loaded: Any, canary_run: Path) -> Any:
    from privlora.tasks.loading import load_task
    from privlora.tasks.lora import read_spec

    config = loaded.config
    task = load_task(config.base, read_spec(canary_run / "adapter"), seed=config.seed,
                     trust_pickle=config.trust_pickle, device=config.device)
    task.load_adapter(canary_run / "adapter")
    task.model.eval()
    return task


def dp_canary_audit(run: Path, *, m: int, kind: str = DEFAULT_KIND, seed: int = 0, beta: float = 0.05,
                    guesses: Sequence[int] | None = None, draws: int = 4, canary_dir: Path | None = None,
                    quiet: bool = True, loaded: Any = None) -> dict[str, Any]:
    """One-run DP audit of ``run``'s recipe with ``m`` canaries; writes and returns dp_canaries.json."""
    run = Path(run)
    if m < 2:
        raise UserError(f"--dp-canaries needs at least 2 canaries, got {m}")
    if not 0 < beta < 1:
        raise UserError(f"β must be in (0, 1), got {beta}")
    if draws < 1:
        raise UserError(f"need at least one noise draw per canary, got {draws}")
    if kind not in CANARY_KINDS:
        raise UserError(f"unknown canary kind {kind!r}; available: {', '.join(CANARY_KINDS)}")
    if guesses is not None and any(not 1 <= g <= m for g in guesses):
        raise UserError(f"guess counts must be between 1 and M = {m}, got {list(guesses)}")
    start = time.perf_counter()
    loaded = loaded or load_run(run)
    shape = tuple(int(s) for s in loaded.members.pixels.shape[1:])
    canaries = make_canaries(kind, m, shape, seed=seed)  # type: ignore[arg-type]
    included = draw_inclusion(m, seed=seed)
    out = Path(canary_dir) if canary_dir is not None else run / "audit" / DEFAULT_DIR
    canary_run = _train_canary_run(loaded, canaries, included, out, kind=kind, seed=seed, quiet=quiet)
    trained = time.perf_counter()
    privacy = json.loads((canary_run / "privacy.json").read_text())
    n_train = len(loaded.members) + int(included.sum())
    # the hypothesis tested is "(ε, δ)-DP" at the canary run's δ; a plain run has none, so we test at the
    # δ a DP run of this size would get (δ = 1/(10 n)) to make the two comparable
    delta = float(privacy.get("delta") or default_delta(n_train))
    task = _load_adapter_task(loaded, canary_run)
    scores = canary_scores(task, canaries, seed=seed, draws=draws)
    bound = audit_bound(scores, included, delta=delta, beta=beta, guesses=guesses)
    epsilon = privacy.get("epsilon")
    result = {
        "run": str(run), "mode": loaded.config.mode, "method": "Steinke, Nasr & Jagielski 2023 (one run)",
        "attack": "black-box final adapter: log base error − log adapter error, same noise",
        "canary_kind": kind, "m": m, "included": int(included.sum()), "training_samples": n_train,
        "seed": seed, "draws": draws, "beta": beta, "confidence": 1 - beta, "delta": delta,
        "delta_source": "canary run's privacy.json" if privacy.get("delta") else "1/(10 n) (no DP in the run)",
        "epsilon_lower_bound": bound["epsilon_lower_bound"], "guesses": bound["guesses"],
        "correct": bound["correct"], "k_in": bound["k_in"], "k_out": bound["k_out"],
        "correction": bound["correction"], "candidates": bound["candidates"],
        "accountant_epsilon": epsilon, "accountant": privacy.get("accountant"),
        "ratio_to_accountant": (bound["epsilon_lower_bound"] / epsilon) if epsilon else None,
        "canary_run": str(canary_run), "canary_run_privacy": privacy,
        "canaries": [{"id": cid, "included": bool(inc), "score": float(s)}
                     for cid, inc, s in zip(canaries.ids, included, scores, strict=True)],
        "seconds": {"train": trained - start, "score": time.perf_counter() - trained}}
    if epsilon is not None and bound["epsilon_lower_bound"] > float(epsilon) + 1e-9:
        result["violation"] = ("the empirical lower bound exceeds the accountant's ε: a bug in the DP "
                               "implementation or its accounting (or a 1-in-1/β false alarm)")
    write_json_atomic(run / "audit" / RESULT, result)
    return result


def summary_line(result: dict[str, Any]) -> str:
    """E.g. ``one-run DP audit: ε lower bound 0.31 (95 %) vs accountant ε 8.00, 62 canaries, …``."""
    eps = result["accountant_epsilon"]
    claim = f"accountant ε {eps:.2f}" if eps is not None else "no DP (accountant ε ∞)"
    line = (f"one-run DP audit: ε lower bound {result['epsilon_lower_bound']:.2f} "
            f"({result['confidence']:.0%}) vs {claim}, {result['m']} canaries ({result['included']} trained on), "
            f"{result['guesses']} guesses, {result['correct']} correct")
    return line + (f" — WARNING: {result['violation']}" if "violation" in result else "")
