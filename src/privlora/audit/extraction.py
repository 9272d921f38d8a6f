"""Training-data extraction (Carlini et al. 2023) and a latent-probe leak test, streamed over generations.

Membership inference asks "was this image trained on?"; extraction asks the question a user fears:
"does the model *emit* a training image?". Both functions here sample ``n`` images from random latents
and compare each one with a reference set, batch by batch: memory holds one batch of generations, the
reference set, O(n) scalars (one distance, one normalised distance and one nearest index per
generation) and a bounded gallery — never all generations, so ``n`` can be as large as time allows.

Definitions, after Carlini et al., "Extracting Training Data from Diffusion Models" (USENIX Security
2023), with the deviations each one needs for small images and small training sets:

* **Tiled ℓ2** (their §4.2): split both images into a grid of non-overlapping tiles, take the ℓ2
  distance normalised by dimension (``sqrt(mean((a − b)²))``, pixels on the paper's ``[0, 1]`` scale)
  per pair of corresponding tiles, and keep the *largest*. A generation is only close if every region
  is close, so a copy cannot hide behind a large uniform background. The paper cut 512² images into 16
  tiles of 128²; we keep 16 tiles (a 4×4 grid: 8×8 tiles on the 32×32 demo base). Sizes that do not
  divide evenly get tiles that differ by one pixel (``numpy.array_split`` boundaries).
* **Normalised distance** (their §5.1): ``ℓ(x̂, x; S_x̂) = ℓ2(x̂, x) / (α · mean_{y ∈ S_x̂} ℓ2(x̂, y))``
  with ``x̂`` the generation, ``x`` its nearest training image and ``S_x̂`` the ``n`` training images
  nearest to ``x̂`` (``x`` included). A generation is *extracted* when ``ℓ ≤ threshold``: it is much
  closer to one training image than to that image's neighbourhood, which a plain ℓ2 cut-off cannot
  tell apart from a generation that is merely typical of a dense region. Defaults α = 0.5, n = 50 and
  threshold 1 — a generation at most half as far from its nearest training image as from its 50
  nearest on average — are those of the paper's CIFAR-10 experiment as implemented by independent
  reproductions (e.g. LeakPro). Deviations: the paper used plain ℓ2 in this ratio and tiled ℓ2 for
  its Stable Diffusion search; we use tiled ℓ2 in both, the stricter of the two. With fewer than
  ``n`` training images (the demo has 32 members), ``S_x̂`` is the whole training set; the number
  actually used is reported as ``neighbours_used``. The ratio then only asks "nearer one training
  image than half the set's average", which blurry or typical generations can satisfy without
  copying anything, so on small sets read the count against the base-model control below. Notation:
  the paper's prose once calls ``x̂`` the training image; we follow its formula and independent
  implementations (``x̂`` generated, ``S_x̂`` its nearest *training* images).
* **Clusters.** The paper's black-box filter generates many images per prompt and keeps cliques of
  ≥ 10 mutually near-identical generations; an exact clique search needs every pairwise distance, which
  cannot stream. Instead we group generations by their nearest training image and count them
  (``extracted_training_ids``, ``nearest_concentration``). Tiled ℓ2 is a metric (a maximum of
  metrics), so k generations each within d of the same training image are pairwise within 2d: a group
  of extracted generations is a clique at twice their distance, found with O(training set) memory.

Generation ``i`` always starts from the same latent noise, drawn from its own seed (``seed``, ``i``),
so results do not depend on ``batch`` (a memory setting, not a statistical one). The noise therefore
differs from ``privlora generate --seed``, which draws one tensor for the whole grid.

Controls: run either function a second time inside ``with task.adapter_disabled():`` to measure the
base model alone. Only what the adapter adds over that control is the fine-tuning's leak.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from privlora.audit.metrics import auc
from privlora.data.imageset import ImageSet
from privlora.errors import UserError
from privlora.generate import grid_image
from privlora.progress import progress_bar
from privlora.runs import atomic_file
from privlora.tasks.diffusion import DiffusionTask

ALPHA = 0.5  # Carlini et al. §5.1
NEIGHBOURS = 50  # |S_x̂|, Carlini et al. §5.1
THRESHOLD = 1.0  # extracted when ℓ(x̂, x; S_x̂) ≤ this
TILES = 4  # tiles per side: 16 tiles, as in the paper
QUANTILES = {"min": 0.0, "p01": 0.01, "p05": 0.05, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95,
             "max": 1.0}
CONCENTRATION_TOP = 10


# --- distances --------------------------------------------------------------------------------------
def _tile_bounds(size: int, tiles: int) -> list[tuple[int, int]]:
    """``numpy.array_split`` boundaries: ``tiles`` contiguous ranges whose lengths differ by at most one."""
    edges = np.cumsum([0] + [len(part) for part in np.array_split(np.arange(size), tiles)])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def tiled_l2(a: torch.Tensor, b: torch.Tensor, *, tiles: int = TILES) -> torch.Tensor:
    """Tiled ℓ2 between every image of ``a`` ``[A, C, H, W]`` and of ``b`` ``[B, C, H, W]``, both in ``[-1, 1]``.

    Returns ``[A, B]``: the largest, over a ``tiles × tiles`` grid, of the per-tile ℓ2 distance normalised
    by the tile's dimension, on the paper's ``[0, 1]`` pixel scale (so 0.15 means what it means there).
    Differences are computed directly, not as ``|a|² + |b|² − 2ab``, so an exact copy is exactly 0.
    """
    if a.shape[1:] != b.shape[1:]:
        raise UserError(f"cannot compare images of shape {tuple(a.shape[1:])} with {tuple(b.shape[1:])}")
    height, width = a.shape[-2:]
    if not 1 <= tiles <= min(height, width):
        raise UserError(f"tiles must be between 1 and {min(height, width)} for {height}×{width} images, got {tiles}")
    a, b = a.float(), b.float()
    out = torch.zeros(a.shape[0], b.shape[0], device=a.device)
    for top, bottom in _tile_bounds(height, tiles):
        for left, right in _tile_bounds(width, tiles):
            ta = a[:, :, top:bottom, left:right].flatten(1)
            tb = b[:, :, top:bottom, left:right].flatten(1)
            d = torch.cdist(ta, tb, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(ta.shape[1])
            out = torch.maximum(out, d)
    return out / 2  # [-1, 1] → [0, 1] halves every difference


def normalised_distance(distances: torch.Tensor, *, alpha: float = ALPHA,
                        neighbours: int = NEIGHBOURS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest distance, nearest index and ``ℓ(x̂, x; S_x̂)`` for each row of ``distances`` ``[A, N]``.

    ``S_x̂`` is the ``min(neighbours, N)`` nearest columns (the nearest included). A row whose nearest
    distance is 0 is an exact copy and scores 0 even if its whole neighbourhood is at 0 too.
    """
    k = min(neighbours, distances.shape[1])
    near = torch.topk(distances, k, dim=1, largest=False, sorted=True)
    nearest, index = near.values[:, 0], near.indices[:, 0]
    denominator = alpha * near.values.mean(1)
    ratio = torch.where(nearest == 0, torch.zeros_like(nearest), nearest / denominator.clamp_min(1e-30))
    return nearest, index, ratio


# --- generation ---------------------------------------------------------------------------------------
def _noise_seed(seed: int, index: int) -> int:
    """A seed for generation ``index`` that no other (seed, index) pair shares (SeedSequence hashing)."""
    state = np.random.SeedSequence([seed % 2**64, index]).generate_state(1, dtype=np.uint64)
    return int(state[0])


def initial_noise(shape: tuple[int, ...], seed: int, start: int, count: int) -> torch.Tensor:
    """x_T for generations ``start … start+count−1``, each from its own generator (batch-size invariant)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(_noise_seed(seed, i)))
                        for i in range(start, start + count)])


def generations(task: DiffusionTask, n: int, *, seed: int, batch: int = 64,
                steps: int = 50) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, pixels)`` for ``n`` generations in batches: pixels ``[b, C, H, W]`` in ``[-1, 1]``, CPU."""
    shape = tuple(task.sample_shape())
    for start in range(0, n, batch):
        count = min(batch, n - start)
        x = task.ddim(initial_noise(shape, seed, start, count), steps)  # DDIM η = 0, unconditional
        with torch.no_grad():
            pixels = task.to_pixels(x).float().cpu()
        yield start, pixels  # outside no_grad: a suspended generator must not hold the caller's grad mode


@torch.no_grad()
def _pixel_shape(task: DiffusionTask) -> tuple[int, ...]:
    """Shape of one generated image in pixels, from one decode of a zero latent (cheap next to sampling)."""
    zero = torch.zeros((1, *task.sample_shape()), device=task.device)
    return tuple(task.to_pixels(zero).shape[1:])


# --- validation ---------------------------------------------------------------------------------------
def _check_common(task: DiffusionTask, reference: ImageSet, name: str, *, n: int, batch: int,
                  sample_steps: int, tiles: int) -> None:
    """Refuse bad settings before any sampling, with messages that say what to change."""
    if n < 1:
        raise UserError(f"n must be at least 1, got {n}")
    if batch < 1:
        raise UserError(f"batch must be at least 1, got {batch}")
    if sample_steps < 1:
        raise UserError(f"sample_steps must be at least 1, got {sample_steps}")
    if len(reference) == 0:
        raise UserError(f"the {name} set is empty: there is nothing to compare generations with")
    shape = _pixel_shape(task)
    if tuple(reference.pixels.shape[1:]) != shape:
        raise UserError(f"{name} images are {tuple(reference.pixels.shape[1:])} (C, H, W) but the model generates "
                        f"{shape}: load them at the model's channels and resolution")
    if not 1 <= tiles <= min(shape[-2:]):
        raise UserError(f"tiles must be between 1 and {min(shape[-2:])} for {shape[-2]}×{shape[-1]} images, "
                        f"got {tiles}")


def _quantiles(values: np.ndarray) -> dict[str, float]:
    return {k: float(np.quantile(values, q)) for k, q in QUANTILES.items()}


# --- extraction ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GalleryPair:
    """One generation next to its nearest training image."""

    generation: int
    training_id: str
    tiled_l2: float
    normalised: float
    generated: torch.Tensor  # [C, H, W] in [-1, 1]
    training: torch.Tensor


@dataclass
class ExtractionResult:
    """Per-generation scalars (O(n)), the bounded gallery and the settings that produced them."""

    training_ids: list[str]
    nearest: np.ndarray  # [n] index into training_ids
    tiled_l2: np.ndarray  # [n] distance to the nearest training image, [0, 1] pixel scale
    normalised: np.ndarray  # [n] ℓ(x̂, x; S_x̂)
    threshold: float
    parameters: dict[str, Any]
    gallery: list[GalleryPair] = field(default_factory=list)

    @property
    def generated(self) -> int:
        return int(self.nearest.size)

    @property
    def extracted(self) -> np.ndarray:
        """Boolean mask of generations flagged as near-copies."""
        return self.normalised <= self.threshold

    def clusters(self) -> list[dict[str, Any]]:
        """Extracted generations grouped by the training image they copy, largest group first."""
        mask = self.extracted
        groups = []
        for index in np.unique(self.nearest[mask]):
            members = mask & (self.nearest == index)
            groups.append({"id": self.training_ids[int(index)], "generations": int(members.sum()),
                           "best_normalised": float(self.normalised[members].min()),
                           "best_tiled_l2": float(self.tiled_l2[members].min())})
        return sorted(groups, key=lambda g: (-g["generations"], g["best_normalised"], g["id"]))

    def _concentration(self) -> list[dict[str, Any]]:
        """Training images that are nearest to the most generations, extracted or not (mode collapse)."""
        counts = np.bincount(self.nearest, minlength=len(self.training_ids))
        order = np.lexsort((np.arange(counts.size), -counts))[:CONCENTRATION_TOP]
        return [{"id": self.training_ids[int(i)], "generations": int(counts[i])} for i in order if counts[i] > 0]

    def to_json(self) -> dict[str, Any]:
        clusters = self.clusters()
        extracted = int(self.extracted.sum())
        return {
            "method": "extraction (Carlini et al. 2023): tiled l2, normalised by the generation's nearest neighbours",
            "generated": self.generated,
            "extracted": extracted,
            "extracted_fraction": extracted / self.generated,
            "unique_extracted": len(clusters),
            "largest_cluster": max((c["generations"] for c in clusters), default=0),
            "extracted_training_ids": clusters,
            "nearest_concentration": self._concentration(),
            "quantiles": {"tiled_l2": _quantiles(self.tiled_l2), "normalised": _quantiles(self.normalised)},
            "threshold": self.threshold,
            "parameters": dict(self.parameters),
            "gallery": [{"generation": p.generation, "training_id": p.training_id, "tiled_l2": p.tiled_l2,
                         "normalised": p.normalised, "extracted": bool(p.normalised <= self.threshold)}
                        for p in self.gallery],
        }

    def gallery_png(self, path: str | Path, *, scale: int = 4) -> Path:
        """Write the gallery: one row per pair, generation left, nearest training image right.

        ``scale`` enlarges with nearest-neighbour sampling so 32-pixel images are visible without
        blurring the evidence. Written to a temporary name and renamed, so no half-written PNG is left.
        """
        if not self.gallery:
            raise UserError("the gallery is empty (gallery=0): nothing to draw")
        if scale < 1:
            raise UserError(f"scale must be at least 1, got {scale}")
        tiles = torch.stack([img for p in self.gallery for img in (p.generated, p.training)])
        image = grid_image(tiles, columns=2)
        if scale > 1:
            image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        with atomic_file(path) as tmp:
            image.save(tmp, format="PNG")
        return Path(path)


class _Gallery:
    """The ``size`` best pairs seen so far, at most one per training image, in O(size) memory.

    Distinct training images make the picture show *what* leaks; how often each leaks is in the
    counts. A max-heap on (normalised, tiled ℓ2, generation) evicts the worst pair; ties break on the
    earlier generation, so the gallery does not depend on batch size.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._heap: list[tuple[float, float, int, int]] = []  # negated keys: heap[0] is the worst kept
        self._by_train: dict[int, tuple[float, float, int, int]] = {}
        self._pixels: dict[int, torch.Tensor] = {}  # generation → pixels

    def offer(self, key: tuple[float, float, int], train_index: int, pixels: torch.Tensor) -> None:
        if self.size == 0:
            return
        entry = (-key[0], -key[1], -key[2], train_index)
        old = self._by_train.get(train_index)
        if old is not None:
            if entry <= old:  # the kept pair for this training image is at least as good
                return
            self._remove(old)
        elif len(self._heap) >= self.size:
            if entry <= self._heap[0]:
                return
            self._remove(self._heap[0])
        heapq.heappush(self._heap, entry)
        self._by_train[train_index] = entry
        self._pixels[key[2]] = pixels.clone()

    def _remove(self, entry: tuple[float, float, int, int]) -> None:
        self._heap.remove(entry)
        heapq.heapify(self._heap)
        del self._by_train[entry[3]]
        del self._pixels[-entry[2]]

    def pairs(self, train: ImageSet) -> list[GalleryPair]:
        best_first = sorted(self._heap, reverse=True)
        return [GalleryPair(generation=-g, training_id=train.ids[t], tiled_l2=float(-d), normalised=float(-r),
                            generated=self._pixels[-g], training=train.pixels[t].float().clone())
                for r, d, g, t in best_first]


@torch.no_grad()
def extract(task: DiffusionTask, train: ImageSet, *, n: int, seed: int, batch: int = 64, sample_steps: int = 50,
            threshold: float = THRESHOLD, alpha: float = ALPHA, neighbours: int = NEIGHBOURS, tiles: int = TILES,
            gallery: int = 8, quiet: bool = True,
            on_batch: Callable[[int, torch.Tensor], None] | None = None) -> ExtractionResult:
    """Generate ``n`` images and flag those that copy a training image (Carlini et al. 2023, §5.1).

    Streaming: each batch is generated, compared with every training image by tiled ℓ2, reduced to
    three scalars per generation and dropped; only the ``gallery`` best pairs (one per training
    image) keep pixels. For a base-model control call it again inside ``with task.adapter_disabled():``
    with the same seed — the same latents then go through the base alone. ``on_batch(start, pixels)``
    sees every batch of generations too (e.g. :meth:`LatentProbe.update`), so a second analysis needs
    no second sampling pass.
    """
    _check_common(task, train, "training", n=n, batch=batch, sample_steps=sample_steps, tiles=tiles)
    if not threshold > 0:
        raise UserError(f"threshold must be positive, got {threshold}")
    if not alpha > 0:
        raise UserError(f"alpha must be positive, got {alpha}")
    if neighbours < 1:
        raise UserError(f"neighbours must be at least 1, got {neighbours}")
    if gallery < 0:
        raise UserError(f"gallery must be 0 or more, got {gallery}")
    reference = train.pixels.to(task.device, torch.float32)
    nearest = np.zeros(n, dtype=np.int64)
    distance = np.zeros(n, dtype=np.float64)
    ratio = np.zeros(n, dtype=np.float64)
    kept = _Gallery(gallery)
    flagged = 0
    with progress_bar("extraction", total=n, quiet=quiet) as bar:
        for start, pixels in generations(task, n, seed=seed, batch=batch, steps=sample_steps):
            d, index, r = normalised_distance(tiled_l2(pixels.to(task.device), reference, tiles=tiles),
                                              alpha=alpha, neighbours=neighbours)
            stop = start + pixels.shape[0]
            nearest[start:stop] = index.cpu().numpy()
            distance[start:stop] = d.double().cpu().numpy()
            ratio[start:stop] = r.double().cpu().numpy()
            for j in range(pixels.shape[0]):
                i = start + j
                kept.offer((ratio[i], distance[i], i), int(nearest[i]), pixels[j])
            flagged += int((ratio[start:stop] <= threshold).sum())
            if on_batch is not None:
                on_batch(start, pixels)
            bar.advance(pixels.shape[0], extracted=flagged)
    parameters = {"n": n, "seed": seed, "batch": batch, "sample_steps": sample_steps, "alpha": alpha,
                  "neighbours": neighbours, "neighbours_used": min(neighbours, len(train)),
                  "tiles": [tiles, tiles], "training_images": len(train),
                  "image_shape": list(train.pixels.shape[1:]), "pixel_scale": "[0, 1]",
                  "sampler": "DDIM eta=0, per-generation noise seeds"}
    return ExtractionResult(training_ids=list(train.ids), nearest=nearest, tiled_l2=distance, normalised=ratio,
                            threshold=threshold, parameters=parameters, gallery=kept.pairs(train))


# --- latent probe -------------------------------------------------------------------------------------
class _Closest:
    """Running minimum over generations of the tiled ℓ2 to each reference image, and which generation."""

    def __init__(self, images: ImageSet, device: torch.device) -> None:
        self.reference = images.pixels.to(device, torch.float32)
        self.distance = np.full(len(images), np.inf)
        self.generation = np.full(len(images), -1, dtype=np.int64)

    def update(self, start: int, pixels: torch.Tensor, tiles: int) -> None:
        d = tiled_l2(pixels.to(self.reference.device), self.reference, tiles=tiles)  # [b, N]
        best, which = d.min(0)
        best, which = best.double().cpu().numpy(), which.cpu().numpy()
        better = best < self.distance  # strict: ties keep the earlier generation
        self.distance[better] = best[better]
        self.generation[better] = start + which[better]

    def rows(self, ids: list[str]) -> list[dict[str, Any]]:
        return [{"id": ids[i], "closest_tiled_l2": float(self.distance[i]),
                 "closest_generation": int(self.generation[i]), "score": -float(self.distance[i])}
                for i in range(len(ids))]


class LatentProbe:
    """Streaming state of the latent probe: closest generation to each sensitive (and control) image."""

    def __init__(self, sensitive: ImageSet, control: ImageSet | None, device: torch.device, *,
                 tiles: int = TILES) -> None:
        self.sensitive, self.control, self.tiles = sensitive, control, tiles
        self.probes = {"sensitive": _Closest(sensitive, device)}
        if control is not None:
            self.probes["control"] = _Closest(control, device)

    def update(self, start: int, pixels: torch.Tensor) -> None:
        for probe in self.probes.values():
            probe.update(start, pixels, self.tiles)

    def result(self, parameters: dict[str, Any]) -> dict[str, Any]:
        sensitive, control = self.sensitive, self.control
        result: dict[str, Any] = {
            "method": "latent probe: tiled l2 from each sensitive image to its closest generation",
            "generated": parameters["n"],
            "parameters": {**parameters, "tiles": [self.tiles, self.tiles], "sensitive_images": len(sensitive),
                           "control_images": len(control) if control else 0, "pixel_scale": "[0, 1]",
                           "sampler": "DDIM eta=0, per-generation noise seeds"},
            "sensitive": self.probes["sensitive"].rows(list(sensitive.ids)),
            "summary": {"sensitive_closest_tiled_l2": _quantiles(self.probes["sensitive"].distance)},
        }
        if control is not None:
            s, c = self.probes["sensitive"].distance, self.probes["control"].distance
            result["control"] = self.probes["control"].rows(list(control.ids))
            result["summary"].update({
                "control_closest_tiled_l2": _quantiles(c),
                "auc": auc(np.r_[-s, -c], np.r_[np.ones(s.size, int), np.zeros(c.size, int)]),
                "fraction_closer_than_any_control": float((s < c.min()).mean()),
            })
        return result


@torch.no_grad()
def latent_probe(task: DiffusionTask, sensitive: ImageSet, *, n: int, seed: int, control: ImageSet | None = None,
                 batch: int = 64, sample_steps: int = 50, tiles: int = TILES, quiet: bool = True) -> dict[str, Any]:
    """Do random latents land on the sensitive images? Per-image score: −(tiled ℓ2 to the closest generation).

    ``n`` generations from random latents are compared with each sensitive image, keeping only the
    running closest distance per image (memory O(|sensitive| + |control|), not O(n)). A raw distance
    says little on its own — typical faces are close to typical generations — so pass ``control``:
    images from the same distribution the model did not train on (e.g. evaluation non-members). The
    summary then gives the AUC of "sensitive images have closer generations than control images"
    (0.5: no leak) and the fraction of sensitive images closer than the closest control image. For a
    base-model control, call again inside ``with task.adapter_disabled():``.
    """
    _check_common(task, sensitive, "sensitive", n=n, batch=batch, sample_steps=sample_steps, tiles=tiles)
    if control is not None:
        _check_common(task, control, "control", n=n, batch=batch, sample_steps=sample_steps, tiles=tiles)
    probe = LatentProbe(sensitive, control, task.device, tiles=tiles)
    with progress_bar("latent probe", total=n, quiet=quiet) as bar:
        for start, pixels in generations(task, n, seed=seed, batch=batch, steps=sample_steps):
            probe.update(start, pixels)
            bar.advance(pixels.shape[0])
    return probe.result({"n": n, "seed": seed, "batch": batch, "sample_steps": sample_steps})
