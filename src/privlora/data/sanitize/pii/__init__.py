"""PII in text datasets: Presidio (offline, spaCy NER) plus our own recognizers, and operators that replace it.

:class:`PiiScrubber` finds and replaces PII in strings; :func:`sanitize_table` applies it to one CSV, TSV,
JSONL or plain-text file and returns its :class:`~privlora.data.sanitize.report.FileReport`.

Importing this package is cheap: Presidio and spaCy (seconds to import) load on first use of
:class:`PiiScrubber`, :data:`ENTITIES`, :func:`supported_entities` or :data:`RECOGNIZERS`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from privlora.data.sanitize.pii.operators import OPERATORS
from privlora.data.sanitize.pii.tables import TABLE_SUFFIXES, sanitize_table

if TYPE_CHECKING:
    from privlora.data.sanitize.pii.engine import ENTITIES, PiiScrubber, supported_entities
    from privlora.data.sanitize.pii.recognizers import RECOGNIZERS

_LAZY = {"ENTITIES": "engine", "PiiScrubber": "engine", "supported_entities": "engine", "RECOGNIZERS": "recognizers"}

__all__ = ["ENTITIES", "OPERATORS", "RECOGNIZERS", "TABLE_SUFFIXES", "PiiScrubber", "sanitize_table",
           "supported_entities"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
