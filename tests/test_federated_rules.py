"""Wire layouts and merges of FedIT / FFA-LoRA / FLoRA, rank changes, hierarchy, upload checks, one
client round without Flower — all against independent computations of ΔW = (alpha/r)·B·A."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from privlora.config import FederatedConfig
from privlora.errors import UserError
from privlora.federated.client import LoraClient
from privlora.federated.dp_client import privatize
from privlora.federated.rules import FLoRA, Rule, get_rule, lora_layers, weighted_mean
from privlora.federated.strategy import LoraStrategy, hierarchical_mean

RNG = np.random.default_rng(0)


def fake_state(layers: int = 3, rank: int = 4, d: int = 12, labels: int = 3) -> list[np.ndarray]:
    As = [RNG.normal(size=(rank, d)).astype(np.float32) for _ in range(layers)]
    Bs = [RNG.normal(size=(d, rank)).astype(np.float32) for _ in range(layers)]
    return As + Bs + [RNG.normal(size=(labels, d)).astype(np.float32), RNG.normal(size=labels).astype(np.float32)]


def delta_w(state: list[np.ndarray], alpha: float) -> list[np.ndarray]:
    n = len(state) // 2 - 1
    return [(alpha / state[k].shape[0]) * state[n + k].astype(np.float64) @ state[k].astype(np.float64)
            for k in range(n)]


def test_fedit_merge_is_fedavg_of_a_and_b() -> None:
    state = fake_state()
    uploads = [[RNG.normal(size=a.shape).astype(np.float32) for a in state] for _ in range(3)]
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    new = get_rule("fedit").merge(state, uploads, p)
    for k, s in enumerate(state):
        expected = s + sum(w * u[k] for w, u in zip([0.5, 0.3, 0.2], uploads, strict=True))
        np.testing.assert_allclose(new[k], expected, rtol=1e-5, atol=1e-5)


def test_ffa_keeps_a_and_is_exact_in_delta_w() -> None:
    state = fake_state()
    rule = get_rule("ffa")
    n = 3
    shapes = rule.upload_shapes(state)
    assert shapes == [tuple(a.shape) for a in state[n:]]  # no A travels
    uploads = [[RNG.normal(size=s).astype(np.float32) for s in shapes] for _ in range(4)]
    p = torch.full((4,), 0.25, dtype=torch.float64)
    new = rule.merge(state, uploads, p)
    for k in range(n):
        np.testing.assert_array_equal(new[k], state[k])
    # exact: ΔW of the merged adapter = mean of the clients' ΔW
    clients = [delta_w(list(state[:n]) + [state[n + k] + u[k] for k in range(n)] + list(state[2 * n:]), 16.0)
               for u in uploads]
    merged = delta_w(new, 16.0)
    for k in range(n):
        target = sum(c[k] for c in clients) / 4
        assert np.linalg.norm(merged[k] - target) / np.linalg.norm(target) < 1e-6


def test_flora_merge_adds_weighted_client_products_with_their_own_scaling() -> None:
    d, labels = 10, 3
    state = [np.zeros((d, d), np.float32) for _ in range(2)] + [np.zeros((labels, d), np.float32),
                                                                np.zeros(labels, np.float32)]
    ranks = [2, 5]
    uploads = []
    for r in ranks:
        As = [RNG.normal(size=(r, d)).astype(np.float32) for _ in range(2)]
        Bs = [RNG.normal(size=(d, r)).astype(np.float32) for _ in range(2)]
        uploads.append(As + Bs + [RNG.normal(size=(labels, d)).astype(np.float32),
                                  RNG.normal(size=labels).astype(np.float32)])
    p = torch.tensor([0.25, 0.75], dtype=torch.float64)
    rule = get_rule("flora", alpha=8.0)
    new = rule.merge(state, uploads, p)
    for k in range(2):
        target = sum(w * (8.0 / r) * u[2 + k].astype(np.float64) @ u[k].astype(np.float64)
                     for w, r, u in zip([0.25, 0.75], ranks, uploads, strict=True))
        np.testing.assert_allclose(new[k], target, rtol=1e-5, atol=1e-5)
    # the saved adapter's factors reproduce the dense ΔW exactly
    As, Bs = rule.adapter_factors(new)
    for k in range(2):
        np.testing.assert_allclose(Bs[k] @ As[k], new[k], rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="cannot work from a securely summed"):
        rule.apply_mean(new, new)


def test_rank_growth_keeps_delta_w_and_shrinking_is_the_best_low_rank_approximation() -> None:
    state = fake_state(rank=4)
    rule = Rule(alpha=16.0)
    before = delta_w(state, 16.0)
    grown = rule.resize(state, 8, seed=1)
    assert grown[0].shape == (8, 12) and grown[3].shape == (12, 8)
    for a, b in zip(before, delta_w(grown, 16.0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    shrunk = rule.resize(state, 2, seed=1)
    for a, b in zip(before, delta_w(shrunk, 16.0), strict=True):
        singular = np.linalg.svd(a, compute_uv=False)
        # Eckart–Young: the error of the best rank-2 approximation is the norm of the dropped singular values
        assert np.linalg.norm(a - b) == pytest.approx(np.sqrt((singular[2:] ** 2).sum()), rel=1e-4)


def test_hierarchical_mean_equals_the_flat_weighted_mean() -> None:
    uploads = [[RNG.normal(size=(5, 3)).astype(np.float32)] for _ in range(7)]
    p = torch.tensor(RNG.random(7), dtype=torch.float64)
    p = p / p.sum()
    flat = weighted_mean(uploads, p)
    two_level = hierarchical_mean(uploads, p, partitions=list(range(7)), edges=3)
    np.testing.assert_allclose(two_level[0], flat[0], rtol=1e-5, atol=1e-6)


def small_config(**overrides) -> FederatedConfig:
    base = {"clients": 3, "rounds": 1, "data": {"limit": 200}, "client": {"local_steps": 2, "batch_size": 8},
            "quiet": True}
    base.update(overrides)
    return FederatedConfig.model_validate(base)


def test_server_rejects_nan_wrong_shape_and_oversized_uploads(tmp_path) -> None:
    strategy = LoraStrategy(small_config(max_update_norm=5.0), tmp_path)
    strategy.state = fake_state(layers=2, rank=2, d=6)
    good = [np.full(s, 0.01, np.float32) for s in strategy.rule.upload_shapes(strategy.state)]

    def res(arrays):
        return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 10, {"partition": 0})

    assert strategy.decode_checked(res(good))[1] is None
    nan = [a.copy() for a in good]
    nan[1][0, 0] = np.nan
    assert "NaN" in strategy.decode_checked(res(nan))[1]
    assert "shape" in strategy.decode_checked(res(good[:-1] + [np.zeros(7, np.float32)]))[1]
    assert "expected" in strategy.decode_checked(res(good[:-1]))[1]
    big = [a * 1000 for a in good]
    assert "exceeds the bound" in strategy.decode_checked(res(big))[1]


def test_privatize_clips_then_adds_noise_of_the_requested_scale() -> None:
    upload = [np.full((100, 100), 1.0, np.float32)]  # norm 100
    out, norm = privatize(upload, {"mechanism": "gaussian", "clip": 2.0, "noise_std": 0.0})
    assert norm == pytest.approx(100.0)
    assert np.linalg.norm(out[0]) == pytest.approx(2.0, rel=1e-5)
    noisy, _ = privatize(upload, {"mechanism": "gaussian", "clip": 2.0, "noise_std": 0.5})
    assert np.std(noisy[0] - out[0]) == pytest.approx(0.5, rel=0.05)
    lap, _ = privatize(upload, {"mechanism": "laplace", "clip": 3.0, "laplace_scale": 0.2})
    # Laplace(b): mean absolute deviation b
    assert np.mean(np.abs(lap[0] - np.full((100, 100), 3.0 / 10000, np.float32))) == pytest.approx(0.2, rel=0.05)


def test_one_ffa_client_round_moves_b_and_the_head_but_not_a(tmp_path) -> None:
    config = small_config()
    strategy = LoraStrategy(config, tmp_path)
    strategy.initialize_parameters(None)
    state = [a.copy() for a in strategy.state]
    n = (len(state) - 2) // 2
    upload, samples, metrics = LoraClient(config, 1).fit(state, {"round": 1, "rank": 8, "mechanism": "none"})
    assert len(upload) == n + 2  # B's and the head only
    assert samples == len(strategy.data.parts[1]) and metrics["partition"] == 1
    assert all(np.abs(u).max() > 0 for u in upload), "every uploaded tensor must have moved"
    from privlora.federated.client import task_for

    task = task_for(config, 3, 8)
    for (_, m), A in zip(lora_layers(task.model), state[:n], strict=True):
        np.testing.assert_array_equal(m.lora_A["default"].weight.detach().numpy(), A)  # frozen, shared A


def test_flora_client_trains_fresh_factors_of_its_own_rank(tmp_path) -> None:
    config = small_config(strategy="flora", lora={"client_ranks": [2, 4, 8]})
    strategy = LoraStrategy(config, tmp_path)
    strategy.initialize_parameters(None)
    assert isinstance(strategy.rule, FLoRA)
    upload, _, _ = LoraClient(config, 1).fit([a.copy() for a in strategy.state],
                                             {"round": 1, "rank": 8, "mechanism": "none"})
    assert upload[0].shape[0] == 4  # partition 1 → client_ranks[1]
    assert strategy.decode_checked(FitRes(Status(Code.OK, ""), ndarrays_to_parameters(upload), 5, {}))[1] is None


@pytest.mark.parametrize("overrides, message", [
    ({"strategy": "flora", "secagg": {"enabled": True}}, "secagg needs a summing strategy"),
    ({"compression": "int8", "secagg": {"enabled": True}}, "quantises the uploads itself"),
    ({"dp": {"mechanism": "gaussian", "noise_multiplier": 1.0, "placement": "distributed"}}, "relies on secure"),
    ({"lora": {"client_ranks": [2, 4]}}, "needs strategy flora"),
    ({"clients_per_round": 9}, "clients_per_round 9 > clients 3"),
    ({"dp": {"mechanism": "gaussian"}}, "noise_multiplier or dp.target_epsilon"),
    ({"bogus": 1}, "unknown config key 'bogus'"),
])
def test_incompatible_settings_are_refused_in_one_line(overrides, message) -> None:
    from privlora.config import load_config

    tree = {"clients": 3, **overrides}
    with pytest.raises(UserError, match=message):
        load_config(None, {k: v for k, v in tree.items()}, model=FederatedConfig)


def test_privacy_plan_solves_sigma_for_a_target_epsilon_and_keeps_the_ledger() -> None:
    from privlora.federated import client_privacy
    from privlora.federated.privacy_plan import PrivacyPlan

    cfg = small_config(rounds=10, clients=5, clients_per_round=2,
                       dp={"mechanism": "gaussian", "target_epsilon": 3.0, "delta": 1e-5})
    plan = PrivacyPlan(cfg)
    eps = client_privacy.gaussian_epsilons([(plan.sigma, 0.4)] * 10, 1e-5)[-1]
    assert 2.95 < eps <= 3.0  # σ is the smallest (to 0.1 %) that meets the target
    for r in range(1, 11):
        plan.record(r, survivors=2)
    report = plan.report()
    assert report["epsilon"] == pytest.approx(eps) and len(report["epsilon_per_round"]) == 10
    assert report["epsilon_per_round"] == sorted(report["epsilon_per_round"])


def test_laplace_schedule_is_loose_early_strict_late_and_composes() -> None:
    from privlora.federated.privacy_plan import PrivacyPlan

    cfg = small_config(rounds=4, dp={"mechanism": "laplace", "clip": 2.0, "epsilon_start": 4.0,
                                     "epsilon_end": 1.0, "schedule": "linear"})
    plan = PrivacyPlan(cfg)
    scales = [plan.instructions(r)["laplace_scale"] for r in range(1, 5)]
    assert scales == pytest.approx([2.0 / 4.0, 2.0 / 3.0, 2.0 / 2.0, 2.0 / 1.0])
    for r in range(1, 5):
        plan.record(r, survivors=3)
    report = plan.report()
    assert report["epsilon"] == pytest.approx(10.0)  # basic composition: 4 + 3 + 2 + 1
    assert report["epsilon_advanced"] <= 10.0
