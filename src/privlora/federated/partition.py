"""Which client holds which examples, and which clients train in a round: seeded, reproducible splits.

Federated results depend heavily on how skewed the clients' data are, so the split must be a named,
seeded quantity rather than an accident of loading order.

* :func:`dirichlet_partition` is the usual label-skew split (Hsu et al. 2019): for every class, its
  examples are dealt to the clients in proportions drawn from ``Dir(alpha)``. Small ``alpha`` gives each
  client only a few classes; large ``alpha`` approaches IID; ``alpha=None`` *is* IID (a seeded shuffle cut
  into near-equal parts).
* :func:`poisson_clients` lets every client join a round independently with probability ``q`` (so the
  round's size varies, and may be 0) — the sampling the client-level Gaussian accountant assumes (Poisson
  subsampling, as DP-FedAvg analyses it); DP runs sample this way.
* :func:`sample_clients` picks exactly ``k`` participants uniformly without replacement (runs without DP,
  asynchronous dispatch). Both are fixed by ``(seed, round_number)`` alone, so a resumed run picks the
  same clients.
* :func:`label_skew` puts one number on a split (mean total-variation distance between each client's
  label distribution and the global one; 0 for a perfectly IID split) for docs and logs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from privlora.errors import UserError

MAX_TRIES = 100


def _labels_array(labels: Sequence[int]) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise UserError(f"labels must be a flat sequence of class ids, got an array of shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"labels must be integer class ids, got dtype {y.dtype}")
    return y.astype(np.int64, copy=False)


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    perm = rng.permutation(n)
    return [sorted(part.tolist()) for part in np.array_split(perm, num_clients)]


def _dirichlet_once(y: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
        for client, chunk in enumerate(np.split(idx, cuts)):
            parts[client].extend(chunk.tolist())
    return [sorted(p) for p in parts]


def dirichlet_partition(labels: Sequence[int], num_clients: int, alpha: float | None, *, seed: int,
                        min_size: int = 1) -> list[list[int]]:
    """Split ``range(len(labels))`` over ``num_clients`` clients with Dirichlet label skew.

    Returns one sorted index list per client; every index appears in exactly one of them. The whole split
    is redrawn (up to ``MAX_TRIES`` times, from the same seeded generator) until every client holds at
    least ``min_size`` examples. ``alpha=None`` gives an IID split into parts whose sizes differ by at most 1.
    """
    y = _labels_array(labels)
    n = len(y)
    if num_clients < 1:
        raise UserError(f"num_clients must be at least 1, got {num_clients}")
    if num_clients > n:
        raise UserError(f"cannot split {n} examples over {num_clients} clients; use at most {n} clients")
    if alpha is not None and not (np.isfinite(alpha) and alpha > 0):
        raise UserError(f"Dirichlet alpha must be a positive number (or None for IID), got {alpha}")
    if min_size < 0:
        raise UserError(f"min_size must be non-negative, got {min_size}")
    if min_size * num_clients > n:
        raise UserError(f"{num_clients} clients × min_size {min_size} needs more than the {n} examples available; "
                        "lower num_clients or min_size")
    rng = np.random.default_rng(seed)
    if alpha is None:
        return _iid(n, num_clients, rng)
    for _ in range(MAX_TRIES):
        parts = _dirichlet_once(y, num_clients, float(alpha), rng)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise UserError(f"no Dirichlet split with alpha={alpha} gave all {num_clients} clients at least {min_size} "
                    f"examples in {MAX_TRIES} tries; raise alpha or lower num_clients")


def sample_clients(client_ids: Sequence[int], k: int, *, seed: int, round_number: int) -> list[int]:
    """``k`` distinct clients drawn uniformly without replacement, fixed by ``(seed, round_number)``.

    Returned sorted (the order carries no meaning; sorting makes logs comparable).
    """
    ids = [int(i) for i in client_ids]
    if len(set(ids)) != len(ids):
        raise UserError("client_ids contains duplicates; give each client one id")
    if not 1 <= k <= len(ids):
        raise UserError(f"cannot sample {k} clients from {len(ids)}; k must be between 1 and {len(ids)}")
    if seed < 0 or round_number < 0:
        raise UserError(f"seed and round_number must be non-negative, got seed={seed}, round_number={round_number}")
    rng = np.random.default_rng([seed, round_number])
    chosen = rng.choice(len(ids), size=k, replace=False)
    return sorted(ids[i] for i in chosen)


def poisson_clients(client_ids: Sequence[int], q: float, *, seed: int, round_number: int) -> list[int]:
    """Every client independently with probability ``q``, fixed by ``(seed, round_number)``; sorted.

    The round's size is Binomial(N, q) and can be 0 — callers must handle an empty round. ``q = 1`` gives
    every client. Not :func:`sample_clients`: a fixed-size draw is a different mechanism, and analysing it
    as Poisson understates ε (20 clients, 4 per round, 5 rounds, σ 0.73: 7.99 claimed, 9.67 true).
    """
    ids = [int(i) for i in client_ids]
    if len(set(ids)) != len(ids):
        raise UserError("client_ids contains duplicates; give each client one id")
    if not (math.isfinite(q) and 0 < q <= 1):
        raise UserError(f"the client sampling rate must lie in (0, 1], got {q}")
    if seed < 0 or round_number < 0:
        raise UserError(f"seed and round_number must be non-negative, got seed={seed}, round_number={round_number}")
    # a stream of its own (the trailing 1) so it never coincides with sample_clients' draws
    rng = np.random.default_rng([seed, round_number, 1])
    joined = rng.random(len(ids)) < q
    return sorted(i for i, j in zip(ids, joined, strict=True) if j)


def label_skew(parts: Sequence[Sequence[int]], labels: Sequence[int], num_classes: int) -> float:
    """Mean over clients of the total-variation distance between the client's label distribution and
    the global one (over the examples in ``parts``). 0 means every client sees the global mix; the
    maximum, ``1 − 1/num_classes`` for balanced data, means every client sees a single class."""
    y = _labels_array(labels)
    if num_classes < 1:
        raise UserError(f"num_classes must be at least 1, got {num_classes}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"labels must lie in [0, {num_classes}); got values from {y.min()} to {y.max()}")
    if not parts or any(len(p) == 0 for p in parts):
        raise UserError("label_skew needs at least one client and every client to hold at least one example")
    counts = [np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=num_classes) for p in parts]
    total = np.sum(counts, axis=0)
    glob = total / total.sum()
    tv = [0.5 * np.abs(c / c.sum() - glob).sum() for c in counts]
    return float(np.mean(tv))
