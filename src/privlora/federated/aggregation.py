"""How clients' LoRA factors become one adapter: FedIT, FFA-LoRA and FLoRA, as pure functions.

A client's update for one layer is its pair ``(A_i, B_i)`` (peft shapes: ``A`` is ``r × in``, ``B`` is
``out × r``; the layer's change is ``ΔW_i = s_i · B_i A_i`` with scaling ``s_i = alpha / r_i``). What
the server should produce is the weighted mean of the clients' changes, ``ΔW* = Σ p_i ΔW_i`` with
``p_i`` proportional to their (capped) sample counts.

* **FedIT** (Zhang et al. 2023): FedAvg on ``A`` and on ``B`` separately. ``(Σ p_i B_i)(Σ p_i A_i)``
  is not ``Σ p_i B_i A_i``: the cross terms ``p_i p_j B_i A_j`` make it inexact.
* **FFA-LoRA** (Sun et al. 2024): ``A`` is frozen at a random matrix all clients draw from one shared
  seed; only ``B`` trains and is sent. ``(Σ p_i B_i) A = Σ p_i B_i A`` — exact, and half the payload.
* **FLoRA** (Wang et al. 2024): stack instead of averaging — ``A* = [A_1; …; A_n]`` (rows),
  ``B* = [p_1 s_1 B_1, …, p_n s_n B_n]`` (columns), so ``B* A* = Σ p_i s_i B_i A_i`` exactly, and clients
  may use different ranks. The stacked adapter has rank ``Σ r_i`` and scaling 1 (folded into ``B*``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from privlora.errors import UserError


def weights(counts: Sequence[float], cap: float | None = None) -> torch.Tensor:
    """Aggregation weights from clients' sample counts, each capped at ``cap`` (the server does not
    trust a client's claim beyond it), normalised to sum to 1."""
    w = torch.as_tensor(counts, dtype=torch.float64)
    if w.numel() == 0 or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise UserError(f"client sample counts must be finite, non-negative and not all zero, got {list(counts)}")
    if cap is not None:
        w = w.clamp(max=cap)
    return w / w.sum()


def _check(factors: Sequence[torch.Tensor], what: str) -> None:
    for i, f in enumerate(factors):
        if not torch.isfinite(f).all():
            raise UserError(f"client {i}: {what} holds NaN or infinite values")


def fedit(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FedAvg of A and of B (same rank everywhere). Returns ``(A, B)``; the scaling is unchanged."""
    _check(As, "A")
    _check(Bs, "B")
    if len({tuple(a.shape) for a in As}) != 1 or len({tuple(b.shape) for b in Bs}) != 1:
        raise UserError("FedIT needs every client's A and B in the same shapes (same rank)")
    A = sum(pi * a.double() for pi, a in zip(p, As, strict=True))
    B = sum(pi * b.double() for pi, b in zip(p, Bs, strict=True))
    return A.to(As[0].dtype), B.to(Bs[0].dtype)


def ffa(A: torch.Tensor, Bs: Sequence[torch.Tensor], p: torch.Tensor) -> torch.Tensor:
    """FFA-LoRA: the mean of the clients' B (A is the shared frozen one). Returns ``B``."""
    _check(Bs, "B")
    if len({tuple(b.shape) for b in Bs}) != 1 or Bs[0].shape[1] != A.shape[0]:
        raise UserError(f"FFA-LoRA: every B must be out × {A.shape[0]} (the shared A's rank)")
    return sum(pi * b.double() for pi, b in zip(p, Bs, strict=True)).to(Bs[0].dtype)


def flora(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], p: torch.Tensor,
          scalings: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA stacking (ranks may differ). Returns ``(A*, B*)`` with the weights and scalings in ``B*``."""
    _check(As, "A")
    _check(Bs, "B")
    if len({a.shape[1] for a in As}) != 1 or len({b.shape[0] for b in Bs}) != 1:
        raise UserError("FLoRA: every client's A must have the same input size and B the same output size")
    for i, (a, b) in enumerate(zip(As, Bs, strict=True)):
        if a.shape[0] != b.shape[1]:
            raise UserError(f"client {i}: A has rank {a.shape[0]} but B has rank {b.shape[1]}")
    A = torch.cat([a.double() for a in As], dim=0)
    B = torch.cat([pi * s * b.double() for pi, s, b in zip(p, scalings, Bs, strict=True)], dim=1)
    return A.to(As[0].dtype), B.to(Bs[0].dtype)


def relative_error(aggregated: torch.Tensor, target: torch.Tensor) -> float:
    """‖aggregated − target‖_F / ‖target‖_F."""
    return float(torch.linalg.norm((aggregated - target).double()) / torch.linalg.norm(target.double()))
