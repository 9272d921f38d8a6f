"""Client-level DP with adaptive clipping (``dp.clipping: adaptive``; Andrew et al. 2021): the noise split
against Flower's own implementation, the clip tracking the target quantile of the update norms, the
client reporting nothing about its update but a noisy bit, the ledger at the effective noise multiplier,
and the refusals. Strategies are driven without a simulation (as in test_federated_dp_wrappers); one slow
test runs the whole thing on Flower's engine."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.supercore.differential_privacy import compute_adaptive_noise_params
from pydantic import ValidationError

from conftest import assert_one_line_error, run_cli
from privlora.config import FederatedConfig
from privlora.errors import UserError
from privlora.federated import adaptive_clip, client_privacy
from privlora.federated.client import PlainRound
from privlora.federated.dp_client import AdaptiveClientClipping, ClientLevelClipping, wrap_round
from privlora.federated.dp_level import privacy_level
from privlora.federated.dp_strategy import ClientLevelAdaptiveClipping, wrap_strategy
from privlora.federated.privacy_plan import PrivacyPlan
from test_federated_dp_wrappers import TensorFedAvg, fit_res, manager

ADAPTIVE = {"mechanism": "gaussian", "clipping": "adaptive", "noise_multiplier": 0.5, "clip": 0.05,
            "clipped_count_stddev": 1.0, "target_quantile": 0.5, "clip_lr": 0.2}


def fed_config(clients: int = 20, rounds: int = 40, **dp: Any) -> FederatedConfig:
    return FederatedConfig.model_validate({"clients": clients, "clients_per_round": clients, "rounds": rounds,
                                           "data": {"limit": 200}, "quiet": True, "dp": {**ADAPTIVE, **dp}})


@pytest.mark.parametrize(("z", "m"), [(0.5, 20), (0.9, 50), (1.2, 1000), (0.3, 10)])
def test_noise_split_is_flowers(z: float, m: int) -> None:
    ours = adaptive_clip.update_noise_multiplier(z, adaptive_clip.default_count_stddev(m))
    count_std, theirs = compute_adaptive_noise_params(z, m, None)  # Flower returns (σ_b, z_Δ)
    assert ours == pytest.approx(theirs, rel=1e-12) and count_std == pytest.approx(m / 20)
    assert ours > z  # the updates pay for the bits
    assert adaptive_clip.effective_noise_multiplier(ours, count_std) == pytest.approx(z, rel=1e-12)


def test_too_little_count_noise_is_refused_as_flower_refuses_it() -> None:
    with pytest.raises(ValueError):
        compute_adaptive_noise_params(1.0, 10, None)  # σ_b = 0.5: 2σ_b = z
    with pytest.raises(UserError, match="clipped_count_stddev"):
        adaptive_clip.update_noise_multiplier(1.0, adaptive_clip.default_count_stddev(10))
    with pytest.raises(UserError, match="clipped_count_stddev"):
        wrap_strategy(fed_config(clients=10, clipped_count_stddev=None, noise_multiplier=1.0),
                      TensorFedAvg(fed_config(), [np.zeros(3, np.float32)]), Path("unused"))


def test_the_cli_explains_too_little_count_noise_in_one_line(tmp_path: Path) -> None:
    proc = run_cli("federate", "--clipping", "adaptive", "--dp", "gaussian", "--noise-multiplier", "1",
                   "--clients", "5", "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, "clipped_count_stddev")
    assert not (tmp_path / "run").exists()


def test_config_rules_and_the_registries() -> None:
    cfg = fed_config()
    assert privacy_level(cfg) == "client-adaptive"
    assert type(wrap_strategy(cfg, TensorFedAvg(cfg, [np.zeros(3, np.float32)]), Path("unused"))) \
        is ClientLevelAdaptiveClipping
    assert type(wrap_round(cfg, PlainRound(cfg))) is AdaptiveClientClipping
    bad = [({"dp": {**ADAPTIVE, "level": "sample"}}, "dp.level client"),
           ({"dp": {**ADAPTIVE, "mechanism": "laplace", "noise_multiplier": None}}, "gaussian"),
           ({"dp": {**ADAPTIVE, "placement": "distributed"}, "secagg": {"enabled": True}}, "local"),
           ({"dp": ADAPTIVE, "secagg": {"enabled": True}}, "without secagg"),
           ({"dp": ADAPTIVE, "hierarchy": {"edges": 2}}, "without secagg")]
    for extra, message in bad:
        with pytest.raises(ValidationError, match=message):
            FederatedConfig.model_validate({"clients": 6, **extra})


def test_the_client_says_nothing_about_its_update_but_a_noisy_bit() -> None:
    cfg = fed_config()
    upload = [np.full(50, 0.1, np.float32)]  # norm √50 · 0.1 ≈ 0.707
    norm = client_privacy.l2_norm(upload)
    instructions = {"mechanism": "gaussian", "clip": 0.5, "noise_std": 0.01, "placement": "local",
                    adaptive_clip.COUNT_STD_KEY: 0.3}
    client = AdaptiveClientClipping(PlainRound(cfg), rng=lambda: np.random.default_rng(7))
    released, raw = client.release(upload, instructions, 1.0)
    assert raw == pytest.approx(norm)
    assert client_privacy.l2_norm(released) < 0.5 + 0.01 * (math.sqrt(50) + 6)  # clipped to C, then noised
    want = 0.0 - 0.5 + float(np.random.default_rng(7).normal(0.0, 0.3))  # norm > C: bit 0
    assert client.released_metrics(raw, 1.23) == {adaptive_clip.BIT_KEY: pytest.approx(want)}
    assert ClientLevelClipping(PlainRound(cfg)).released_metrics(raw, 1.23) == {}  # fixed clip: nothing
    assert PlainRound(cfg).released_metrics(raw, 1.23) == {"update_norm": raw, "loss": 1.23}  # no DP: both
    with pytest.raises(UserError, match="count noise"):  # a server that asks for a clear bit is refused
        client.release(upload, {k: v for k, v in instructions.items() if k != adaptive_clip.COUNT_STD_KEY}, 1.0)


def drive(cfg: FederatedConfig, norms: np.ndarray, tmp_path: Path, dims: int = 50) -> Any:
    """Every round: the wrapper's instructions to every client, each client's real adaptive release of an
    update of its norm, the replies merged; the wrapper (its plan holds the clips) after the last round."""
    strategy = TensorFedAvg(cfg, [np.zeros(dims, np.float32)])
    wrapped = wrap_strategy(cfg, strategy, tmp_path)
    nodes = list(range(1, len(norms) + 1))
    clients = {n: AdaptiveClientClipping(PlainRound(cfg), rng=lambda n=n: np.random.default_rng(n))
               for n in nodes}
    direction = np.ones(dims, np.float32) / math.sqrt(dims)
    for r in range(1, cfg.rounds + 1):
        picked = wrapped.configure_fit(r, None, manager(nodes))
        results = []
        for proxy, ins in picked:
            k = int(proxy.node_id)
            client = clients[k]
            client.rng = lambda k=k, r=r: np.random.default_rng(1000 * r + k)
            released, raw = client.release([direction * float(norms[k - 1])], ins.config, 1.0)
            results.append((proxy, fit_res(released, 10, k - 1, **client.released_metrics(raw, 0.0))))
        wrapped.aggregate_fit(r, results, [])
        wrapped.evaluate(r, None)
    return wrapped


def test_the_clip_tracks_the_target_quantile_and_the_ledger_is_the_effective_z(tmp_path: Path) -> None:
    norms = np.linspace(0.2, 2.0, 20)  # median 1.1
    cfg = fed_config()
    wrapped = drive(cfg, norms, tmp_path)
    plan = wrapped.privacy
    clips = plan.clips
    assert len(clips) == cfg.rounds and clips[0] == pytest.approx(0.05)
    assert all(b > a for a, b in zip(clips[:10], clips[1:11], strict=True))  # all clipped: C grows early on
    assert 0.6 < plan.clip < 1.7  # … to near the median norm (1.1), from 0.05, in 40 rounds
    # the instructions carried each round's C and z_Δ·C
    assert plan.update_sigma == pytest.approx(adaptive_clip.update_noise_multiplier(0.5, 1.0))
    fixed = PrivacyPlan(FederatedConfig.model_validate({**cfg.model_dump(), "dp": {
        "mechanism": "gaussian", "noise_multiplier": 0.5, "clip": 1.0}}))
    for r in range(1, cfg.rounds + 1):
        fixed.record(r, 20, planned=20)
    assert plan.spent() == pytest.approx(fixed.spent(), rel=1e-12)  # counted at the effective z, once per round
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["clipping"] == "adaptive" and report["clip_per_round"] == pytest.approx(clips)
    assert len(report["unclipped_fraction_per_round"]) == cfg.rounds
    assert report["epsilon"] == pytest.approx(plan.spent())


def test_a_lower_target_quantile_ends_at_a_lower_clip(tmp_path: Path) -> None:
    norms = np.linspace(0.2, 2.0, 20)
    low = drive(fed_config(target_quantile=0.2), norms, tmp_path / "low").privacy.clip
    high = drive(fed_config(target_quantile=0.8), norms, tmp_path / "high").privacy.clip
    assert low < 0.8 < 1.3 < high  # γ = 0.2 → near the 20th percentile (0.56), γ = 0.8 → the 80th (1.64)


@pytest.mark.slow
def test_adaptive_clipping_on_flowers_engine(tmp_path: Path) -> None:
    from privlora.federated.run import federate

    cfg = FederatedConfig.model_validate({
        "clients": 6, "rounds": 3, "out": str(tmp_path / "run"), "quiet": True, "data": {"limit": 240},
        "client": {"local_steps": 2, "batch_size": 8},
        "dp": {**ADAPTIVE, "clip": 0.01}})
    run = federate(cfg).run_dir
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["clipping"] == "adaptive" and len(privacy["clip_per_round"]) == 3
    fractions = [f for f in privacy["unclipped_fraction_per_round"] if f is not None]
    assert fractions and privacy["clip_next"] != privacy["clip_initial"]  # the clients' bits moved C
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["accepted"] >= 1 for m in lines[1:] if m.get("sampled"))
