"""Write a run's adapter in the format another tool reads: peft, diffusers or kohya (A1111, ComfyUI, sd-scripts).

Why a converter of our own: a run stores its LoRA once, in peft's layout (``adapter_model.safetensors`` +
``adapter_config.json``); every other layout is a renaming of the same tensors plus the scale. kohya's layout
names each LoRA'd module ``lora_unet_<diffusers module path, dots as underscores>`` with ``.lora_down.weight``
(peft's A), ``.lora_up.weight`` (peft's B) and a scalar ``.alpha`` (scale = alpha / rank, as in peft) — the
names kohya's sd-scripts gives SD 1.x/2.x LoRAs and that diffusers' ``load_lora_weights``, A1111 and ComfyUI
read back. Nothing here loads a base model: the same functions serve ``privlora export`` and the registry's
``?format=`` downloads, where the base is usually not on disk.

Kinds of adapter: ``sd`` (a Stable Diffusion UNet2DConditionModel: every format), ``unet2d`` (the embedded
UNet2DModel or a UNet folder: peft and diffusers — kohya is refused, since no kohya-format reader loads a
UNet2DModel and diffusers has no LoRA loader for its pipeline), ``text`` (peft only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privlora.errors import UserError

PEFT_WEIGHTS = "adapter_model.safetensors"  # the same names as privlora.tasks.lora (not imported: no torch)
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
#: where a diffusers UNet's modules live: an adapter whose layers are all below these is a UNet adapter
UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.",
              "add_embedding.", "time_proj", "class_embedding.", "encoder_hid_proj")
PICKLE_ADAPTERS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")


@dataclass(frozen=True)
class Source:
    """One adapter as stored: peft tensors (keys without ``base_model.model.``), its peft config, its kind."""

    tensors: dict[str, Any]
    config: dict[str, Any]
    kind: str  # sd | unet2d | text | other
    sha256: str  # of the stored adapter_model.safetensors bytes (the registry's adapter id)

    @property
    def base(self) -> str:
        return str(self.config.get("base_model_name_or_path") or "")

    @property
    def rank(self) -> int:
        """The config's ``r``, else the first A matrix's rows (a registry push may carry a sparse config)."""
        shapes = [v.shape[0] for k, v in self.tensors.items() if ".lora_A." in k]
        value = self.config.get("r")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        if shapes:
            return int(shapes[0])
        raise UserError("the adapter has no LoRA A matrix and its config no rank r")

    @property
    def alpha(self) -> float:
        value = self.config.get("lora_alpha")
        if value is None:
            raise UserError("the adapter's config has no lora_alpha, so its scale is unknown; export needs it")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UserError(f"the adapter's config has lora_alpha {str(value)[:40]!r}, not a positive number")
        return float(value)


def _modules(keys: Any) -> list[str]:
    return sorted({k.split(".lora_")[0] for k in keys if ".lora_A." in k or ".lora_B." in k})


def classify(config: Mapping[str, Any], keys: Any, task: str | None = None, *, probe_base: bool = True) -> str:
    """The adapter's kind from its config and tensor names (and the run's ``task`` where known).

    The base decides where it is on disk (``embedded``, a UNet folder: unet2d; a pipeline folder: sd); where it
    is not (the registry), the layer names do: attention inside ``transformer_blocks`` is SD's cross-attention
    UNet, attention directly below ``attentions.N`` is UNet2DModel's; a hub id is SD (``load_task`` loads hub
    ids as SD pipelines). ``probe_base=False`` (the registry) never looks at the local disk for a pushed path."""
    if task == "text" or str(config.get("task_type") or "").upper() == "SEQ_CLS":
        return "text"
    modules = _modules(keys)
    if not modules or not all(m.startswith(UNET_ROOTS) for m in modules):
        return "other"
    base = str(config.get("base_model_name_or_path") or "")
    if base == "embedded":
        return "unet2d"
    if probe_base and base:
        try:
            if Path(base).is_dir():
                return "sd" if (Path(base) / "model_index.json").is_file() else "unet2d"
        except (OSError, ValueError):  # a name too long or holding NUL names no folder
            pass
    if any(".transformer_blocks." in m for m in modules):
        return "sd"
    if any(".attentions." in m for m in modules):
        return "unet2d"
    return "sd"


def source_from_bytes(weights: bytes, config: Mapping[str, Any], *, task: str | None = None,
                      where: str = "the adapter", probe_base: bool = True) -> Source:
    """A :class:`Source` from ``adapter_model.safetensors`` bytes; a pickle or malformed file is a UserError."""
    from safetensors.torch import load

    from privlora.tensorfiles import HeaderError, first_nonfinite, read_header

    try:
        read_header(weights)
        tensors = load(weights)
    except HeaderError as e:
        raise UserError(f"{where} is {e}") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad body
        raise UserError(f"{where} is not a valid safetensors file ({str(e).splitlines()[0][:200]})") from None
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise UserError(f"{where} has non-finite weights (tensor {bad})")
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}
    return Source(tensors=tensors, config=dict(config), kind=classify(config, tensors, task, probe_base=probe_base),
                  sha256=hashlib.sha256(weights).hexdigest())


def source_from_run(run: str | Path) -> Source:
    """The adapter of a run directory written by ``privlora train`` (or unlearn, federate …)."""
    from privlora.runs import require_run_dir

    run = Path(run)
    pickled = [n for n in PICKLE_ADAPTERS if (run / "adapter" / n).is_file()]
    if pickled and not (run / "adapter" / PEFT_WEIGHTS).is_file():
        raise UserError(f"{run}/adapter holds only {pickled[0]}, a pickle, which can run code when loaded; "
                        f"export reads safetensors adapters ({PEFT_WEIGHTS}) only")
    require_run_dir(run, adapter_file=PEFT_WEIGHTS, purpose="to export")
    try:
        config = json.loads((run / "adapter" / PEFT_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {run / 'adapter' / PEFT_CONFIG}: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{run / 'adapter' / PEFT_CONFIG} is not a JSON object")
    return source_from_bytes((run / "adapter" / PEFT_WEIGHTS).read_bytes(), config, task=_run_task(run),
                             where=str(run / "adapter" / PEFT_WEIGHTS))


def _run_task(run: Path) -> str | None:
    from privlora.config import safe_yaml

    try:
        parsed = safe_yaml((run / "config.yaml").read_text())
    except Exception:  # noqa: BLE001 - an unreadable config leaves the kind to the adapter itself
        return None
    return parsed.get("task") if isinstance(parsed, dict) else None


# --- the writers: Source → (tensors, extra header metadata) ------------------------------------------------

Written = tuple[dict[str, Any], dict[str, str]]


def _lora_config_dict(source: Source) -> dict[str, Any]:
    """The adapter's peft config as ``LoraConfig`` accepts it (keys peft does not take are dropped)."""
    from peft import LoraConfig

    fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    try:
        config = LoraConfig(**{k: v for k, v in source.config.items() if k in fields}).to_dict()
    except (TypeError, ValueError) as e:  # a pushed config is input: peft's own check says what is wrong
        raise UserError(f"the adapter's config is not a peft LoraConfig ({str(e).splitlines()[0][:200]})") from None
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def _require(source: Source, fmt: str, kinds: tuple[str, ...]) -> None:
    if source.kind in kinds:
        return
    if source.kind == "text":
        raise UserError(f"a text run's adapter exports as peft only, not {fmt} (the {fmt} format is for "
                        "diffusion UNets)")
    if source.kind == "unet2d":
        raise UserError(f"base {source.base or '?'} is a UNet2DModel, which no {fmt}-format reader (A1111, "
                        "ComfyUI, kohya, diffusers' load_lora_weights) loads; export --format diffusers or peft")
    first = _modules(source.tensors)[:1] or sorted(source.tensors)[:1]
    raise UserError(f"the adapter's layers ({', '.join(first)} …) are not a diffusers UNet's; it exports as peft "
                    f"only, not {fmt}")


def write_peft(source: Source) -> Written:
    """peft's own file: ``base_model.model.<module>.lora_A|B.weight`` (``PeftModel.from_pretrained`` reads it
    as ``adapter_model.safetensors`` beside ``adapter_config.json``, whose content the header carries)."""
    return ({PEFT_PREFIX + k: v for k, v in source.tensors.items()},
            {"privlora_adapter_config": json.dumps(source.config, sort_keys=True, default=str)})


def write_diffusers(source: Source) -> Written:
    """diffusers' ``pytorch_lora_weights.safetensors``: ``unet.<module>.lora_A|B.weight`` plus the LoraConfig
    in ``lora_adapter_metadata`` (without it ``load_lora_weights`` assumes alpha = rank)."""
    _require(source, "diffusers", ("sd", "unet2d"))
    packed = {f"unet.{k}": v for k, v in _lora_config_dict(source).items()}
    return ({f"unet.{k}": v for k, v in source.tensors.items()},
            {DIFFUSERS_METADATA_KEY: json.dumps(packed, sort_keys=True, default=str)})


def kohya_name(module: str) -> str:
    """peft's module path → kohya's LoRA name, e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``
    → ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``."""
    return "lora_unet_" + module.replace(".", "_")


def write_kohya(source: Source) -> Written:
    """kohya's sd-scripts layout (LoRA / LoCon for conv layers) with ``ss_network_*`` header keys."""
    import torch

    _require(source, "kohya", ("sd",))
    for flag, what in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA scaling")):
        if source.config.get(flag):
            raise UserError(f"the adapter uses {what}, which the kohya format cannot express; export peft")
    if source.config.get("alpha_pattern"):
        raise UserError("the adapter has per-layer alphas (alpha_pattern); the kohya export writes one alpha")
    alpha, out, names = source.alpha, {}, {}
    for key, tensor in source.tensors.items():
        module, sep, rest = key.partition(".lora_")
        if not sep or rest not in ("A.weight", "B.weight"):
            raise UserError(f"tensor {key} is not a LoRA A/B weight; the kohya format holds only those")
        name = kohya_name(module)
        if names.setdefault(name, module) != module:
            raise UserError(f"modules {names[name]} and {module} get the same kohya name {name}")
        out[f"{name}.lora_down.weight" if rest == "A.weight" else f"{name}.lora_up.weight"] = tensor
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    convs = [m for m in names.values() if source.tensors[m + ".lora_A.weight"].dim() == 4]
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(source.rank),
            "ss_network_alpha": f"{alpha:g}"}
    if convs:  # LoCon: sd-scripts records the conv layers' rank and alpha in the network args
        meta["ss_network_args"] = json.dumps({"conv_dim": str(source.rank), "conv_alpha": f"{alpha:g}"})
    return out, meta


#: format → (writer, the tools that read it); ``privlora export --help`` and the registry list the same set
FORMATS: dict[str, tuple[Callable[[Source], Written], str]] = {
    "peft": (write_peft, "peft (PeftModel.from_pretrained, set_peft_model_state_dict), privlora"),
    "diffusers": (write_diffusers, "diffusers (pipe.load_lora_weights)"),
    "kohya": (write_kohya, "AUTOMATIC1111 / Forge, ComfyUI (LoraLoader), kohya sd-scripts, diffusers"),
}


def convert(source: Source, fmt: str) -> bytes:
    """The adapter in ``fmt`` as safetensors bytes, with privlora's provenance keys in the header."""
    from importlib.metadata import version

    from safetensors.torch import save

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    tensors, extra = FORMATS[fmt][0](source)
    meta = {"format": "pt", "privlora_version": version("privlora"), "privlora_export_format": fmt,
            "privlora_base": source.base, "privlora_rank": str(source.rank),
            "privlora_source_sha256": source.sha256, **extra}
    if source.config.get("lora_alpha") is not None:
        meta["privlora_alpha"] = f"{source.alpha:g}"
    return canonical(save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))


def canonical(data: bytes) -> bytes:
    """safetensors bytes with the header's ``__metadata__`` in sorted order, so one adapter exports to the same
    bytes every time (safetensors writes that map in hash order, which changes from process to process); the
    tensor entries and data are kept as they are."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(text)) + text + data[8 + size:]


def export_run(run: str | Path, fmt: str, out: str | Path, *, force: bool = False) -> Path:
    """Write ``run``'s adapter as ``fmt`` to ``out`` (temporary file + rename); an existing ``out`` needs
    ``force``."""
    from privlora.runs import atomic_file

    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'lora.safetensors'}")
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to overwrite it")
    data = convert(source_from_run(run), fmt)
    with atomic_file(out) as tmp:
        tmp.write_bytes(data)
    return out
