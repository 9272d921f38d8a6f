"""Secret-sharer canaries planted in a causal-lm run's members (``canaries:`` in the config).

The canaries themselves (secrets, format, exposure) are :mod:`privlora.audit.lm_canaries`'; this module only
turns the config section into training records and records what was planted in ``<run>/canaries.json``, so
``privlora audit`` can measure exposure later. Why members only: a canary is a known training record whose
memorisation is measured; it must never be an evaluation or aux non-member, and the never-inserted controls
are never records at all. Each copy is one record: under DP-SGD ε counts each copy as a separate sample, so a
secret inserted k times is protected only at group privacy k — what the secret-sharer test measures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from privlora.errors import UserError
from privlora.runs import write_json_atomic

CANARIES_JSON = "canaries.json"
ID_PREFIX = "canary:"


def canary_format(options: Any) -> Any:
    from privlora.audit.lm_canaries import SecretFormat

    return SecretFormat(prefix=options.prefix, alphabet=options.alphabet, length=options.length)


def planted(config: Any) -> list[Any]:
    """The run's canaries (inserted ones and controls), the same for the same config; [] when none."""
    from privlora.audit.lm_canaries import make_canaries

    options = config.canaries
    if not options.insertions:
        return []
    seed = config.seed if options.seed is None else options.seed
    return make_canaries(seed=seed, insertions=options.insertions, per_count=options.per_count,
                         controls=options.controls, fmt=canary_format(options))


def with_canaries(config: Any, members: Any) -> Any:
    """``members`` plus every inserted canary's copies (InstructionSet records; controls never join)."""
    canaries = [c for c in planted(config) if c.insertions]
    if not canaries:
        return members
    from privlora.data.instructions import InstructionSet

    prompt = (("user", config.canaries.prefix),)
    ids = [f"{ID_PREFIX}{j}:{copy}" for j, c in enumerate(canaries) for copy in range(c.insertions)]
    responses = [c.secret for c in canaries for _ in range(c.insertions)]
    extra = InstructionSet(ids, [prompt] * len(ids), responses, [{} for _ in ids] if members.pii else [])
    return members.concat(extra)


def write_canaries(config: Any, run: Path) -> None:
    """``<run>/canaries.json``: format, seed, every secret and its insertion count (nothing when no canaries).
    The secrets are the planted test data, not user data: storing them is what makes exposure measurable."""
    canaries = planted(config)
    if not canaries:
        return
    o = config.canaries
    write_json_atomic(run / CANARIES_JSON, {
        "format": {"prefix": o.prefix, "alphabet": o.alphabet, "length": o.length,
                   "space": len(o.alphabet) ** o.length},
        "seed": config.seed if o.seed is None else o.seed,
        "canaries": [{"secret": c.secret, "insertions": c.insertions} for c in canaries],
        "records_added": sum(c.insertions for c in canaries),
        "note": "each inserted copy is one member record; under mode dp epsilon counts each copy as a separate "
                "sample, so a secret inserted k times is protected at group privacy k"})


def read_canaries(run: Path) -> tuple[list[Any], Any] | None:
    """The canaries and their format from ``<run>/canaries.json``, or None when the run planted none."""
    from privlora.audit.lm_canaries import Canary, SecretFormat

    path = Path(run) / CANARIES_JSON
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        f = manifest["format"]
        fmt = SecretFormat(prefix=f["prefix"], alphabet=f["alphabet"], length=int(f["length"]))
        canaries = [Canary(secret=str(c["secret"]), insertions=int(c["insertions"])) for c in manifest["canaries"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is broken ({type(e).__name__}: {e}); retrain or delete it") from None
    return canaries, fmt
