"""Privatizers: what the user's device does to the hidden states before they leave it.

* ``dchi`` — dχ-privacy (metric local DP on the token vectors): each token's vector gets noise ``n`` with
  density ∝ exp(−η‖n‖). Sampled exactly: a uniform direction (a normalised Gaussian) times a norm drawn from
  Gamma(shape=d, rate=η) — the radial part of that density in d dimensions is r^{d−1}·e^{−ηr}. The mean
  noise norm is d/η, so η is read against the vectors' own norms (``split sweep`` prints both).
* ``cti`` — SAP's contributing-token identification: the tokens that carry the label (found on the user's
  own training data, see :func:`contributing_tokens`) are perturbed with a larger η (η·boost: less noise),
  every other token with η. Few tokens carry a sentiment, most carry the private content.
* ``none`` — the baseline: hidden states go out as they are.

Noise comes from OS entropy unless a seeded ``torch.Generator`` is passed (the sweep does, to be
reproducible; a user's client does not — a seeded stream is predictable from its config).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from privlora.errors import UserError


def os_generator() -> torch.Generator:
    """A generator seeded from OS entropy (not reproducible on purpose)."""
    import secrets

    g = torch.Generator()
    g.manual_seed(secrets.randbits(63))
    return g


def dchi_noise(shape: tuple[int, ...], eta: torch.Tensor | float, generator: torch.Generator) -> torch.Tensor:
    """Noise vectors along the last axis with density ∝ exp(−η‖n‖); ``eta`` broadcasts over the leading axes."""
    d = shape[-1]
    direction = torch.randn(shape, generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    # Gamma(d, 1) by the sum of d exponentials is slow for d=384; torch's Gamma sampler takes no generator,
    # so draw it through numpy seeded from the torch generator (one draw of 63 bits per call)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    radius = torch.from_numpy(np.random.default_rng(seed).standard_gamma(d, size=shape[:-1])).float()
    eta_t = torch.as_tensor(eta, dtype=torch.float32)
    return direction * (radius / eta_t)[..., None]


@dataclass
class Privatizer:
    """Perturbs ``hidden [B,T,H]`` given the token ids ``[B,T]`` it came from (CTI needs them)."""

    name: str
    eta: float | None = None
    boost: float = 1.0
    contributing: dict[int, dict[str, Any]] = field(default_factory=dict)  # token id → why it was chosen

    def __post_init__(self) -> None:
        if self.name not in PRIVATIZERS:
            raise UserError(f"unknown privatizer {self.name!r}; choose one of {', '.join(PRIVATIZERS)}")
        if self.name != "none" and (self.eta is None or not math.isfinite(self.eta) or self.eta <= 0):
            raise UserError(f"privatizer {self.name!r} needs eta > 0 (got {self.eta})")
        if self.boost < 1:
            raise UserError(f"the CTI boost must be ≥ 1 (contributing tokens get less noise), got {self.boost}")

    def token_eta(self, input_ids: torch.Tensor) -> torch.Tensor:
        """η per token position: η everywhere, η·boost at contributing tokens (CTI)."""
        assert self.eta is not None
        eta = torch.full(input_ids.shape, float(self.eta))
        if self.name == "cti" and self.contributing:
            ids = torch.tensor(sorted(self.contributing), dtype=input_ids.dtype)
            eta[torch.isin(input_ids.cpu(), ids)] *= self.boost
        return eta

    def __call__(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return PRIVATIZERS[self.name](self, hidden, input_ids, generator or os_generator())

    def describe(self) -> dict[str, Any]:
        """What the run records: name, η, mean noise norm, and (CTI) which tokens were spared and why."""
        out: dict[str, Any] = {"name": self.name, "eta": self.eta}
        if self.name == "cti":
            out.update(boost=self.boost, contributing_count=len(self.contributing),
                       contributing=[{"id": k, **v} for k, v in
                                     sorted(self.contributing.items(), key=lambda kv: -kv[1].get("score", 0))])
        return out


def _none(p: Privatizer, hidden: torch.Tensor, input_ids: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return hidden


def _dchi(p: Privatizer, hidden: torch.Tensor, input_ids: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    assert p.eta is not None
    return hidden + dchi_noise(tuple(hidden.shape), p.eta, g).to(hidden.dtype)


def _cti(p: Privatizer, hidden: torch.Tensor, input_ids: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return hidden + dchi_noise(tuple(hidden.shape), p.token_eta(input_ids), g).to(hidden.dtype)


PRIVATIZERS: dict[str, Callable[[Privatizer, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]] = {
    "none": _none,
    "dchi": _dchi,
    "cti": _cti,
}


def contributing_tokens(token_ids: list[list[int]], labels: list[int], *, top_k: int = 50, min_count: int = 5,
                        exclude: set[int] | frozenset[int] = frozenset(),
                        decode: Callable[[int], str] | None = None) -> dict[int, dict[str, Any]]:
    """The ``top_k`` tokens whose presence says most about the label, on the user's own data.

    Score: the χ² statistic of token presence against the class (sklearn's ``chi2`` on a binary
    document×token matrix), over tokens seen in at least ``min_count`` texts; ``exclude`` drops special
    tokens. Each chosen token records its χ², count and the class it is most over-represented in.
    """
    from scipy.sparse import csr_matrix
    from sklearn.feature_selection import chi2

    rows, cols = [], []
    for r, ids in enumerate(token_ids):
        for t in set(ids) - set(exclude):
            rows.append(r)
            cols.append(t)
    if not rows:
        return {}
    vocab = sorted(set(cols))
    column = {t: j for j, t in enumerate(vocab)}
    x = csr_matrix((np.ones(len(rows)), (rows, [column[c] for c in cols])), shape=(len(token_ids), len(vocab)))
    counts = np.asarray(x.sum(axis=0)).ravel()
    y = np.asarray(labels)
    scores, _ = chi2(x, y)
    scores = np.nan_to_num(scores)
    scores[counts < min_count] = -1
    classes = np.unique(y)
    # rate of the token within each class → the class it speaks for
    per_class = np.stack([np.asarray(x[y == c].mean(axis=0)).ravel() for c in classes])
    chosen = [j for j in np.argsort(-scores)[:top_k] if scores[j] > 0]
    return {int(vocab[j]): {"token": decode(int(vocab[j])) if decode else str(vocab[j]),
                            "score": round(float(scores[j]), 3), "count": int(counts[j]),
                            "class": int(classes[int(per_class[:, j].argmax())])} for j in chosen}
