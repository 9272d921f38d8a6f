"""Which training samples to forget: ids from a file, a comma-separated list, or a seeded random fraction.

Every id must be a member of the source run (``splits.json`` → ``members``): forgetting a sample the
adapter never trained on is a user mistake that would make the verification meaningless (its "forget"
AUC would measure non-members against non-members), so it is refused rather than ignored.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from privlora.errors import UserError

#: below this many forgotten samples the membership AUC moves in steps of ≥ 1/(8·n_eval): coarse
MIN_MEANINGFUL = 8


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"forget list {path} does not exist (one sample id per line, ids from splits.json)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"forget list {path} is not UTF-8 text (one sample id per line)") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def select_forget(members: list[str], *, file: Path | None = None, fraction: float | None = None,
                  ids: str | list[str] | None = None, seed: int = 0) -> list[str]:
    """The forget set, in the order of ``members`` (so that the same request always gives the same set).

    Exactly one of ``file`` (one id per line, ``#`` comments), ``ids`` (comma-separated or a list) and
    ``fraction`` (a seeded random share of the members, at least one sample) must be given; at least one
    member must stay retained.
    """
    given = [name for name, value in (("--forget", file), ("--forget-ids", ids), ("--forget-fraction", fraction))
             if value is not None]
    if len(given) != 1:
        raise UserError("say what to forget with exactly one of --forget FILE, --forget-ids a,b or "
                        f"--forget-fraction F (got {', '.join(given) if given else 'none'})")
    if not members:
        raise UserError("the run has no members to forget")
    if fraction is not None:
        if not 0 < fraction < 1:
            raise UserError(f"--forget-fraction must be in (0, 1), got {fraction}")
        k = min(len(members) - 1, max(1, math.ceil(fraction * len(members) - 1e-9)))
        chosen = set(random.Random(seed).sample(range(len(members)), k))
        wanted = [members[i] for i in sorted(chosen)]
    else:
        if file is not None:
            wanted = _read_ids(Path(file))
        else:
            wanted = [i.strip() for i in (ids.split(",") if isinstance(ids, str) else ids or []) if i.strip()]
        if not wanted:
            raise UserError("the forget set is empty: give at least one member id")
    known = set(members)
    unknown = [i for i in dict.fromkeys(wanted) if i not in known]
    if unknown:
        raise UserError(f"{len(unknown)} forget id(s) are not members of the run (e.g. {unknown[0]!r}); "
                        "use ids listed under 'members' in its splits.json")
    forget = set(wanted)
    if len(forget) >= len(members):
        raise UserError(f"the forget set holds all {len(members)} members; nothing would be retained "
                        "(retrain from scratch instead)")
    return [m for m in members if m in forget]
