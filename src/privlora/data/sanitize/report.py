"""What sanitizing found and did, per file: the contract every detector and the report share.

A :class:`Finding` never holds the sensitive value itself (no PII, no recognised text) unless the user
asked for it with ``--keep-text``: the report is meant to be shown to an auditor, so it must not become
the leak.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: statuses a file can end in
CLEANED, CLEAN, SKIPPED, DUPLICATE = "cleaned", "clean", "skipped", "duplicate"


class SkipFile(Exception):
    """This one file cannot be sanitized (corrupt, truncated, too large, not parseable): report it, go on."""


@dataclass
class Finding:
    """One thing found in one file.

    ``kind`` is the family (``face``, ``text``, ``metadata``, ``pii``, ``duplicate``), ``label`` the
    specific type (``PERSON``, ``GPSInfo``, ``frontal``), ``detector`` which detector found it,
    ``where`` the location (``{"box": [x0, y0, x1, y1]}``, ``{"row": 3, "column": "note", "start": 5,
    "end": 17}``, ``{"field": "EXIF"}``), ``action`` what was done (``fill``, ``pixelate``, ``blur``,
    ``stripped``, ``replace``, ``mask``, ``hash``, ``dropped``, ``reported``).
    """

    kind: str
    label: str
    detector: str
    where: dict[str, Any]
    action: str
    score: float | None = None
    text: str | None = None  # only with --keep-text

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if data["text"] is None:
            del data["text"]
        if data["score"] is not None:
            data["score"] = round(float(data["score"]), 4)
        return data


@dataclass
class FileReport:
    """One input file: its path relative to the input folder, what became of it and why."""

    path: str
    kind: str  # image | text | other
    status: str = CLEAN
    findings: list[Finding] = field(default_factory=list)
    reason: str | None = None  # why skipped, or which file this one duplicates
    read_back: dict[str, Any] | None = None  # images only, when the read-back ran (readback.ReadBack.to_json)
    #: what the read-back cost on this file; summed into the run's report, not written per file (the
    #: same input must give the same per-file report, whatever the machine's load)
    read_back_seconds: float = 0.0

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)
        if self.status == CLEAN:
            self.status = CLEANED

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"path": self.path, "kind": self.kind, "status": self.status}
        if self.reason is not None:
            data["reason"] = self.reason
        data["findings"] = [f.to_json() for f in self.findings]
        if self.read_back is not None:
            data["read_back"] = self.read_back
        return data
