"""Images in parallel: one process per core, each with its own models and one thread.

The detectors are small networks whose single-image inference does not keep two cores busy (measured:
two single-threaded processes sanitize 1.4× as many images per second as one two-threaded process),
so images are spread over processes. ``spawn`` rather than ``fork``: onnxruntime's and OpenCV's thread
pools do not survive a fork. A worker that crashes fails the whole run (nothing is written). Small jobs
stay in-process, where starting workers would cost more than
it saves.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from privlora.data.sanitize.dedup import Signature
from privlora.data.sanitize.images import ImageOptions, ImageSanitizer
from privlora.data.sanitize.report import SKIPPED, FileReport, SkipFile

Job = tuple[Path, "Path | None", str]  # source, destination (None: dry run), path relative to the input
#: below this many images per worker the pool's start-up (imports + model loads, ~2 s) is not worth it
MIN_PER_WORKER = 8

_sanitizer: ImageSanitizer | None = None


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def _start(options: ImageOptions) -> None:
    global _sanitizer
    import cv2

    cv2.setNumThreads(1)
    _sanitizer = ImageSanitizer(options, threads=1)


def _one(job: Job, sanitizer: ImageSanitizer | None = None) -> tuple[FileReport, Signature | None]:
    src, dst, rel = job
    sanitizer = sanitizer or _sanitizer
    assert sanitizer is not None
    try:
        return sanitizer(src, dst, rel)
    except SkipFile as e:
        if dst is not None:
            dst.unlink(missing_ok=True)
        return FileReport(rel, "image", SKIPPED, reason=str(e)), None


def sanitize_images(jobs: Sequence[Job], sanitizer: ImageSanitizer,
                    workers: int) -> Iterator[tuple[FileReport, Signature | None]]:
    """Each job's report and pHash (None if skipped), in job order."""
    if workers <= 1 or len(jobs) < MIN_PER_WORKER * workers:
        for job in jobs:
            yield _one(job, sanitizer)
        return
    # an executor, not multiprocessing.Pool: a worker that dies (or cannot start) raises BrokenProcessPool
    # here instead of being respawned forever
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
                             initargs=(sanitizer.options,)) as pool:
        yield from pool.map(_one, jobs, chunksize=2)
