"""Client sampling is the sampling the accountant assumes: DP rounds are Poisson draws (every client
independently with probability q, so round sizes vary and can be 0), distributed noise is split over
the clients actually drawn, and every round — empty ones too — is counted once in the ledger.

Driven through the real strategy with Flower's own client manager and client proxies."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy

from privlora.config import FederatedConfig
from privlora.errors import UserError
from privlora.federated import client_privacy
from privlora.federated.dp_strategy import PrivacyWrapper, build_strategy
from privlora.federated.partition import poisson_clients

NODES = [101, 205, 309, 412, 517, 620, 733, 848, 951, 1064]


def fed_config(**overrides) -> FederatedConfig:
    base = {"clients": 10, "clients_per_round": 3, "rounds": 40, "data": {"limit": 200}, "quiet": True,
            "dp": {"mechanism": "gaussian", "noise_multiplier": 1.0, "clip": 0.5}}
    return FederatedConfig.model_validate({**base, **overrides})


def strategy_with_clients(config: FederatedConfig, tmp_path: Path) -> tuple[PrivacyWrapper, SimpleClientManager]:
    manager = SimpleClientManager()
    for n in NODES[:config.clients]:
        manager.register(GridClientProxy(n, None, 1))  # type: ignore[arg-type]
    strategy = build_strategy(config, tmp_path)  # the LoRA strategy in its privacy wrapper
    strategy.state = [np.zeros((2, 3), np.float32)]  # what travels does not matter here
    return strategy, manager


def test_poisson_clients_are_independent_draws_with_rate_q() -> None:
    ids = list(range(50))
    rounds = [poisson_clients(ids, 0.2, seed=3, round_number=r) for r in range(400)]
    assert rounds[7] == poisson_clients(ids, 0.2, seed=3, round_number=7)  # seeded by (seed, round)
    assert rounds[7] != poisson_clients(ids, 0.2, seed=4, round_number=7)
    sizes = np.array([len(r) for r in rounds])
    assert len(set(sizes.tolist())) > 5  # the round size varies (Binomial(50, 0.2)), it is not fixed at 10
    assert abs(sizes.mean() - 10) < 0.5 and abs(sizes.var() - 50 * 0.2 * 0.8) < 2.0
    share = np.mean([[i in r for i in ids] for r in rounds], axis=0)
    assert np.all(np.abs(share - 0.2) < 0.07)  # every client joins with probability q
    assert poisson_clients(ids, 1.0, seed=0, round_number=0) == ids
    assert any(not poisson_clients([1, 2], 0.05, seed=0, round_number=r) for r in range(20))  # empty rounds
    for q in (0.0, 1.5, math.nan):
        with pytest.raises(UserError, match="sampling rate"):
            poisson_clients(ids, q, seed=0, round_number=0)


def test_dp_rounds_sample_poisson_and_say_so(tmp_path) -> None:
    config = fed_config()
    strategy, manager = strategy_with_clients(config, tmp_path)
    sizes = []
    for r in range(1, 41):
        chosen = sorted(p.node_id for p, _ in strategy.configure_fit(r, None, manager))  # type: ignore[arg-type]
        assert chosen == poisson_clients(sorted(NODES), 0.3, seed=config.seed, round_number=r)
        sizes.append(len(chosen))
    assert len(set(sizes)) >= 3 and 0 in sizes  # not a fixed 3 per round; some round drew nobody
    report = strategy.privacy.report()
    assert report["sampling"].startswith("poisson, q=0.3 ")
    assert report["neighbouring"] == "add/remove one client (all of that client's data)"
    assert report["sampled_per_round"] == sizes and report["empty_rounds"] == sizes.count(0)


def test_without_dp_rounds_keep_a_fixed_size(tmp_path) -> None:
    strategy, manager = strategy_with_clients(fed_config(dp={"mechanism": "none"}), tmp_path)
    assert {len(strategy.configure_fit(r, None, manager)) for r in range(1, 21)} == {3}  # type: ignore[arg-type]


def test_distributed_noise_is_split_over_the_clients_actually_drawn(tmp_path) -> None:
    config = fed_config(secagg={"enabled": True},
                        dp={"mechanism": "gaussian", "noise_multiplier": 2.0, "clip": 0.5, "placement": "distributed"})
    strategy, manager = strategy_with_clients(config, tmp_path)
    seen = set()
    for r in range(1, 21):
        picked = strategy.configure_fit(r, None, manager)  # type: ignore[arg-type]
        for _, ins in picked:
            # the secure sum of the n drawn clients carries σC whatever n is
            assert ins.config["noise_std"] == pytest.approx(2.0 * 0.5 / math.sqrt(len(picked)))
        seen.add(len(picked))
    assert len(seen - {0}) >= 2


def test_every_round_counts_once_empty_ones_too(tmp_path) -> None:
    config = fed_config(clients=3, clients_per_round=1, rounds=6)
    strategy, manager = strategy_with_clients(config, tmp_path)
    for r in range(1, 7):
        picked = strategy.configure_fit(r, None, manager)  # type: ignore[arg-type]
        if picked:
            strategy.aggregate_fit(r, [], [])  # every drawn client failed: nothing merged
        strategy.close_round(r)  # what the round's evaluation does
        strategy.close_round(r)  # a second time changes nothing
    assert 0 in strategy.privacy.report()["sampled_per_round"]
    expected = client_privacy.gaussian_epsilons([(1.0, 1 / 3)] * 6, config.dp.delta)[-1]
    assert strategy.privacy.report()["rounds"] == 6
    assert strategy.privacy.report()["epsilon"] == pytest.approx(expected, rel=1e-12)
