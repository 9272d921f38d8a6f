"""Sample unlearning: forget-set selection, NegGrad+, SalUn's mask, exact retraining, the verification
figures (checked against sklearn) and the output run directory (loadable by peft, auditable)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from conftest import CONFIGS, assert_nothing_written, assert_one_line_error, run_cli
from privlora.config import load_config
from privlora.data.splits import Splits
from privlora.errors import UserError
from privlora.train.loop import train
from privlora.unlearn import verify
from privlora.unlearn.methods import saliency_mask
from privlora.unlearn.run import unlearn
from privlora.unlearn.selection import select_forget
from privlora.unlearn.source import load_source

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_torch_thread")]  # conftest: one intra-op thread

# a small image run: 24 members, 16 aux, 20 evaluation non-members, rank 4, one eval timestep, no FD
FAST = {"eval.timesteps": [200], "eval.samples": 0, "quiet": True, "optim.batch_size": 8,
        "optim.max_steps": 8, "data.members": 0.24, "data.aux": 0.16, "data.eval": 0.2,
        "lora.rank": 4, "lora.alpha": 4, "log_every": 1}
QUICK = {"steps": 4, "lr": 2e-3, "stop": "none", "draws": 2, "quiet": True, "seed": 0}
ADAPTER = "adapter/adapter_model.safetensors"


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / ADAPTER))



@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("unlearn")


@pytest.fixture(scope="module")
def source(work) -> Path:
    config = load_config(CONFIGS / "demo-plain.yaml", {**FAST, "out": str(work / "source")})
    return train(config).run_dir


@pytest.fixture(scope="module")
def retrained(source, work) -> dict:
    return unlearn(source, work / "retrain", method="retrain", forget_fraction=0.25, seed=0, quiet=True)


@pytest.fixture(scope="module")
def neggrad(source, retrained, work) -> dict:
    return unlearn(source, work / "neggrad", method="neggrad+", forget_fraction=0.25, reference=work / "retrain",
                   alpha=0.5, **QUICK)


# --- forget-set selection -------------------------------------------------------------------------
def test_forget_selection_rules(tmp_path):
    members = [f"m{i}" for i in range(10)]
    a = select_forget(members, fraction=0.3, seed=1)
    assert len(a) == 3 and a == select_forget(members, fraction=0.3, seed=1) and set(a) <= set(members)
    assert select_forget(members, ids="m4, m1,m4") == ["m1", "m4"]  # member order, duplicates dropped
    f = tmp_path / "ids.txt"
    f.write_text("# who asked\nm2\n\nm7\n")
    assert select_forget(members, file=f) == ["m2", "m7"]
    for kwargs, needle in [({}, "exactly one"), ({"ids": "m1", "fraction": 0.5}, "exactly one"),
                           ({"ids": "m1,nobody"}, "not members"), ({"fraction": 1.5}, "(0, 1)"),
                           ({"ids": ",".join(members)}, "nothing would be retained"),
                           ({"file": tmp_path / "missing.txt"}, "does not exist")]:
        with pytest.raises(UserError, match=needle):
            select_forget(members, **kwargs)


# --- the verification figures ---------------------------------------------------------------------
def test_efficacy_formula_against_sklearn():
    rng = np.random.default_rng(0)
    held = rng.normal(0, 1, 40)
    forget_before, forget_after = rng.normal(1.0, 1, 12), rng.normal(0.2, 1, 12)
    y = np.r_[np.ones(12), np.zeros(40)]
    auc_b = roc_auc_score(y, np.r_[forget_before, held])
    auc_a = roc_auc_score(y, np.r_[forget_after, held])
    assert verify.efficacy(auc_b, auc_a) == pytest.approx(1 - (auc_a - 0.5) / (auc_b - 0.5))
    assert verify.efficacy(0.8, 0.5) == pytest.approx(1.0)
    assert verify.efficacy(0.8, 0.8) == pytest.approx(0.0)
    assert verify.efficacy(0.8, 0.35) == pytest.approx(1.5)  # forgot too much: detectable, flagged as > 1
    assert verify.efficacy(0.5, 0.4) is None
    assert verify.relative_drop(0.80, 0.78, higher_is_better=True) == pytest.approx(0.025)
    assert verify.relative_drop(0.050, 0.051, higher_is_better=False) == pytest.approx(0.02)


def test_unlearn_json_figures_match_sklearn_on_its_own_scores(neggrad):
    """AUCs, efficacy, gap to the reference and utility drop, recomputed from the per-sample scores."""
    aucs = {}
    for which in ("before", "after", "reference"):
        m = neggrad[which]["membership"]
        forget, held = np.array(m["scores"]["forget"]), np.array(m["scores"]["heldout"])
        assert len(forget) == neggrad["forget_size"] == 6 and len(held) == neggrad["heldout_size"] == 20
        aucs[which] = roc_auc_score(np.r_[np.ones(len(forget)), np.zeros(len(held))], np.r_[forget, held])
        assert m["forget"]["auc"] == pytest.approx(aucs[which], abs=1e-12)
        assert m["forget"]["auc_ci_low"] <= m["forget"]["auc"] <= m["forget"]["auc_ci_high"]
    s = neggrad["summary"]
    if aucs["before"] > 0.5:
        assert s["efficacy"] == pytest.approx(1 - (aucs["after"] - 0.5) / (aucs["before"] - 0.5))
    assert s["auc_gap_to_reference"] == pytest.approx(abs(aucs["after"] - aucs["reference"]))
    u0, u1 = neggrad["before"]["utility"], neggrad["after"]["utility"]
    assert s["utility_drop_heldout"] == pytest.approx((u1["heldout"] - u0["heldout"]) / u0["heldout"])
    assert neggrad["seconds"]["ratio_to_retrain"] == pytest.approx(
        neggrad["seconds"]["method"] / neggrad["seconds"]["retrain"])


# --- exact retraining -----------------------------------------------------------------------------
def test_retrain_never_saw_the_forget_set_and_equals_train(source, retrained, work):
    out = work / "retrain"
    splits = json.loads((out / "splits.json").read_text())
    forget = set(splits["forget"])
    src = Splits.load(source)
    assert len(forget) == 6 and forget <= set(src.members)
    assert not forget & set(splits["members"])
    assert sorted([*splits["members"], *forget]) == sorted(src.members)
    assert splits["eval_nonmembers"] == src.eval and splits["aux_nonmembers"] == src.aux
    # the same as `train` on those splits with the same seed: bit-identical weights
    config = load_config(source / "config.yaml", {"out": str(work / "by-hand"), "quiet": True})
    train(config, splits=Splits(members=splits["members"], aux=src.aux, eval=src.eval, source=src.source,
                                seed=src.seed))
    a, b = _adapter(out), _adapter(work / "by-hand")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and not the source's adapter
    assert any(not torch.equal(a[k], v) for k, v in _adapter(source).items())
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["unlearning"]["method"] == "retrain" and "own privacy" in privacy["unlearning"]["note"]
    assert retrained["summary"]["auc_after"] == retrained["summary"]["auc_reference"]


# --- NegGrad+ -------------------------------------------------------------------------------------
def test_neggrad_moves_the_adapter_and_raises_forget_loss_more_than_retain_loss(source, neggrad, work):
    from privlora.unlearn.methods import probe_losses

    before, after = load_source(source), load_source(work / "neggrad")
    a, b = _adapter(source), _adapter(work / "neggrad")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    forget_ids = neggrad["forget"]
    retain_ids = [m for m in before.splits.members if m not in set(forget_ids)]
    assert after.splits.members == retain_ids
    rise = {}
    for name, ids in (("forget", forget_ids), ("retain", retain_ids)):
        data = before.members.by_ids(ids)
        rise[name] = float(probe_losses(after.task, data, seed=3).mean()
                           - probe_losses(before.task, data, seed=3).mean())
    assert rise["forget"] > 0 and rise["forget"] > rise["retain"], rise
    assert neggrad["steps_taken"] == 4 and len((work / "neggrad" / "metrics.jsonl").read_text().splitlines()) == 4
    privacy = json.loads((work / "neggrad" / "privacy.json").read_text())
    assert "does not cover" in privacy["unlearning"]["note"]


def test_stopping_rule_stops_once_forget_looks_like_aux(source, work):
    r = unlearn(source, work / "stop", method="neggrad+", forget_fraction=0.25, steps=12, lr=2e-2,
                stop="aux", check_every=2, draws=1, train_reference=False, quiet=True)
    gaps = r["stop"]["gaps"]
    assert gaps[0]["step"] == 0 and gaps[0]["gap"] < 0  # the source fits its forget set better than aux
    assert r["stop"]["reached"], gaps  # seeded: this forget set reaches the aux level within the 12 steps
    assert all(g["gap"] < 0 for g in gaps[:-1])  # it only stops at the first check at or past the aux level
    assert gaps[-1]["gap"] >= 0 and r["steps_taken"] == gaps[-1]["step"] < 12
    assert [g["step"] for g in gaps] == list(range(0, r["steps_taken"] + 1, 2))  # a check every 2 steps
    assert len((work / "stop" / "metrics.jsonl").read_text().splitlines()) == r["steps_taken"]
    assert r["reference"] is None and r["seconds"]["ratio_to_retrain"] is None


# --- target (bounded ascent) ---------------------------------------------------------------------
def test_target_losses_are_aux_quantiles_at_the_forget_ranks(source):
    """Recomputed with numpy from the base-relative probe losses: forget sample of rank r → aux quantile."""
    from privlora.unlearn.methods import NonmemberLossTargets, probe_losses

    src = load_source(source)
    forget = src.members.by_ids(select_forget(list(src.splits.members), fraction=0.25, seed=0))
    term = NonmemberLossTargets(src.task, forget, src.aux, seed=5)
    f, a = probe_losses(src.task, forget, seed=5).numpy(), probe_losses(src.task, src.aux, seed=6).numpy()
    with src.task.adapter_disabled():
        f = f / probe_losses(src.task, forget, seed=5).numpy()
        a = a / probe_losses(src.task, src.aux, seed=6).numpy()
    ranks = np.argsort(np.argsort(f))
    expected = np.quantile(a.astype(np.float64), (ranks + 0.5) / len(f))
    assert term.relative
    np.testing.assert_allclose(term.targets.numpy(), expected, rtol=1e-5)
    order = np.argsort(f)  # best-fitted forget sample → lowest target
    assert np.all(np.diff(term.targets.numpy()[order]) >= 0)


def test_target_term_is_a_hinge_on_the_base_loss_of_the_same_noise(source):
    """``relu(q_i · ℓ_base − ℓ_i)``: ℓ_base recomputed with the adapter bypassed on a replayed generator;
    a sample at or past its target has no gradient."""
    from privlora.unlearn.methods import NonmemberLossTargets

    src = load_source(source)
    task = src.task
    forget = src.members.by_ids(select_forget(list(src.splits.members), fraction=0.25, seed=0))
    term = NonmemberLossTargets(task, forget, src.aux, seed=0)
    idx = list(range(len(forget)))
    batch = forget.batch(idx)
    with torch.no_grad():
        own = task.per_sample_loss(batch, torch.Generator().manual_seed(11))
        with task.adapter_disabled():
            base = task.per_sample_loss(batch, torch.Generator().manual_seed(11))
    value, mean_loss = term(task, idx, batch, torch.Generator().manual_seed(11))
    expected = torch.relu(term.targets * base - own).mean()
    assert float(mean_loss.detach()) == pytest.approx(float(own.mean()), rel=1e-5)
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-4, abs=1e-9)
    term.targets = torch.zeros(len(forget))  # every sample past its target: the term and its gradient vanish
    params = task.trainable_parameters()
    value, _ = term(task, idx, batch, torch.Generator().manual_seed(11))
    assert float(value.detach()) == 0.0
    value.backward()
    assert all(p.grad is None or not p.grad.any() for p in params)


def test_target_raises_forget_loss_and_records_its_targets(source, retrained, work):
    from privlora.unlearn.methods import DEFAULTS, probe_losses

    r = unlearn(source, work / "target", forget_fraction=0.25, reference=work / "retrain", **QUICK)
    assert r["method"] == "target"  # the default method
    assert r["options"]["alpha"] == DEFAULTS["target"]["alpha"] and r["options"]["lr"] == QUICK["lr"]
    assert r["targets"]["relative_to_base"] and r["targets"]["min"] <= r["targets"]["max"]
    before, after = load_source(source), load_source(work / "target")
    forget = before.members.by_ids(r["forget"])
    rise = float(probe_losses(after.task, forget, seed=3).mean() - probe_losses(before.task, forget, seed=3).mean())
    assert rise > 0
    logs = [json.loads(line) for line in (work / "target" / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == 4 and all(log["objective"] >= 0.5 * log["loss_retain"] - 1e-9 for log in logs)


def test_text_targets_are_raw_loss_quantiles(monkeypatch):
    """A task without a base model to compare with (text) gets the aux losses' quantiles themselves."""
    from privlora.unlearn import methods

    class Classifier:
        num_labels = 3

    class Losses(list):
        """Stands for a data split; the probe below returns its losses."""

    monkeypatch.setattr(methods, "probe_losses", lambda task, data, *, seed: torch.tensor(list(data)))
    aux = [0.1, 0.5, 2.0, 5.0]
    term = methods.NonmemberLossTargets(Classifier(), Losses([0.04, 0.01, 0.03, 0.02]), Losses(aux), seed=0)
    ranks = np.array([3, 0, 2, 1])
    assert not term.relative
    np.testing.assert_allclose(term.targets.numpy(), np.quantile(aux, (ranks + 0.5) / 4), rtol=1e-6)


@pytest.mark.slow
def test_text_unlearning_runs_the_real_text_branch(tmp_path):
    """The text branch end to end (MiniLM, no stubs): a 40-step run on 30 tweets memorises them (forget AUC
    measured 0.87), `target` — the default method, with raw-loss aux quantiles as its bounds — then raises the
    forget set's loss more than the retained set's and pulls its membership AUC down towards chance (20 steps:
    measured 0.87 → 0.40; 10 steps left 0.80 here, too close to the source to tell forgetting from noise)."""
    from privlora.unlearn.methods import probe_losses

    config = load_config(CONFIGS / "text-plain.yaml", {"data.limit": 60, "optim.batch_size": 8, "optim.lr": 5e-3,
                                                       "optim.max_steps": 40, "quiet": True,
                                                       "out": str(tmp_path / "text")})
    source = train(config).run_dir
    r = unlearn(source, tmp_path / "forgot", forget_fraction=0.2, steps=20, lr=5e-3, stop="none", draws=1,
                train_reference=False, seed=0, quiet=True)
    assert r["task"] == "text" and r["method"] == "target" and r["forget_size"] == 6 and r["steps_taken"] == 20
    assert r["targets"]["relative_to_base"] is False  # a classifier has no base model to compare with
    before, after = r["before"]["membership"]["forget"]["auc"], r["after"]["membership"]["forget"]["auc"]
    assert before > 0.75, before  # the source memorised its members: there is something to forget
    assert after < before - 0.2 and abs(after - 0.5) < abs(before - 0.5), (before, after)
    src, out = load_source(source), load_source(tmp_path / "forgot")
    rise = {}
    for name, ids in (("forget", r["forget"]), ("retain", out.splits.members)):
        data = src.members.by_ids(ids)
        rise[name] = float(probe_losses(out.task, data, seed=3).mean() - probe_losses(src.task, data, seed=3).mean())
    assert rise["forget"] > 0 and rise["forget"] > rise["retain"], rise
    assert not set(r["forget"]) & set(out.splits.members) and len(out.splits.members) == 24
    utility = json.loads((tmp_path / "forgot" / "utility.json").read_text())
    assert utility["accuracy_members"] == pytest.approx(r["after"]["utility"]["retain"])


# --- SalUn ----------------------------------------------------------------------------------------
def test_salun_updates_only_the_salient_weights(source, work):
    r = unlearn(source, work / "salun", method="salun", forget_fraction=0.25, saliency=0.3,
                train_reference=False, **{**QUICK, "steps": 2, "draws": 1})
    # the mask again, independently of the run: same source, same forget set, same seed
    src = load_source(source)
    params = src.task.trainable_parameters()
    names = [n for n, p in src.task.model.named_parameters() if p.requires_grad]
    masks = saliency_mask(src.task, src.members.by_ids(r["forget"]), params, share=0.3, draws=4, seed=0)
    share = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert share == pytest.approx(0.3, abs=0.01)
    assert r["saliency"]["updated"] == sum(int(m.sum()) for m in masks)
    a, b = _adapter(source), _adapter(work / "salun")
    by_name = {n.replace(".default", ""): m for n, m in zip(names, masks, strict=True)}
    changed = 0
    for key, value in a.items():
        mask = by_name[key.removeprefix("base_model.model.")]
        assert torch.equal(value[~mask], b[key][~mask]), key  # outside the mask: bit-identical
        changed += int((value[mask] != b[key][mask]).sum())
    assert changed > 0


# --- the output run -------------------------------------------------------------------------------
def test_output_is_a_run_peft_loads_and_the_audit_accepts(neggrad, work):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

    from privlora.audit.runner import load_run
    from privlora.tasks.embedded import load_embedded

    out = work / "neggrad"
    for name in ("config.yaml", "splits.json", "privacy.json", "utility.json", "unlearn.json", ADAPTER,
                 "adapter/adapter_config.json", "adapter/pytorch_lora_weights.safetensors"):
        assert (out / name).is_file(), name
    # the reference was reused (--reference), so none is trained into or copied to the output
    assert not (out / "reference").exists() and neggrad["reference_run"] == str(work / "retrain")
    saved = _adapter(out)
    unet, _, _ = load_embedded()
    unet = inject_adapter_in_model(LoraConfig.from_pretrained(str(out / "adapter")), unet)
    result = set_peft_model_state_dict(unet, saved)
    assert not [k for k in result.unexpected_keys if "lora_" in k]
    loaded = get_peft_model_state_dict(unet)
    assert all(torch.equal(loaded[k.removeprefix("base_model.model.")], v) for k, v in saved.items())
    run = load_run(out)  # what `privlora audit --run OUT` loads: members are the retained samples
    assert len(run.members) == neggrad["retain_size"] and not set(neggrad["forget"]) & set(run.members.ids)


@pytest.mark.slow
def test_cli_prints_the_table(source, retrained, work):
    ids = ",".join(json.loads((work / "retrain" / "splits.json").read_text())["forget"])
    ok = run_cli("unlearn", str(source), "--out", str(work / "cli"), "--forget-ids", ids, "--reference",
                 str(work / "retrain"), "--steps", "2", "--fixed-steps", "--draws", "1", "-q")
    assert ok.returncode == 0, ok.stderr
    from privlora.unlearn.run import format_table

    result = json.loads((work / "cli" / "unlearn.json").read_text())
    assert result["method"] == "target" and result["forget"] == ids.split(",")  # the default method, these ids
    assert result["reference_run"] == str(work / "retrain") and result["steps_taken"] == 2
    # the printed table is the written figures: method row, retrained-reference row, utility line
    assert ok.stdout.splitlines() == [*format_table(result), f"wrote {work / 'cli'}"]
    rows = ok.stdout.splitlines()
    assert rows[1].startswith("target ") and rows[2].startswith("retrain ") and "efficacy" in rows[0]
    # the reference's AUC is the attack on the reference run's own scores, not the method's
    ref = result["reference"]["membership"]
    forget, held = np.array(ref["scores"]["forget"]), np.array(ref["scores"]["heldout"])
    auc = roc_auc_score(np.r_[np.ones(len(forget)), np.zeros(len(held))], np.r_[forget, held])
    assert result["summary"]["auc_reference"] == pytest.approx(auc, abs=1e-12)
    assert f"{auc:.3f}" in rows[1].split()


def test_cli_one_line_error_for_a_non_member(source, work):
    held_out = Splits.load(source).eval[0]
    bad = run_cli("unlearn", str(source), "--out", str(work / "bad"), "--forget-ids", held_out, "-q")
    assert_one_line_error(bad, "not members")
    assert_nothing_written(work / "bad")


def test_bad_inputs_are_user_errors(source, neggrad, work, tmp_path):
    for kwargs, needle in [({"method": "forget-harder"}, "unknown unlearning method"),
                           ({"alpha": 1.0}, "alpha"), ({"saliency": 0.0}, "saliency"),
                           ({"attack": "lira"}, "unknown attack"), ({"stop": "never"}, "stopping rule"),
                           ({"reference": tmp_path / "nope"}, "does not exist"),
                           ({"reference": work / "neggrad"}, "retained ones")]:
        with pytest.raises(UserError, match=needle):
            unlearn(source, tmp_path / "x", forget_fraction=0.5, train_reference=False, **kwargs)
        assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="already exists"):
        unlearn(source, source, forget_fraction=0.25)
    with pytest.raises(UserError, match="not a run directory"):
        unlearn(tmp_path, tmp_path / "y", forget_fraction=0.25)
