"""Client splits and round sampling: every example placed once, reproducible, and as skewed as alpha says."""

from __future__ import annotations

import numpy as np
import pytest

from privlora.errors import UserError
from privlora.federated.partition import dirichlet_partition, label_skew, sample_clients

LABELS = np.repeat(np.arange(3), 1000)  # 3000 examples, 3 balanced classes


@pytest.mark.parametrize("alpha", [None, 0.1, 1.0, 100.0])
def test_every_index_lands_in_exactly_one_sorted_client(alpha):
    parts = dirichlet_partition(LABELS, 10, alpha, seed=3)
    assert len(parts) == 10
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(LABELS)))  # covering and disjoint
    assert all(p == sorted(p) for p in parts)
    assert all(len(p) >= 1 for p in parts)


def test_split_is_deterministic_in_the_seed():
    assert dirichlet_partition(LABELS, 10, 0.5, seed=7) == dirichlet_partition(LABELS, 10, 0.5, seed=7)
    assert dirichlet_partition(LABELS, 10, 0.5, seed=7) != dirichlet_partition(LABELS, 10, 0.5, seed=8)
    assert dirichlet_partition(LABELS, 10, None, seed=7) == dirichlet_partition(LABELS, 10, None, seed=7)
    assert dirichlet_partition(LABELS, 10, None, seed=7) != dirichlet_partition(LABELS, 10, None, seed=8)


def test_iid_split_has_near_equal_sizes_and_little_skew():
    parts = dirichlet_partition(LABELS[:2995], 10, None, seed=0)
    sizes = sorted(len(p) for p in parts)
    assert sizes[0] == 299 and sizes[-1] == 300
    assert label_skew(parts, LABELS[:2995], 3) < 0.08


def test_smaller_alpha_gives_larger_label_skew():
    for seed in range(3):
        skewed = label_skew(dirichlet_partition(LABELS, 10, 0.1, seed=seed), LABELS, 3)
        mild = label_skew(dirichlet_partition(LABELS, 10, 100.0, seed=seed), LABELS, 3)
        assert skewed > 0.4 > 0.08 > mild


def test_label_skew_against_hand_computation():
    labels = [0, 0, 1, 1]
    assert label_skew([[0, 2], [1, 3]], labels, 2) == pytest.approx(0.0)  # both clients see 50/50
    assert label_skew([[0, 1], [2, 3]], labels, 2) == pytest.approx(0.5)  # each sees one class
    # client 0: (2/3, 1/3), client 1: (0, 1); global (1/2, 1/2): TVs 1/6 and 1/2
    assert label_skew([[0, 1, 2], [3]], labels, 2) == pytest.approx((1 / 6 + 1 / 2) / 2)
    with pytest.raises(UserError, match="labels must lie in"):
        label_skew([[0, 1]], [0, 5], 2)
    with pytest.raises(UserError, match="at least one example"):
        label_skew([[0, 1], []], [0, 1], 2)


def test_min_size_is_honoured_by_redrawing():
    # seed 1 at alpha=1 first draws a client with 61 examples; asking for 100 makes it redraw
    assert min(len(p) for p in dirichlet_partition(LABELS, 10, 1.0, seed=1)) < 100
    parts = dirichlet_partition(LABELS, 10, 1.0, seed=1, min_size=100)
    assert min(len(p) for p in parts) >= 100
    assert sorted(i for p in parts for i in p) == list(range(len(LABELS)))


def test_impossible_min_size_says_how_to_fix_it():
    with pytest.raises(UserError, match="raise alpha or lower num_clients"):
        dirichlet_partition(LABELS, 100, 0.01, seed=0, min_size=20)
    with pytest.raises(UserError, match="lower num_clients or min_size"):
        dirichlet_partition(LABELS[:100], 10, 1.0, seed=0, min_size=11)


@pytest.mark.parametrize(("num_clients", "alpha", "match"), [
    (0, 1.0, "at least 1"),
    (11, 1.0, "at most 10"),
    (2, 0.0, "positive"),
    (2, -1.0, "positive"),
    (2, float("nan"), "positive"),
])
def test_bad_partition_arguments(num_clients, alpha, match):
    with pytest.raises(UserError, match=match):
        dirichlet_partition(LABELS[:10], num_clients, alpha, seed=0)


def test_sample_clients_is_a_seeded_subset_that_changes_by_round():
    ids = list(range(100, 150))
    picks = [sample_clients(ids, 5, seed=1, round_number=r) for r in range(20)]
    for p in picks:
        assert len(p) == 5 and len(set(p)) == 5 and set(p) <= set(ids)
    assert picks == [sample_clients(ids, 5, seed=1, round_number=r) for r in range(20)]
    assert len({tuple(p) for p in picks}) >= 19  # C(50, 5) ≈ 2.1M sets: repeats are (nearly) impossible
    assert picks != [sample_clients(ids, 5, seed=2, round_number=r) for r in range(20)]
    assert sample_clients(ids, 50, seed=0, round_number=0) == ids


def test_sample_clients_is_uniform():
    rounds = 3000
    counts = np.zeros(10)
    for r in range(rounds):
        counts[sample_clients(range(10), 3, seed=0, round_number=r)] += 1
    freq = counts / rounds
    # each client is in a round with probability 3/10; sd of the frequency ≈ 0.0084
    assert np.abs(freq - 0.3).max() < 0.04


def test_bad_sampling_arguments():
    with pytest.raises(UserError, match="between 1 and 3"):
        sample_clients([1, 2, 3], 4, seed=0, round_number=0)
    with pytest.raises(UserError, match="between 1 and 3"):
        sample_clients([1, 2, 3], 0, seed=0, round_number=0)
    with pytest.raises(UserError, match="duplicates"):
        sample_clients([1, 1, 3], 2, seed=0, round_number=0)
