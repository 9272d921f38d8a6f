"""The run directory (DESIGN.md): atomic writes so a failed or interrupted command leaves no half output."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it replaces ``final`` in one rename.

    Readers see the old file or the new one, never half of it; a failure removes the temporary.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(final)


def rename_dir(src: Path, dst: Path) -> None:
    """Rename the directory ``src`` to ``dst`` (which must not exist) in one step where the file system can.

    Gramine's encrypted mounts (``privlora tee``: the run folder inside an SGX enclave) rename only regular
    files and answer ENOSYS for a directory; there the files move one by one (each rename re-binds the
    encrypted file to its new path) and ``src`` is removed. That fallback is not atomic: an interruption
    leaves part of the run in ``dst`` and the rest in ``src``.
    """
    try:
        os.rename(src, dst)
        return
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
    os.mkdir(dst)
    for root, dirs, files in os.walk(src):
        target = Path(dst) / Path(root).relative_to(src)
        for name in dirs:
            os.mkdir(target / name)
        for name in files:
            os.rename(Path(root) / name, target / name)
    for root, dirs, _ in os.walk(src, topdown=False):
        for name in dirs:
            os.rmdir(Path(root) / name)
    os.rmdir(src)


def require_run_dir(run: str | Path, *, adapter_file: str, purpose: str) -> Path:
    """``run`` as a run directory written by ``privlora train`` (config.yaml and ``adapter/adapter_file``), or
    a UserError saying which part is missing; ``purpose`` ends the message ("to audit", "to unlearn from")."""
    from privlora.errors import UserError

    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist")
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run directory (no config.yaml)")
    if not (run / "adapter" / adapter_file).is_file():
        raise UserError(f"{run} has no adapter/ {purpose} (missing {adapter_file})")
    return run


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
