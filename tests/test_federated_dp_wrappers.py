"""DP as wrappers (issue 22): the LoRA strategy and the client's plain round hold no privacy code; the
wrappers chosen by ``dp.level`` add it, around any strategy with the same interface.

No Flower simulation: strategies are driven with Flower's own client manager and proxies, uploads are
hand-made arrays, so every test runs in seconds."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy

from privlora.config import FederatedConfig
from privlora.federated import client_privacy
from privlora.federated.client import PlainRound
from privlora.federated.dp_client import ClientLevelClipping, SampleLevelDPSGD, wrap_round
from privlora.federated.dp_strategy import (
    ClientLevelFixedClipping,
    NoDP,
    SampleLevelBudget,
    build_strategy,
    wrap_strategy,
)
from privlora.federated.partition import poisson_clients, sample_clients
from privlora.federated.sample_dp import ClientLedger
from privlora.federated.strategy import LoraStrategy

NODES = [11, 22, 33, 44, 55, 66]


def fed_config(**overrides: Any) -> FederatedConfig:
    base = {"clients": 6, "clients_per_round": 3, "rounds": 3, "data": {"limit": 200}, "quiet": True}
    return FederatedConfig.model_validate({**base, **overrides})


def manager(nodes: Sequence[int] = NODES) -> SimpleClientManager:
    m = SimpleClientManager()
    for n in nodes:
        m.register(GridClientProxy(n, None, 1))  # type: ignore[arg-type]
    return m


def fit_res(arrays: list[np.ndarray], samples: int, partition: int, **metrics: Any) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), samples, {"partition": partition, **metrics})


class TensorFedAvg(Strategy):
    """A second, trivial strategy with the wrappable interface: FedAvg of plain tensors."""

    def __init__(self, config: FederatedConfig, state: list[np.ndarray]) -> None:
        self.config = config
        self.state = state
        self.sampler = lambda ids, r: sample_clients(sorted(ids), min(config.per_round(), len(ids)),
                                                     seed=config.seed, round_number=r)
        self.upload_bound = lambda dims: None
        self.round_log: dict[str, Any] = {}
        self.lines: list[dict[str, Any]] = []

    def initialize_parameters(self, client_manager: Any) -> Parameters:
        return ndarrays_to_parameters(self.state)

    def fit_ins(self, server_round: int, group: int = 1) -> FitIns:
        return FitIns(ndarrays_to_parameters(self.state), {"round": server_round})

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        by_node = {p.node_id: p for p in client_manager.all().values()}
        chosen = self.sampler(sorted(by_node), server_round)
        self.round_log = {"round": server_round, "sampled": len(chosen)}
        ins = self.fit_ins(server_round, len(chosen))
        return [(by_node[n], ins) for n in chosen]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Parameters, dict]:
        kept = []
        for _, res in results:
            upload = parameters_to_ndarrays(res.parameters)
            bound = self.upload_bound(sum(a.size for a in upload))
            if bound is None or client_privacy.l2_norm(upload) <= bound:
                kept.append((upload, res.num_examples))
        if kept:
            w = np.array([n for _, n in kept], dtype=np.float64)
            w /= w.sum()
            self.state = [sum(p * u[k].astype(np.float64) for p, (u, _) in zip(w, kept, strict=True)).astype(np.float32)
                          for k in range(len(self.state))]
        self.round_log["accepted"] = len(kept)
        return ndarrays_to_parameters(self.state), {"accepted": len(kept)}

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> tuple[float, dict]:
        self.lines.append({"round": server_round, **self.round_log})
        return 0.0, {}


def uploads_for(shapes: Sequence[tuple[int, ...]], picked: list, seed: int = 5) -> list[tuple[Any, FitRes]]:
    rng = np.random.default_rng(seed)
    return [(proxy, fit_res([rng.normal(0, 0.1, s).astype(np.float32) for s in shapes], 10 + 7 * i, i))
            for i, (proxy, _) in enumerate(picked)]


# --- registries ---------------------------------------------------------------------------------------


def test_both_registries_pick_the_wrapper_by_privacy_level(tmp_path: Path) -> None:
    cases = [(fed_config(), NoDP, type(None)),
             (fed_config(dp={"mechanism": "gaussian", "noise_multiplier": 1.0}), ClientLevelFixedClipping,
              ClientLevelClipping),
             (fed_config(dp={"level": "sample", "mechanism": "gaussian", "noise_multiplier": 1.0}), SampleLevelBudget,
              SampleLevelDPSGD)]
    for cfg, server, client in cases:
        strategy = TensorFedAvg(cfg, [np.zeros(3, np.float32)])
        wrapped = wrap_strategy(cfg, strategy, tmp_path)
        assert type(wrapped) is server and wrapped.inner is strategy
        assert strategy.sampler == wrapped.privacy.sample  # the wrapper's plan now samples
        plain = PlainRound(cfg)
        round_ = wrap_round(cfg, plain)
        assert (round_ is plain) if client is type(None) else (type(round_) is client and round_.inner is plain)


# --- server side ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["ffa", "fedit"])
def test_no_dp_wrapper_aggregates_bit_identically_to_the_plain_lora_strategy(rule: str, tmp_path: Path) -> None:
    cfg = fed_config(strategy=rule)
    rng = np.random.default_rng(0)
    layers, rank, d = 2, 2, 6
    state = ([rng.normal(size=(rank, d)).astype(np.float32) for _ in range(layers)]
             + [rng.normal(size=(d, rank)).astype(np.float32) for _ in range(layers)]
             + [rng.normal(size=(3, d)).astype(np.float32), rng.normal(size=3).astype(np.float32)])
    plain = LoraStrategy(cfg, tmp_path / "plain")
    wrapped = build_strategy(cfg, tmp_path / "wrapped")
    assert isinstance(wrapped, NoDP) and isinstance(wrapped.inner, LoraStrategy)
    for s in (plain, wrapped):
        s.state = [a.copy() for a in state]  # written through the wrapper to the inner strategy
    assert wrapped.inner.state is wrapped.state
    for r in (1, 2):
        picked_plain = plain.configure_fit(r, None, manager())  # type: ignore[arg-type]
        picked_wrapped = wrapped.configure_fit(r, None, manager())  # type: ignore[arg-type]
        assert [p.node_id for p, _ in picked_plain] == [p.node_id for p, _ in picked_wrapped]
        assert picked_wrapped[0][1].parameters.tensors == picked_plain[0][1].parameters.tensors
        assert dict(picked_wrapped[0][1].config) == {**picked_plain[0][1].config, "mechanism": "none"}
        shapes = plain.rule.upload_shapes(plain.state)
        plain.aggregate_fit(r, uploads_for(shapes, picked_plain, seed=r), [])
        wrapped.aggregate_fit(r, uploads_for(shapes, picked_wrapped, seed=r), [])
        for a, b in zip(plain.state, wrapped.state, strict=True):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()  # bit for bit
        assert wrapped.round_log["epsilon"] is None and "epsilon" not in plain.round_log


def test_no_dp_wrapper_around_another_strategy_changes_no_bit(tmp_path: Path) -> None:
    cfg = fed_config()
    start = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, np.float32)]
    plain = TensorFedAvg(cfg, [a.copy() for a in start])
    wrapped = NoDP(TensorFedAvg(cfg, [a.copy() for a in start]), cfg, tmp_path)
    for r in (1, 2, 3):
        pp = plain.configure_fit(r, None, manager())
        pw = wrapped.configure_fit(r, None, manager())
        assert [p.node_id for p, _ in pp] == [p.node_id for p, _ in pw]
        plain.aggregate_fit(r, uploads_for([(2, 3), (4,)], pp, seed=r), [])
        wrapped.aggregate_fit(r, uploads_for([(2, 3), (4,)], pw, seed=r), [])
        assert all(a.tobytes() == b.tobytes() for a, b in zip(plain.state, wrapped.state, strict=True))
        wrapped.evaluate(r, None)
    assert json.loads((tmp_path / "privacy.json").read_text())["mechanism"] == "none"


def test_client_level_wrapper_around_fedavg_clips_noises_and_accounts_by_the_formula(tmp_path: Path) -> None:
    """Hand-made client updates through the client-level wrappers of both ends, around plain FedAvg:
    the aggregate is Σ p_i (u_i·min(1, C/‖u_i‖) + N(0, (σC)²)) with the clients' own noise draws."""
    sigma, clip = 0.8, 0.5
    cfg = fed_config(rounds=4, dp={"mechanism": "gaussian", "noise_multiplier": sigma, "clip": clip})
    inner = TensorFedAvg(cfg, [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)])
    strategy = ClientLevelFixedClipping(inner, cfg, tmp_path)
    rounds_sampled = []
    for r in range(1, 5):
        picked = strategy.configure_fit(r, None, manager())
        chosen = [p.node_id for p, _ in picked]
        assert chosen == poisson_clients(NODES, 0.5, seed=cfg.seed, round_number=r)  # the plan's sampling
        rounds_sampled.append(len(chosen))
        if not picked:
            strategy.evaluate(r, None)
            continue
        ins = dict(picked[0][1].config)
        assert ins == {"round": r, "mechanism": "gaussian", "clip": clip, "noise_std": sigma * clip,
                       "placement": "local"}
        raw = np.random.default_rng(r)
        results, expected = [], []
        for i, (proxy, _) in enumerate(picked):
            update = [raw.normal(0, 0.6 * (i + 1), (2, 3)).astype(np.float32),
                      raw.normal(0, 0.6 * (i + 1), 4).astype(np.float32)]
            seed = 1000 * r + i
            client = ClientLevelClipping(PlainRound(cfg), rng=lambda s=seed: np.random.default_rng(s))
            released, norm = client.release(update, ins, 1.0)
            # the formula, computed here on its own: scale to the clip, then one N(0, (σC)²) per value
            total = math.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in update))
            assert norm == pytest.approx(total, rel=1e-12)
            factor = min(1.0, clip / total)
            noise = np.random.default_rng(seed)
            want = [u.astype(np.float64) * factor + noise.normal(0.0, sigma * clip, u.shape) for u in update]
            for got, w in zip(released, want, strict=True):
                np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-6)
            results.append((proxy, fit_res(released, 10 + i, i)))
            expected.append((want, 10 + i))
        strategy.aggregate_fit(r, results, [])
        p = np.array([n for _, n in expected], dtype=np.float64)
        p /= p.sum()
        for k, got in enumerate(strategy.state):
            np.testing.assert_allclose(got, sum(pi * w[k] for pi, (w, _) in zip(p, expected, strict=True)),
                                       rtol=1e-5, atol=1e-6)
        strategy.evaluate(r, None)
    # the ledger: one Poisson-subsampled Gaussian step per round, empty rounds too
    eps = client_privacy.gaussian_epsilons([(sigma, 0.5)] * 4, cfg.dp.delta)
    assert [line["epsilon"] for line in inner.lines] == pytest.approx(eps, rel=1e-9)
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["epsilon"] == pytest.approx(eps[-1], rel=1e-9) and report["sampled_per_round"] == rounds_sampled


def test_client_level_wrapper_rejects_uploads_past_clip_plus_noise_bound(tmp_path: Path) -> None:
    cfg = fed_config(clients_per_round=6, dp={"mechanism": "gaussian", "noise_multiplier": 0.5, "clip": 1.0})
    inner = TensorFedAvg(cfg, [np.zeros(100, np.float32)])
    strategy = ClientLevelFixedClipping(inner, cfg, tmp_path)  # q = 1: every client every round
    picked = strategy.configure_fit(1, None, manager())
    bound = 1.0 + 0.5 * (math.sqrt(100) + 6.0)
    assert inner.upload_bound(100) == pytest.approx(bound)
    honest = [np.full(100, 0.1, np.float32)]  # norm 1
    huge = [np.full(100, bound, np.float32)]  # norm 10·bound
    results = [(picked[0][0], fit_res(honest, 10, 0)), (picked[1][0], fit_res(huge, 10, 1))]
    _, metrics = strategy.aggregate_fit(1, results, [])
    assert metrics["accepted"] == 1
    np.testing.assert_array_equal(strategy.state[0], honest[0])


def test_sample_level_wrapper_stops_sampling_a_client_whose_budget_is_spent(tmp_path: Path) -> None:
    one_round = ClientLedger([(1.0, 0.1, 3)]).epsilon(1e-5)  # the config's δ
    cfg = fed_config(clients_per_round=6, dp={"level": "sample", "mechanism": "gaussian", "noise_multiplier": 1.0,
                                              "budget": one_round * (1 + 1e-9)})
    inner = TensorFedAvg(cfg, [np.zeros(3, np.float32)])
    strategy = SampleLevelBudget(inner, cfg, tmp_path)
    picked = strategy.configure_fit(1, None, manager())
    assert len(picked) == 6 and dict(picked[0][1].config) == {"round": 1, "mechanism": "none", "level": "sample"}
    dp = {"dp_noise_multiplier": 1.0, "dp_sample_rate": 0.1, "dp_steps": 3, "dp_epsilon": one_round}
    first = picked[0][0]
    strategy.aggregate_fit(1, [(first, fit_res([np.ones(3, np.float32)], 5, 0, **dp))], [])
    np.testing.assert_array_equal(strategy.state[0], np.ones(3, np.float32))  # merged by the inner FedAvg
    again = [p.node_id for p, _ in strategy.configure_fit(2, None, manager())]
    assert first.node_id not in again and len(again) == 5  # one more round would pass its budget
    assert strategy.privacy.report()["clients"][0]["epsilon"] == pytest.approx(one_round)
