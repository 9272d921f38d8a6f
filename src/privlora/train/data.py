"""Load the training data a config names, shaped for the Task (channels, resolution, captions)."""

from __future__ import annotations

from pathlib import Path

from privlora.config import TrainConfig
from privlora.data.demo import BUILTIN, load_builtin
from privlora.data.folder import load_folder
from privlora.data.imageset import ImageSet
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
        return data
    data, report = load_folder(Path(source), channels=channels, resolution=resolution,
                               center_crop=config.data.center_crop, default_caption=config.prompt)
    if task.needs_captions and report.uncaptioned:
        raise UserError(f"{len(report.uncaptioned)} images in {source} have no caption (e.g. "
                        f"{report.uncaptioned[0]}): add metadata.jsonl or .txt sidecars, or pass --prompt")
    if report.skipped:
        import warnings

        warnings.warn(f"{len(report.skipped)} files in {source} were skipped (corrupt or not images)",
                      stacklevel=2)
    return data
