"""What an audit was run on and with: the adapter's bytes (sha256), privlora's version, command line, date.

Why: an auditor acting on a report must be able to tell that the numbers belong to the adapter in front of
them (same sha256), which code produced them and when — results.json records it at audit time, the report
re-hashes the adapter and says when the file no longer matches.
"""

from __future__ import annotations

import datetime
import hashlib
import sys
from pathlib import Path
from typing import Any

ADAPTER_WEIGHTS = Path("adapter") / "adapter_model.safetensors"  # relative to the run directory


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (adapters can be large)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def adapter_sha256(run: Path) -> str | None:
    """sha256 of the run's adapter weights, None when the run has none (e.g. a full-model head)."""
    weights = Path(run) / ADAPTER_WEIGHTS
    return sha256_file(weights) if weights.is_file() else None


def privlora_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("privlora")
    except PackageNotFoundError:  # running from a source tree that was never installed
        from privlora import __version__

        return __version__


def provenance(run: Path) -> dict[str, Any]:
    """The block audit_run stores in results.json under ``provenance``."""
    return {"privlora": privlora_version(), "adapter_sha256": adapter_sha256(run), "argv": list(sys.argv),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
