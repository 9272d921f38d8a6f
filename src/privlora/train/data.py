"""Load the Task and the training data a config names (images: at the Task's channels, resolution and
captions; text: the labels decide the classifier's head)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from privlora.config import TrainConfig
from privlora.data.demo import BUILTIN, load_builtin
from privlora.data.folder import load_listing
from privlora.data.imageset import ImageSet
from privlora.data.sources import Columns, read_source
from privlora.errors import UserError
from privlora.tasks.diffusion import DiffusionTask


def load_training_data(config: TrainConfig, task: DiffusionTask) -> ImageSet:
    """Built-in demo set or image folder, at the Task's channels and resolution."""
    channels = int(getattr(task, "channels", 3))
    resolution = config.data.resolution or int(task.resolution)  # type: ignore[attr-defined]
    source = config.data.source
    if source in BUILTIN:
        data = load_builtin(source, resolution)
        if data.pixels.shape[1] != channels:
            data = ImageSet(ids=data.ids, pixels=data.pixels.expand(-1, channels, -1, -1).contiguous(),
                            captions=data.captions)
        return _limited(data, config.data.limit)
    listing = read_source(source, "image", data_columns(config))
    data, report = load_listing(listing, source, channels=channels, resolution=resolution,
                                center_crop=config.data.center_crop, default_caption=config.prompt)
    if task.needs_captions and report.uncaptioned:
        raise UserError(f"{len(report.uncaptioned)} images in {source} have no caption (e.g. "
                        f"{report.uncaptioned[0]}): add metadata.jsonl/.csv, .caption or .txt sidecars, "
                        "name the caption column (--caption-column), or pass --prompt")
    if config.mode == "dp" and data.repeats is not None:
        # DP-SGD counts each sample as one person: N copies of one image would understate ε N-fold
        repeated = next(i for i, r in zip(data.ids, data.repeats, strict=True) if r > 1)
        raise UserError(f"{source} has kohya repeat folders (e.g. {repeated.split('/')[0]}/); under mode dp "
                        "every copy would count as another person and ε would be understated. Move the "
                        "images out of the N_name folders (or rename them 1_name) for a DP run")
    if report.skipped:
        import warnings

        warnings.warn(f"{len(report.skipped)} files in {source} were skipped (corrupt or not images)",
                      stacklevel=2)
    return _limited(data, config.data.limit)


def data_columns(config: TrainConfig) -> Columns:
    """The ``data.*_column`` options as the source readers take them."""
    d = config.data
    return Columns(image=d.image_column, caption=d.caption_column, text=d.text_column, label=d.label_column)


def _limited(data: ImageSet, limit: int | None) -> ImageSet:
    """A fixed random sample of ``limit`` images (file order kept). The draw does not depend on the run's
    seed: reference adapters train under other seeds and must see the same population as the target."""
    if limit is None or limit >= len(data):
        return data
    import torch

    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:limit].sort().values
    return data.subset(keep.tolist())


def _image_task_and_data(config: TrainConfig, spec: Any) -> tuple[Any, Any]:
    from privlora.tasks.loading import load_task

    task = load_task(config.base, spec, seed=config.seed, trust_pickle=config.trust_pickle, device=config.device)
    return task, load_training_data(config, task)


def _text_task_and_data(config: TrainConfig, spec: Any) -> tuple[Any, Any]:
    from privlora.data.text import load_text_dataset
    from privlora.tasks.text import TextClassificationTask, TextLora

    if config.device != "cpu":
        raise UserError("the text task runs on the CPU only for now (device: cpu)")
    data = load_text_dataset(config.data.source, limit=config.data.limit, columns=data_columns(config))
    base = None if config.base == "minilm" else Path(config.base)
    if base is not None and not (base / "config.json").is_file():
        raise UserError(f"text base {config.base!r} is neither 'minilm' nor a BERT model folder with config.json")
    lora = TextLora(rank=spec.rank, alpha=spec.alpha, targets=tuple(spec.targets)) if spec is not None else None
    try:
        task = TextClassificationTask(len(data.classes), lora=lora, seed=config.seed, base=base)
    except ValueError as e:  # peft: targets that match no layer
        raise UserError(f"LoRA targets {list(spec.targets) if spec else []} do not fit the text base: {e}") from None
    return task, data


def _causal_lm_task_and_data(config: TrainConfig, spec: Any) -> tuple[Any, Any]:
    from privlora.data.instructions import load_instruction_dataset
    from privlora.tasks.causal_lm import CausalLMTask

    if config.mode in ("mp", "smp") and config.mp.attacker != "paper":
        raise UserError("the causal-lm task's proxy attacker reads its per-token loss statistics "
                        "(mp.attacker: paper); the calibrated view is for diffusion runs")
    data = load_instruction_dataset(config.data.source, limit=config.data.limit)
    return CausalLMTask(config.base, lora=spec, seed=config.seed, device=config.device,
                        max_length=config.data.max_tokens), data


#: config.task → loader of (Task, dataset)
TASK_LOADERS = {"image": _image_task_and_data, "text": _text_task_and_data, "causal-lm": _causal_lm_task_and_data}


def load_task_and_data(config: TrainConfig, spec: Any) -> tuple[Any, Any]:
    """The Task (LoRA attached per ``spec``) and the whole dataset, for ``config.task``."""
    return TASK_LOADERS[config.task](config, spec)
