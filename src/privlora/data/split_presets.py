"""Named member / aux / eval splits (``data.split``): how much of the user's data an adapter trains on.

Why presets: the three fractions decide what share of a user's own folder the adapter learns from, and a
silent audit-heavy default trained on a third of it. ``train`` (the default) trains on 80 % and keeps 10 %
for MP/SMP's proxy attacker and 10 % for the audit; ``audit`` is the split the demo and the benchmark
tables were measured with (32 / 32 / 36 %: enough non-members for an audit with narrow intervals).
Fractions given explicitly (``data.members`` …) override the preset's, one by one.

Torch-free and pydantic-free: config.py applies it before validation, when only the CLI is loaded.
"""

from __future__ import annotations

from typing import Any

from privlora.config_yaml import quote
from privlora.errors import UserError

FRACTIONS = ("members", "aux", "eval")
#: preset → fraction of the data for each part (cli/choices.SPLITS lists the names, checked by a test)
SPLIT_PRESETS: dict[str, dict[str, float]] = {
    "train": {"members": 0.8, "aux": 0.1, "eval": 0.1},
    "audit": {"members": 0.32, "aux": 0.32, "eval": 0.36},
}
DEFAULT_SPLIT = "train"


def describe_presets() -> str:
    """``train (80/10/10 % members/aux/eval), audit (32/32/36 %)`` — for errors and --help."""
    parts = ["/".join(f"{round(100 * p[k]):g}" for k in FRACTIONS) for p in SPLIT_PRESETS.values()]
    named = [f"{name} ({part} %)" for name, part in zip(SPLIT_PRESETS, parts, strict=True)]
    return f"{named[0][:-1]} members/aux/eval), " + ", ".join(named[1:])


def with_preset(values: dict[str, Any]) -> dict[str, Any]:
    """The ``data`` section with the named preset's fractions filled in under any given explicitly."""
    name = values.get("split", DEFAULT_SPLIT)
    if not isinstance(name, str) or name not in SPLIT_PRESETS:
        raise UserError(f"unknown data.split {quote(name)}: the presets are {describe_presets()}; "
                        "or give data.members, data.aux and data.eval")
    return {**SPLIT_PRESETS[name], **{k: v for k, v in values.items() if v is not None or k not in FRACTIONS}}


def split_label(split: str, fractions: dict[str, float]) -> str:
    """``data.split audit``, or what overrode it: how the start-of-training line names where its counts came from."""
    preset = SPLIT_PRESETS.get(split, {})
    given = [f"{k} {fractions[k]:g}" for k in FRACTIONS if abs(fractions[k] - preset.get(k, -1.0)) > 1e-12]
    return f"data.split {split}" + (f", explicit {', '.join(given)}" if given else "")
