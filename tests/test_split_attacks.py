"""The server-side attacks on split hidden states: scoring, EIA (nearest / optimised) and AIA.

Every check compares against something computed independently of the code under test: hand-counted
tokens, the embeddings module's own forward pass, hand-pooled tensors, sklearn's accuracy on labels.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from privlora.data.text import load_tweets
from privlora.errors import UserError
from privlora.split import attacks
from privlora.split.attacks import (
    AIRLINES,
    ATTRIBUTES,
    attribute_inference,
    eia_nearest,
    eia_optimize,
    empirical_privacy,
    nearest_tokens,
    pooled_features,
    token_recovery,
)
from privlora.split.models import SplitBottom
from privlora.split.privatizers import Privatizer

UNIFORM_DEPTH1_MIN = 0.9  # measured 1.0 on 4 and on 16 tweets
DEEP_STEPS = 60


@pytest.fixture(scope="module")
def tweets():
    return load_tweets(32, seed=1).texts


@pytest.fixture(scope="module")
def bottom0():
    return SplitBottom(0)


def _states(bottom: SplitBottom, texts: list[str], eta: float | None = None):
    ids, mask = bottom.encode(texts)
    with torch.no_grad():
        hidden = bottom.forward(ids, mask)
    if eta is not None:
        hidden = Privatizer("dchi", eta)(hidden, ids, torch.Generator().manual_seed(0))
    return ids, mask, hidden


# --- scoring ------------------------------------------------------------------------------------------


def test_token_recovery_counts_real_non_special_tokens_only():
    specials = frozenset({0, 101, 102})
    ids = torch.tensor([[101, 5, 6, 102, 0], [101, 7, 8, 102, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    # counted: 5 ✓, 6 ✗, 7 ✓, 8 ✗ → 2/4; wrong specials and wrong padding must not count
    guess = torch.tensor([[999, 5, 9, 999, 3], [101, 7, 9, 102, 0]])
    assert token_recovery(guess, ids, mask, specials) == pytest.approx(0.5)
    assert token_recovery(ids, ids, mask, specials) == 1.0
    # a non-special token under mask 0 (truncated / padding) is not the user's: not counted
    mask2 = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 0, 1, 0]])
    assert token_recovery(guess, ids, mask2, specials) == 1.0
    only_specials = torch.tensor([[101, 102]])
    assert np.isnan(token_recovery(only_specials, only_specials, torch.ones(1, 2), specials))


def test_empirical_privacy_is_one_minus_success():
    assert empirical_privacy(0.25) == pytest.approx(0.75)
    assert empirical_privacy(1.0) == 0.0


# --- EIA at depth 0 -----------------------------------------------------------------------------------


def test_nearest_matches_the_embeddings_module_candidates(bottom0, tweets):
    """The expanded-LayerNorm distances pick the same token as brute force over the module's own output."""
    ids, mask, noisy = _states(bottom0, tweets[:8], eta=15.0)  # noisy: ties would be decided by rounding
    got = nearest_tokens(bottom0, noisy, mask)
    emb = bottom0.model.bert.embeddings
    vocab = bottom0.word_embeddings.shape[0]
    for p in (0, 1, 5, 9):
        with torch.no_grad():
            cand = emb(input_ids=torch.arange(vocab)[None], position_ids=torch.full((1, vocab), p))[0]
        brute = torch.cdist(noisy[:, p], cand).argmin(dim=1)
        rows = mask[:, p].bool()
        assert torch.equal(got[rows, p], brute[rows])
    assert (got[~mask.bool()] == bottom0.tokenizer.pad_token_id).all()


def test_eia_nearest_inverts_clean_depth0_and_noise_defeats_it(bottom0, tweets):
    ids, mask, clean = _states(bottom0, tweets)
    assert token_recovery(eia_nearest(bottom0, clean, mask), ids, mask, bottom0.special_ids) >= 0.95
    _, _, noisy = _states(bottom0, tweets, eta=3.0)  # mean noise norm 128 against clean norms ~10
    assert token_recovery(eia_nearest(bottom0, noisy, mask), ids, mask, bottom0.special_ids) < 0.2


def test_eia_nearest_refuses_a_deeper_split(bottom1, tweets):
    ids, mask, hidden = _states(bottom1, tweets[:2])
    with pytest.raises(UserError, match="depth-0"):
        eia_nearest(bottom1, hidden, mask)


# --- EIA behind blocks --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bottom1():
    return SplitBottom(1)


def test_eia_optimize_from_a_uniform_start_inverts_depth1(bottom1, tweets):
    """No prior guess at all (init_scale=0): the optimisation alone must find most tokens."""
    texts = tweets[:4]
    ids, mask, hidden = _states(bottom1, texts)
    got = eia_optimize(bottom1, hidden, mask, init_scale=0.0, generator=torch.Generator().manual_seed(0))
    score = token_recovery(got, ids, mask, bottom1.special_ids)
    counted = [t for row, m in zip(ids.tolist(), mask.tolist(), strict=True)
               for t, k in zip(row, m, strict=True) if k and t not in bottom1.special_ids]
    commonest = Counter(counted).most_common(1)[0][1] / len(counted)
    assert score >= UNIFORM_DEPTH1_MIN
    assert score > commonest + 0.3  # the commonest token is ~4% of a batch


def test_eia_optimize_beats_the_nearest_neighbour_baseline_deep(tweets):
    """At depth 5 the blocks move states far enough that depth-0 nearest neighbours miss a third of tokens."""
    bottom = SplitBottom(5)
    ids, mask, hidden = _states(bottom, tweets[:4])
    baseline = token_recovery(nearest_tokens(bottom, hidden, mask), ids, mask, bottom.special_ids)
    got = token_recovery(eia_optimize(bottom, hidden, mask, steps=DEEP_STEPS,
                                      generator=torch.Generator().manual_seed(0)), ids, mask, bottom.special_ids)
    assert baseline < 0.85  # measured 0.61–0.77 on three 4-tweet batches
    assert got >= max(0.85, baseline + 0.1)  # measured 0.94–0.99


def test_eia_optimize_leaves_the_model_as_it_was(bottom1, tweets, monkeypatch):
    params = list(bottom1.model.parameters())
    original = params[3].requires_grad
    params[3].requires_grad_(not original)  # a caller's flag the attack must restore
    before = [p.requires_grad for p in params]
    weights = [p.detach().clone() for p in params]
    # force one sequence per chunk: the chunked path must give whole [B, T] answers
    monkeypatch.setattr(attacks, "MAX_RELAXED_ELEMENTS", bottom1.word_embeddings.shape[0] * 3)
    ids, mask, hidden = _states(bottom1, tweets[:3])
    got = eia_optimize(bottom1, hidden, mask, steps=2)
    try:
        assert [p.requires_grad for p in params] == before
        assert all(p.grad is None for p in params)
        assert all(torch.equal(p, w) for p, w in zip(params, weights, strict=True))
        assert got.shape == ids.shape and got.dtype == torch.long
        assert (got[~mask.bool()] == bottom1.tokenizer.pad_token_id).all()
    finally:
        params[3].requires_grad_(original)


def test_eia_optimize_rejects_bad_settings(bottom1, tweets):
    ids, mask, hidden = _states(bottom1, tweets[:1])
    for bad in ({"steps": 0}, {"lr": 0.0}, {"temperature": -1.0}, {"loss": "huber"}):
        with pytest.raises(UserError):
            eia_optimize(bottom1, hidden, mask, **bad)
    with pytest.raises(UserError, match=r"\[B, T, H\]"):
        eia_optimize(bottom1, hidden[0], mask)
    with pytest.raises(UserError, match="init"):
        eia_optimize(bottom1, hidden, mask, init=ids[:, :-1])


# --- AIA ----------------------------------------------------------------------------------------------


def test_airline_labels_hand_written_tweets():
    label = ATTRIBUTES["airline"]
    texts = ["@united lost my bag", "thanks @USAirways!", "@AmericanAir @americanair again",
             "@SouthwestAir, @JetBlue: which one?", "no airline here", "@unitedairlines is not a handle we use",
             "loving @JetBlue.", "@VirginAmerica"]
    assert label(texts) == [0, 1, 2, None, None, None, 4, 5]
    assert AIRLINES[3] == "southwestair"


def test_pooled_features_ignore_padding():
    hidden = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [1e6, 1e6]],
                           [[-1.0, 5.0], [-1e6, -1e6], [-1e6, -1e6]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    want = np.array([[2.0, 1.0, 3.0, 4.0], [-1.0, 5.0, -1.0, 5.0]])
    np.testing.assert_allclose(pooled_features(hidden, mask), want)


@pytest.fixture(scope="module")
def airline_split(bottom0):
    from sklearn.model_selection import train_test_split

    data = load_tweets(900, seed=3)
    labels = ATTRIBUTES["airline"](data.texts)
    keep = [i for i, y in enumerate(labels) if y is not None]
    texts, y = [data.texts[i] for i in keep], np.array([labels[i] for i in keep])
    _, mask, hidden = _states(bottom0, texts)
    x = pooled_features(hidden, mask)
    return train_test_split(x, y, test_size=0.5, random_state=0, stratify=y)


def test_aia_reads_the_airline_off_clean_states(airline_split):
    from sklearn.metrics import accuracy_score

    train_x, test_x, train_y, test_y = airline_split
    out = attribute_inference(train_x, train_y, test_x, test_y)
    assert out["n_train"] == len(train_y) and out["n_test"] == len(test_y)
    assert out["chance"] == pytest.approx(Counter(test_y.tolist()).most_common(1)[0][1] / len(test_y))
    assert out["success"] >= out["chance"] + 0.4
    # the reported success is an accuracy: a majority-class guess scores exactly the reported chance
    assert accuracy_score(test_y, np.full_like(test_y, Counter(test_y.tolist()).most_common(1)[0][0])) \
        == pytest.approx(out["chance"])


def test_aia_on_noise_is_near_chance(airline_split):
    train_x, test_x, train_y, test_y = airline_split
    rng = np.random.default_rng(0)
    out = attribute_inference(rng.normal(size=train_x.shape), train_y, rng.normal(size=test_x.shape), test_y)
    assert abs(out["success"] - out["chance"]) <= 0.1


def test_aia_needs_two_classes_and_copes_with_a_rare_one():
    with pytest.raises(UserError):
        attribute_inference(np.zeros((3, 2)), [1, 1, 1], np.zeros((2, 2)), [1, 0])
    rng = np.random.default_rng(1)
    y = np.array([0] * 10 + [1] * 10 + [2])  # one user of class 2: cross-validation must still run
    x = rng.normal(size=(21, 4)) + y[:, None] * 3.0
    out = attribute_inference(x, y, x, y)
    assert out["success"] >= 0.9 and out["n_train"] == 21
