"""One-run DP audit (Steinke, Nasr & Jagielski 2023): the statistics against independent computations,
and the audit end to end on the embedded base (a DP run's bound never exceeds its accountant ε; a plain
run's bound is clearly > 0, which is the check that the canary attack works)."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from conftest import CONFIGS, assert_one_line_error, run_cli
from privlora.audit import one_run
from privlora.errors import UserError

# --- statistics ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("m", "r", "v", "eps"), [(10, 10, 7, 0.5), (100, 40, 30, 1.0), (1000, 1000, 650, 0.3),
                                                   (64, 20, 20, 2.0), (5, 3, 0, 1.0)])
def test_delta_zero_p_value_is_the_binomial_tail(m: int, r: int, v: int, eps: float) -> None:
    """δ = 0: the p-value is P[Binomial(r, e^ε/(1+e^ε)) ≥ v], summed here term by term with exact binomials."""
    q = math.exp(eps) / (1 + math.exp(eps))
    brute = sum(math.comb(r, k) * q ** k * (1 - q) ** (r - k) for k in range(v, r + 1))
    assert one_run.p_value(m, r, v, eps, 0.0) == pytest.approx(brute, rel=1e-9, abs=1e-300)
    assert one_run.p_value(m, r, v, eps, 0.0) == pytest.approx(1 - stats.binom.cdf(v - 1, r, q), rel=1e-9)


def test_delta_term_matches_exact_rational_arithmetic() -> None:
    """The δ term 2mδ · max_i P[v−i ≤ B < v]/i, recomputed with exact fractions at ε = ln 3 (q = 3/4)."""
    m, r, v, delta = 50, 12, 10, 0.001
    q = Fraction(3, 4)
    pmf = [math.comb(r, k) * q ** k * (1 - q) ** (r - k) for k in range(r + 1)]
    tail = sum(pmf[v:])
    alpha = max(sum(pmf[v - i:v]) / i for i in range(1, v + 1))
    exact = float(tail + 2 * m * Fraction(delta) * alpha)
    assert one_run.p_value(m, r, v, math.log(3), delta) == pytest.approx(exact, rel=1e-9)


def test_p_value_and_bound_are_monotone() -> None:
    m, r = 200, 100
    ps = [one_run.p_value(m, r, 70, e) for e in np.linspace(0, 3, 31)]
    assert all(a <= b + 1e-15 for a, b in zip(ps, ps[1:], strict=False))  # more ε allowed → more likely
    bounds = [one_run.epsilon_lower_bound(m, r, v) for v in range(50, 101, 5)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False)) and bounds[0] == 0 and bounds[-1] > 2
    # δ only weakens the evidence, and fewer canaries (m) with the same guesses help under δ > 0
    assert one_run.epsilon_lower_bound(m, r, 90, delta=1e-3) < one_run.epsilon_lower_bound(m, r, 90)
    assert one_run.epsilon_lower_bound(m, r, 90, delta=1e-3) < one_run.epsilon_lower_bound(r, r, 90, delta=1e-3)
    # a stricter confidence proves less
    assert one_run.epsilon_lower_bound(m, r, 90, beta=0.01) < one_run.epsilon_lower_bound(m, r, 90, beta=0.05)


def test_bound_is_the_boundary_of_rejection() -> None:
    """At the returned ε the hypothesis is rejected (p < β); a hair above it, it is not."""
    m, r, v, d, beta = 300, 120, 95, 1e-4, 0.05
    eps = one_run.epsilon_lower_bound(m, r, v, delta=d, beta=beta)
    assert one_run.p_value(m, r, v, eps, d) < beta <= one_run.p_value(m, r, v, eps + 1e-4, d)


def test_all_correct_with_m_guesses_matches_closed_form() -> None:
    """v = r = m, δ = 0: p = q^m < β ⇔ ε < logit(β^(1/m)), so the bound is that logit."""
    m, beta = 64, 0.05
    q = beta ** (1 / m)
    assert one_run.epsilon_lower_bound(m, m, m, beta=beta) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)


def _randomized_response(shape: tuple[int, int], eps: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An ε-DP mechanism on m canaries (one row per trial): each canary's inclusion bit is reported
    truthfully with probability e^ε/(1+e^ε), flipped otherwise."""
    included = rng.random(shape) < 0.5
    truthful = rng.random(shape) < 1 / (1 + math.exp(-eps))
    return included, np.where(truthful, included, ~included)


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0])
def test_monte_carlo_randomized_response_is_audited_tightly_and_validly(eps: float) -> None:
    """The perfect auditor of ε-DP randomized response on 10 000 canaries: the bound is ≤ ε in ≥ 95 % of
    trials (the guarantee; 2 000 trials, allowing 3 standard errors of sampling noise) and within 15 % of ε
    on average (the paper's tightness for pure DP)."""
    m, seeds = 10_000, 2_000
    cache: dict[int, float] = {}  # the bound depends on the seed only through v: compute each v once
    bounds = []
    included, reported = _randomized_response((seeds, m), eps, np.random.default_rng(int(eps * 100)))
    for v in (reported == included).sum(1).tolist():  # the perfect auditor guesses what it saw
        if v not in cache:
            cache[v] = one_run.epsilon_lower_bound(m, m, v, beta=0.05, tolerance=1e-4)
        bounds.append(cache[v])
    bounds = np.array(bounds)
    assert (bounds <= eps).mean() >= 0.95 - 3 * math.sqrt(0.05 * 0.95 / seeds)
    assert 0.85 * eps < bounds.mean() < eps


def test_monte_carlo_no_signal_gives_no_bound() -> None:
    """Random guesses (the model tells nothing): the bound is 0 in ≥ 95 % of seeds and tiny otherwise."""
    m, bounds = 2_000, []
    for s in range(200):
        rng = np.random.default_rng(1000 + s)
        included = rng.random(m) < 0.5
        scores = rng.normal(size=m)
        bounds.append(one_run.audit_bound(scores, included, delta=1e-4)["epsilon_lower_bound"])
    bounds = np.array(bounds)
    assert (bounds == 0).mean() >= 0.95 and bounds.max() < 0.3


def test_audit_bound_guesses_top_in_bottom_out_with_bonferroni() -> None:
    scores = np.arange(10, dtype=float)  # canary i has score i
    included = np.array([0, 0, 1, 0, 0, 1, 0, 1, 1, 1])
    assert one_run.guess(scores, included, 3, 2) == (5, 5)  # top 3 (9, 8, 7) in, bottom 2 (0, 1) out
    assert one_run.guess(scores, included, 2, 3) == (5, 4)  # bottom 3 includes canary 2 (in)
    fixed = one_run.audit_bound(scores, included, delta=0.0, guesses=[5])
    assert fixed["correction"] == "none" and fixed["candidates"][0]["beta"] == 0.05
    assert fixed["epsilon_lower_bound"] == pytest.approx(one_run.epsilon_lower_bound(10, 5, 5))
    grid = one_run.audit_bound(scores, included, delta=0.0, guesses=[1, 5, 10])
    assert grid["correction"] == "bonferroni" and all(c["beta"] == pytest.approx(0.05 / 3) for c in grid["candidates"])
    assert grid["epsilon_lower_bound"] == max(one_run.epsilon_lower_bound(10, c["guesses"], c["correct"],
                                                                          beta=0.05 / 3) for c in grid["candidates"])


def test_statistics_refuse_bad_input() -> None:
    with pytest.raises(UserError, match="guesses"):
        one_run.p_value(10, 11, 3, 1.0)
    with pytest.raises(UserError, match="β"):
        one_run.epsilon_lower_bound(10, 5, 5, beta=1.5)
    with pytest.raises(UserError, match="at least 2"):
        one_run.audit_bound(np.array([1.0]), np.array([1]), delta=0.0)
    with pytest.raises(UserError, match="NaN"):
        one_run.audit_bound(np.array([1.0, np.nan]), np.array([1, 0]), delta=0.0)
    with pytest.raises(UserError, match="between 1"):
        one_run.audit_bound(np.array([1.0, 2.0]), np.array([1, 0]), delta=0.0, guesses=[3])


# --- the audit end to end -----------------------------------------------------------------------

QUICK = {"eval.timesteps": [200], "eval.samples": 0, "quiet": True, "optim.max_steps": 3,
         "data.members": 0.08, "data.eval": 0.08}


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step DP-LoRA run on 8 faces: the recipe under audit (its own adapter is not what is audited)."""
    from privlora.config import load_config
    from privlora.train.loop import train

    out = tmp_path_factory.mktemp("dp1") / "dp"
    train(load_config(CONFIGS / "demo-dp.yaml", {**QUICK, "out": str(out)}))
    return out


@pytest.fixture(scope="module")
def dp_audited(dp_run: Path) -> tuple[Path, dict]:
    """The audit through the real CLI (one subprocess): 9 canaries, the canary run trains 3 DP steps."""
    proc = run_cli("audit", "--run", str(dp_run), "--dp-canaries", "9", "--seed", "1", "-q", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "one-run DP audit: ε lower bound" in proc.stdout and "accountant ε" in proc.stdout
    return dp_run, json.loads((dp_run / "audit" / "dp_canaries.json").read_text())


def test_dp_canary_audit_writes_a_bound_below_the_accountant(dp_audited: tuple[Path, dict]) -> None:
    run, result = dp_audited
    canary_run = Path(result["canary_run"])
    assert canary_run == run / "audit" / "dp-canary-run" and (canary_run / "adapter").is_dir()
    privacy = json.loads((canary_run / "privacy.json").read_text())
    # the claim under test is the canary run's own ε: its n is members + included canaries
    assert privacy["dataset_size"] == result["training_samples"] == 8 + result["included"]
    assert result["accountant_epsilon"] == privacy["epsilon"] and result["delta"] == privacy["delta"]
    # the claim is the accountant's ε of the mechanism that ran (its σ, q = batch / n incl. canaries, steps)
    from privlora.train import accounting

    assert privacy["sample_rate"] == pytest.approx(min(1.0, 16 / privacy["dataset_size"]))
    assert privacy["epsilon"] == pytest.approx(accounting.epsilon(
        noise_multiplier=privacy["noise_multiplier"], sample_rate=privacy["sample_rate"], steps=privacy["steps"],
        delta=privacy["delta"], accountant=privacy["accountant"]))
    # bound ≤ ε cannot fail here (9 canaries prove at most ≈ 0.9 < 8): the check with power is
    # test_dp_claim_survives_an_audit_that_could_refute_it
    assert 0 <= result["epsilon_lower_bound"] <= result["accountant_epsilon"]
    assert "violation" not in result
    canaries = result["canaries"]
    assert len(canaries) == result["m"] == 9 and sum(c["included"] for c in canaries) == result["included"]
    assert 0 <= result["correct"] <= result["guesses"] <= 9
    # the canary run trained on exactly the members and the included canaries
    splits = json.loads((canary_run / "splits.json").read_text())
    original = json.loads((run / "splits.json").read_text())
    assert splits["members"] == original["members"] + [c["id"] for c in canaries if c["included"]]
    # the reported numbers are the statistics of the reported guesses
    assert result["epsilon_lower_bound"] == pytest.approx(one_run.audit_bound(
        np.array([c["score"] for c in canaries]), np.array([c["included"] for c in canaries]),
        delta=result["delta"])["epsilon_lower_bound"])


@pytest.fixture(scope="module")
def tight_dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same 3-step recipe with a claim small enough to be checked: ε = 1 at δ = 1e-5."""
    from privlora.config import load_config
    from privlora.train.loop import train

    out = tmp_path_factory.mktemp("dp-tight") / "dp"
    train(load_config(CONFIGS / "demo-dp.yaml", {**QUICK, "out": str(out), "dp.target_epsilon": 1.0,
                                                 "dp.delta": 1e-5}))
    return out


def test_dp_claim_survives_an_audit_that_could_refute_it(tight_dp_run: Path) -> None:
    """The bound ≤ ε check with the power to fail. 9 image canaries can prove at most ≈ 0.9 — far below the
    ε = 8 above, and at demo scale even a noiseless run lets image canaries prove nothing (measured: 32
    canaries, noise removed, 30 steps: bound 0.03, AUC 0.70) — so the claim is checked with 2000 white-box
    gradient canaries through the same CLI: a leak they see perfectly would prove more than the claimed ε
    (asserted below), so DP-SGD that lost its noise or an accountant that under-reports ε fails here
    (measured with the noise zeroed: bound ≫ ε, a violation)."""
    proc = run_cli("audit", "--run", str(tight_dp_run), "--dp-canaries", "2000", "--dp-canary-kind", "gradient",
                   "--seed", "1", "-q", timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tight_dp_run / "audit" / "dp_gradient_canaries.json").read_text())
    privacy = json.loads((tight_dp_run / "privacy.json").read_text())
    from privlora.train import accounting

    eps = accounting.epsilon(noise_multiplier=privacy["noise_multiplier"], sample_rate=privacy["sample_rate"],
                             steps=privacy["steps"], delta=result["delta"])
    assert result["accountant_epsilon"] == pytest.approx(eps) and result["delta"] <= privacy["delta"]
    included = np.array([c["included"] for c in result["canaries"]])
    perfect = one_run.audit_bound(included.astype(float), included, delta=result["delta"])["epsilon_lower_bound"]
    assert perfect > 1.5 * result["accountant_epsilon"], (perfect, result["accountant_epsilon"])  # the power
    assert 0 <= result["epsilon_lower_bound"] <= result["accountant_epsilon"], result["epsilon_lower_bound"]
    assert "violation" not in result and "WARNING" not in proc.stdout


def test_dp_canary_audit_reuses_its_run_and_refuses_a_foreign_one(dp_audited: tuple[Path, dict]) -> None:
    from privlora.audit.dp_canaries import dp_canary_audit
    from privlora.audit.runner import load_run

    run, first = dp_audited
    loaded = load_run(run)
    weights = next((Path(first["canary_run"]) / "adapter").glob("*.safetensors"))
    before = weights.stat().st_mtime_ns
    again = dp_canary_audit(run, m=9, seed=1, draws=1, loaded=loaded)  # same manifest: reused, not retrained
    assert weights.stat().st_mtime_ns == before and again["canary_run"] == first["canary_run"]
    assert [c["included"] for c in again["canaries"]] == [c["included"] for c in first["canaries"]]
    for other in ({"m": 10, "seed": 1}, {"m": 9, "seed": 2}, {"m": 9, "seed": 1, "kind": "blocks"}):
        with pytest.raises(UserError, match="not this audit's canary run"):
            dp_canary_audit(run, loaded=loaded, **other)


def test_an_interrupted_canary_run_resumes_only_with_its_own_canaries(dp_audited: tuple[Path, dict],
                                                                      tmp_path: Path) -> None:
    from privlora.audit.dp_canaries import dp_canary_audit

    run, _ = dp_audited
    out = tmp_path / "canaries"
    (tmp_path / "canaries.partial").mkdir()  # left by another audit, with no manifest of ours
    with pytest.raises(UserError, match="interrupted canary run"):
        dp_canary_audit(run, m=9, seed=1, canary_dir=out)
    (tmp_path / ".canaries.manifest.json").write_text(json.dumps({"kind": "blocks", "m": 9}))
    with pytest.raises(UserError, match="interrupted canary run"):
        dp_canary_audit(run, m=9, seed=1, canary_dir=out)
    assert not out.exists()


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"m": 1}, "at least 2"),
    ({"m": 4, "kind": "stripes"}, "unknown canary kind"),
    ({"m": 4, "guesses": [5]}, "between 1 and M"),
    ({"m": 4, "beta": 0.0}, "β"),
    ({"m": 4, "draws": 0}, "noise draw"),
])
def test_dp_canary_audit_refuses_bad_input(dp_run: Path, kwargs: dict, needle: str) -> None:
    from privlora.audit.dp_canaries import dp_canary_audit

    with pytest.raises(UserError, match=needle):
        dp_canary_audit(dp_run, **kwargs)
    assert not (dp_run / "audit" / "dp-canary-run.partial").exists()  # refused before any training


def test_dp_canary_audit_of_a_missing_run(tmp_path: Path) -> None:
    from privlora.audit.dp_canaries import dp_canary_audit

    with pytest.raises(UserError, match="does not exist"):
        dp_canary_audit(tmp_path / "nope", m=8)


@pytest.mark.parametrize(("args", "needle"), [(["--dp-guesses", "two"], "--dp-guesses"),
                                             (["--references", "2"], "alone")])
def test_dp_canary_cli_bad_input_is_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    assert_one_line_error(run_cli("audit", "--run", str(tmp_path), "--dp-canaries", "4", *args), needle)


def test_canaries_are_seeded_and_out_of_the_data() -> None:
    from privlora.audit.dp_canaries import CANARY_KINDS, draw_inclusion, make_canaries

    for kind in CANARY_KINDS:
        a, b = make_canaries(kind, 6, (1, 32, 32), seed=3), make_canaries(kind, 6, (1, 32, 32), seed=3)
        assert a.pixels.shape == (6, 1, 32, 32) and a.pixels.abs().max() <= 1
        assert a.ids == b.ids and (a.pixels == b.pixels).all()
        assert not (a.pixels == make_canaries(kind, 6, (1, 32, 32), seed=4).pixels).all()
        assert len({tuple(x.flatten().tolist()) for x in a.pixels}) == 6  # distinct canaries
    inc = draw_inclusion(4000, seed=0)
    assert (inc == draw_inclusion(4000, seed=0)).all() and abs(inc.mean() - 0.5) < 0.03


@pytest.mark.slow
def test_plain_run_with_canaries_gives_a_bound_above_zero(tmp_path: Path) -> None:
    """The attack works: a plain LoRA run (demo-plain's recipe, 150 steps) with 32 canaries of each kind
    memorises the included noise canaries enough for a bound > 0 (the benchmark's "kinds" section, same
    seeds: 0.33; AUC 0.81)."""
    from privlora.audit import dp_canaries as dc
    from privlora.config import load_config
    from privlora.data.splits import Splits, make_splits
    from privlora.tasks.loading import load_task
    from privlora.train.data import load_training_data
    from privlora.train.loop import train

    out = tmp_path / "kinds-run"
    config = load_config(CONFIGS / "demo-plain.yaml", {"eval.timesteps": [200], "eval.samples": 0, "quiet": True,
                                                       "out": str(out), "optim.max_steps": 150})
    data = load_training_data(config, load_task(config.base, None, seed=config.seed))
    splits = make_splits(data, members=config.data.members, aux=config.data.aux, eval=config.data.eval,
                         seed=config.seed, source=config.data.source)
    sets = [dc.make_canaries(k, 32, tuple(data.pixels.shape[1:]), seed=0) for k in dc.CANARY_KINDS]
    canaries = sets[0].concat(sets[1]).concat(sets[2])
    included = dc.draw_inclusion(len(canaries), seed=0)
    chosen = [c for c, inc in zip(canaries.ids, included, strict=True) if inc]
    train(config, splits=Splits(members=[*splits.members, *chosen], aux=splits.aux, eval=splits.eval,
                                source=splits.source, seed=splits.seed), extra=canaries)
    task = dc._load_adapter_task(type("Loaded", (), {"config": config})(), out)
    scores = dc.canary_scores(task, canaries, seed=0)
    noise = slice(0, 32)  # CANARY_KINDS starts with "noise"
    bound = one_run.audit_bound(scores[noise], included[noise], delta=1 / (10 * (len(splits.members) + len(chosen))))
    assert bound["epsilon_lower_bound"] > 0.2, bound["candidates"]
