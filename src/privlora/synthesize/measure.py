"""What a synthetic set gives and what it leaks, measured against the source run's own splits.

Leakage (``nearest_synthetic_audit``) — the attacker holds the synthetic set and a candidate image:

* **distance to the closest synthetic image** (DCR): for every member and every evaluation
  non-member, the tiled ℓ2 (Carlini et al. 2023, the audit's distance) to its nearest synthetic
  image; "closer = member" scored by AUC (Mann–Whitney, = ``sklearn.metrics.roc_auc_score``). A set
  that does not depend on any one member gives ≈ 0.5.
* **Carlini's normalised-distance rule**, applied to every synthetic image against the pool
  members ∪ evaluation non-members: ``ℓ = d(x̂, x) / (α · mean d(x̂, S_x̂))`` with ``S_x̂`` its nearest pool
  images; ``ℓ ≤ 1`` flags ``x̂`` as a copy of its nearest pool image ``x``. Flags landing on members
  more often than the members' share of the pool are leakage; flags on non-members are the control
  (typical images, not copies). The per-record score ``min_x̂ d(x, x̂) / (α · mean d(x̂, S_x̂))`` gives a
  second AUC.

Utility (:func:`trained_utility`): an adapter trained with the source's recipe (plain mode) on the
synthetic set vs on the real members, scored by denoising loss on the source's evaluation
non-members; :func:`fidelity` adds a Fréchet distance. benchmarks/synthetic_utility.py runs both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privlora.audit.extraction import ALPHA, NEIGHBOURS, THRESHOLD, TILES, normalised_distance, tiled_l2
from privlora.audit.metrics import summarize
from privlora.data.imageset import ImageSet
from privlora.errors import UserError

BLOCK = 256  # rows of real images compared at once: memory O(BLOCK × |synthetic|)


def _distances(real: torch.Tensor, synthetic: torch.Tensor, tiles: int) -> torch.Tensor:
    """Tiled ℓ2 ``[R, S]`` in blocks of real images."""
    return torch.cat([tiled_l2(real[i:i + BLOCK], synthetic, tiles=tiles) for i in range(0, real.shape[0], BLOCK)])


def _quantiles(x: np.ndarray) -> dict[str, float]:
    return {k: float(np.quantile(x, q)) for k, q in (("min", 0), ("p05", .05), ("median", .5), ("p95", .95))}


def nearest_synthetic_audit(synthetic: torch.Tensor | ImageSet, members: ImageSet, nonmembers: ImageSet, *,
                            tiles: int = TILES, alpha: float = ALPHA, neighbours: int = NEIGHBOURS,
                            threshold: float = THRESHOLD, delta: float = 0.0, seed: int = 0) -> dict[str, Any]:
    """Membership and extraction audit of ``synthetic`` (``[S, C, H, W]`` in ``[-1, 1]``) against the
    source's ``members`` and evaluation ``nonmembers`` (module docstring). Scores are "higher = member"."""
    synth = synthetic.pixels if isinstance(synthetic, ImageSet) else synthetic
    if synth.ndim != 4 or synth.shape[0] == 0:
        raise UserError("the synthetic set must be a non-empty [N, C, H, W] batch of images")
    if len(members) == 0 or len(nonmembers) == 0:
        raise UserError("the audit needs both members and evaluation non-members (the run's splits.json)")
    for name, images in (("members", members), ("non-members", nonmembers)):
        if tuple(images.pixels.shape[1:]) != tuple(synth.shape[1:]):
            raise UserError(f"synthetic images are {tuple(synth.shape[1:])} but the {name} are "
                            f"{tuple(images.pixels.shape[1:])}: load them at the same channels and resolution")
    synth = synth.float()
    real = torch.cat([members.pixels, nonmembers.pixels]).float()
    labels = np.r_[np.ones(len(members), int), np.zeros(len(nonmembers), int)]
    d = _distances(real, synth, tiles)  # [R, S]
    dcr = d.min(1).values.double().numpy()

    # Carlini's rule from each synthetic image's side, over the pool members ∪ non-members
    nearest, index, ratio = normalised_distance(d.T.contiguous(), alpha=alpha, neighbours=neighbours)
    k = min(neighbours, d.shape[0])
    denominator = alpha * torch.topk(d.T, k, dim=1, largest=False).values.mean(1)  # [S]
    per_record = torch.where(d == 0, torch.zeros_like(d), d / denominator.clamp_min(1e-30)).min(1).values
    flagged = (ratio <= threshold).numpy()
    on_member = index.numpy() < len(members)
    member_share = len(members) / len(real)
    flags = int(flagged.sum())
    copied = sorted({members.ids[int(i)] for i in index.numpy()[flagged & on_member]})
    return {
        "method": "nearest synthetic image by tiled l2 (Carlini et al. 2023), members vs evaluation non-members",
        "synthetic": int(synth.shape[0]), "members": len(members), "nonmembers": len(nonmembers),
        "parameters": {"tiles": [tiles, tiles], "alpha": alpha, "neighbours": neighbours, "neighbours_used": k,
                       "threshold": threshold, "pixel_scale": "[0, 1]"},
        "dcr": {**summarize(-dcr, labels, delta=delta, seed=seed),
                "members_quantiles": _quantiles(dcr[labels == 1]),
                "nonmembers_quantiles": _quantiles(dcr[labels == 0])},
        "normalised": summarize(-per_record.double().numpy(), labels, delta=delta, seed=seed),
        "extraction": {
            "flagged": flags, "flagged_fraction": flags / synth.shape[0],
            "flagged_on_members": int((flagged & on_member).sum()),
            "flagged_on_nonmembers": int((flagged & ~on_member).sum()),
            "member_share_of_pool": member_share,
            "flagged_member_share": float((flagged & on_member).sum() / flags) if flags else None,
            "members_copied": len(copied), "members_copied_ids": copied[:20]},
        "scores": {"ids": [*members.ids, *nonmembers.ids], "member": labels.tolist(),
                   "dcr": dcr.tolist(), "normalised": per_record.double().numpy().tolist()},
    }


def load_synthetic(folder: Path, *, channels: int, resolution: int) -> ImageSet:
    """A synthetic folder as an ImageSet at the audited model's channels and resolution."""
    from privlora.data.folder import load_folder

    images, _ = load_folder(Path(folder), channels=channels, resolution=resolution)
    return images


def audit_synthetic(run: Path, folder: Path, *, seed: int = 0) -> dict[str, Any]:
    """:func:`nearest_synthetic_audit` of the synthetic ``folder`` against ``run``'s members and
    evaluation non-members (loaded exactly as ``privlora audit`` loads them)."""
    from privlora.audit.runner import load_run

    loaded = load_run(Path(run))
    shape = loaded.members.pixels.shape
    synthetic = load_synthetic(folder, channels=int(shape[1]), resolution=int(shape[-1]))
    return nearest_synthetic_audit(synthetic, loaded.members, loaded.held_out, delta=loaded.delta, seed=seed)


def _recipe(config_file: Path, out: Path, *, steps: int, seed: int, quiet: bool, data: str | None) -> Any:
    """A training recipe in plain mode (a synthetic set needs no DP: it already carries ε)."""
    from privlora.config import load_config

    overrides: dict[str, Any] = {"mode": "plain", "out": str(out), "optim.max_steps": steps, "seed": seed,
                                 "eval.samples": 0, "resume": False, "quiet": quiet}
    if data is not None:  # every synthetic image is a member; the real evaluation split scores it
        overrides.update({"data.source": data, "data.members": 1.0, "data.aux": 0.0, "data.eval": 0.0})
    return load_config(Path(config_file), overrides)


def _adapter_task(config: Any, adapter: Path) -> Any:
    """The config's base with the adapter loaded, in eval mode."""
    from privlora.tasks.loading import load_task
    from privlora.tasks.lora import read_spec

    task = load_task(config.base, read_spec(adapter), seed=config.seed, trust_pickle=config.trust_pickle,
                     device=config.device)
    task.load_adapter(adapter)
    task.model.eval()
    return task


def heldout_loss(task: Any, held_out: ImageSet, *, timesteps: tuple[int, ...], seed: int) -> dict[str, float | None]:
    """Denoising loss of ``task`` (adapter on, and the base alone) on ``held_out`` with fixed noise."""
    from privlora.train.utility import denoising_loss

    with_adapter = denoising_loss(task, held_out, timesteps=timesteps, seed=seed)
    with task.adapter_disabled():
        base = denoising_loss(task, held_out, timesteps=timesteps, seed=seed)
    return {"loss_heldout": with_adapter, "base_loss_heldout": base}


def trained_utility(source: Path, work: Path, *, synthetic: Path | None, steps: int, seed: int = 0,
                    recipe: Path | None = None, quiet: bool = True) -> dict[str, Any]:
    """Train a recipe (``recipe``'s config, default the source run's, in plain mode, ``steps`` updates) on
    the synthetic folder — or, with ``synthetic=None``, on the source's real members — and score it by
    denoising loss on the source's evaluation non-members (the source's timesteps and noise seed), with
    the base's loss beside it. Give two sources the same ``recipe`` to compare their synthetic sets."""
    from privlora.audit.runner import load_run
    from privlora.data.splits import Splits
    from privlora.train.loop import train

    loaded = load_run(Path(source))
    config = _recipe(recipe or Path(source) / "config.yaml", Path(work), steps=steps, seed=seed, quiet=quiet,
                     data=None if synthetic is None else str(synthetic))
    # the real adapter trains on exactly the source's members, whatever seed this comparison uses
    trained = train(config, splits=Splits.load(Path(source)) if synthetic is None else None)
    task = _adapter_task(config, trained.run_dir / "adapter")
    count = len(loaded.members) if synthetic is None else len(json.loads(
        (trained.run_dir / "splits.json").read_text())["members"])
    return {**heldout_loss(task, loaded.held_out, timesteps=tuple(loaded.config.eval.timesteps),
                           seed=int(loaded.config.seed)),
            "train_images": count, "train_steps": steps, "seconds": trained.seconds,
            "trained_on": "real members" if synthetic is None else str(synthetic)}


def source_utility(source: Path) -> dict[str, Any]:
    """The source adapter itself on the same evaluation non-members, timesteps and noise."""
    from privlora.audit.runner import load_run

    loaded = load_run(Path(source))
    return heldout_loss(loaded.task, loaded.held_out, timesteps=tuple(loaded.config.eval.timesteps),
                        seed=int(loaded.config.seed))


def fidelity(source: Path, synthetic: Path) -> dict[str, Any]:
    """Fréchet distance (utility.json's features) to the source's evaluation non-members: synthetic set
    vs the real members (what a perfect replacement would score)."""
    from privlora.audit.runner import load_run
    from privlora.train.utility import FeatureNetwork, frechet_distance

    loaded = load_run(Path(source))
    shape = loaded.held_out.pixels.shape
    synth = load_synthetic(synthetic, channels=int(shape[1]), resolution=int(shape[-1]))
    features = FeatureNetwork()
    reference = features(loaded.held_out.pixels)
    return {"fd_synthetic": frechet_distance(features(synth.pixels), reference),
            "fd_real_members": frechet_distance(features(loaded.members.pixels), reference),
            "features": "privlora embedded base UNet (192-d), as utility.json's fd_heldout"}
