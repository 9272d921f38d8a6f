"""Sample-level DP inside each client (``dp.level: sample``): the per-client ledger against Google's
dp-accounting, refusal at the budget, DP-SGD through the real client, SecAgg+ over DP-SGD uploads, and
(slow) whole Flower simulations whose privacy.json lists every client's ε."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as dpa_rdp
from flwr.app import RecordDict
from flwr.common import parameters_to_ndarrays
from pydantic import ValidationError

from privlora import privacy
from privlora.config import FederatedConfig
from privlora.federated import sample_dp
from privlora.federated.client import LoraClient
from privlora.federated.data import federated_data
from privlora.federated.dp_strategy import PrivacyWrapper, build_strategy
from privlora.federated.rules import weighted_mean
from privlora.federated.sample_dp import BudgetExhausted, ClientLedger

SMALL = {"clients": 3, "rounds": 2, "data": {"limit": 240}, "client": {"local_steps": 3, "batch_size": 8},
         "quiet": True}
#: the RDP orders where Opacus and dp-accounting both use the exact closed form (integer α)
INTEGER_ORDERS = [a for a in privacy.ORDERS if float(a).is_integer()]


def config(tmp_path: Path | None = None, name: str = "run", *, dp: dict | None = None, **overrides) -> FederatedConfig:
    tree = {**SMALL, **overrides,
            "dp": {"level": "sample", "mechanism": "gaussian", "noise_multiplier": 1.0, "clip": 1.0, **(dp or {})}}
    if tmp_path is not None:
        tree["out"] = str(tmp_path / name)
    return FederatedConfig.model_validate(tree)


def dp_accounting_event(segments: list[tuple[float, float, int]]) -> dpa.DpEvent:
    """The rounds × local steps the client took, as dp-accounting events."""
    return dpa.ComposedDpEvent([dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(s)), k)
                                for s, q, k in segments])


# --- the ledger (fast) -------------------------------------------------------------------------------


ROUNDS = [(1.1, 0.05, 20), (1.1, 0.05, 20), (0.9, 0.08, 10), (1.1, 0.05, 20)]  # a client skipping no round


def test_ledger_composes_across_rounds_and_matches_dp_accounting() -> None:
    ledger = ClientLedger()
    delta = 1e-5
    running = []
    for s, q, k in ROUNDS:
        ledger.record(s, q, k)
        running.append(ledger.epsilon(delta))
    assert ledger.rounds == 4 and ledger.steps == 70
    assert running == sorted(running) and running[0] > 0  # every round spends more
    # RDP at the integer orders: Opacus' closed form vs dp-accounting's, to 1e-6 relative
    ours = privacy.rdp(ledger.history())
    idx = [privacy.ORDERS.index(a) for a in INTEGER_ORDERS]
    theirs = sum(np.asarray(dpa_rdp._compute_rdp_poisson_subsampled_gaussian(q, s, INTEGER_ORDERS)) * k
                 for s, q, k in ROUNDS)
    np.testing.assert_allclose(ours[idx], theirs, rtol=1e-6)
    # ε over those orders: our RDP through Opacus' conversion vs dp-accounting's accountant on the events
    from opacus.accountants.analysis.rdp import get_privacy_spent

    eps_ours, _ = get_privacy_spent(orders=INTEGER_ORDERS, rdp=ours[idx], delta=delta)
    acc = dpa.rdp.RdpAccountant(orders=INTEGER_ORDERS).compose(dp_accounting_event(ROUNDS))
    assert float(eps_ours) == pytest.approx(acc.get_epsilon(delta), rel=1e-6)
    # and the ledger's ε (all Opacus orders) is never above that integer-order bound, nor far below it
    assert ledger.epsilon(delta) <= float(eps_ours) * (1 + 1e-12)
    assert ledger.epsilon(delta) >= 0.9 * float(eps_ours)


def test_ledger_is_the_sum_of_its_rounds_not_of_the_last_one() -> None:
    one, four = ClientLedger(), ClientLedger()
    one.record(1.0, 0.1, 5)
    for _ in range(4):
        four.record(1.0, 0.1, 5)
    uniform = privacy.epsilon(privacy.History.uniform(1.0, 0.1, 20), 1e-5)
    assert four.epsilon(1e-5) == pytest.approx(uniform, rel=1e-12)
    assert four.epsilon(1e-5) > 1.3 * one.epsilon(1e-5)  # ε grows sublinearly, but it grows


def test_a_client_at_its_budget_refuses_and_spends_nothing() -> None:
    ledger, delta = ClientLedger(), 1e-5
    per_round = ledger.epsilon_after(1.0, 0.1, 5, delta)
    budget = ClientLedger([(1.0, 0.1, 5)] * 3).epsilon(delta)  # exactly three rounds fit
    for _ in range(3):
        assert ledger.admit(1.0, 0.1, 5, delta, budget) <= budget
        ledger.record(1.0, 0.1, 5)
    with pytest.raises(BudgetExhausted, match="refused"):
        ledger.admit(1.0, 0.1, 5, delta, budget)
    assert ledger.rounds == 3 and ledger.epsilon(delta) <= budget
    assert ledger.admit(1.0, 0.1, 5, delta, None) > budget  # no budget: nothing refused
    assert per_round < budget


def test_ledger_round_trips_through_flower_state() -> None:
    state = RecordDict()
    assert sample_dp.load_ledger(state).rounds == 0
    sample_dp.save_ledger(state, ClientLedger(list(ROUNDS)))
    assert sample_dp.load_ledger(state).segments == ROUNDS


def test_config_rules() -> None:
    with pytest.raises(ValidationError, match="noise_multiplier"):
        config(dp={"noise_multiplier": None})
    with pytest.raises(ValidationError, match="not both"):
        config(dp={"target_epsilon": 4.0})
    with pytest.raises(ValidationError, match="below dp.target_epsilon"):
        config(dp={"noise_multiplier": None, "target_epsilon": 4.0, "budget": 3.0})
    assert sample_dp.budget(config(dp={"noise_multiplier": None, "target_epsilon": 4.0})) == 4.0
    assert sample_dp.budget(config()) is None
    with pytest.raises(ValidationError, match="placement"):
        config(dp={"placement": "distributed"}, secagg={"enabled": True})
    with pytest.raises(ValidationError, match="level sample"):
        FederatedConfig.model_validate({**SMALL, "dp": {"mechanism": "gaussian", "noise_multiplier": 1.0,
                                                         "budget": 3.0}})
    cfg = config(compression="int8")  # int8 uploads combine with it
    assert cfg.dp.level == "sample" and config(secagg={"enabled": True}).secagg.enabled


# --- the real client, no Flower ----------------------------------------------------------------------


def start(cfg: FederatedConfig, tmp_path: Path) -> tuple[PrivacyWrapper, list[np.ndarray]]:
    strategy = build_strategy(cfg, tmp_path / "server")
    return strategy, parameters_to_ndarrays(strategy.initialize_parameters(None))


def test_the_client_runs_dp_sgd_keeps_its_ledger_and_refuses_past_its_budget(tmp_path) -> None:
    probe = config()
    n = len(federated_data(probe).client(0))
    q = sample_dp.sample_rate(probe, n)
    budget = ClientLedger([(1.0, q, 3)] * 2).epsilon(probe.dp.delta) * (1 + 1e-9)  # two rounds fit
    cfg = config(dp={"budget": budget})
    strategy, state = start(cfg, tmp_path)
    ins = {"rank": 8, **strategy.privacy.instructions(1)}
    assert ins["mechanism"] == "none"  # the server asks for no upload noise: DP-SGD ran in the client
    node = RecordDict()
    uploads = []
    for r in (1, 2):
        upload, samples, metrics = LoraClient(cfg, 0, node).fit(state, {**ins, "round": r})
        uploads.append(upload)
        assert metrics["dp_rounds"] == r and metrics["dp_steps"] == 3
        assert metrics["dp_epsilon"] == pytest.approx(ClientLedger([(1.0, q, 3)] * r).epsilon(cfg.dp.delta))
    assert len(uploads[0]) == len(state) // 2 + 1  # FFA: B and the head only
    # two rounds from the same start differ: Poisson batches and noise are fresh each time
    assert not all(np.array_equal(a, b) for a, b in zip(*uploads, strict=True))
    refusal = LoraClient(cfg, 0, node).fit(state, {**ins, "round": 3})  # a reply, not a crash
    assert refusal == ([], 0, {"partition": 0, sample_dp.REFUSED_KEY: 1})
    assert sample_dp.load_ledger(node).rounds == 2  # the refused round spent nothing
    with pytest.raises(BudgetExhausted):  # under SecAgg+ a reply must carry a masked vector: a dropout
        LoraClient(cfg.model_copy(update={"secagg": cfg.secagg.model_copy(update={"enabled": True})}), 0,
                   node).fit(state, {**ins, "round": 3})
    # the server rebuilds the client's ledger from what it reported
    strategy.privacy.observe([(None, type("R", (), {"metrics": metrics})())])
    report = strategy.privacy.report()
    assert report["unit"] == "one training sample of one client"
    assert [c["client"] for c in report["clients"]] == [0, 1, 2]
    assert report["clients"][0]["rounds"] == 1  # one round reported to this server in this test


def test_the_server_drops_a_refusal_and_never_samples_that_client_again(tmp_path) -> None:
    """A client that cannot afford even its first round answers with a refusal: the round merges the
    others, the refusing node is not sampled again, and its privacy.json entry spent nothing."""
    from types import SimpleNamespace

    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    cfg = config(dp={"budget": 1e-3})  # below any one round's ε: every client refuses
    strategy, state = start(cfg, tmp_path)
    ins = {"rank": 8, "round": 1, **strategy.privacy.instructions(1)}
    upload, samples, metrics = LoraClient(cfg, 1, RecordDict()).fit(state, ins)
    refusal = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(upload), samples, metrics)
    params, out = strategy.aggregate_fit(1, [(SimpleNamespace(node_id=11), refusal)], [])
    assert out["accepted"] == 0 and strategy.round_log["refused"] == 1
    for a, b in zip(parameters_to_ndarrays(params), state, strict=True):  # nothing merged
        np.testing.assert_array_equal(a, b)
    assert 11 not in strategy.privacy.sample([10, 11, 12], 2)
    entry = strategy.privacy.report()["clients"][1]
    assert entry["exhausted"] and entry["rounds"] == 0 and entry["epsilon"] == 0.0


def test_each_client_calibrates_its_own_sigma_to_end_every_round_at_the_target(tmp_path) -> None:
    """dp.target_epsilon at sample level: a small client (large q) gets a larger σ than a large one, each
    ends exactly at the target after every round — by Google's dp-accounting too — and refuses one more."""
    cfg = config(dp={"noise_multiplier": None, "target_epsilon": 3.0})
    data = federated_data(cfg)
    sizes = {k: len(data.client(k)) for k in range(cfg.clients)}
    small, large = min(sizes, key=sizes.get), max(sizes, key=sizes.get)
    assert sizes[small] < sizes[large]
    sigma = {k: sample_dp.client_sigma(cfg, sizes[k]) for k in (small, large)}
    assert sigma[small] > sigma[large]
    steps = cfg.rounds * cfg.client.local_steps
    for k in (small, large):
        q = sample_dp.sample_rate(cfg, sizes[k])
        ours = ClientLedger([(sigma[k], q, cfg.client.local_steps)] * cfg.rounds).epsilon(cfg.dp.delta)
        theirs = dpa.rdp.RdpAccountant(orders=list(privacy.ORDERS)).compose(
            dp_accounting_event([(sigma[k], q, steps)])).get_epsilon(cfg.dp.delta)
        assert 2.9 <= ours <= 3.0 and ours == pytest.approx(theirs, rel=0.05)
    strategy, state = start(cfg, tmp_path)
    ins = {"rank": 8, **strategy.privacy.instructions(1)}
    node = RecordDict()
    for r in range(1, cfg.rounds + 1):
        _, _, metrics = LoraClient(cfg, small, node).fit(state, {**ins, "round": r})
        assert metrics["dp_noise_multiplier"] == sigma[small]
    assert metrics["dp_epsilon"] <= 3.0
    # the budget defaults to the target: one round more is refused
    _, _, refusal = LoraClient(cfg, small, node).fit(state, {**ins, "round": cfg.rounds + 1})
    assert refusal[sample_dp.REFUSED_KEY] == 1
    strategy.privacy.observe([(None, type("R", (), {"metrics": metrics})())])
    report = strategy.privacy.report()
    assert report["budget"] == 3.0 and report["noise_multiplier"] is None and "own σ" in report["calibration"]
    assert report["clients"][small]["noise_multipliers"] == [sigma[small]]


def test_an_unreachable_target_is_one_clear_error() -> None:
    from privlora.errors import UserError

    cfg = config(dp={"noise_multiplier": None, "target_epsilon": 1e-9})
    with pytest.raises(UserError, match="target_epsilon"):
        sample_dp.client_sigma(cfg, 50)


def test_secagg_plus_over_dp_sgd_uploads_is_the_plain_aggregate_of_the_same_uploads(tmp_path) -> None:
    from test_federated_secagg_noise import secure_round

    cfg = config(secagg={"enabled": True})
    strategy, state = start(cfg, tmp_path)
    ins = {"rank": 8, "round": 1, **strategy.privacy.instructions(1)}
    uploads, sizes = [], []
    for pid in range(cfg.clients):
        upload, samples, _ = LoraClient(cfg, pid, RecordDict()).fit(state, ins)
        uploads.append(upload)
        sizes.append(samples)
    clipping_range = strategy.privacy.secagg_clipping_range()
    secure, total_weight = secure_round(uploads, sizes, cfg, clipping_range)
    w = np.asarray(sizes, dtype=np.float64)
    import torch

    plain = weighted_mean(uploads, torch.tensor(w / w.sum()))
    scale = max(float(np.abs(u).max()) for up in uploads for u in up)
    assert scale < clipping_range  # nothing is clipped by the mod
    # each client's weighted value is rounded to one quantisation step (2·range/T); the mean divides by Σw
    step = 2 * clipping_range / cfg.secagg.quantization_range
    for s, p in zip(secure, plain, strict=True):
        np.testing.assert_allclose(s, p, rtol=0, atol=len(uploads) * step / total_weight)
    assert max(float(np.abs(p).max()) for p in plain) > 100 * step  # a real update, not rounding noise


# --- Flower simulation (slow) ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{"compression": "int8"}, {"secagg": {"enabled": True}}], ids=["int8", "secagg"])
def test_simulation_writes_every_clients_epsilon(tmp_path, extra) -> None:
    from privlora.federated.run import federate

    probe = config()
    data = federated_data(probe)
    rates = [sample_dp.sample_rate(probe, len(data.client(k))) for k in range(probe.clients)]
    # a budget that lets every client but the one with the largest q (the smallest partition) take both
    # rounds: that one must stop after round 1, and round 2 still has two clients (SecAgg+'s minimum)
    worst, runner_up = sorted(rates)[-1], sorted(rates)[-2]
    budget = ClientLedger([(1.0, runner_up, 3)] * 2).epsilon(probe.dp.delta) * 1.001
    cfg = config(tmp_path, "sim", dp={"budget": budget}, **extra)
    result = federate(cfg)
    report = json.loads((result.run_dir / "privacy.json").read_text())
    assert report["level"] == "sample" and report["unit"] == "one training sample of one client"
    by_client = {c["client"]: c for c in report["clients"]}
    assert sorted(by_client) == [0, 1, 2]
    for k, q in enumerate(rates):
        entry = by_client[k]
        segments = [(1.0, q, 3)] * entry["rounds"]
        assert entry["epsilon"] <= budget
        assert entry["epsilon"] == pytest.approx(entry["epsilon_reported"] or 0.0, rel=1e-9)
        theirs = dpa.rdp.RdpAccountant(orders=list(privacy.ORDERS)).compose(dp_accounting_event(segments)) \
            .get_epsilon(cfg.dp.delta) if segments else 0.0
        assert theirs * 0.95 <= entry["epsilon"] <= theirs * (1 + 1e-3) + 1e-12
    # a client whose report shows that round 2 would pass the budget is not sampled again
    fits_two = [ClientLedger([(1.0, q, 3)] * 2).epsilon(cfg.dp.delta) <= budget for q in rates]
    assert not fits_two[rates.index(worst)] and sum(fits_two) == 2
    assert [by_client[k]["rounds"] for k in range(3)] == [2 if f else 1 for f in fits_two]
    assert by_client[rates.index(worst)]["exhausted"]
    rounds = [m for m in result.rounds if m["round"] > 0]
    assert [m["sampled"] for m in rounds] == [3, 2] and [m["accepted"] for m in rounds] == [3, 2]
    assert report["epsilon"] == max(c["epsilon"] for c in report["clients"])


def test_fedit_trains_a_and_b_by_dp_sgd_from_the_zero_b_start(tmp_path) -> None:
    """FedIT's first round starts at B = 0, where ∂L/∂A is exactly zero on the first step: the dead-gradient
    guard defers A's check to a later step instead of refusing the round, and both A and B move."""
    cfg = config(strategy="fedit")
    strategy, state = start(cfg, tmp_path)
    layers = (len(state) - 2) // 2
    assert all(not np.any(b) for b in state[layers:2 * layers])  # B starts at zero
    upload, _, metrics = LoraClient(cfg, 0, RecordDict()).fit(state, {"rank": 8, **strategy.privacy.instructions(1),
                                                                     "round": 1})
    assert metrics["dp_steps"] == 3 and len(upload) == len(state)
    assert all(np.any(u != 0) for u in upload[:2 * layers])  # every A and every B changed


@pytest.mark.slow
def test_simulation_a_client_that_cannot_afford_one_round_refuses_and_the_others_train(tmp_path) -> None:
    """Flower's engine carries the refusal reply: no failure, the others' round merges, the refusing client
    is never sampled again and spent nothing."""
    from privlora.federated.run import federate

    probe = config()
    data = federated_data(probe)
    rates = [sample_dp.sample_rate(probe, len(data.client(k))) for k in range(probe.clients)]
    worst = rates.index(max(rates))
    budget = ClientLedger([(1.0, max(rates), 3)]).epsilon(probe.dp.delta) * 0.999  # the worst cannot start
    fits_two = [ClientLedger([(1.0, q, 3)] * 2).epsilon(probe.dp.delta) <= budget for q in rates]
    result = federate(config(tmp_path, "sim", dp={"budget": budget}))
    report = json.loads((result.run_dir / "privacy.json").read_text())
    by_client = {c["client"]: c for c in report["clients"]}
    assert by_client[worst]["rounds"] == 0 and by_client[worst]["epsilon"] == 0.0 and by_client[worst]["exhausted"]
    assert all(by_client[k]["rounds"] == (2 if fits_two[k] else 1) for k in range(probe.clients) if k != worst)
    rounds = [m for m in result.rounds if m["round"] > 0]
    assert [m["sampled"] for m in rounds] == [3, sum(fits_two)] and [m["refused"] for m in rounds] == [1, 0]
    assert [m["accepted"] for m in rounds] == [2, sum(fits_two)] and not any(m.get("failures") for m in rounds)
