"""Reference-model attacks: LiRA (Carlini et al. 2022) and RMIA (Zarifzadeh et al. 2024).

A single image's loss says little on its own — some faces are simply easier to denoise (the base model
alone scores AUC ≈ 0.6 on the demo split). The strongest auditors calibrate every image against
*reference adapters* trained the same way on random halves of a population (members ∪ evaluation
non-members): each image is then inside about half of them and outside the rest, and the question
becomes "does the target treat this image like the references that trained on it?".

Halves come in complementary pairs, so with K references every population image is inside exactly
K/2 of them ("online" attacks in both papers). References are ordinary run directories (trained by
:func:`privlora.train.loop.train` in plain mode with the target's recipe) in a reference directory
with ``references.json``; several targets over the same population (plain, SMP and DP adapters of the
demo) share them, which is where most of an audit's cost goes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privlora.audit.attacks import BATCH
from privlora.audit.provenance import sha256_file
from privlora.audit.reference_pool import ReferenceJob, ReferencePool
from privlora.data.imageset import ImageSet
from privlora.data.splits import Splits
from privlora.errors import UserError
from privlora.runs import atomic_file, write_json_atomic
from privlora.tasks.diffusion import DiffusionTask

MANIFEST = "references.json"
#: timesteps of the loss signal: one fixed noise draw at each, shared by target and references
SIGNAL_TIMESTEPS = (50, 100, 150, 200, 250, 300, 350, 400)


@dataclass(frozen=True)
class References:
    """Trained reference adapters and which population images each one trained on."""

    directory: Path
    population: list[str]
    inside: list[list[str]]
    recipe: dict[str, Any]

    def adapter(self, k: int) -> Path:
        return self.directory / f"ref-{k}" / "adapter"

    def membership(self, ids: list[str]) -> np.ndarray:
        """``[K, N]`` booleans: was image ``ids[n]`` in reference ``k``'s training half?"""
        return np.array([[i in set(inside) for i in ids] for inside in self.inside], dtype=bool)


def _identity(config: Any, population: list[str]) -> dict[str, Any]:
    """What must match for references to be reused: the same images, base, data and adapter shape."""
    return {"base": config.base, "data": {"source": config.data.source, "resolution": config.data.resolution,
                                          "center_crop": config.data.center_crop},
            "lora": config.lora.model_dump(mode="json"), "population": sorted(population)}


def _halves(population: list[str], k: int, seed: int) -> list[list[str]]:
    """K training sets: K/2 random permutations of the population, each cut into two halves."""
    if k < 2 or k % 2:
        raise UserError(f"--references must be an even number ≥ 2 (complementary halves), got {k}")
    out = []
    for pair in range(k // 2):
        order = torch.randperm(len(population), generator=torch.Generator().manual_seed(seed * 1000 + pair))
        ids = [population[i] for i in order.tolist()]
        out += [sorted(ids[: len(ids) // 2]), sorted(ids[len(ids) // 2:])]
    return out


def ensure_references(config: Any, population: list[str], *, k: int, directory: Path, seed: int = 0,
                      quiet: bool = True, pool: ReferencePool | None = None) -> References:
    """Load ``k`` reference adapters from ``directory``, training the missing ones first.

    ``pool`` says how the missing ones train (default: one after another here; or as Ray tasks, with the
    same configs and splits, so the adapters are the same — :mod:`privlora.audit.reference_pool`)."""
    directory = Path(directory)
    identity = _identity(config, population)
    manifest = directory / MANIFEST
    inside = _halves(population, k, seed)
    recipe = {"mode": "plain", "optim": config.optim.model_dump(mode="json"), "seed": seed}
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        if saved["identity"] != identity:
            raise UserError(f"the references in {directory} were trained for another population, base or "
                            "adapter shape; pass another --reference-dir or remove that one")
        if len(saved["inside"]) >= k and saved["seed"] == seed:
            inside = saved["inside"][:k]
        # references are trained once, with the recipe they were first made with (the session picks a
        # plain run's); later runs reuse them as they are and report that recipe
        recipe = saved.get("recipe", recipe)
    optim = type(config.optim).model_validate(recipe["optim"])
    jobs = []
    for i, members in enumerate(inside):
        out = directory / f"ref-{i}"
        if (out / "adapter").is_dir():
            continue
        ref_config = config.model_copy(update={
            "mode": "plain", "optim": optim, "out": out, "name": f"reference-{i}", "seed": seed * 1000 + i,
            "quiet": quiet, "report_to": "none",  # the audit's own training: nothing to mirror
            "resume": out.with_name(out.name + ".partial").exists(),
            "eval": config.eval.model_copy(update={"samples": 0, "timesteps": (200,)}),
            # references have no aux split to probe; they train the recipe's full max_steps
            "privacy_stop": config.privacy_stop.model_copy(update={"every": None}),
            # causal-lm: references model the population's records, not the target's planted canaries
            "canaries": config.canaries.model_copy(update={"insertions": ()})})
        jobs.append(ReferenceJob(index=i, of=len(inside), config=ref_config, splits=Splits(
            members=members, aux=[], eval=[], source=config.data.source, seed=seed * 1000 + i)))
    (pool or ReferencePool()).train(jobs, quiet=quiet)
    write_json_atomic(manifest, {"identity": identity, "seed": seed, "inside": inside, "recipe": recipe})
    return References(directory=directory, population=population, inside=inside, recipe=recipe)


@torch.no_grad()
def loss_signal(task: DiffusionTask, data: ImageSet, *, seed: int,
                timesteps: tuple[int, ...] = SIGNAL_TIMESTEPS) -> np.ndarray:
    """Per image, ``log`` of the mean denoising error over ``timesteps`` (one noise draw each).

    The same seed gives the target and every reference identical noisy inputs, so the per-draw luck
    cancels in the comparison. The log makes image difficulty (which scales the error) additive.
    Training's privacy stop (:mod:`privlora.train.privacy_stop`) may ask for fewer timesteps.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for batch in data.batches(BATCH):
        n = len(batch["captions"])
        errors = torch.zeros(n, dtype=torch.float64)
        for t in timesteps:
            err = task.squared_error(batch, gen, timesteps=torch.full((n,), t, dtype=torch.long))
            errors += err.flatten(1).mean(1).double().cpu()
        out.append(torch.log(errors / len(timesteps)).numpy())
    return np.concatenate(out)


def _signal_file(refs: References, k: int, ids: list[str], seed: int,
                 signal_key: dict[str, Any] | None = None) -> Path:
    """Where reference ``k``'s signal on ``ids`` is kept: keyed by the adapter's bytes, the images, the seed
    and the timesteps (or ``signal_key``, another task's signal), so a retrained reference or another
    population never reads a stale file."""
    key = {"timesteps": SIGNAL_TIMESTEPS} if signal_key is None else signal_key
    what = {"adapter": sha256_file(refs.adapter(k) / "adapter_model.safetensors"), "ids": ids, "seed": seed, **key}
    digest = hashlib.sha256(json.dumps(what).encode()).hexdigest()
    return refs.directory / "signals" / f"ref-{k}-{digest[:24]}.npy"


def reference_signals(task: DiffusionTask, data: ImageSet, refs: References, *, seed: int,
                      target_adapter: Path, signal: Callable[..., np.ndarray] = loss_signal,
                      signal_key: dict[str, Any] | None = None) -> np.ndarray:
    """``[K, N]`` signals of every reference adapter; the target adapter is loaded back afterwards.

    ``signal`` (lower = member) defaults to the diffusion loss signal; another task passes its own and the
    ``signal_key`` its cache files are told apart by (:mod:`privlora.audit.kinds`).

    Each reference's signal is saved beside it: every target audited over the same population (a sweep of
    plain, SMP and DP runs) then pays only for its own signal, which is a sixth of the audit with K = 4."""
    rows = []
    loaded = False
    try:
        for k in range(len(refs.inside)):
            cache = _signal_file(refs, k, list(data.ids), seed, signal_key)
            if cache.is_file():
                rows.append(np.load(cache))
                continue
            task.load_adapter(refs.adapter(k))
            loaded = True
            rows.append(signal(task, data, seed=seed))
            try:  # a cache: a read-only or full reference folder only costs the next audit the time
                with atomic_file(cache) as tmp, tmp.open("wb") as f:
                    np.save(f, rows[-1])
            except OSError:
                pass
    finally:
        if loaded:
            task.load_adapter(target_adapter)
    return np.stack(rows)


def _gauss_logpdf(x: np.ndarray, mu: np.ndarray, sigma: float) -> np.ndarray:
    return -0.5 * ((x - mu) / sigma) ** 2 - np.log(sigma)


def lira_scores(target: np.ndarray, refs: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Online LiRA: log N(s; μ_in, σ) − log N(s; μ_out, σ) per image, s = −signal (higher = member-like).

    μ_in / μ_out are the image's mean signal over the references that did / did not train on it. With
    few references the paper uses one global σ; with one reference per side (K = 2) the within-image
    spread cannot be seen, so σ² is taken from the spread of the in−out gap across images
    (Var(s_in − s_out) = 2σ²) — a documented deviation that only sets the scale of the ratio.
    """
    s, r = -target, -refs
    n_in, n_out = inside.sum(0), (~inside).sum(0)
    if (n_in == 0).any() or (n_out == 0).any():
        raise UserError("every audited image must be inside some references and outside others")
    mu_in = np.where(inside, r, 0).sum(0) / n_in
    mu_out = np.where(~inside, r, 0).sum(0) / n_out
    if n_in.min() >= 2 and n_out.min() >= 2:
        resid = np.where(inside, r - mu_in, r - mu_out)
        sigma = float(np.sqrt((resid ** 2).sum() / (resid.size - 2 * target.size)))
    else:
        sigma = float(np.std(mu_in - mu_out) / np.sqrt(2))
    sigma = max(sigma, 1e-6)
    return _gauss_logpdf(s, mu_in, sigma) - _gauss_logpdf(s, mu_out, sigma)


def rmia_scores(target: np.ndarray, refs: np.ndarray, target_z: np.ndarray, refs_z: np.ndarray,
                gamma: float = 1.0) -> np.ndarray:
    """RMIA: the fraction of population samples z that x dominates, LR(x, z) = [p(x|θ)/p(x)] / [p(z|θ)/p(z)] ≥ γ.

    p(x) is the mean of p(x|θ_ref) over all references (half inside, half outside: the paper's online
    form). Diffusion models have no exact per-image likelihood; we use p(x|θ) = 1 / (denoising error),
    i.e. ``exp(−signal)`` — scale-free, with the error standing in for the negative log-likelihood
    the way the ELBO does. z ranges over known non-members the references never trained on
    (the run's auxiliary non-members). γ = 1.
    """
    log_ratio_x = -target - np.log(np.exp(-refs).mean(0))
    log_ratio_z = -target_z - np.log(np.exp(-refs_z).mean(0))
    return (log_ratio_x[:, None] - log_ratio_z[None, :] >= np.log(gamma)).mean(1)
