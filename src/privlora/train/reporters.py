"""``--report-to``: mirror a run's metrics where people look — TensorBoard or MLflow — beside metrics.jsonl.

``metrics.jsonl`` stays the source of truth and is always written; a reporter only copies what goes into it
(every numeric key of every row: loss, lr, ε, the proxy attacker's and the privacy stop's figures) and the
validation grids. Why a copy and not a replacement: the audit, the tests and ``--resume`` read the JSONL
file, and a viewer's store must not be able to change a run's results.

Both stores live inside the run directory (``<run>/tensorboard/``, ``<run>/mlruns/``), so they travel with it:
they are written into ``<out>.partial`` and renamed with the rest. A resumed run appends to them;
TensorBoard is told the step it resumes from (``purge_step``), so the steps an interrupted process logged
after its last checkpoint are dropped there as they are from metrics.jsonl. Only rank 0 reports.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from privlora.errors import UserError

#: where each store writes inside the run directory
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
MLFLOW_EXPERIMENT = "privlora"


class Reporter(Protocol):
    """A metric sink: scalars by step, images by step, closed once (before the run directory is renamed)."""

    def log(self, step: int, scalars: Mapping[str, Any]) -> None: ...

    def image(self, step: int, name: str, image: Path | np.ndarray) -> None: ...

    def close(self) -> None: ...


def scalars_of(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics row (booleans as 0/1; None, strings and lists are not scalars)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "step" or value is None or isinstance(value, str | list | dict):
            continue
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _pixels(image: Path | np.ndarray) -> np.ndarray:
    """``H×W×3`` uint8 from a PNG path or an array (float arrays are taken as 0..1)."""
    if isinstance(image, str | Path):
        from PIL import Image

        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return array if array.ndim == 3 else np.repeat(array[..., None], 3, axis=2)


class NoReporter:
    """``--report-to none``: metrics.jsonl only."""

    def log(self, step: int, scalars: Mapping[str, Any]) -> None:
        pass

    def image(self, step: int, name: str, image: Path | np.ndarray) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardReporter:
    """Event files in ``<run>/tensorboard/`` via torch's SummaryWriter (``tensorboard --logdir <run>``)."""

    def __init__(self, run: Path, out: Path, resumed_at: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides what an earlier event file logged after the checkpoint's step (as
        # metrics.jsonl is truncated to it): the steps an interrupted process ran past its last checkpoint
        purge = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(log_dir=str(Path(run) / TENSORBOARD_DIR), purge_step=purge)

    def log(self, step: int, scalars: Mapping[str, Any]) -> None:
        for key, value in scalars_of(scalars).items():
            self.writer.add_scalar(key, value, global_step=step)

    def image(self, step: int, name: str, image: Path | np.ndarray) -> None:
        self.writer.add_image(name, _pixels(image), global_step=step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class MlflowReporter:
    """An MLflow run in the local file store ``<run>/mlruns`` (``mlflow ui --backend-store-uri <run>/mlruns``).

    MLflow records artifact locations as absolute paths; the run directory is renamed from ``<out>.partial``
    to ``<out>`` at the end, so ``close`` points them at ``<out>`` and a resume points them back first."""

    def __init__(self, run: Path, out: Path, resumed_at: int | None) -> None:
        import os

        # MLflow ≥ 3.7 refuses the file store unless asked for it ("maintenance mode"); it is the one that
        # lives inside the run directory with no database or server, which is why it is used here
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.root, self.partial, self.out = Path(run) / MLFLOW_DIR, Path(run).resolve(), Path(out).resolve()
        _repoint(self.root, self.out, self.partial)
        self.client = MlflowClient(tracking_uri=self.root.resolve().as_uri())
        found = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        experiment = found.experiment_id if found else self.client.create_experiment(MLFLOW_EXPERIMENT)
        runs = self.client.search_runs([experiment], max_results=1) if resumed_at is not None else []
        self.run_id = runs[0].info.run_id if runs else self.client.create_run(
            experiment, run_name=self.out.name).info.run_id

    def log(self, step: int, scalars: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = _millis()
        metrics = [Metric(key, value, now, step) for key, value in scalars_of(scalars).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def image(self, step: int, name: str, image: Path | np.ndarray) -> None:
        self.client.log_image(self.run_id, _pixels(image), artifact_file=f"{name}/step-{step}.png")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
        _repoint(self.root, self.partial, self.out)


def _millis() -> int:
    import time

    return int(time.time() * 1000)


def _repoint(root: Path, old: Path, new: Path) -> None:
    """Rewrite MLflow's recorded artifact locations from ``old`` to ``new`` (meta.yaml files under root)."""
    if not root.is_dir():
        return
    before, after = old.as_uri(), new.as_uri()
    for meta in root.rglob("meta.yaml"):
        text = meta.read_text()
        if before in text:
            meta.write_text(text.replace(before, after))


#: --report-to name → (the module it needs, what to install when it is missing, the reporter)
REPORTERS: dict[str, tuple[str | None, str, Callable[[Path, Path, int | None], Reporter]]] = {
    "none": (None, "", lambda run, out, resumed_at: NoReporter()),
    "tensorboard": ("tensorboard", "pip install tensorboard", TensorBoardReporter),
    "mlflow": ("mlflow", "pip install 'privlora[mlflow]'", MlflowReporter),
}


def check_reporter(name: str) -> None:
    """Refuse an unknown reporter or one whose package is not installed, before any work."""
    import importlib.util

    if name not in REPORTERS:
        raise UserError(f"unknown --report-to {name!r}; choose one of {', '.join(REPORTERS)}")
    module, install, _ = REPORTERS[name]
    if module is not None and importlib.util.find_spec(module) is None:
        raise UserError(f"--report-to {name} needs the {module} package, which is not installed: {install}")


def open_reporter(name: str, run: Path, out: Path, *, resumed_at: int | None = None,
                  writes: bool = True) -> Reporter:
    """The reporter ``name`` writing into the run directory ``run`` (to be renamed ``out``); a no-op one on
    ranks other than 0."""
    check_reporter(name)
    if not writes:
        return NoReporter()
    return REPORTERS[name][2](Path(run), Path(out), resumed_at)


class MetricsLog:
    """metrics.jsonl as a file: every complete line written is also passed to the reporter.

    Whoever writes a row (the loop, the privacy stop) writes it here once; the reporter sees exactly the rows
    the file holds."""

    def __init__(self, file: IO[str], reporter: Reporter) -> None:
        self.file, self.reporter, self._pending = file, reporter, ""

    def write(self, text: str) -> int:
        written = self.file.write(text)
        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                continue
            self.reporter.log(step, row)
        return written

    def flush(self) -> None:
        self.file.flush()
