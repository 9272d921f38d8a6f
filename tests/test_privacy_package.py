"""privlora.privacy: one ε sum and one σ search for DP-SGD, the federated ledger and the audits.

The numbers below were recorded from the functions privacy/ replaced, before it existed
(``train.accounting.epsilon`` / ``noise_for_epsilon`` on Opacus' accountant and ``get_noise_multiplier``;
``federated.client_privacy.gaussian_epsilons`` and ``PrivacyPlan._solve_sigma``, each with its own RDP
sum and bisection). The refactor must reproduce them to 1e-9 relative. The independent check of the
numbers themselves (Google's dp-accounting) is tests/test_accounting_crosscheck.py.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from privlora import privacy
from privlora.config import FederatedConfig, load_config
from privlora.errors import UserError
from privlora.federated import client_privacy
from privlora.federated.privacy_plan import PrivacyPlan
from privlora.train import accounting

DELTA = 1e-5
REL = 1e-9
SLOW_Q = 0.5  # q = 0.5 at large σ: Opacus' fractional orders take seconds per ε, so those cases are slow

#: ε by Opacus' RDP accountant, (q, σ, steps) → ε at δ = 1e-5 (train/accounting.epsilon before privacy/)
RDP_EPSILON = {
    (0.01, 0.8, 100): 2.185316245509876,
    (0.01, 0.8, 1000): 3.695428832544017,
    (0.01, 2.5, 100): 0.17228570837607105,
    (0.01, 2.5, 1000): 0.5203154587378138,
    (0.064, 0.8, 100): 8.24277791029324,
    (0.064, 0.8, 1000): 25.453495446144725,
    (0.064, 2.5, 100): 1.1851114865755457,
    (0.064, 2.5, 1000): 3.991611481538887,
    (0.5, 0.8, 100): 62.100194470410884,
    (0.5, 0.8, 1000): 347.2366941668012,
    (0.5, 2.5, 100): 11.444069037155959,
    (0.5, 2.5, 1000): 50.45447713775951,
}
#: the same by PRV (an upper bound from Opacus' PRV accountant)
PRV_EPSILON = {
    (0.064, 0.8, 100): 7.208807156555936,
    (0.5, 2.5, 1000): 47.74104898274424,
    (0.01, 2.5, 1000): 0.4815306461638663,
}
#: (target ε, q, steps) → σ by Opacus' get_noise_multiplier (train/accounting.noise_for_epsilon)
TRAIN_SIGMA = {
    (1.0, 0.01, 100): 1.083984375,
    (1.0, 0.01, 1000): 1.5234375,
    (1.0, 0.064, 100): 2.87109375,
    (1.0, 0.064, 1000): 8.28125,
    (1.0, 0.5, 100): 20.46875,
    (1.0, 0.5, 1000): 64.375,
    (3.0, 0.01, 100): 0.712890625,
    (3.0, 0.01, 1000): 0.865478515625,
    (3.0, 0.064, 100): 1.32568359375,
    (3.0, 0.064, 1000): 3.1640625,
    (3.0, 0.5, 100): 7.59765625,
    (3.0, 0.5, 1000): 23.671875,
    (8.0, 0.01, 100): 0.500946044921875,
    (8.0, 0.01, 1000): 0.6158447265625,
    (8.0, 0.064, 100): 0.8111572265625,
    (8.0, 0.064, 1000): 1.500244140625,
    (8.0, 0.5, 100): 3.3154296875,
    (8.0, 0.5, 1000): 10.126953125,
}
#: (target ε, clients, clients per round, rounds) → σ of PrivacyPlan._solve_sigma (the ledger's bisection)
FEDERATED_SIGMA = {
    (1.0, 100, 1, 100): 1.080224609375,
    (1.0, 100, 1, 1000): 1.5134521484375,
    (1.0, 125, 8, 100): 2.862060546875,
    (1.0, 125, 8, 1000): 8.2820068359375,
    (1.0, 10, 5, 100): 20.346362304687496,
    (1.0, 10, 5, 1000): 64.0,
    (3.0, 100, 1, 100): 0.7128662109375,
    (3.0, 100, 1, 1000): 0.8650146484375001,
    (3.0, 125, 8, 100): 1.3258789062499998,
    (3.0, 125, 8, 1000): 3.1571533203125,
    (3.0, 10, 5, 100): 7.584643554687499,
    (3.0, 10, 5, 1000): 23.6536865234375,
    (8.0, 100, 1, 100): 0.5008789062500001,
    (8.0, 100, 1, 1000): 0.61591796875,
    (8.0, 125, 8, 100): 0.8107421874999998,
    (8.0, 125, 8, 1000): 1.5001220703125,
    (8.0, 10, 5, 100): 3.3153076171875,
    (8.0, 10, 5, 1000): 10.127783203125002,
}
#: client_privacy.gaussian_epsilons(history, 1e-5): ε after each round
ROUND_EPSILONS = {
    'mixed': [
        2.133005995430793,
        2.412889750604902,
        2.606512338807164,
        2.6249559619693565,
        2.643399585131549,
        3.277850034624704,
    ],
    'dropout': [
        0.24223120554463531,
        0.26472101027153216,
        0.28695813236559975,
        0.30666482256898764,
        0.4443367917532738,
        2.7993178260681137,
        3.1106910831677212,
        3.3162586604985904,
        3.4793452372322515,
        3.6194930943750974,
    ],
    'q1': [
        6.122757864599008,
        9.234958991683897,
        11.819742782514052,
        14.132226163159332,
    ],
}
#: the 100-round history (σ 0.8, q 0.01): ε after rounds 1, 2, 50 and 100
SMALL_Q_ROUNDS = {0: 1.5840992210769225, 1: 1.6364271834820419, 49: 2.0199393462274684, 99: 2.1853162455098754}

HISTORIES = {"mixed": [(1.0, 0.1)] * 3 + [(1.5, 0.1)] * 2 + [(1.0, 0.2)],
             "dropout": [(2.5, 0.064)] * 4 + [(2.5 * (5 / 8) ** 0.5, 0.064)] + [(0.8, 0.064)] * 5,
             "q1": [(0.8, 1.0)] * 4}


def _params(table: dict, q_of) -> list:
    """Every case; the q = 0.5 σ searches marked slow (seconds each), the rest well under a second."""
    return [pytest.param(k, v, marks=pytest.mark.slow if q_of(k) == SLOW_Q else (), id=str(k))
            for k, v in table.items()]


# --- the recorded numbers --------------------------------------------------------------------------

@pytest.mark.parametrize("key, expected", list(RDP_EPSILON.items()), ids=str)
def test_rdp_epsilon_is_the_recorded_one(key, expected) -> None:
    q, sigma, steps = key
    history = privacy.History.uniform(sigma, q, steps)
    assert privacy.epsilon(history, DELTA) == pytest.approx(expected, rel=REL)
    assert accounting.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA) == \
        pytest.approx(expected, rel=REL)


def test_rdp_epsilon_is_opacus_accountant_bit_for_bit() -> None:
    """Not only close: the cached per-step RDP times the steps is Opacus' own sum."""
    history = privacy.History.of([(1.0, 0.1, 30), (1.5, 0.064, 7), (0.8, 0.01, 100)])
    acc = RDPAccountant()
    acc.history = history.as_opacus()
    assert privacy.epsilon(history, DELTA) == acc.get_epsilon(DELTA)


@pytest.mark.parametrize("key, expected", list(PRV_EPSILON.items()), ids=str)
def test_prv_epsilon_is_the_recorded_one(key, expected) -> None:
    q, sigma, steps = key
    assert privacy.epsilon(privacy.History.uniform(sigma, q, steps), DELTA, "prv") == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("key, expected", _params(TRAIN_SIGMA, lambda k: k[1]))
def test_dp_sgd_sigma_search_is_the_recorded_one(key, expected) -> None:
    target, q, steps = key
    sigma = accounting.noise_for_epsilon(target_epsilon=target, sample_rate=q, steps=steps, delta=DELTA)
    assert sigma == pytest.approx(expected, rel=REL)
    achieved = privacy.epsilon(privacy.History.uniform(sigma, q, steps), DELTA)
    assert target - 0.01 <= achieved <= target  # Opacus' stopping rule: within 0.01 below the target


@pytest.mark.parametrize("key, expected", _params(FEDERATED_SIGMA, lambda k: k[2] / k[1]))
def test_federated_sigma_search_is_the_recorded_one(key, expected) -> None:
    target, clients, per_round, rounds = key
    config = load_config(None, {"clients": clients, "clients_per_round": per_round, "rounds": rounds,
                                "dp.mechanism": "gaussian", "dp.target_epsilon": target, "dp.delta": DELTA},
                         model=FederatedConfig)
    plan = PrivacyPlan(config)
    assert plan.sigma == pytest.approx(expected, rel=REL)
    # the ledger's ε after all rounds meets the target it was solved for
    assert client_privacy.gaussian_epsilon([(plan.sigma, plan.sample_rate)] * rounds, DELTA) <= target


@pytest.mark.parametrize("name", list(ROUND_EPSILONS))
def test_round_epsilons_are_the_recorded_ones(name) -> None:
    assert client_privacy.gaussian_epsilons(HISTORIES[name], DELTA) == pytest.approx(ROUND_EPSILONS[name], rel=REL)
    assert client_privacy.gaussian_epsilon(HISTORIES[name], DELTA) == pytest.approx(ROUND_EPSILONS[name][-1], rel=REL)


def test_a_hundred_small_q_rounds_are_the_recorded_ones() -> None:
    eps = client_privacy.gaussian_epsilons([(0.8, 0.01)] * 100, DELTA)
    assert {i: eps[i] for i in SMALL_Q_ROUNDS} == pytest.approx(SMALL_Q_ROUNDS, rel=REL)
    # one segment of 100 steps is the same mechanism: ε per step of it is the same list
    assert privacy.running_epsilons(privacy.History.uniform(0.8, 0.01, 100), DELTA) == pytest.approx(eps, rel=1e-12)


# --- behaviour --------------------------------------------------------------------------------------

def test_search_returns_a_sigma_that_meets_the_target_and_a_smaller_one_that_misses_it() -> None:
    q, steps = 0.064, 200
    for search in (privacy.OPACUS, privacy.LEDGER):
        sigma = privacy.noise_multiplier(3.0, sample_rate=q, steps=steps, delta=DELTA, search=search)
        assert privacy.epsilon(privacy.History.uniform(sigma, q, steps), DELTA) <= 3.0
        assert privacy.epsilon(privacy.History.uniform(sigma * 0.99, q, steps), DELTA) > 3.0 - 0.01


def test_opacus_search_agrees_with_opacus_get_noise_multiplier() -> None:
    """The OPACUS preset is Opacus' own search, run through privacy's ε (RDP and PRV)."""
    for accountant, (q, steps, target) in (("rdp", (0.02, 300, 2.0)), ("prv", (0.064, 100, 4.0))):
        theirs = get_noise_multiplier(target_epsilon=target, target_delta=DELTA, sample_rate=q, steps=steps,
                                      accountant=accountant, epsilon_tolerance=0.01)
        ours = privacy.noise_multiplier(target, sample_rate=q, steps=steps, delta=DELTA, accountant=accountant)
        assert ours == pytest.approx(theirs, rel=REL)


def test_prv_and_gdp_are_opacus_accountants() -> None:
    history = privacy.History.of([(1.2, 0.05, 40), (1.2, 0.05, 60)])
    prv = PRVAccountant()
    prv.history = history.as_opacus()
    assert privacy.epsilon(history, DELTA, "prv") == pytest.approx(prv.get_epsilon(DELTA), rel=REL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus: "GDP accounting is experimental"
        gdp = GaussianAccountant()
        gdp.history = [(1.2, 0.05, 100)]  # one (σ, q): the two segments are 100 steps of it
        assert privacy.epsilon(history, DELTA, "gdp") == pytest.approx(gdp.get_epsilon(DELTA), rel=REL)
        with pytest.raises(UserError, match="one noise multiplier and one sample rate"):
            privacy.epsilon(history.then(2.0, 0.05, 5), DELTA, "gdp")


def test_epsilon_grows_along_a_history_and_running_matches_prefixes() -> None:
    history = privacy.History.of([(1.0, 0.1, 3), (1.5, 0.1, 2), (1.0, 0.2, 1)])
    running = privacy.running_epsilons(history, DELTA)
    assert len(running) == history.steps == 6
    assert all(b > a for a, b in zip(running, running[1:], strict=False))
    assert running[-1] == pytest.approx(privacy.epsilon(history, DELTA), rel=1e-12)
    assert running[2] == pytest.approx(privacy.epsilon(privacy.History.uniform(1.0, 0.1, 3), DELTA), rel=1e-12)
    assert privacy.epsilon(privacy.History(), DELTA) == 0.0
    assert privacy.epsilon(privacy.History.uniform(1.0, 0.1, 0), DELTA, "prv") == 0.0


def test_only_poisson_add_remove_histories_are_accounted() -> None:
    """Issue 18's lesson as a rule: a fixed-size draw (or replace-one neighbours) is refused, not
    accounted as if it were Poisson."""
    for kw in ({"sampling": privacy.FIXED_SIZE}, {"neighbouring": privacy.REPLACE_ONE}):
        history = privacy.History.uniform(0.73, 0.2, 5, **kw)
        for accountant in ("rdp", "prv"):
            with pytest.raises(UserError, match="understates ε"):
                privacy.epsilon(history, DELTA, accountant)
        with pytest.raises(UserError, match="understates ε"):
            privacy.noise_multiplier(8.0, sample_rate=0.2, steps=5, delta=DELTA, **kw)


def test_bad_inputs_say_what_to_fix() -> None:
    for bad in (0.0, -1.0, float("nan"), "1"):
        with pytest.raises(UserError, match="noise multiplier must be a positive"):
            privacy.Segment(bad, 0.1, 10)
    for bad in (0.0, 1.5, float("inf")):
        with pytest.raises(UserError, match="sample rate must lie in"):
            privacy.Segment(1.0, bad, 10)
    for bad in (-1, 2.5, True):
        with pytest.raises(UserError, match="non-negative integer"):
            privacy.Segment(1.0, 0.1, bad)
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(UserError, match="delta must lie strictly between 0 and 1"):
            privacy.epsilon(privacy.History.uniform(1.0, 0.1, 10), bad)
    with pytest.raises(UserError, match="gdp, prv, rdp"):
        privacy.epsilon(privacy.History.uniform(1.0, 0.1, 10), DELTA, "moments")
    with pytest.raises(UserError, match="unknown sampling"):
        privacy.History(sampling="shuffled")
    with pytest.raises(UserError, match="target ε must be a positive"):
        privacy.noise_multiplier(0.0, sample_rate=0.1, steps=10, delta=DELTA)
    with pytest.raises(UserError, match="no σ to calibrate for 0 steps"):
        privacy.noise_multiplier(1.0, sample_rate=0.1, steps=0, delta=DELTA)


def test_unreachable_targets_are_user_errors_that_name_the_target() -> None:
    with pytest.raises(privacy.TargetUnreachable, match="ε = 0.01"):
        privacy.noise_multiplier(0.01, sample_rate=1.0, steps=1000, delta=DELTA)
    with pytest.raises(UserError, match="target ε=0.01 is impossible"):
        accounting.noise_for_epsilon(target_epsilon=0.01, sample_rate=1.0, steps=1000, delta=DELTA)
    config = load_config(None, {"clients": 4, "clients_per_round": 4, "rounds": 2000, "dp.mechanism": "gaussian",
                                "dp.target_epsilon": 1e-4, "dp.delta": DELTA}, model=FederatedConfig)
    with pytest.raises(UserError, match="no noise level reaches ε = 0.0001 in 2000 rounds"):
        PrivacyPlan(config)


def test_old_names_still_import() -> None:
    assert accounting.SAMPLE_NEIGHBOURS == privacy.SAMPLE_NEIGHBOURS == "add/remove one training sample"
    assert accounting.default_delta is privacy.default_delta and accounting.default_delta(10) == 0.01
    assert set(accounting.ACCOUNTANTS) == {"rdp", "prv"}  # gdp stays out of DP-SGD and the registry
    from privlora.federated.privacy_plan import CLIENT_NEIGHBOURS
    assert CLIENT_NEIGHBOURS == privacy.CLIENT_NEIGHBOURS


# --- layering ---------------------------------------------------------------------------------------

ALLOWED_OUTSIDE = {"__future__", "abc", "collections", "dataclasses", "functools", "math", "numbers", "typing",
                   "warnings", "numpy", "opacus", "dp_accounting"}


def test_privacy_imports_nothing_above_the_ground_floor() -> None:
    """privacy/ may import the standard library, numpy, Opacus (and dp-accounting), privlora.privacy
    and privlora.errors — never train/, federated/, audit/ or config (the layers that call it)."""
    package = Path(privacy.__file__).parent
    seen = set()
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                seen.add(name)
                top = name.split(".")[0]
                if top == "privlora":
                    assert name == "privlora.errors" or name == "privlora" and all(
                        a.name == "errors" for a in node.names) or name.startswith("privlora.privacy"), \
                        f"{path.name} imports {name}"
                else:
                    assert top in ALLOWED_OUTSIDE, f"{path.name} imports {name}"
    assert "opacus.accountants" in seen  # the walk did see the imports


def test_orders_are_opacus_own() -> None:
    assert list(privacy.ORDERS) == RDPAccountant.DEFAULT_ALPHAS


def test_importing_privacy_does_not_import_torch() -> None:
    """Opacus (hence torch, seconds) loads at the first ε, not at import: the ledger and the registry
    import privacy/ in processes that may never account anything."""
    code = "import sys, privlora.privacy, privlora.federated.client_privacy; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
