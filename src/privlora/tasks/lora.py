"""Attach LoRA to any torch module with peft, and write it in the formats peft and diffusers read.

Why peft's low-level API (``inject_adapter_in_model``) and not ``unet.add_adapter``: diffusers'
``UNet2DModel`` has no ``add_adapter``; the injection works for every module alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save
from torch import nn

from privlora.errors import UserError
from privlora.runs import atomic_file
from privlora.tensorfiles import first_nonfinite

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraSpec:
    """Rank, scaling and target module names (peft suffix matching, e.g. ``to_q``, ``conv1``)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    def peft_config(self) -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets),
                          init_lora_weights="gaussian", lora_dropout=0.0)


def add_lora(module: nn.Module, spec: LoraSpec, *, seed: int) -> list[nn.Parameter]:
    """Freeze ``module``, inject LoRA layers, return the trainable LoRA parameters.

    ``seed`` fixes the random init of the A matrices (B starts at zero, so the adapter starts as a no-op).
    """
    module.requires_grad_(False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(spec.peft_config(), module)
        except ValueError as e:
            raise UserError(f"LoRA targets {list(spec.targets)} match no layer of the base model: {e}"
                            ) from None
    params = [p for n, p in module.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights in peft's key format (no adapter name), detached and contiguous."""
    state = get_peft_model_state_dict(module)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_lora(module: nn.Module, spec: LoraSpec, out_dir: Path, *, diffusers_prefix: str,
              base_model: str) -> None:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (peft ``PeftModel.from_pretrained``)
    and ``pytorch_lora_weights.safetensors`` (diffusers ``load_lora_weights``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(module)
    meta = {"format": "pt", "privlora_base": base_model}
    write_safetensors(out_dir / PEFT_WEIGHTS, {PEFT_PREFIX + k: v for k, v in state.items()}, meta)
    write_safetensors(out_dir / DIFFUSERS_WEIGHTS, {f"{diffusers_prefix}.{k}": v for k, v in state.items()}, meta)
    config = spec.peft_config()
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(out_dir))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Serialise in memory and write through Python (temporary + rename): a full or read-only disk is an
    ``OSError`` with its errno, and no half file is left under the final name."""
    data = save(tensors, metadata=metadata)
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def check_finite(state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Refuse weights holding NaN or ±inf: such an adapter turns every output into NaN (a black image, a
    constant class) while looking like a normal file, and would pass through generate, audit or the
    registry as if it were a trained model."""
    name = first_nonfinite(state)
    if name is not None:
        raise UserError(f"adapter {source} has non-finite weights (tensor {name})")


def read_lora(path: Path) -> dict[str, torch.Tensor]:
    """Read peft-format LoRA weights from an adapter directory (keys without the PeftModel prefix)."""
    file = path / PEFT_WEIGHTS if path.is_dir() else path
    if not file.exists():
        raise UserError(f"no adapter at {path}: expected {PEFT_WEIGHTS} (safetensors) inside it")
    try:
        state = load_file(str(file))
    except Exception as e:  # safetensors raises several types for bad headers
        raise UserError(f"{file} is not a valid safetensors file ({e}); "
                        "pickle checkpoints are refused") from None
    check_finite(state, path)
    return {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}


def read_spec(path: Path) -> LoraSpec:
    """LoRA rank/alpha/targets from an adapter directory's ``adapter_config.json``."""
    try:
        cfg = json.loads((path / PEFT_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path / PEFT_CONFIG}: {e}") from None
    return LoraSpec(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), targets=tuple(cfg["target_modules"]))


def load_lora(module: nn.Module, path: Path, *, other_prefixes: tuple[str, ...] = ()) -> None:
    """Load adapter weights into a module that already carries LoRA layers of the same shape.

    Keys starting with one of ``other_prefixes`` (e.g. a classification head the caller loads itself)
    are left out.
    """
    state = {k: v for k, v in read_lora(path).items() if not k.startswith(other_prefixes)} if other_prefixes \
        else read_lora(path)
    expected = lora_state_dict(module)
    for key, value in state.items():
        if key not in expected:
            raise UserError(f"adapter {path} has tensor {key!r} that the model has no LoRA layer for")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserError(f"adapter {path}: {key} has shape {tuple(value.shape)}, "
                            f"the model expects {tuple(expected[key].shape)}")
    result = set_peft_model_state_dict(module, state)
    missing = [k for k in result.unexpected_keys if "lora_" in k]
    if missing:
        raise UserError(f"adapter {path} could not be applied: {missing[:3]}")


@contextmanager
def lora_bypassed(model: nn.Module) -> Iterator[None]:
    """Run ``model`` without its LoRA layers (the base model alone); they are switched back on afterwards,
    whatever happens inside. Nested blocks are safe: only layers enabled on entry are switched back on."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
