"""Every ε privlora writes to a privacy.json, recomputed by an independent library: Google's
``dp-accounting`` (RDP and PLD), for the mechanism the privacy.json itself says ran.

The federated checks read the report's ``sampling`` and pick the matching dp-accounting event — Poisson
(add/remove one client), no sampling, or a fixed-size draw (sampled without replacement, replace-one) —
so a report that describes one mechanism and accounts another fails here. Tolerances:

* never below dp-accounting's PLD (a tighter valid bound for the same mechanism) by more than 0.1 %:
  privlora may overstate ε, never understate it;
* within [−5 %, +0.1 %] of dp-accounting's RDP at the same orders. Not tighter, because dp-accounting
  0.6's fractional-order series adds the absolute values of its alternating terms (a valid but looser
  bound: up to 2.2 % more ε here), while Opacus' matches numerical integration
  (:func:`test_opacus_fractional_order_rdp_is_the_exact_integral`). A fixed-size draw reported as Poisson
  (issue 18) is 17 % below its true bound, far outside this.
"""

from __future__ import annotations

import dp_accounting as dpa
import pytest
from dp_accounting import pld, rdp
from opacus.accountants import RDPAccountant

from conftest import CONFIGS
from privlora.config import CLEAR, FederatedConfig, TrainConfig, load_config
from privlora.federated.privacy_plan import PrivacyPlan
from privlora.train import accounting

RDP_BELOW = 0.05  # privlora's RDP ε may be this much (relative) below dp-accounting's looser RDP series
SLACK = 1e-3  # privlora's ε may fall below an independent tight bound by this much (relative), no more


def rdp_epsilon(event: dpa.DpEvent, delta: float, neighbours=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE) -> float:
    acc = rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS, neighboring_relation=neighbours)
    return float(acc.compose(event).get_epsilon(delta))


def pld_epsilon(event: dpa.DpEvent, delta: float, neighbours=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE) -> float:
    acc = pld.PLDAccountant(neighboring_relation=neighbours, value_discretization_interval=1e-3)
    return float(acc.compose(event).get_epsilon(delta))


def assert_matches(ours: float, event: dpa.DpEvent, delta: float, **kw) -> None:
    theirs = rdp_epsilon(event, delta, **kw)
    assert theirs * (1 - RDP_BELOW) <= ours <= theirs * (1 + SLACK), (ours, theirs)
    if kw.get("neighbours", dpa.NeighboringRelation.ADD_OR_REMOVE_ONE) == dpa.NeighboringRelation.ADD_OR_REMOVE_ONE:
        tight = pld_epsilon(event, delta, **kw)  # dp-accounting's PLD has no sampling without replacement
        assert ours >= tight * (1 - SLACK), (ours, tight)


# --- train: DP-SGD (per-sample clipping, Poisson batches), unit = one training sample -----------------

#: (config, members n): the shipped DP configs at the sizes they train on, and a long small-q run
TRAIN_CASES = [("demo-dp.yaml", 60, {}), ("dp-digits.yaml", 627, {}),
               ("dp-digits.yaml", 5000, {"dp.target_epsilon": CLEAR, "dp.noise_multiplier": 0.9,
                                         "optim.batch_size": 50, "optim.max_steps": 2000})]


@pytest.mark.parametrize("name, n, overrides", TRAIN_CASES)
def test_dp_sgd_epsilon_matches_dp_accounting(name, n, overrides) -> None:
    config = load_config(CONFIGS / name, overrides, model=TrainConfig)
    p = accounting.resolve(config.dp, n=n, batch_size=config.optim.batch_size, steps=config.optim.max_steps)
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(p.sample_rate, dpa.GaussianDpEvent(p.noise_multiplier)),
                                    p.steps)
    kw = {"noise_multiplier": p.noise_multiplier, "sample_rate": p.sample_rate, "steps": p.steps, "delta": p.delta}
    assert_matches(accounting.epsilon(**kw, accountant="rdp"), event, p.delta)
    # PRV (a numerical PLD method, Opacus returns its upper bound) against dp-accounting's PLD
    prv, tight = accounting.epsilon(**kw, accountant="prv"), pld_epsilon(event, p.delta)
    assert prv >= tight * (1 - 0.01) and prv == pytest.approx(tight, rel=0.05), (prv, tight)
    assert accounting.SAMPLE_NEIGHBOURS == "add/remove one training sample"  # what the Poisson bound is for


# --- federated: client-level Gaussian, unit = one client's whole data -------------------------------

def federated(name: str | None, **tree) -> FederatedConfig:
    return load_config(CONFIGS / name if name else None, tree, model=FederatedConfig)


FED_CASES = {
    "fed-ffa-secure (5 clients, all every round)": federated("fed-ffa-secure.yaml"),
    "benchmark: 100 clients, 10 per round, target ε 8": federated(
        "fed-ffa.yaml", **{"clients": 100, "clients_per_round": 10, "secagg.enabled": True,
                           "dp.mechanism": "gaussian", "dp.target_epsilon": 8.0, "dp.clip": 0.5,
                           "dp.placement": "distributed"}),
    "issue 18: 20 clients, 4 per round, 5 rounds, σ 0.73": federated(
        None, **{"clients": 20, "clients_per_round": 4, "rounds": 5, "dp.mechanism": "gaussian",
                 "dp.noise_multiplier": 0.73}),
}


def report_after_all_rounds(config: FederatedConfig, dropouts: dict[int, int] | None = None) -> dict:
    plan = PrivacyPlan(config)
    m = config.per_round()
    for r in range(1, config.rounds + 1):
        plan.record(r, survivors=m - (dropouts or {}).get(r, 0), planned=m)
    return plan.report()


def composed(events: list[dpa.DpEvent]) -> dpa.DpEvent:
    """The rounds in order, runs of equal rounds as one self-composition (dp-accounting analyses each
    distinct event once: seconds instead of tens of seconds)."""
    runs: list[list] = []
    for e in events:
        if runs and runs[-1][0] == e:
            runs[-1][1] += 1
        else:
            runs.append([e, 1])
    return dpa.ComposedDpEvent([dpa.SelfComposedDpEvent(e, k) for e, k in runs])


def event_for(report: dict) -> tuple[dpa.DpEvent, dpa.NeighboringRelation]:
    """The dp-accounting event for the mechanism the report says ran."""
    n, m, q = report["clients"], report["clients_per_round"], report["sample_rate"]
    sampling = report.get("sampling", "")
    rounds = [dpa.GaussianDpEvent(s) for s in report["effective_noise_multipliers"]]
    if sampling.startswith("poisson"):
        assert report["neighbouring"].startswith("add/remove one client")
        return composed([dpa.PoissonSampledDpEvent(q, g) for g in rounds]), dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    if sampling.startswith("every client every round") and q == 1:
        return composed(rounds), dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    # anything else is a fixed-size draw of m of n clients: sampled without replacement, replace-one
    return composed([dpa.SampledWithoutReplacementDpEvent(n, m, g) for g in rounds]), \
        dpa.NeighboringRelation.REPLACE_ONE


@pytest.mark.parametrize("case", list(FED_CASES))
def test_federated_gaussian_epsilon_matches_dp_accounting_for_the_sampling_it_reports(case) -> None:
    config = FED_CASES[case]
    report = report_after_all_rounds(config)
    event, neighbours = event_for(report)
    assert_matches(report["epsilon"], event, config.dp.delta, neighbours=neighbours)
    if config.dp.target_epsilon is not None:
        assert report["epsilon"] <= config.dp.target_epsilon


def test_federated_dropouts_are_accounted_at_the_noise_that_reached_the_sum() -> None:
    config = federated(None, **{"clients": 40, "clients_per_round": 8, "rounds": 6, "secagg.enabled": True,
                                "dp.mechanism": "gaussian", "dp.noise_multiplier": 1.5,
                                "dp.placement": "distributed"})
    report = report_after_all_rounds(config, dropouts={2: 3})
    assert report["effective_noise_multipliers"][:3] == pytest.approx([1.5, 1.5 * (5 / 8) ** 0.5, 1.5])
    event, neighbours = event_for(report)
    assert_matches(report["epsilon"], event, config.dp.delta, neighbours=neighbours)


def test_fixed_size_draws_accounted_as_poisson_would_fail_this_check() -> None:
    """The check is tight enough to catch issue 18: the ε the old code reported for a fixed-size draw is
    outside the tolerance of the correct (sampled-without-replacement) bound."""
    report = report_after_all_rounds(FED_CASES["issue 18: 20 clients, 4 per round, 5 rounds, σ 0.73"])
    fixed = dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(20, 4, dpa.GaussianDpEvent(0.73)), 5)
    correct = rdp_epsilon(fixed, 1e-5, neighbours=dpa.NeighboringRelation.REPLACE_ONE)
    assert correct == pytest.approx(9.675, abs=0.01) and report["epsilon"] == pytest.approx(7.99, abs=0.01)
    assert report["epsilon"] < correct * (1 - RDP_BELOW)  # so a fixed-size report would fail assert_matches


# --- federated: Laplace schedule (pure ε per round, basic and advanced composition) -----------------

@pytest.mark.parametrize("schedule, rounds, start, end", [("linear", 4, 4.0, 1.0), ("exponential", 10, 2.0, 0.2),
                                                          ("constant", 50, 0.1, 0.1)])
def test_laplace_schedule_epsilon_is_never_below_dp_accounting(schedule, rounds, start, end) -> None:
    config = federated(None, **{"clients": 10, "clients_per_round": 5, "rounds": rounds, "dp.mechanism": "laplace",
                                "dp.schedule": schedule, "dp.epsilon_start": start, "dp.epsilon_end": end})
    plan = PrivacyPlan(config)
    for r in range(1, rounds + 1):
        plan.record(r, survivors=5)
    report = plan.report()
    # round r adds Laplace(C/ε_r) to an L1-sensitivity-C sum: LaplaceDpEvent(1/ε_r); no amplification
    # by sampling is claimed, so the unsampled composition is the bound to respect
    event = composed([dpa.LaplaceDpEvent(1 / e) for e in report["epsilon_per_round"]])
    assert report["epsilon"] >= pld_epsilon(event, 1e-10) * (1 - SLACK)  # basic: (Σε, 0) holds at any δ
    assert report["epsilon_advanced"] >= pld_epsilon(event, report["delta_advanced"]) * (1 - SLACK)
    assert report["epsilon"] == pytest.approx(sum(report["epsilon_per_round"]))


def test_opacus_fractional_order_rdp_is_the_exact_integral() -> None:
    """Why the RDP tolerance is one-sided: at a fractional order, Opacus' RDP of the Poisson-subsampled
    Gaussian (what privlora uses) is the integral itself; dp-accounting's series is larger."""
    import numpy as np
    from dp_accounting.rdp.rdp_privacy_accountant import _compute_rdp_poisson_subsampled_gaussian
    from opacus.accountants.analysis.rdp import compute_rdp
    from scipy import integrate
    from scipy.stats import norm

    sigma, q, alpha = 1.5369, 0.2667, 2.5  # the demo DP config's mechanism, its best order

    def moment(z: float) -> float:  # E_{z~N(0,σ²)}[((1−q) + q·N(1,σ²)(z)/N(0,σ²)(z))^α]
        return norm.pdf(z, 0, sigma) * ((1 - q) + q * np.exp((2 * z - 1) / (2 * sigma**2))) ** alpha

    exact = np.log(integrate.quad(moment, -40, 40, limit=200)[0]) / (alpha - 1)
    assert float(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0]) == pytest.approx(exact, rel=1e-9)
    assert float(_compute_rdp_poisson_subsampled_gaussian(q, sigma, [alpha])[0]) > exact * 1.03
