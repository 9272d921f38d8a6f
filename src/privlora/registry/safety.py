"""Is an uploaded adapter safe to store and load? Checked from the bytes, before any tensor is built.

* pickle (or torch zip) content is refused outright — loading it can run code;
* the safetensors header must hold only floating-point LoRA tensors (``…lora_A.weight`` [r, in],
  ``…lora_B.weight`` [out, r], one rank for all) plus optional head tensors (``classifier.*``), each A
  with its B, and — when the base model's shapes are given — every layer must exist in the base with
  the matching in/out sizes;
* a spectrum scan (ΔW = B·A per layer, :mod:`privlora.audit.spectrum`) warns when one direction holds
  almost all of a layer's energy: a LoRA can carry a backdoor as a rank-1 trigger (LoRA-as-an-Attack,
  2024). A warning, not a refusal: a tiny rank-1 adapter looks the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from privlora.tensorfiles import HeaderError, read_header

FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
SUSPICIOUS_TOP1 = 0.99  # share of a layer's ΔW energy in its first singular direction


@dataclass
class AdapterReport:
    ok: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rank: int | None = None
    layers: int = 0


def _layer(key: str) -> tuple[str, str] | None:
    for part in ("lora_A", "lora_B"):
        marker = f".{part}."
        if marker in key:
            return key.split(marker)[0].removeprefix("base_model.model."), part
    return None


def inspect_adapter(weights: bytes, *, base_shapes: dict[str, tuple[int, int]] | None = None,
                    scan_spectrum: bool = True) -> AdapterReport:
    """Validate an ``adapter_model.safetensors``; ``base_shapes`` maps module name → (out, in)."""
    report = AdapterReport(ok=False)
    try:
        header = read_header(weights)
    except HeaderError as e:
        report.errors.append(f"adapter weights are {e}")
        return report
    pairs: dict[str, dict[str, list[int]]] = {}
    for key, info in header.items():
        if info["dtype"] not in FLOAT_DTYPES:
            report.errors.append(f"{key}: dtype {info['dtype']} is not a float type")
            continue
        found = _layer(key)
        if found is None:
            if not key.removeprefix("base_model.model.").startswith("classifier."):
                report.errors.append(f"{key}: neither a LoRA tensor nor a classification head")
            continue
        layer, part = found
        if len(info["shape"]) != 2:
            report.errors.append(f"{key}: LoRA tensors are matrices, got shape {info['shape']}")
            continue
        pairs.setdefault(layer, {})[part] = info["shape"]
    ranks = set()
    for layer, parts in sorted(pairs.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            report.errors.append(f"{layer}: has {', '.join(sorted(parts))} without its pair")
            continue
        (r_a, n_in), (n_out, r_b) = parts["lora_A"], parts["lora_B"]
        if r_a != r_b:
            report.errors.append(f"{layer}: A has rank {r_a} but B has {r_b}")
        ranks.add(r_a)
        if base_shapes is not None:
            if layer not in base_shapes:
                report.errors.append(f"{layer}: no such layer in the base model")
            elif tuple(base_shapes[layer]) != (n_out, n_in):
                report.errors.append(f"{layer}: ΔW would be {n_out}×{n_in}, the base layer is "
                                     f"{base_shapes[layer][0]}×{base_shapes[layer][1]}")
    if not pairs:
        report.errors.append("no LoRA tensors in the adapter")
    if len(ranks) > 1:
        report.errors.append(f"mixed LoRA ranks {sorted(ranks)}")
    report.layers, report.rank = len(pairs), (next(iter(ranks)) if len(ranks) == 1 else None)
    if not report.errors and scan_spectrum:
        report.warnings.extend(_spectrum_warnings(weights))
    report.ok = not report.errors
    return report


def _spectrum_warnings(weights: bytes) -> list[str]:
    """Layers whose ΔW puts ≥ 99 % of its energy in one direction (rank > 1 adapters only)."""
    import torch
    from safetensors.torch import load

    state = load(weights)
    warnings = []
    for key, a in state.items():
        found = _layer(key)
        if found is None or found[1] != "lora_A" or a.shape[0] < 2:
            continue
        b = state.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            continue
        s = torch.linalg.svdvals(b.float() @ a.float())
        energy = float((s ** 2).sum())
        if energy > 0 and float(s[0] ** 2) / energy >= SUSPICIOUS_TOP1:
            warnings.append(f"{found[0]}: {float(s[0] ** 2) / energy:.3f} of ΔW's energy in one direction "
                            "(a rank-1 update in a rank-{} adapter — possible backdoor trigger)".format(a.shape[0]))
    return warnings
