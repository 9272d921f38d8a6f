"""Resolve ``--base`` to a Task: the embedded UNet, a diffusers UNet2DModel folder, or an SD pipeline.

Weights load from safetensors only. A pickle checkpoint (``.bin``, ``.ckpt``, ``.pt``, ``.pth``,
``.pkl``) can run code when unpickled, so it is refused unless ``trust_pickle`` is set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from privlora.errors import UserError
from privlora.tasks.diffusion import DiffusionTask
from privlora.tasks.embedded import EMBEDDED, load_embedded
from privlora.tasks.lora import LoraSpec

PICKLE_SUFFIXES = {".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"}


#: pipeline components privlora never loads (``safety_checker=None``), so their weights do not matter
_UNUSED_COMPONENTS = {"safety_checker", "feature_extractor", "image_encoder"}


def _loaded_weight_dirs(folder: Path) -> list[Path]:
    """Where loading ``folder`` reads weights: a pipeline's component folders, or a model folder itself.

    Files beside ``model_index.json`` (e.g. a single-file ``.ckpt`` shipped with the repo) and the
    components privlora skips are never loaded, so they must not decide the pickle question.
    """
    index = folder / "model_index.json"
    if not index.exists():
        return [folder]
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{index} is not valid JSON ({e}); is this a diffusers pipeline folder?") from None
    if not isinstance(entries, dict):
        raise UserError(f"{index} is not a diffusers model index (expected a JSON object)")
    return [folder / name for name, value in entries.items()
            if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None
            and name not in _UNUSED_COMPONENTS and (folder / name).is_dir()]


def _refuse_pickle(folder: Path, trust_pickle: bool) -> bool:
    """True if some weights that loading ``folder`` reads exist only as pickle (allowed only when trusted).

    Checked per component folder (``unet/``, ``text_encoder/``, …): a pipeline whose UNet is safetensors
    but whose text encoder is only ``pytorch_model.bin`` still needs pickle to load.
    """
    weights: dict[Path, set[str]] = {}
    for root in _loaded_weight_dirs(folder):
        for p in root.rglob("*"):
            if p.is_file() and (p.suffix in PICKLE_SUFFIXES or p.suffix == ".safetensors"):
                weights.setdefault(p.parent, set()).add("safe" if p.suffix == ".safetensors" else "pickle")
    pickle_only = sorted(d for d, kinds in weights.items() if kinds == {"pickle"})
    if pickle_only:
        if not trust_pickle:
            where = ", ".join(d.relative_to(folder).as_posix() or "." for d in pickle_only)
            raise UserError(f"{folder} holds only pickle weights (in {where}), which can execute code "
                            "when loaded; convert them to safetensors or pass --trust-pickle if you trust "
                            "the source")
        return True
    return False


def load_task(base: str, lora: LoraSpec | None, *, seed: int = 0, trust_pickle: bool = False,
              device: str = "cpu") -> DiffusionTask:
    """Build the Task for ``base`` with LoRA ``lora`` attached (``None``: full fine-tuning)."""
    task: DiffusionTask
    if base == EMBEDDED:
        from privlora.tasks.unet import UNetTask

        unet, scheduler, _ = load_embedded()
        task = UNetTask(unet, scheduler, lora, base_name=EMBEDDED, seed=seed)
        return _to_device(task, device)
    path = Path(base)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES and not trust_pickle:
            raise UserError(f"{path} is a pickle checkpoint, which can execute code when loaded; "
                            "use safetensors weights or pass --trust-pickle if you trust the source")
        raise UserError(f"--base must be a diffusers model folder or model id, not the file {path}")
    use_safetensors: bool | None = True
    if path.is_dir():
        # trusted pickle: None lets diffusers take safetensors where a component has them, pickle elsewhere
        use_safetensors = None if _refuse_pickle(path, trust_pickle) else True
        if (path / "model_index.json").exists():
            task = _load_sd(base, lora, seed=seed, use_safetensors=use_safetensors)
        elif (path / "config.json").exists():
            task = _load_unet2d(base, lora, seed=seed, use_safetensors=use_safetensors)
        else:
            raise UserError(f"{path} is neither a diffusers pipeline (model_index.json) "
                            "nor a UNet folder (config.json)")
    elif "/" in base and not base.startswith((".", "/")):
        # hub id (from the local cache when offline): pickle-only repos load only when trusted
        task = _load_sd(base, lora, seed=seed, use_safetensors=None if trust_pickle else True)
    else:
        raise UserError(f"base model {base!r} not found: give 'embedded', a diffusers folder or a model id")
    return _to_device(task, device)


@contextmanager
def _quiet_hf() -> Iterator[None]:
    """Silence diffusers/transformers/huggingface_hub loading bars and logs while a base loads, so a user
    error stays one line on stderr. diffusers logs a failed component fetch at ERROR before raising (and
    before falling back to trusted pickle weights); the exception is what privlora reports. The hub's
    "offline: using the cached commit" warning is noise under HF_HUB_OFFLINE. Restores the settings after.
    """
    import logging

    from diffusers.utils import logging as d_log
    from huggingface_hub.utils import logging as h_log
    from transformers.utils import logging as t_log

    levels = d_log.get_verbosity(), t_log.get_verbosity(), h_log.get_verbosity()
    bars = d_log.is_progress_bar_enabled(), t_log.is_progress_bar_enabled()
    d_log.set_verbosity(logging.CRITICAL)
    t_log.set_verbosity_error()
    h_log.set_verbosity_error()
    d_log.disable_progress_bar()
    t_log.disable_progress_bar()
    try:
        yield
    finally:
        d_log.set_verbosity(levels[0])
        t_log.set_verbosity(levels[1])
        h_log.set_verbosity(levels[2])
        if bars[0]:
            d_log.enable_progress_bar()
        if bars[1]:
            t_log.enable_progress_bar()


def _load_sd(base: str, lora: LoraSpec | None, *, seed: int, use_safetensors: bool | None) -> DiffusionTask:
    with _quiet_hf():
        from diffusers import StableDiffusionPipeline

        from privlora.tasks.sd import StableDiffusionTask
        from privlora.tasks.sdxl import StableDiffusionXLTask, is_sdxl

        sdxl = is_sdxl(base)  # two text encoders and added conditioning: its own pipeline class and Task
        try:
            if sdxl:
                from diffusers import StableDiffusionXLPipeline

                pipe = StableDiffusionXLPipeline.from_pretrained(base, use_safetensors=use_safetensors,
                                                                 add_watermarker=False)
            else:
                pipe = StableDiffusionPipeline.from_pretrained(base, use_safetensors=use_safetensors,
                                                               safety_checker=None, requires_safety_checker=False)
        except (OSError, ValueError) as e:
            hint = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            pickle = ""
            if use_safetensors and "safetensors" in first:
                pickle = ("; if it ships only pickle weights, which can execute code when loaded, pass "
                          "--trust-pickle if you trust the source")
            raise UserError(f"cannot load Stable Diffusion pipeline {base!r}{hint}: "
                            f"{first}{pickle}") from None
    pipe.set_progress_bar_config(disable=True)
    task_class = StableDiffusionXLTask if sdxl else StableDiffusionTask
    return task_class(pipe, lora, base_name=base, seed=seed)


def _load_unet2d(base: str, lora: LoraSpec | None, *, seed: int,
                 use_safetensors: bool | None) -> DiffusionTask:
    from diffusers import DDPMScheduler, UNet2DModel

    from privlora.tasks.unet import UNetTask

    try:
        unet = UNet2DModel.from_pretrained(base, use_safetensors=use_safetensors)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load UNet from {base!r}: {str(e).splitlines()[0]}") from None
    sched_dir = Path(base) / "scheduler_config.json"
    scheduler = DDPMScheduler.from_pretrained(base) if sched_dir.exists() else DDPMScheduler()
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction != "epsilon":  # UNetTask trains and samples ε; a v/x0 model would be silently ruined
        raise UserError(f"{base}: the UNet predicts {prediction!r} (scheduler_config.json), but privlora "
                        "trains ε-prediction UNet2DModel bases; use an ε model or an SD pipeline")
    return UNetTask(unet, scheduler, lora, base_name=base, seed=seed)


def _to_device(task: DiffusionTask, device: str) -> DiffusionTask:
    if device != "cpu":
        import torch

        try:
            target = torch.device(device)
            if target.type == "cuda" and not torch.cuda.is_available():
                raise UserError("--device cuda requested but no CUDA GPU is available")
        except RuntimeError as e:
            raise UserError(f"unknown device {device!r}: {e}") from None
        holder = getattr(task, "pipe", None) or task.model
        holder.to(target)
    return task
