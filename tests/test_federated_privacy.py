"""Client-level DP: clipping norms, noise of the stated size, the RDP accountant, schedules, composition."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from privlora.errors import UserError
from privlora.federated.client_privacy import (
    PLACEMENTS,
    SCHEDULES,
    add_gaussian,
    add_laplace,
    clip_l1,
    clip_l2,
    effective_noise_multiplier,
    epsilon_schedule,
    gaussian_epsilons,
    l1_norm,
    l2_norm,
    laplace_composed,
    laplace_scale,
    noise_std,
)


def _update(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal((8, 32)).astype(np.float32)]


def test_norms_are_over_all_arrays_together():
    xs = _update()
    flat = np.concatenate([x.ravel().astype(np.float64) for x in xs])
    assert l2_norm(xs) == pytest.approx(np.linalg.norm(flat))
    assert l1_norm(xs) == pytest.approx(np.abs(flat).sum())
    assert l2_norm([np.float32([3.0]), np.float32([[4.0]])]) == pytest.approx(5.0)


@pytest.mark.parametrize(("clip", "norm"), [(clip_l2, l2_norm), (clip_l1, l1_norm)])
def test_clipping_scales_down_only_when_over_the_bound(clip, norm):
    xs = _update()
    before = norm(xs)
    clipped, reported = clip(xs, before / 4)
    assert reported == pytest.approx(before)
    assert norm(clipped) <= before / 4
    assert norm(clipped) == pytest.approx(before / 4, rel=1e-5)
    for c, x in zip(clipped, xs, strict=True):  # same direction, a quarter of the length
        assert c.dtype == np.float32
        np.testing.assert_allclose(c, x / 4, rtol=1e-5, atol=1e-7)
    untouched, reported = clip(xs, before * 2)
    assert reported == pytest.approx(before)
    for u, x in zip(untouched, xs, strict=True):
        np.testing.assert_array_equal(u, x)
    zeros, reported = clip([np.zeros(5, np.float32)], 1.0)
    assert reported == 0.0 and not zeros[0].any()


def test_clip_bound_holds_exactly_despite_float32_rounding():
    rng = np.random.default_rng(3)
    for _ in range(50):
        xs = [rng.standard_normal(rng.integers(1, 500)).astype(np.float32) * 10 for _ in range(3)]
        bound = float(rng.uniform(0.1, 2.0))
        assert l2_norm(clip_l2(xs, bound)[0]) <= bound
        assert l1_norm(clip_l1(xs, bound)[0]) <= bound


def test_gaussian_noise_has_the_stated_std_and_leaves_input_alone():
    xs = [np.full((400, 250), 2.0, np.float32), np.zeros(100_000, np.float32)]
    noisy = add_gaussian(xs, 0.5, np.random.default_rng(0))
    assert all(n.dtype == np.float32 for n in noisy)
    assert np.all(xs[0] == 2.0) and not xs[1].any()
    noise = np.concatenate([(noisy[0] - 2.0).ravel(), noisy[1]])
    assert noise.mean() == pytest.approx(0.0, abs=0.005)
    assert noise.std() == pytest.approx(0.5, rel=0.01)


def test_laplace_noise_has_the_stated_scale():
    scale = laplace_scale(clip_l1=0.3, epsilon=2.0)
    assert scale == pytest.approx(0.15)
    noise = add_laplace([np.zeros(200_000, np.float32)], scale, np.random.default_rng(0))[0].astype(np.float64)
    assert np.abs(noise).mean() == pytest.approx(scale, rel=0.01)  # E|L| = b
    assert noise.std() == pytest.approx(math.sqrt(2) * scale, rel=0.01)  # sd = √2·b
    # the shape is Laplace, not Gaussian: P(|L| > 3b) = e^{-3}
    assert (np.abs(noise) > 3 * scale).mean() == pytest.approx(math.exp(-3), abs=0.003)


def _accountant_epsilons(history, delta):
    """What the brief asks for, done the slow way: a fresh RDPAccountant history of (σ, q, 1) per round."""
    out = []
    for r in range(1, len(history) + 1):
        acc = RDPAccountant()
        acc.history = [(s, q, 1) for s, q in history[:r]]
        out.append(acc.get_epsilon(delta))
    return out


def test_gaussian_epsilons_match_opacus_rdp_accountant():
    history = [(1.0, 0.1)] * 3 + [(1.5, 0.1)] * 2 + [(1.0, 0.2)]
    ours = gaussian_epsilons(history, 1e-5)
    stepped = RDPAccountant()
    expected = []
    for sigma, q in history:
        stepped.step(noise_multiplier=sigma, sample_rate=q)
        expected.append(stepped.get_epsilon(1e-5))
    assert ours == pytest.approx(expected, rel=1e-9)
    assert ours[:4] == pytest.approx(_accountant_epsilons(history[:4], 1e-5), rel=1e-9)


def test_gaussian_epsilons_against_closed_form_without_sampling():
    # q = 1: each round is the Gaussian mechanism, RDP α/(2σ²); T rounds compose to Tα/(2σ²), and
    # Balle et al. 2020 convert RDP to ε = min_α rdp + ln((α−1)/α) − (ln δ + ln α)/(α − 1)
    sigma, delta, rounds = 2.0, 1e-5, 5
    alphas = np.asarray(RDPAccountant.DEFAULT_ALPHAS, dtype=np.float64)
    expected = [float(np.min(t * alphas / (2 * sigma**2) + np.log((alphas - 1) / alphas)
                             - (np.log(delta) + np.log(alphas)) / (alphas - 1))) for t in range(1, rounds + 1)]
    assert gaussian_epsilons([(sigma, 1.0)] * rounds, delta) == pytest.approx(expected, rel=1e-9)


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    low = gaussian_epsilons([(0.8, 0.2)] * 30, 1e-5)
    high = gaussian_epsilons([(1.6, 0.2)] * 30, 1e-5)
    assert all(b > a for a, b in zip(low, low[1:], strict=False))
    assert all(h < lo for h, lo in zip(high, low, strict=True))
    assert gaussian_epsilons([], 1e-5) == []


def test_noise_placements():
    sigma, clip, m = 1.2, 0.5, 16
    assert noise_std(sigma, clip, m, "local") == pytest.approx(sigma * clip)
    per_client = noise_std(sigma, clip, m, "distributed")
    assert per_client == pytest.approx(sigma * clip / 4)
    # the sum of m clients' distributed noise carries σ·C, as one local client's does
    rng = np.random.default_rng(0)
    summed = sum(add_gaussian([np.zeros(50_000, np.float32)], per_client, rng)[0].astype(np.float64)
                 for _ in range(m))
    assert summed.std() == pytest.approx(sigma * clip, rel=0.02)
    # if only 4 of the 16 report, their sum carries σ·C·√(4/16): account with σ/2
    assert effective_noise_multiplier(sigma, "distributed", 16, 4) == pytest.approx(sigma / 2)
    survivors = sum(add_gaussian([np.zeros(50_000, np.float32)], per_client, rng)[0].astype(np.float64)
                    for _ in range(4))
    assert survivors.std() == pytest.approx(sigma / 2 * clip, rel=0.02)
    assert effective_noise_multiplier(sigma, "distributed", 16, 16) == pytest.approx(sigma)
    assert effective_noise_multiplier(sigma, "local", 16, 4) == sigma
    assert set(PLACEMENTS) == {"local", "distributed"}


def test_schedules_endpoints_and_shape():
    lin = epsilon_schedule("linear", 4.0, 1.0, 7)
    exp = epsilon_schedule("exponential", 4.0, 0.25, 5)
    const = epsilon_schedule("constant", 2.0, 0.5, 3)
    assert lin[0] == 4.0 and lin[-1] == pytest.approx(1.0) and len(lin) == 7
    assert np.diff(lin) == pytest.approx([-0.5] * 6)  # equal steps
    assert exp == pytest.approx([4.0, 2.0, 1.0, 0.5, 0.25])  # equal ratios
    assert const == [2.0, 2.0, 2.0]
    assert all(b < a for a, b in zip(lin, lin[1:], strict=False))
    assert all(b < a for a, b in zip(exp, exp[1:], strict=False))
    assert epsilon_schedule("linear", 1.0, 3.0, 5) == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0])
    for name in SCHEDULES:
        assert epsilon_schedule(name, 3.0, 1.0, 1) == [3.0]


def test_laplace_composition_against_hand_computation():
    delta = 1e-5
    many = laplace_composed([0.1] * 100, delta)
    assert many["basic"] == {"epsilon": pytest.approx(10.0), "delta": 0.0}
    # 100·0.1·(e^0.1 − 1)/(e^0.1 + 1) + √(2·ln(1e5)·100·0.01) = 0.49958 + 4.79853
    by_hand = 100 * 0.1 * (math.exp(0.1) - 1) / (math.exp(0.1) + 1) + math.sqrt(2 * math.log(1e5) * 1.0)
    assert by_hand == pytest.approx(5.29811, abs=1e-4)
    assert many["advanced"] == {"epsilon": pytest.approx(by_hand), "delta": delta}
    # few large ε: advanced composition is worse, so the basic sum is the answer
    few = laplace_composed([2.0, 2.0], delta)
    assert few["advanced"]["epsilon"] == pytest.approx(4.0)
    mixed = [1.0, 0.5, 0.25, 0.25]
    drift = sum(e * (math.exp(e) - 1) / (math.exp(e) + 1) for e in mixed)
    spread = math.sqrt(2 * math.log(1 / 1e-3) * sum(e * e for e in mixed))
    assert laplace_composed(mixed, 1e-3)["advanced"]["epsilon"] == pytest.approx(min(2.0, drift + spread))


def test_bad_privacy_arguments_say_what_to_fix():
    xs = _update()
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(UserError, match="clipping norm must be a positive"):
            clip_l2(xs, bad)
        with pytest.raises(UserError, match="clipping norm must be a positive"):
            clip_l1(xs, bad)
    for delta in (0.0, 1.0, -0.1, 2.0):
        with pytest.raises(UserError, match="delta must lie strictly between 0 and 1"):
            gaussian_epsilons([(1.0, 0.1)], delta)
        with pytest.raises(UserError, match="delta must lie strictly between 0 and 1"):
            laplace_composed([1.0], delta)
    with pytest.raises(UserError, match="sample rate"):
        gaussian_epsilons([(1.0, 0.0)], 1e-5)
    with pytest.raises(UserError, match="ε must be a positive"):
        laplace_composed([1.0, 0.0], 1e-5)
    with pytest.raises(UserError, match="ε must be a positive"):
        laplace_scale(1.0, -2.0)
    with pytest.raises(UserError, match="constant, exponential, linear"):
        epsilon_schedule("cosine", 1.0, 0.1, 10)
    with pytest.raises(UserError, match="starting ε must be a positive"):
        epsilon_schedule("linear", 0.0, 0.1, 10)
    with pytest.raises(UserError, match="distributed, local"):
        noise_std(1.0, 1.0, 10, "central")
    with pytest.raises(UserError, match="distributed, local"):
        effective_noise_multiplier(1.0, "central", 10, 5)
    with pytest.raises(UserError, match="survivors must be between 1 and planned"):
        effective_noise_multiplier(1.0, "distributed", 10, 11)
    with pytest.raises(UserError, match="NaN or infinite"):
        clip_l2([np.float32([np.inf])], 1.0)
