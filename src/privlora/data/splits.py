"""Reproducible member / auxiliary non-member / evaluation non-member splits (``splits.json``).

* members — trained on;
* aux — non-members only MP/SMP's proxy attacker may see (never the audit);
* eval — non-members only the audit may see (never training, never the proxy attacker).
Keeping aux and eval apart is what makes an audit of an MP/SMP adapter honest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from privlora.data.imageset import ImageSet
from privlora.errors import UserError
from privlora.runs import write_json_atomic

SPLITS = "splits.json"


@dataclass(frozen=True)
class Splits:
    members: list[str]
    aux: list[str]
    eval: list[str]
    source: str
    seed: int

    def to_json(self) -> dict[str, object]:
        return {"source": self.source, "seed": self.seed, "members": self.members,
                "aux_nonmembers": self.aux, "eval_nonmembers": self.eval}

    def summary(self, total: int, label: str) -> str:
        """One line for the start of training: the counts actually used, and the preset they came from."""
        return (f"split: {len(self.members)} members (trained on), {len(self.aux)} aux non-members (MP/SMP's "
                f"attacker only), {len(self.eval)} eval non-members (audit only) of {total} "
                f"({label}; splits.json)")

    def save(self, run_dir: Path) -> None:
        write_json_atomic(run_dir / SPLITS, self.to_json())

    @classmethod
    def load(cls, run_dir: Path) -> Splits:
        try:
            data = json.loads((run_dir / SPLITS).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read {run_dir / SPLITS}: {e}") from None
        return cls(members=data["members"], aux=data["aux_nonmembers"], eval=data["eval_nonmembers"],
                   source=data["source"], seed=int(data["seed"]))


def make_splits(data: ImageSet, *, members: float, aux: float, eval: float, seed: int, source: str) -> Splits:
    """Shuffle ids with ``seed`` and cut three disjoint parts of the given fractions."""
    n = len(data)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_members = max(1, round(members * n))
    n_aux = round(aux * n)
    n_eval = min(round(eval * n), n - n_members - n_aux)
    if n_members + n_aux > n:
        raise UserError(f"dataset has {n} images: too few for members={members}, aux={aux}")
    ids = [data.ids[i] for i in order]
    return Splits(members=ids[:n_members], aux=ids[n_members:n_members + n_aux],
                  eval=ids[n_members + n_aux:n_members + n_aux + n_eval], source=source, seed=seed)
