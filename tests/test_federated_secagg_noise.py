"""Distributed Gaussian noise through Flower's real SecAgg+ arithmetic: the sum the server decodes must
carry the σ·C the accountant assumes, for unequal client sizes, and no noisy value may be clipped.

Each client's upload goes through ``secaggplus_mod``'s own ``_collect_masked_vectors`` (weighting by
samples/max_weight, ±clipping_range clip, stochastic quantisation, private mask); the server side
removes the private masks and decodes exactly as ``SecAggPlusWorkflow`` does (factor_extract →
dequantize → offset → divide by the total weight). No pairwise masks (they cancel in the sum)."""

from __future__ import annotations

import math
import secrets
from pathlib import Path

import numpy as np
import pytest
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState, _collect_masked_vectors
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_extract, parameters_mod
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from privlora.config import FederatedConfig
from privlora.errors import UserError
from privlora.federated import secagg
from privlora.federated.app import fit_workflow
from privlora.federated.client import LoraClient
from privlora.federated.data import federated_data
from privlora.federated.dp_client import privatize
from privlora.federated.dp_strategy import build_strategy
from privlora.federated.privacy_plan import PrivacyPlan

SIZES = [579, 378, 99, 344, 200]  # the 5-client benchmark's partitions (RMS of the ratios 0.62)
MOD = 2**32
DIMS = 40_000
SIGMA, CLIP = 2.02, 0.5  # the benchmark's "ε = 8" row


def config(placement: str = "distributed", **secagg_options) -> FederatedConfig:
    return FederatedConfig.model_validate({
        "clients": len(SIZES), "rounds": 1, "quiet": True, "data": {"limit": 200}, "sample_cap": max(SIZES),
        "secagg": {"enabled": True, **secagg_options},
        "dp": {"mechanism": "gaussian", "noise_multiplier": SIGMA, "clip": CLIP, "placement": placement}})


def masked_upload(upload: list[np.ndarray], samples: int, state_args: dict) -> tuple[list[np.ndarray], bytes]:
    """One client's masked vector from the mod's own code, and its private-mask seed."""
    seed = secrets.token_bytes(32)
    state = SecAggPlusState(nid=1, threshold=1, rd_seed=seed, **state_args)
    out = _collect_masked_vectors(state, {Key.CIPHERTEXT_LIST: [], Key.SOURCE_LIST: []}, samples,
                                  ndarrays_to_parameters(upload))
    return [bytes_to_ndarray(b) for b in out[Key.MASKED_PARAMETERS]], seed


def secure_round(uploads: list[list[np.ndarray]], sizes: list[int], cfg: FederatedConfig,
                 clipping_range: float) -> tuple[list[np.ndarray], float]:
    """The decoded weighted mean, as SecAggPlusWorkflow computes it, and the total weight Σ w_i."""
    args = {"clipping_range": clipping_range, "target_range": cfg.secagg.quantization_range, "mod_range": MOD,
            "max_weight": secagg.max_weight(cfg)}
    total: list[np.ndarray] | None = None
    for upload, n in zip(uploads, sizes, strict=True):
        masked, seed = masked_upload(upload, n, args)
        mask = pseudo_rand_gen(seed, MOD, [a.shape for a in masked])
        vec = [m - k for m, k in zip(masked, mask, strict=True)]
        total = vec if total is None else [t + v for t, v in zip(total, vec, strict=True)]
    assert total is not None
    q_total, recon = factor_extract(parameters_mod(total, MOD))
    mean = dequantize(recon, clipping_range, cfg.secagg.quantization_range)
    for vec in mean:  # the workflow's own offset and rescaling
        vec += -(len(uploads) - 1) * clipping_range
        vec *= cfg.secagg.quantization_range / q_total
    return mean, float(q_total) / cfg.secagg.quantization_range


def noisy_uploads(cfg: FederatedConfig, sizes: list[int]) -> list[list[np.ndarray]]:
    """Every client's privatized (zero) update, as LoraClient.fit makes it: the plan's instructions,
    the client's own SecAgg+ weight."""
    ins = PrivacyPlan(cfg).instructions(1, group=len(sizes))
    weight_cap = secagg.max_weight(cfg)
    return [privatize([np.zeros(DIMS, np.float32)], ins,
                      secagg.upload_factor(n, weight_cap, cfg.secagg.quantization_range))[0] for n in sizes]


@pytest.mark.parametrize("sizes", [SIZES, [10, 10, 10, 10, 579]])
def test_the_decoded_secure_sum_carries_sigma_c_for_unequal_clients(sizes) -> None:
    np.random.seed(0)  # the mod's stochastic rounding draws from numpy's global generator
    cfg = config()
    plan = PrivacyPlan(cfg)
    mean, total_weight = secure_round(noisy_uploads(cfg, sizes), sizes, cfg, plan.secagg_clipping_range())
    weighted_sum = mean[0] * total_weight  # Σ w_i·x_i: the released sum the accountant analyses
    # before the fix the mod's weighting shrank the noise to σC·RMS(w) (0.62·σC for the benchmark)
    assert float(np.std(weighted_sum)) == pytest.approx(SIGMA * CLIP, rel=0.03)


def test_each_clients_contribution_to_the_sum_is_at_most_c() -> None:
    """Sensitivity: a client's clipped update enters the weighted sum as w·clip(u), w ≤ 1 — the
    largest client (samples = max_weight) contributes exactly C, as the accountant assumes."""
    cfg = config()
    cap = secagg.max_weight(cfg)
    weights = [secagg.upload_factor(n, cap, cfg.secagg.quantization_range) for n in SIZES]
    assert max(weights) == 1.0 and all(0 < w <= 1 for w in weights)
    np.random.seed(1)
    big = [np.full(DIMS, 3.0, np.float32)]  # norm 600 ≫ C: clipped to C
    ins = {"mechanism": "gaussian", "clip": CLIP, "noise_std": 0.0, "placement": "distributed"}
    for n, w in zip(SIZES, weights, strict=True):
        clipped, _ = privatize(big, ins, w)
        mean, total = secure_round([clipped], [n], cfg, 2.0)
        assert total == pytest.approx(w)
        assert float(np.linalg.norm(mean[0] * total)) == pytest.approx(w * CLIP, rel=1e-3)


def test_upload_factor_is_the_mods_own_rounding() -> None:
    """The factor a client divides its noise by is the one the mod multiplies by (read back from the
    factor the mod prepends to its masked vector)."""
    cfg = config(quantization_range=1000)  # coarse, so rounding shows
    cap = secagg.max_weight(cfg)
    for n in (1, 99, 200, 578, 579):
        _, total = secure_round([[np.zeros(4, np.float32)]], [n], cfg, 1.0)
        assert total == secagg.upload_factor(n, cap, 1000)
    with pytest.raises(UserError, match="exceed SecAgg"):
        secagg.upload_factor(580, cap, 1000)
    with pytest.raises(UserError, match="round to weight 0"):
        secagg.upload_factor(1, 1e6, 1000)


def test_local_noise_is_not_rescaled_and_distributed_noise_is() -> None:
    upload = [np.zeros(DIMS, np.float32)]
    local = {"mechanism": "gaussian", "clip": 1.0, "noise_std": 0.3, "placement": "local"}
    out, _ = privatize(upload, local, 0.25)
    assert float(np.std(out[0])) == pytest.approx(0.3, rel=0.03)
    out, _ = privatize(upload, {**local, "placement": "distributed"}, 0.25)
    assert float(np.std(out[0])) == pytest.approx(0.3 / 0.25, rel=0.03)


def test_clipping_range_covers_every_noisy_value() -> None:
    """The mod clips each client's noisy value before the sum (not post-processing of the Gaussian sum):
    the range is widened under DP so that, in practice, it never does."""
    cfg = config()  # secagg.clipping_range 1.0 configured
    plan = PrivacyPlan(cfg)
    r = plan.secagg_clipping_range()
    assert r == pytest.approx(CLIP * (1 + secagg.RANGE_SIGMAS * SIGMA))
    cap = secagg.max_weight(cfg)
    weighted = [u[0] * secagg.upload_factor(n, cap, cfg.secagg.quantization_range)
                for u, n in zip(noisy_uploads(cfg, SIZES), SIZES, strict=True)]
    assert max(float(np.abs(w).max()) for w in weighted) < r
    # the configured ±1.0 would have clipped about 3 % of the values the secure sum adds up
    assert np.mean(np.abs(np.concatenate(weighted)) > cfg.secagg.clipping_range) > 0.01
    report = plan.report()["secagg_range"]
    assert report["clipping_range"] == r and report["per_value_overflow_probability"] < 1e-22
    assert fit_workflow(cfg, r).clipping_range == r  # what the server gives SecAgg+
    assert secagg.clipping_range(config(clipping_range=50.0), SIGMA) == 50.0  # a wider configured one stays
    laplace = FederatedConfig.model_validate({**cfg.model_dump(), "dp": {"mechanism": "laplace", "clip": CLIP}})
    assert PrivacyPlan(laplace).secagg_clipping_range() == 1.0  # local noise: the clip is post-processing


def test_a_client_round_divides_its_distributed_noise_by_its_own_weight(tmp_path: Path) -> None:
    """LoraClient.fit itself: its upload's noise is the server's σC/√n over the client's SecAgg+ weight."""
    cfg = FederatedConfig.model_validate({
        "clients": 3, "rounds": 1, "quiet": True, "data": {"limit": 200},
        "client": {"local_steps": 1, "batch_size": 4}, "secagg": {"enabled": True},
        "dp": {"mechanism": "gaussian", "noise_multiplier": 100.0, "clip": 0.01, "placement": "distributed"}})
    parts = [len(p) for p in federated_data(cfg).parts]
    small = min(range(3), key=lambda k: parts[k])
    weight = secagg.upload_factor(parts[small], max(parts), cfg.secagg.quantization_range)
    assert weight < 0.9  # a client well below max_weight, so the rescaling shows
    strategy = build_strategy(cfg, tmp_path)
    strategy.initialize_parameters(None)  # type: ignore[arg-type]
    ins = strategy.fit_ins(1, group=3)
    upload, samples, _ = LoraClient(cfg, small).fit([a.copy() for a in strategy.state], dict(ins.config))
    assert samples == parts[small]
    values = np.concatenate([a.ravel() for a in upload])
    assert float(np.std(values)) == pytest.approx(100.0 * 0.01 / math.sqrt(3) / weight, rel=0.03)
