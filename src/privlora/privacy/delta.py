"""The default δ: what a run uses when the user names none."""

from __future__ import annotations


def default_delta(n: int) -> float:
    """δ = 1/(10·N): well below 1/N, so the mechanism cannot simply publish one record."""
    return 1.0 / (10.0 * max(n, 1))
