"""Aggregation rules against the quantity they must produce: the weighted mean of the clients' ΔW."""

from __future__ import annotations

import pytest
import torch

from privlora.errors import UserError
from privlora.federated.aggregation import fedit, ffa, flora, relative_error, weights


def _clients(n: int, ranks: list[int], out: int = 48, inp: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, inp, generator=g) / inp ** 0.5 for r in ranks]
    Bs = [torch.randn(out, r, generator=g) * 0.1 for r in ranks]
    return As, Bs


def _target(As, Bs, p, scalings):
    return sum(pi * s * (b.double() @ a.double()) for pi, s, a, b in zip(p, scalings, As, Bs, strict=True))


def test_weights_are_normalised_and_capped():
    torch.testing.assert_close(weights([10, 30]), torch.tensor([0.25, 0.75], dtype=torch.float64))
    # a client claiming a million samples counts as the cap, not as a million
    torch.testing.assert_close(weights([100, 1_000_000], cap=100), torch.tensor([0.5, 0.5], dtype=torch.float64))
    for bad in ([], [0, 0], [-1, 5], [float("nan"), 2]):
        with pytest.raises(UserError, match="sample counts"):
            weights(bad)


def test_ffa_is_exact():
    As, Bs = _clients(5, [8] * 5)
    shared = As[0]
    p = weights([5, 10, 20, 40, 25])
    B = ffa(shared, Bs, p)
    target = _target([shared] * 5, Bs, p, [2.0] * 5)
    assert relative_error(2.0 * (B.double() @ shared.double()), target) < 1e-6


def test_flora_is_exact_with_different_ranks_and_scalings():
    ranks = [4, 8, 16]
    As, Bs = _clients(3, ranks)
    p = weights([1, 2, 3])
    scalings = [16 / r for r in ranks]  # alpha / r
    A, B = flora(As, Bs, p, scalings)
    assert A.shape == (sum(ranks), 32) and B.shape == (48, sum(ranks))
    assert relative_error(B.double() @ A.double(), _target(As, Bs, p, scalings)) < 1e-6


def test_fedit_is_inexact_unless_clients_agree():
    As, Bs = _clients(5, [8] * 5)
    p = weights([1] * 5)
    A, B = fedit(As, Bs, p)
    assert relative_error(B.double() @ A.double(), _target(As, Bs, p, [1.0] * 5)) > 0.3
    same_A, same_B = fedit([As[0]] * 5, [Bs[0]] * 5, p)
    assert relative_error(same_B.double() @ same_A.double(), Bs[0].double() @ As[0].double()) < 1e-6


def test_bad_updates_are_refused():
    As, Bs = _clients(2, [8, 8])
    p = weights([1, 1])
    poisoned = [Bs[0], Bs[1].clone()]
    poisoned[1][0, 0] = float("nan")
    with pytest.raises(UserError, match="client 1: B holds NaN"):
        ffa(As[0], poisoned, p)
    with pytest.raises(UserError, match="same shapes"):
        fedit([As[0], As[1][:4]], Bs, p)
    with pytest.raises(UserError, match="rank"):
        ffa(As[0], [Bs[0], Bs[1][:, :4]], p)
    with pytest.raises(UserError, match="A has rank 8 but B has rank 4"):
        flora(As, [Bs[0], Bs[1][:, :4]], p, [1.0, 1.0])
