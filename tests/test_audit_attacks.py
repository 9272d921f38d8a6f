"""Membership attacks: model-only scorers on a really memorised adapter, and reference attacks' maths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import CONFIGS, FAST, assert_one_line_error, run_cli
from privlora.audit import references as refs
from privlora.audit.attacks import ATTACKS, _ddim_move
from privlora.audit.runner import load_run
from privlora.errors import UserError


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """4 faces seen 300 times each (lr 2e-3) — members every attack should find (AUCs 0.81–1.0 measured)."""
    out = tmp_path_factory.mktemp("mem") / "run"
    proc = run_cli("train", "--config", str(CONFIGS / "demo-plain.yaml"), "--max-steps", "300",
                   "--batch-size", "4", "--lr", "0.002", "--set", "data.members=0.04", "--set", "data.aux=0.0",
                   "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    return load_run(out)


@pytest.mark.parametrize("name", ["loss", "secmi", "pia", "sima"])
def test_attack_finds_memorised_members_and_base_does_not(memorised, name):
    score = ATTACKS[name].score
    members, held_out = memorised.members, memorised.held_out
    labels = np.r_[np.ones(len(members)), np.zeros(len(held_out))]
    adapter = np.r_[score(memorised.task, members, seed=0), score(memorised.task, held_out, seed=1)]
    with memorised.task.adapter_disabled():
        base = np.r_[score(memorised.task, members, seed=0), score(memorised.task, held_out, seed=1)]
    assert adapter.shape == (len(labels),) and np.isfinite(adapter).all()
    assert roc_auc_score(labels, adapter) >= 0.75, name  # 4 heavily trained faces stand out
    assert roc_auc_score(labels, adapter) > roc_auc_score(labels, base) + 0.15, name
    again = np.r_[score(memorised.task, members, seed=0), score(memorised.task, held_out, seed=1)]
    np.testing.assert_array_equal(adapter, again)  # same seed, same scores


def test_ddim_move_round_trip_and_forward_noising():
    x, eps = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    there = _ddim_move(x, eps, 0.9, 0.4)
    torch.testing.assert_close(_ddim_move(there, eps, 0.4, 0.9), x)
    # from a clean image (ᾱ = 1) the move is exactly the forward noising with that ε
    torch.testing.assert_close(_ddim_move(x, eps, 1.0, 0.4), 0.4 ** 0.5 * x + 0.6 ** 0.5 * eps)


def test_halves_are_complementary():
    population = [f"x{i}" for i in range(11)]
    halves = refs._halves(population, 4, seed=3)
    assert len(halves) == 4
    for a, b in (halves[0:2], halves[2:4]):
        assert set(a) | set(b) == set(population) and not set(a) & set(b)
    assert halves[0] != halves[2]  # two different random cuts
    inside = refs.References(directory=None, population=population, inside=halves, recipe={}).membership(population)
    np.testing.assert_array_equal(inside.sum(0), 2)
    with pytest.raises(UserError, match="even"):
        refs._halves(population, 3, seed=0)


def _synthetic(n: int = 400, k: int = 8, effect: float = 0.4, seed: int = 0):
    """Per-image difficulty (sd 1) dwarfs the membership effect: raw loss barely separates, references do."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 1, n)
    member = rng.random(n) < 0.5
    inside = np.zeros((k, n), bool)
    for pair in range(k // 2):
        cut = rng.random(n) < 0.5
        inside[2 * pair], inside[2 * pair + 1] = cut, ~cut
    noise = 0.1
    target = difficulty - effect * member + rng.normal(0, noise, n)
    ref_signals = difficulty - effect * inside + rng.normal(0, noise, (k, n))
    return target, ref_signals, inside, member


def test_lira_calibration_beats_raw_loss_and_matches_formula():
    target, ref_signals, inside, member = _synthetic()
    raw_auc = roc_auc_score(member, -target)
    lira = refs.lira_scores(target, ref_signals, inside)
    assert raw_auc < 0.7 < 0.95 < roc_auc_score(member, lira)
    # independent computation of one image's Gaussian likelihood ratio
    i = 7
    mu_in, mu_out = (-ref_signals[inside[:, i], i]).mean(), (-ref_signals[~inside[:, i], i]).mean()
    resid = np.where(inside, -ref_signals - np.where(inside, -ref_signals, 0).sum(0) / inside.sum(0),
                     -ref_signals - np.where(~inside, -ref_signals, 0).sum(0) / (~inside).sum(0))
    sigma = np.sqrt((resid ** 2).sum() / (resid.size - 2 * target.size))
    from scipy.stats import norm

    expected = norm.logpdf(-target[i], mu_in, sigma) - norm.logpdf(-target[i], mu_out, sigma)
    assert lira[i] == pytest.approx(expected, rel=1e-9)


def test_lira_with_two_references_still_calibrates():
    target, ref_signals, inside, member = _synthetic(k=2)
    assert roc_auc_score(member, refs.lira_scores(target, ref_signals, inside)) > 0.9


def test_rmia_matches_pairwise_definition():
    target, ref_signals, inside, member = _synthetic(n=60, k=4)
    rng = np.random.default_rng(1)
    z_t, z_r = rng.normal(0, 1, 20), rng.normal(0, 1, (4, 20))
    scores = refs.rmia_scores(target, ref_signals, z_t, z_r, gamma=1.0)
    p_x = np.exp(-ref_signals).mean(0)
    p_z = np.exp(-z_r).mean(0)
    for i in (0, 13, 59):
        lr = [(np.exp(-target[i]) / p_x[i]) / (np.exp(-z_t[j]) / p_z[j]) for j in range(20)]
        assert scores[i] == pytest.approx(np.mean(np.array(lr) >= 1.0))
    big = refs.rmia_scores(*_synthetic()[:2], _synthetic()[0][:50], _synthetic()[1][:, :50])
    assert roc_auc_score(_synthetic()[3], big) > 0.9


def test_reference_adapters_are_trained_once_and_reused(tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", "--config", str(CONFIGS / "demo-plain.yaml"), "--max-steps", "2", "--batch-size", "4",
                   "--out", str(run), *FAST).returncode == 0
    proc = run_cli("audit", "--run", str(run), "--references", "2", "--attacks", "loss", "-q")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((run / "references" / "references.json").read_text())
    splits = json.loads((run / "splits.json").read_text())
    population = sorted(splits["members"] + splits["eval_nonmembers"])
    assert sorted(manifest["inside"][0] + manifest["inside"][1]) == population
    for k in range(2):  # each reference is a normal run directory that trained on its half only
        ref_splits = json.loads((run / "references" / f"ref-{k}" / "splits.json").read_text())
        assert ref_splits["members"] == manifest["inside"][k]
    stamp = (run / "references" / "ref-0" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    results = json.loads((run / "audit" / "results.json").read_text())
    assert set(results["attacks"]) == {"loss", "lira", "rmia"}
    # each reference's signal (on the population and on the aux samples) is kept beside it and reused
    signals = sorted((run / "references" / "signals").glob("ref-*.npy"))
    assert len(signals) == 4, signals
    kept = {f: f.stat().st_mtime_ns for f in signals}
    first = (run / "audit" / "scores.csv").read_text()
    assert run_cli("audit", "--run", str(run), "--references", "2", "--attacks", "loss", "-q").returncode == 0
    assert (run / "references" / "ref-0" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert {f: f.stat().st_mtime_ns for f in signals} == kept
    assert (run / "audit" / "scores.csv").read_text() == first  # the same numbers as computing them afresh
    # references for another population are refused, not silently reused
    other = tmp_path / "other"
    assert run_cli("train", "--config", str(CONFIGS / "demo-plain.yaml"), "--max-steps", "2", "--batch-size", "4",
                   "--seed", "5", "--out", str(other), *FAST).returncode == 0
    assert_one_line_error(run_cli("audit", "--run", str(other), "--references", "2",
                                  "--reference-dir", str(run / "references")), "another population")
    assert_one_line_error(run_cli("audit", "--run", str(run), "--references", "3"), "even")
    assert_one_line_error(run_cli("audit", "--run", str(run), "--attacks", "lira"), "--references")
    assert_one_line_error(run_cli("audit", "--run", str(run), "--fpr", "0.001"), "non-members")


@pytest.mark.slow  # ~150 s on 2 cores: three trainings and a sweep audit with references
def test_shared_references_take_the_plain_runs_recipe(tmp_path):
    """A sweep lists runs by name: an SMP run first must not decide how the shared references train."""
    runs = tmp_path / "sweep"
    assert run_cli("train", "--config", str(CONFIGS / "demo-smp.yaml"), "--max-steps", "2", "--batch-size", "4",
                   "--out", str(runs / "a-smp"), *FAST).returncode == 0
    assert run_cli("train", "--config", str(CONFIGS / "demo-plain.yaml"), "--max-steps", "3", "--batch-size", "4",
                   "--lr", "0.0007", "--out", str(runs / "b-plain"), *FAST).returncode == 0
    proc = run_cli("audit", "--sweep", str(runs), "--references", "2", "--attacks", "loss", "-q",
                   "--reference-dir", str(tmp_path / "refs"))
    assert proc.returncode == 0, proc.stderr
    recipe = json.loads((tmp_path / "refs" / "references.json").read_text())["recipe"]
    assert recipe["optim"]["max_steps"] == 3 and recipe["optim"]["lr"] == 0.0007
    metrics = (tmp_path / "refs" / "ref-0" / "metrics.jsonl").read_text().strip().splitlines()
    assert json.loads(metrics[-1])["step"] == 3  # trained with the plain run's step budget
