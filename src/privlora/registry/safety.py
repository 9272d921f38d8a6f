"""Is an uploaded adapter safe to store and load? Checked from the bytes, before any tensor is built.

* pickle (or torch zip) content is refused outright — loading it can run code;
* the safetensors header must hold only floating-point LoRA tensors (``…lora_A.weight`` [r, in] and
  ``…lora_B.weight`` [out, r]; for convolutions, as peft stores them, [r, in, kh, kw] and [out, r, 1, 1]),
  one rank for all, plus optional head tensors (``classifier.*``), each A with its B, and — when the base
  model's shapes are given (:mod:`privlora.registry.bases`) — every layer must exist in the base with the
  matching weight shape ([out, in] or [out, in, kh, kw]);
* every tensor must be finite: NaN or inf weights are refused (they would poison any model they are merged
  into, and the spectrum scan below cannot factor them);
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
    nonfinite: list[str] = field(default_factory=list)  # tensors holding NaN or inf


def _layer(key: str) -> tuple[str, str] | None:
    for part in ("lora_A", "lora_B"):
        marker = f".{part}."
        if marker in key:
            return key.split(marker)[0].removeprefix("base_model.model."), part
    return None


def inspect_adapter(weights: bytes, *, base_shapes: dict[str, tuple[int, ...]] | None = None,
                    scan_spectrum: bool = True) -> AdapterReport:
    """Validate an ``adapter_model.safetensors``; ``base_shapes`` maps module name → its weight's shape."""
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
        if len(info["shape"]) not in (2, 4):
            report.errors.append(f"{key}: LoRA tensors are matrices (or 4-d convolution kernels), got shape "
                                 f"{info['shape']}")
            continue
        pairs.setdefault(layer, {})[part] = info["shape"]
    ranks = set()
    for layer, parts in sorted(pairs.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            report.errors.append(f"{layer}: has {', '.join(sorted(parts))} without its pair")
            continue
        a, b = parts["lora_A"], parts["lora_B"]
        if len(a) != len(b) or any(d != 1 for d in b[2:]):
            report.errors.append(f"{layer}: A {a} and B {b} are not a LoRA pair (B of a convolution is 1×1)")
            continue
        (r_a, n_in, *kernel), (n_out, r_b) = a, b[:2]
        if r_a != r_b:
            report.errors.append(f"{layer}: A has rank {r_a} but B has {r_b}")
        ranks.add(r_a)
        if base_shapes is not None:
            delta = (n_out, n_in, *kernel)
            if layer not in base_shapes:
                report.errors.append(f"{layer}: no such layer in the base model")
            elif tuple(base_shapes[layer]) != delta:
                report.errors.append(f"{layer}: ΔW would be {_dims(delta)}, the base layer is "
                                     f"{_dims(base_shapes[layer])}")
    if not pairs:
        report.errors.append("no LoRA tensors in the adapter")
    if len(ranks) > 1:
        report.errors.append(f"mixed LoRA ranks {sorted(ranks)}")
    report.layers, report.rank = len(pairs), (next(iter(ranks)) if len(ranks) == 1 else None)
    if not report.errors:
        try:
            report.nonfinite = _nonfinite(weights)
        except Exception as e:  # safetensors' own error type: data that does not match its header
            report.errors.append(f"adapter weights cannot be read as safetensors ({type(e).__name__})")
        if report.nonfinite:
            report.errors.append(f"adapter has non-finite weights (NaN or inf in {report.nonfinite[0]}"
                                 + (f" and {len(report.nonfinite) - 1} more tensors)" if len(report.nonfinite) > 1
                                    else ")"))
    if not report.errors and scan_spectrum:
        report.warnings.extend(_spectrum_warnings(weights))
    report.ok = not report.errors
    return report


def _dims(shape: tuple[int, ...] | list[int]) -> str:
    return "×".join(str(d) for d in shape)


def _nonfinite(weights: bytes) -> list[str]:
    """Names of the tensors that hold a NaN or an infinity (the header was checked: floats only)."""
    import torch
    from safetensors.torch import load

    return sorted(key for key, t in load(weights).items() if not bool(torch.isfinite(t).all()))


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
        s = torch.linalg.svdvals(b.float().flatten(1) @ a.float().flatten(1))  # conv: [out, r]·[r, in·kh·kw]
        energy = float((s ** 2).sum())
        if energy > 0 and float(s[0] ** 2) / energy >= SUSPICIOUS_TOP1:
            warnings.append(f"{found[0]}: {float(s[0] ** 2) / energy:.3f} of ΔW's energy in one direction "
                            "(a rank-1 update in a rank-{} adapter — possible backdoor trigger)".format(a.shape[0]))
    return warnings
