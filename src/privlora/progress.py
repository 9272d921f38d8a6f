"""Progress of long work: a rich bar on a terminal, plain periodic lines otherwise, nothing when quiet.

Why plain lines: under nohup, Slurm, CI or ``| tee`` a redrawn bar is either invisible or garbage, and a job
that prints nothing for minutes looks hung. Off a terminal a line ``train plain: 40/100 (40%) 0:01:02 loss
0.0612`` goes to stdout every tenth of the work or every 30 seconds, whichever comes first, and at the end.
"""

from __future__ import annotations

import sys
import time
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


#: off a terminal: a line at least every this many seconds, and at every this fraction of the total
LINE_SECONDS = 30.0
LINE_FRACTION = 0.1


class _Lines(_Bar):
    """The bar as plain lines on stdout (not a terminal): every ``LINE_FRACTION`` of the total or
    ``LINE_SECONDS``, whichever comes first, and the last step."""

    def __init__(self, description: str, total: int, completed: int) -> None:
        super().__init__(None, None)
        self.description, self.total, self.done = description, total, completed
        self.started = self.printed_at = time.monotonic()
        self.next_share = self._share(completed) + 1

    def _share(self, done: int) -> int:
        """How many whole tenths of the total ``done`` is."""
        return int(done / self.total / LINE_FRACTION + 1e-9) if self.total > 0 else 0

    def advance(self, n: int = 1, **fields: float) -> None:
        self.done += n
        now = time.monotonic()
        share = self._share(self.done)
        if share < self.next_share and now - self.printed_at < LINE_SECONDS and self.done != self.total:
            return
        self.next_share, self.printed_at = share + 1, now
        elapsed = time.strftime("%H:%M:%S", time.gmtime(now - self.started))
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total > 0 else ""
        shown = "".join(f"  {k} {v:.4g}" for k, v in fields.items() if v is not None)
        print(f"{self.description}: {self.done}/{self.total}{percent} {elapsed}{shown}", flush=True)


@contextmanager
def progress_bar(description: str, *, total: int, quiet: bool = False, completed: int = 0) -> Iterator[_Bar]:
    """Context manager yielding a bar with ``advance(n, **fields)``: rich's on a terminal, plain lines
    on stdout when it is not one (a file, a pipe, a batch job's log), nothing when ``quiet``."""
    if quiet:
        yield _Bar(None, None)
        return
    if not sys.stdout.isatty():
        yield _Lines(description, total, completed)
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[fields]}"))
    with Progress(*columns, transient=False) as progress:
        task_id = progress.add_task(description, total=total, completed=completed, fields="")
        yield _Bar(progress, task_id)
