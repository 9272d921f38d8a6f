"""The singular-value spectrum of each LoRA update ``ΔW = (α/r)·B·A``, read straight from the adapter file.

Why look: a LoRA update whose energy sits in one direction (top-1 share near 1) is what a narrow,
planted behaviour tends to look like — a backdoor trigger or one memorised sample — while ordinary
fine-tuning spreads over several directions. It is a warning to investigate, not a verdict.

Why it is cheap: with ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (thin QR), ``ΔW = s·Q_B (R_B R_Aᵀ) Q_Aᵀ`` with
orthonormal ``Q``s, so the singular values of ΔW are those of the ``r×r`` core ``s·R_B R_Aᵀ``; ΔW
(``out × in·k·k``) is never formed. Conv LoRA (peft) stores ``A`` as ``[r, in, k, k]`` and ``B`` as
``[out, r, 1, 1]``; flattening both to 2-D gives ΔW reshaped to ``out × (in·k·k)``.

Only safetensors is read: a pickle file can run code when loaded.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from privlora.errors import UserError
from privlora.runs import atomic_file

SUSPICIOUS_SHARE = 0.9
_KEY = re.compile(r"^(?P<layer>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
_PICKLE_SUFFIXES = {".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"}


# --- reading ----------------------------------------------------------------------------------------
def resolve_adapter_dir(path: Path) -> Path:
    """A run directory (its ``adapter/``), an adapter directory, or the weights file inside one."""
    from privlora.tasks.lora import PEFT_CONFIG, PEFT_WEIGHTS

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist (give a run directory or an adapter directory)")
    if path.is_file():
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise UserError(f"{path} is a pickle file, which can execute code when loaded; only safetensors "
                            f"adapters ({PEFT_WEIGHTS}) are read")
        path = path.parent
    for candidate in (path / "adapter", path):
        if (candidate / PEFT_CONFIG).is_file():
            if not (candidate / PEFT_WEIGHTS).is_file():
                found = sorted(p.name for p in candidate.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
                why = f" (found {found[0]}: pickle files are refused)" if found else ""
                raise UserError(f"{candidate} has no {PEFT_WEIGHTS}{why}; only safetensors adapters are read")
            return candidate
    raise UserError(f"{path} is neither a run directory nor an adapter directory (no {PEFT_CONFIG})")


def _read_config(adapter: Path) -> dict[str, Any]:
    from privlora.tasks.lora import PEFT_CONFIG

    try:
        cfg = json.loads((adapter / PEFT_CONFIG).read_text(encoding="utf-8"))
        cfg["lora_alpha"], cfg["r"] = float(cfg["lora_alpha"]), int(cfg["r"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {adapter / PEFT_CONFIG} ({type(e).__name__}: {e}); "
                        "expected peft's adapter_config.json with 'r' and 'lora_alpha'") from None
    return cfg


def _pattern_value(patterns: dict[str, Any], layer: str, default: float) -> float:
    """peft's ``rank_pattern`` / ``alpha_pattern``: a key matches a layer name ending in ``.key``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", layer):
            return float(value)
    return default


def _scale(cfg: dict[str, Any], layer: str, rank: int) -> float:
    """peft's scaling: ``α/r`` (``α/√r`` with rsLoRA), per-layer α from ``alpha_pattern``."""
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, layer, float(cfg["lora_alpha"]))
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def lora_pairs(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``layer → (A, B)`` from the adapter's safetensors file, in file order."""
    from privlora.tasks.lora import read_lora

    state = read_lora(adapter)  # refuses missing or non-safetensors files with a UserError
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match:
            parts.setdefault(match["layer"], {})[match["part"]] = tensor
    incomplete = [layer for layer, ab in parts.items() if set(ab) != {"A", "B"}]
    if incomplete:
        raise UserError(f"{adapter}: layer {incomplete[0]} has lora_A or lora_B but not both")
    if not parts:
        raise UserError(f"{adapter} holds no lora_A/lora_B weights")
    return {layer: (ab["A"], ab["B"]) for layer, ab in parts.items()}


# --- one layer --------------------------------------------------------------------------------------
def as_matrices(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A → [r, in·k·k]``, ``B → [out, r]`` in float64 (linear and conv LoRA alike)."""
    if b.dim() > 2 and any(s != 1 for s in b.shape[2:]):
        raise UserError(f"lora_B of shape {tuple(b.shape)} is not a 1×1 projection; unsupported LoRA layout")
    a2, b2 = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], b.shape[1]).double()
    if a2.shape[0] != b2.shape[1]:
        raise UserError(f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not pair (grouped conv LoRA "
                        "is not supported)")
    return a2, b2


def singular_values(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Singular values of ``scale·B·A`` (descending) from the QR factors: O((out + in)·r²), not O(out·in·r)."""
    a2, b2 = as_matrices(a, b)
    _, r_b = torch.linalg.qr(b2)  # [min(out, r), r]
    _, r_a = torch.linalg.qr(a2.T)  # [min(in, r), r]
    return torch.linalg.svdvals(abs(scale) * (r_b @ r_a.T))


def spectrum_stats(sigma: torch.Tensor, *, top_k: int = 4) -> dict[str, Any]:
    """Energy shares, effective rank (Roy & Vetterli 2007) and stable rank of one set of singular values."""
    s = sigma.double().clamp_min(0)
    energy = s.square()
    total = float(energy.sum())
    frobenius = math.sqrt(total)
    if total == 0:  # an untrained adapter (B = 0) changes nothing: no direction to speak of
        return {"singular_values": [float(v) for v in s], "frobenius": frobenius, "zero": True,
                "energy_top1": None, "energy_topk": None, "effective_rank": 0.0, "stable_rank": 0.0,
                "suspicious": False}
    p = s / s.sum()
    entropy = -float((p[p > 0] * p[p > 0].log()).sum())
    return {
        "singular_values": [float(v) for v in s],
        "frobenius": frobenius,
        "zero": False,
        "energy_top1": float(energy[0] / total),
        "energy_topk": float(energy[:top_k].sum() / total),
        "effective_rank": math.exp(entropy),
        "stable_rank": total / float(energy[0]),
        "suspicious": bool(float(energy[0] / total) >= SUSPICIOUS_SHARE),
    }


def layer_spectrum(a: torch.Tensor, b: torch.Tensor, scale: float, *, top_k: int = 4) -> dict[str, Any]:
    """Everything about one layer's ΔW: its shape, the scale applied, the spectrum figures."""
    kind = "conv" if a.dim() > 2 else "linear"
    shape = [int(b.shape[0]), *(int(d) for d in a.shape[1:])]
    return {"kind": kind, "shape": shape, "rank": int(a.shape[0]), "scale": scale,
            **spectrum_stats(singular_values(a, b, scale), top_k=top_k)}


# --- the adapter ------------------------------------------------------------------------------------
def _summary(layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    live = [v for v in layers.values() if not v["zero"]]

    def mean(key: str) -> float | None:
        return sum(v[key] for v in live) / len(live) if live else None

    suspicious = [name for name, v in layers.items() if v["suspicious"]]
    return {
        "layers": len(layers), "zero_layers": len(layers) - len(live),
        "mean_effective_rank": mean("effective_rank"), "mean_energy_top1": mean("energy_top1"),
        "mean_energy_topk": mean("energy_topk"), "mean_stable_rank": mean("stable_rank"),
        "frobenius_total": math.sqrt(sum(v["frobenius"] ** 2 for v in layers.values())),
        "suspicious_threshold": SUSPICIOUS_SHARE, "suspicious_layers": suspicious,
        "suspicious": bool(suspicious),
    }


def adapter_spectrum(adapter_dir: Path, *, top_k: int = 4) -> dict[str, Any]:
    """Per-layer spectra of a peft LoRA adapter (run or adapter directory) and a whole-adapter summary."""
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    adapter = resolve_adapter_dir(Path(adapter_dir))
    cfg = _read_config(adapter)
    layers = {}
    for layer, (a, b) in lora_pairs(adapter).items():
        layers[layer] = layer_spectrum(a, b, _scale(cfg, layer, int(a.shape[0])), top_k=top_k)
    return {"adapter": str(adapter), "rank": int(cfg["r"]), "lora_alpha": float(cfg["lora_alpha"]),
            "use_rslora": bool(cfg.get("use_rslora")), "top_k": top_k, "layers": layers,
            "summary": _summary(layers)}


# --- the figure -------------------------------------------------------------------------------------
def _mean_curve(spectrum: dict[str, Any]) -> list[float]:
    """Mean over non-zero layers of σ_i/σ_1 (layers with fewer values count as 0 beyond their length)."""
    curves = [v["singular_values"] for v in spectrum["layers"].values() if not v["zero"]]
    if not curves:
        return []
    width = max(len(c) for c in curves)
    return [sum(c[i] / c[0] if i < len(c) else 0.0 for c in curves) / len(curves) for i in range(width)]


def spectrum_plot(spectra: dict[str, dict[str, Any]], path: Path) -> Path:
    """PNG comparing adapters: mean normalised singular values, and effective rank per layer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)  # Agg explicitly, without switching pyplot's global backend
    curve_ax, rank_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
    names = sorted({layer for s in spectra.values() for layer in s["layers"]})
    position = {layer: i for i, layer in enumerate(names)}
    for label, spectrum in spectra.items():
        curve = _mean_curve(spectrum)
        curve_ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=label)
        points = [(position[k], v["effective_rank"]) for k, v in spectrum["layers"].items()]
        rank_ax.plot([x for x, _ in points], [y for _, y in points], marker=".", linestyle="", label=label)
        suspicious = [position[k] for k in spectrum["summary"]["suspicious_layers"]]
        if suspicious:
            rank_ax.plot(suspicious, [spectrum["layers"][names[i]]["effective_rank"] for i in suspicious],
                         marker="x", color="red", linestyle="", markersize=8)
    curve_ax.set(xlabel="singular value index i", ylabel="mean σ_i / σ_1 over layers",
                 title="normalised spectrum", ylim=(0, 1.05))
    rank_ax.set(xlabel="layer (sorted by name)", ylabel="effective rank (Roy & Vetterli)",
                title="effective rank per layer (× = top-1 energy ≥ 0.9)")
    curve_ax.legend(fontsize=7)
    rank_ax.set_ylim(bottom=0)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
