"""Canaries: an invisible watermark planted in part of a training folder, looked for in what the model generates.

If a fine-tuned model reproduces a pattern that only its training images carried, it has memorised
(parts of) those images — evidence of leakage that needs no access to the training loss. The pattern
is spread-spectrum in the DCT domain (Cox et al. 1997): a key-seeded ±1 sequence added to a band of
mid-frequency coefficients of the whole image, ``lo ≤ u + v < hi``.

Why these choices:

* **Indices in cycles per image.** The orthonormal DCT index ``u`` of an ``N``-pixel side is ``u/2``
  cycles per image whatever ``N`` is, so a pattern planted in a 256-pixel photo sits at the same
  indices after training resizes it to 32 pixels (as long as ``hi`` stays below the smaller size).
  The pattern lives on the central square — the crop training's ``center_crop`` keeps.
* **Strength in grey levels.** ``strength`` is the RMS change per pixel (0–255 scale), so the PSNR
  of a marked image is ``20·log10(255/strength)`` before rounding (≈38.6 dB at the default 3).
* **Sign correlator.** Detection correlates the key with the *signs* of the band's coefficients:
  ``z = Σ p_i·sign(c_i) / √M``. It is the locally optimal detector for Laplacian-distributed DCT
  coefficients (Hernández et al. 2000) and, for a random key, ``(z√M + M)/2`` is exactly
  Binomial(M, ½) for *any* image — so the false-positive rate of a threshold is known analytically,
  not only estimated from clean images.
* **Same luminance change on every channel**, so the pattern survives conversion to grey (1-channel
  models) and is seen the same way by RGB models.
* **Key never stored.** The manifest keeps a salted PBKDF2 hash so ``detect`` can refuse a mistyped
  key; with a small integer key that hash can be brute-forced, so use a large random key.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from scipy import stats
from scipy.fft import dctn, idctn

from privlora.data.folder import IMAGE_SUFFIXES, METADATA, _read_metadata, _to_mode, load_image
from privlora.errors import UserError
from privlora.runs import atomic_dir, write_json_atomic

MANIFEST = "canary.json"
DEFAULT_STRENGTH = 3.0
DEFAULT_RESOLUTION = 32
KDF_ITERATIONS = 100_000
_DOMAIN = 0x63616E61  # "cana": keeps the pattern's stream apart from other uses of the same integer key
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, the weights PIL's "L" conversion uses
_GRAY_BANDS = {"L", "I", "F", "1"}


@dataclass(frozen=True)
class Band:
    """DCT coefficients ``(u, v)`` with ``lo ≤ u + v < hi``; needs images of at least ``hi`` pixels a side."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 0 <= self.lo < self.hi:
            raise UserError(f"DCT band must satisfy 0 ≤ lo < hi, got lo={self.lo}, hi={self.hi}")

    def mask(self) -> np.ndarray:
        u, v = np.meshgrid(np.arange(self.hi), np.arange(self.hi), indexing="ij")
        return (u + v >= self.lo) & (u + v < self.hi)

    @property
    def size(self) -> int:
        return int(self.mask().sum())


def default_band(resolution: int) -> Band:
    """``[R/4, R)``: above the coarse shapes that carry most image energy, within what R pixels can hold."""
    return Band(max(1, resolution // 4), resolution)


def parse_band(text: str) -> Band:
    """``"LO,HI"`` → Band (the CLI's ``--band``)."""
    try:
        lo, hi = (int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--band must be two integers LO,HI (e.g. 8,32), got {text!r}") from None
    return Band(lo, hi)


def _check_key(key: int) -> None:
    if not isinstance(key, int) or key < 0:
        raise UserError(f"--key must be a non-negative integer, got {key!r}")


# --- the pattern ------------------------------------------------------------------------------------
def canary_pattern(key: int, band: Band) -> np.ndarray:
    """``[hi, hi]`` array: the key's ±1 sequence on the band, 0 elsewhere (same for every image size)."""
    _check_key(key)
    rng = np.random.default_rng([key, _DOMAIN, band.lo, band.hi])
    signs = rng.integers(0, 2, size=(band.hi, band.hi)) * 2.0 - 1.0
    return np.where(band.mask(), signs, 0.0)


def _center_square(height: int, width: int) -> tuple[slice, slice]:
    """The central square, as training's ``ImageOps.fit`` center crop keeps it."""
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return slice(top, top + side), slice(left, left + side)


def _fits(height: int, width: int, band: Band, what: str) -> int:
    side = min(height, width)
    if side < band.hi:
        raise UserError(f"{what} is {height}×{width} pixels, too small for the DCT band "
                        f"[{band.lo}, {band.hi}): it needs at least {band.hi} pixels a side (use a lower --band)")
    return side


def pattern_pixels(key: int, band: Band, side: int, strength: float) -> np.ndarray:
    """The pixel-domain change ``[side, side]`` whose RMS is ``strength`` grey levels."""
    coeffs = np.zeros((side, side))
    coeffs[:band.hi, :band.hi] = canary_pattern(key, band) * (strength * side / math.sqrt(band.size))
    return idctn(coeffs, norm="ortho")


def embed_canary(image: np.ndarray, key: int, *, band: Band, strength: float = DEFAULT_STRENGTH,
                 what: str = "image") -> np.ndarray:
    """Mark one uint8 image (``[H, W]`` or ``[H, W, C]``): the same change on every channel, rounded and clipped."""
    height, width = image.shape[:2]
    side = _fits(height, width, band, what)
    rows, cols = _center_square(height, width)
    delta = pattern_pixels(key, band, side, strength)
    out = image.astype(np.float64)
    out[rows, cols] += delta if image.ndim == 2 else delta[..., None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def canary_z(gray: np.ndarray, key: int, *, band: Band) -> np.ndarray:
    """Detection statistic per image for grey images ``[..., H, W]`` (0–255 scale) → ``[...]``.

    ``z = Σ p_i·sign(c_i) / √(#non-zero c_i)``: mean 0 and variance 1 without the pattern, ≈ strength·√(H·W)
    / (typical coefficient size) with it.
    """
    x = np.asarray(gray, dtype=np.float64)
    _fits(x.shape[-2], x.shape[-1], band, "each image")
    rows, cols = _center_square(x.shape[-2], x.shape[-1])
    coeffs = dctn(x[..., rows, cols], axes=(-2, -1), norm="ortho")[..., :band.hi, :band.hi]
    mask = band.mask()
    signs = np.sign(coeffs[..., mask])
    used = np.maximum(np.count_nonzero(signs, axis=-1), 1)
    return signs @ canary_pattern(key, band)[mask] / np.sqrt(used)


def to_gray(image: np.ndarray) -> np.ndarray:
    """A uint8 image ``[H, W]`` or ``[H, W, 3]`` → float luminance ``[H, W]``."""
    return image.astype(np.float64) if image.ndim == 2 else image[..., :3].astype(np.float64) @ _LUMA


def pixels_to_gray(pixels: Any) -> np.ndarray:
    """Model pixels ``[N, C, H, W]`` in ``[-1, 1]`` (a torch tensor) → luminance ``[N, H, W]`` on 0–255."""
    x = (pixels.detach().float().cpu().clamp(-1, 1).numpy() + 1.0) * 127.5
    return x[:, 0] if x.shape[1] < 3 else np.einsum("nchw,c->nhw", x[:, :3], _LUMA)


def fpr_of_threshold(threshold: float, band: Band) -> float:
    """Exact false-positive rate of ``z > threshold`` without the pattern: ``(z√M + M)/2 ~ Binomial(M, ½)``."""
    m = band.size
    return float(stats.binom.sf(math.floor((m + threshold * math.sqrt(m)) / 2 + 1e-9), m, 0.5))


def threshold_for_fpr(fpr: float, band: Band) -> float:
    """Smallest threshold whose exact false-positive rate is at most ``fpr``."""
    m = band.size
    k = stats.binom.isf(fpr, m, 0.5)  # P(K > k) ≤ fpr
    return float((2 * k - m) / math.sqrt(m))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB on the 0–255 scale (inf for identical images)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


# --- embedding a folder -----------------------------------------------------------------------------
def _key_hash(key: int, salt: bytes) -> str:
    return hashlib.pbkdf2_hmac("sha256", str(key).encode(), salt, KDF_ITERATIONS).hex()


def _image_files(folder: Path) -> list[str]:
    """Image paths relative to ``folder``, as the folder loader lists them."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_image(path: Path, rel: str) -> tuple[np.ndarray, bytes | None]:
    """Decode as training does (EXIF orientation, mode → L or RGB); a bad file is an error, not a skip.

    The loader skips unreadable files; a marked copy that silently dropped one would no longer be the
    dataset the user meant to mark, so here it stops instead.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as probe:
                probe.verify()
            with Image.open(path) as img:
                img.load()
                icc = img.info.get("icc_profile") if img.mode in ("L", "RGB") else None  # kept only if still valid
                img = ImageOps.exif_transpose(img)
                img = _to_mode(img, 1 if img.getbands()[0] in _GRAY_BANDS else 3)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"cannot read image {rel} ({type(e).__name__}: {e}); fix or remove it before "
                        "marking the folder") from None
    return np.asarray(img), icc


def _check_folders(src: Path, out: Path) -> None:
    if not src.exists():
        raise UserError(f"image folder {src} does not exist")
    if not src.is_dir():
        raise UserError(f"{src} is not a folder of images")
    if out.exists():
        raise UserError(f"{out} already exists; give a new output folder (the marked copy is written fresh)")
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise UserError(f"the output folder {out} must lie outside the input folder {src} (and vice versa)")


def _png_names(src: Path, marked: list[str]) -> dict[str, str]:
    """Marked images are written as PNG (lossy formats would blur the pattern away): old → new name."""
    names = {rel: PurePosixPath(rel).with_suffix(".png").as_posix() for rel in marked}
    taken = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    for rel, new in names.items():
        if new != rel and new in taken:
            raise UserError(f"cannot write the marked copy of {rel} as {new}: {new} already exists in {src}")
    return names


def _caption(folder: Path, rel: str, meta: dict[str, str]) -> str | None:
    """The caption the folder loader would give ``rel`` (metadata.jsonl, else a .txt sidecar)."""
    if rel in meta:
        return meta[rel]
    sidecar = (folder / rel).with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8-sig").strip() if sidecar.exists() else None


def _rewrite_metadata(folder: Path, renamed: dict[str, str]) -> None:
    """Point metadata.jsonl rows at the renamed (PNG) files; other lines are kept as they were."""
    for path in sorted(folder.rglob(METADATA)):
        base = PurePosixPath(path.parent.relative_to(folder).as_posix())
        lines, changed = path.read_text(encoding="utf-8-sig").splitlines(), False
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            row = json.loads(line)  # already validated by _read_metadata
            name = PurePosixPath(str(row["file_name"]).replace("\\", "/"))
            rel = (base / name).as_posix()
            if renamed.get(rel, rel) != rel:
                row["file_name"] = name.with_suffix(".png").as_posix()
                lines[i], changed = json.dumps(row, ensure_ascii=False), True
        if changed:
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _mark_one(src: Path, tmp: Path, rel: str, new: str, *, key: int, band: Band, strength: float,
              resolution: int) -> dict[str, Any]:
    """Write the marked copy of ``rel`` as ``new`` and measure it: PSNR, z as stored, z as training sees it."""
    image, icc = _read_image(src / rel, rel)
    marked = embed_canary(image, key, band=band, strength=strength, what=rel)
    if new != rel:
        (tmp / rel).unlink()
    target = tmp / new
    Image.fromarray(marked).save(target, format="PNG", **({"icc_profile": icc} if icc else {}))
    seen = load_image(target, channels=1, resolution=resolution)  # the loader's crop + resize, grey
    z_seen = canary_z((seen[0].numpy() + 1.0) * 127.5, key, band=band)
    quality = psnr(image, marked)
    return {"file": new, "source": rel, "psnr": round(quality, 3) if math.isfinite(quality) else None,
            "z": round(float(canary_z(to_gray(marked), key, band=band)), 3),
            "z_at_resolution": round(float(z_seen), 3)}


def embed_folder(src: Path, out: Path, *, key: int, fraction: float = 0.5, strength: float = DEFAULT_STRENGTH,
                 seed: int = 0, resolution: int = DEFAULT_RESOLUTION, band: Band | None = None) -> dict[str, Any]:
    """Copy ``src`` to ``out`` (written atomically) with the canary planted in ``fraction`` of the images.

    Captions, sidecars and non-image files are carried over unchanged; marked images become PNG under
    the same stem (metadata.jsonl is updated). Returns the manifest written to ``out/canary.json``.
    """
    src, out = Path(src), Path(out)
    _check_key(key)
    if not 0 < fraction <= 1:
        raise UserError(f"--fraction must be in (0, 1], got {fraction}")
    if not 0 < strength <= 64:
        raise UserError(f"--strength is the RMS change in grey levels and must be in (0, 64], got {strength}")
    band = band or default_band(resolution)
    if band.hi > resolution:
        raise UserError(f"the DCT band [{band.lo}, {band.hi}) does not fit the training resolution {resolution}: "
                        f"need hi ≤ {resolution}")
    _check_folders(src, out)
    files = _image_files(src)
    if not files:
        raise UserError(f"no images in {src}; expected {', '.join(sorted(IMAGE_SUFFIXES))}")
    meta = _read_metadata(src)
    count = max(1, round(fraction * len(files)))
    chosen = sorted(int(i) for i in np.random.default_rng(seed).choice(len(files), size=count, replace=False))
    marked = [files[i] for i in chosen]
    names = _png_names(src, marked)
    salt = secrets.token_bytes(16)
    with atomic_dir(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore_dangling_symlinks=True)
        entries = []
        for rel in files:
            if rel not in names:
                _read_image(src / rel, rel)  # unmarked images are copied as they are, but must be readable too
                continue
            entry = _mark_one(src, tmp, rel, names[rel], key=key, band=band, strength=strength,
                              resolution=resolution)
            entries.append({**entry, "caption": _caption(src, rel, meta)})
        _rewrite_metadata(tmp, names)
        manifest = _manifest(src, files, entries, names, key=key, salt=salt, fraction=fraction, seed=seed,
                             band=band, strength=strength, resolution=resolution)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def _manifest(src: Path, files: list[str], entries: list[dict[str, Any]], names: dict[str, str], *, key: int,
              salt: bytes, fraction: float, seed: int, band: Band, strength: float,
              resolution: int) -> dict[str, Any]:
    quality = [e["psnr"] for e in entries if e["psnr"] is not None]
    return {
        "version": 1,
        "method": "dct-sign-spread-spectrum",
        "source": str(src.resolve()),
        "images": len(files), "marked_count": len(entries), "fraction": fraction, "seed": seed,
        "band": [band.lo, band.hi], "band_size": band.size, "region": "center-square",
        "resolution": resolution, "strength": strength,
        "key_check": {"kdf": "pbkdf2_sha256", "iterations": KDF_ITERATIONS, "salt": salt.hex(),
                      "hash": _key_hash(key, salt)},
        "psnr": {"min": min(quality, default=None), "mean": round(float(np.mean(quality)), 3) if quality else None},
        "marked": entries,
        "unmarked": [rel for rel in files if rel not in names],
    }


# --- detection in a run's generations ---------------------------------------------------------------
def read_manifest(path: Path) -> dict[str, Any]:
    """A canary.json written by :func:`embed_folder`."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        Band(*manifest["band"])
        missing = {"marked", "images", "marked_count"} - set(manifest)
        missing |= {"salt", "hash"} - set(manifest["key_check"])
        if missing:
            raise KeyError(", ".join(sorted(missing)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read canary manifest {path} ({type(e).__name__}: {e}); give the canary.json "
                        "that `privlora canary embed` wrote") from None
    return manifest


def check_key(key: int, manifest: dict[str, Any]) -> None:
    """Refuse a key that is not the one the manifest's images were marked with."""
    _check_key(key)
    check = manifest["key_check"]
    digest = hashlib.pbkdf2_hmac("sha256", str(key).encode(), bytes.fromhex(check["salt"]),
                                 int(check.get("iterations", KDF_ITERATIONS))).hex()
    if not secrets.compare_digest(digest, check["hash"]):
        raise UserError("--key is not the key these images were marked with (the manifest's key check differs)")


def _load_run(run: Path, device: str) -> tuple[Any, Any]:
    from privlora.config import load_config
    from privlora.tasks.loading import load_task
    from privlora.tasks.lora import PEFT_CONFIG, read_spec

    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist")
    if not (run / "config.yaml").is_file() or not (run / "adapter" / PEFT_CONFIG).is_file():
        raise UserError(f"{run} is not a run directory written by `privlora train` (needs config.yaml and adapter/)")
    config = load_config(run / "config.yaml", {"resume": False})
    task = load_task(config.base, read_spec(run / "adapter"), seed=config.seed,
                     trust_pickle=config.trust_pickle, device=device)
    task.load_adapter(run / "adapter")
    task.model.eval()
    return config, task


def _prompts(task: Any, manifest: dict[str, Any], n: int, prompt: str | None) -> list[str] | None:
    """Text-to-image bases are prompted with the marked images' own captions (or ``--prompt``)."""
    if not task.needs_captions:
        return None
    captions = [prompt] if prompt else [e["caption"] for e in manifest["marked"] if e.get("caption")]
    if not captions:
        raise UserError("this is a text-to-image model and the marked images have no captions: give --prompt")
    return [captions[i % len(captions)] for i in range(n)]


def _generate(task: Any, n: int, *, seed: int, steps: int, prompts: list[str] | None,
              batch_size: int) -> np.ndarray:
    """``n`` generations as luminance ``[n, H, W]``; the same seed gives the same starting noise."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, n, batch_size):
        k = min(batch_size, n - start)
        cond = {"captions": prompts[start:start + k]} if prompts else None
        chunks.append(pixels_to_gray(task.to_pixels(task.sample(k, generator=generator, steps=steps, batch=cond))))
    return np.concatenate(chunks)


def _z_summary(z: np.ndarray) -> dict[str, Any]:
    q = np.quantile(z, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"mean": float(z.mean()), "std": float(z.std(ddof=1)) if z.size > 1 else 0.0, "min": float(z.min()),
            "q05": float(q[0]), "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]), "q95": float(q[4]),
            "max": float(z.max()), "values": [round(float(v), 4) for v in z]}


def decide(z_adapter: np.ndarray, z_clean: np.ndarray, *, fpr: float, band: Band) -> dict[str, Any]:
    """Threshold, detection rate and false-positive rates from the adapter's and the clean generations' z.

    The threshold is the larger of the exact analytic one and the empirical one on clean generations,
    so neither false-positive rate exceeds ``fpr``: the analytic rate assumes the base model's images are
    unrelated to the key; the clean generations check that assumption on this base.
    """
    from privlora.audit.metrics import clopper_pearson

    n = z_adapter.size
    ranked = np.sort(z_clean)[::-1]
    allowed = math.floor(fpr * z_clean.size)
    empirical = float(ranked[allowed]) if allowed < z_clean.size else -math.inf
    analytic = threshold_for_fpr(fpr, band)
    threshold = max(empirical, analytic)
    detected = int((z_adapter > threshold).sum())
    lo, hi = clopper_pearson(detected, n)
    fpr_analytic = fpr_of_threshold(threshold, band)
    paired = None
    diff = z_adapter - z_clean
    if n > 1 and np.ptp(diff) > 0:
        test = stats.ttest_rel(z_adapter, z_clean, alternative="greater")
        paired = {"mean_diff": float(diff.mean()), "t": float(test.statistic), "p_value": float(test.pvalue)}
    return {
        "threshold": threshold, "threshold_empirical": empirical if math.isfinite(empirical) else None,
        "threshold_analytic": analytic,
        "detected": detected, "detection_rate": detected / n, "detection_rate_ci95": [float(lo), float(hi)],
        "fpr_clean": float((z_clean > threshold).mean()), "fpr_analytic": fpr_analytic,
        "fpr_normal_approx": float(stats.norm.sf(threshold)),
        "p_value_binomial": float(stats.binom.sf(detected - 1, n, fpr_analytic)),
        "paired": paired,
    }


def detect_run(run: Path, *, key: int, manifest: Path, n: int = 64, seed: int = 0, fpr: float = 0.01,
               steps: int = 50, batch_size: int = 16, prompt: str | None = None,
               device: str = "cpu") -> dict[str, Any]:
    """Generate ``n`` images with the run's adapter and ``n`` with it disabled (same seeds), score both for the
    canary, and write ``<run>/audit/canary.json`` (that one file, atomically). Returns what it wrote."""
    run, manifest_path = Path(run), Path(manifest)
    if n < 1 or steps < 1 or batch_size < 1:
        raise UserError(f"--n, --steps and the batch size must be at least 1 (got {n}, {steps}, {batch_size})")
    if not 0 < fpr <= 0.5:
        raise UserError(f"--fpr must be in (0, 0.5], got {fpr}")
    marks = read_manifest(manifest_path)
    check_key(key, marks)
    band = Band(*marks["band"])
    config, task = _load_run(run, device)
    prompts = _prompts(task, marks, n, prompt)
    z_adapter = canary_z(_generate(task, n, seed=seed, steps=steps, prompts=prompts, batch_size=batch_size),
                         key, band=band)
    with task.adapter_disabled():
        clean = _generate(task, n, seed=seed, steps=steps, prompts=prompts, batch_size=batch_size)
    z_clean = canary_z(clean, key, band=band)
    source = Path(config.data.source)
    result = {
        "run": str(run), "manifest": str(manifest_path), "data_source": config.data.source,
        "trained_on_marked_folder": source.exists() and source.resolve() == manifest_path.resolve().parent,
        "marked_fraction": marks["marked_count"] / max(marks["images"], 1),
        "n": n, "seed": seed, "steps": steps, "target_fpr": fpr, "band": [band.lo, band.hi],
        "band_size": band.size, "image_size": list(clean.shape[1:]),
        **decide(z_adapter, z_clean, fpr=fpr, band=band),
        "z_adapter": _z_summary(z_adapter), "z_clean": _z_summary(z_clean),
    }
    write_json_atomic(run / "audit" / MANIFEST, result)
    return result
