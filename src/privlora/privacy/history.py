"""A composition history: what ran, in the terms an accountant needs — runs of (σ, q, steps) of the
subsampled Gaussian, how the batches were drawn, and which neighbouring datasets the ε is about.

The sampling scheme and the neighbouring relation are part of the history, not of the accountant's
options, because an ε is only valid for the mechanism that really ran: a fixed-size draw without
replacement accounted as Poisson understates ε (issue 18: 7.99 claimed where 9.67 is the bound).
Carrying both here lets :func:`privlora.privacy.epsilon.epsilon` refuse a history it has no bound for.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

from privlora.errors import UserError

#: every record joins each step independently with probability q (what Opacus' accountants bound)
POISSON = "poisson"
#: exactly q·N records per step, drawn without replacement (needs a replace-one bound; Opacus has none)
FIXED_SIZE = "fixed-size without replacement"
SAMPLINGS = (POISSON, FIXED_SIZE)

#: neighbouring datasets differ by one record added or removed
ADD_REMOVE = "add/remove"
#: neighbouring datasets differ by one record replaced by another
REPLACE_ONE = "replace-one"
NEIGHBOURINGS = (ADD_REMOVE, REPLACE_ONE)

#: how privacy.json states the relation, per unit of privacy (DP-SGD: a sample; federated: a client)
SAMPLE_NEIGHBOURS = "add/remove one training sample"
CLIENT_NEIGHBOURS = "add/remove one client (all of that client's data)"


@dataclass(frozen=True)
class Segment:
    """``steps`` consecutive steps of the Gaussian mechanism with noise multiplier σ, each on a batch
    sampled at rate q (Opacus' history entry ``(σ, q, steps)``)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma, q, steps = _number(self.noise_multiplier), _number(self.sample_rate), self.steps
        if not (math.isfinite(sigma) and sigma > 0):
            raise UserError(f"the noise multiplier must be a positive number, got {self.noise_multiplier}")
        if not (math.isfinite(q) and 0 < q <= 1):
            raise UserError(f"the sample rate must lie in (0, 1], got {self.sample_rate}")
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise UserError(f"the number of steps must be a non-negative integer, got {steps!r}")
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "sample_rate", q)
        object.__setattr__(self, "steps", int(steps))

    def as_opacus(self) -> tuple[float, float, int]:
        return self.noise_multiplier, self.sample_rate, self.steps


def _number(value: object) -> float:
    """``value`` as a float (NaN for what is not a real number, so the range checks reject it)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return math.nan
    return float(value)


@dataclass(frozen=True)
class History:
    """Segments in the order they ran, with the sampling scheme and the neighbouring relation."""

    segments: tuple[Segment, ...] = ()
    sampling: str = POISSON
    neighbouring: str = ADD_REMOVE

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise UserError(f"unknown sampling {self.sampling!r}; choose one of {', '.join(SAMPLINGS)}")
        if self.neighbouring not in NEIGHBOURINGS:
            raise UserError(f"unknown neighbouring relation {self.neighbouring!r}; "
                            f"choose one of {', '.join(NEIGHBOURINGS)}")
        object.__setattr__(self, "segments", tuple(self.segments))

    @classmethod
    def of(cls, entries: Iterable[tuple[float, float, int]], *, sampling: str = POISSON,
           neighbouring: str = ADD_REMOVE) -> History:
        """From Opacus-style ``(σ, q, steps)`` triples."""
        return cls(tuple(Segment(s, q, k) for s, q, k in entries), sampling, neighbouring)

    @classmethod
    def uniform(cls, noise_multiplier: float, sample_rate: float, steps: int, **kw: str) -> History:
        """One run of ``steps`` equal steps (a DP-SGD run; a federated run at a fixed σ)."""
        return cls((Segment(noise_multiplier, sample_rate, steps),), **kw)

    def then(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> History:
        """This history followed by ``steps`` more steps (kept as their own segment: merging equal
        neighbours would change the order of the RDP sum, hence its last bits)."""
        return History((*self.segments, Segment(noise_multiplier, sample_rate, steps)), self.sampling,
                       self.neighbouring)

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.segments)

    def as_opacus(self) -> list[tuple[float, float, int]]:
        """Opacus' ``accountant.history`` for the segments that took at least one step."""
        return [s.as_opacus() for s in self.segments if s.steps > 0]
