"""A rich progress bar for long work; silent when not on a TTY or when asked to be quiet."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Bar:
    def __init__(self, progress: Progress | None, task_id: Any) -> None:
        self._progress, self._task_id = progress, task_id

    def advance(self, n: int = 1, **fields: float) -> None:
        """Move on ``n`` steps and show ``fields`` (e.g. ``loss=0.12``) beside the bar."""
        if self._progress is None:
            return
        shown = "  ".join(f"{k} {v:.4g}" for k, v in fields.items())
        self._progress.update(self._task_id, advance=n, fields=shown)


@contextmanager
def progress_bar(description: str, *, total: int, quiet: bool = False, completed: int = 0) -> Iterator[_Bar]:
    """Context manager yielding a bar with ``advance(n, **fields)``."""
    if quiet or not sys.stderr.isatty():
        yield _Bar(None, None)
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[fields]}"))
    with Progress(*columns, transient=False) as progress:
        task_id = progress.add_task(description, total=total, completed=completed, fields="")
        yield _Bar(progress, task_id)
