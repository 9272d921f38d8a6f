"""``privlora audit`` on causal-lm runs (issue 24): loss / zlib / reference / Min-K% through the run's own
CausalLMTask, AUCs recomputable from scores.csv, secret-sharer canaries planted in the members and their
exposure, extraction by prompting, and reference adapters trained from a causal-lm config."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from privlora.config import load_config
from privlora.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = {"task": "causal-lm", "data.limit": 24, "data.members": 0.5, "data.aux": 0.0, "data.eval": 0.5,
        "optim.batch_size": 8, "optim.max_steps": 3, "quiet": True, "eval.samples": 0}
#: a very small member set trained long enough to memorise; 3-digit secrets: exposure is exact (|R| = 1000)
CANARIES = {**FAST, "data.members": 0.34, "data.eval": 0.66, "optim.max_steps": 60, "optim.lr": 0.01,
            "canaries.insertions": [1, 4, 16], "canaries.length": 3}
LM_ATTACKS = ("loss", "zlib", "reference", "min_k")


def _train(out, overrides):
    from privlora.train.loop import train

    return train(load_config(None, {**overrides, "out": str(out)})).run_dir


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("lm") / "plain", FAST)


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("lm") / "canaries", CANARIES)


def _scores(run):
    with (run / "audit" / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    return np.array([int(r["member"]) for r in rows]), {k: np.array([float(r[k]) for r in rows])
                                                         for k in rows[0] if k not in ("id", "member")}


def test_cli_audit_of_a_causal_lm_run_matches_sklearn_on_scores_csv(plain_run):
    from conftest import invoke_cli

    done = invoke_cli("audit", str(plain_run), "--quiet")
    assert done.returncode == 0, done.stderr
    results = json.loads((plain_run / "audit" / "results.json").read_text())
    assert results["task"] == "causal_lm" and results["run_kind"] == "causal-lm"
    assert tuple(results["attacks"]) == LM_ATTACKS
    labels, columns = _scores(plain_run)
    splits = json.loads((plain_run / "splits.json").read_text())
    assert labels.sum() == len(splits["members"]) == results["members"]
    assert (labels == 0).sum() == len(splits["eval_nonmembers"]) == results["nonmembers"]
    for name in LM_ATTACKS:
        for column, who in ((name, "adapter"), (f"{name}_base", "base_control")):
            assert results["attacks"][name][who]["auc"] == pytest.approx(roc_auc_score(labels, columns[column]),
                                                                       abs=1e-12), column
    assert np.all(columns["reference_base"] == 0)  # the base is its own reference: nothing to calibrate away
    assert not np.allclose(columns["loss"], columns["loss_base"])  # the adapter was loaded and scored
    assert "canary_exposure" not in results and "extraction" not in results
    assert (plain_run / "audit" / "report.html").is_file()


def test_attacks_score_the_tokens_training_scored(plain_run):
    """The loss attack is −(the task's per-sample loss): the audit encodes records exactly as training."""
    import torch

    from privlora.audit.lm_kind import loss_attack
    from privlora.audit.runner import load_run

    loaded = load_run(plain_run, tasks=("causal-lm",))
    batch = loaded.members.batch(list(range(len(loaded.members))))
    with torch.no_grad():
        expected = -loaded.task.per_sample_loss(batch).double().numpy()
    np.testing.assert_allclose(loss_attack(loaded.task, loaded.members), expected, rtol=1e-5)


def test_canaries_join_the_members_only_and_are_recorded(canary_run):
    from privlora.data.instructions import load_instruction_dataset
    from privlora.train.lm_canaries import planted, with_canaries

    manifest = json.loads((canary_run / "canaries.json").read_text())
    counts = sorted(c["insertions"] for c in manifest["canaries"])
    assert counts == [0, 1, 4, 16] and manifest["records_added"] == 21
    splits = json.loads((canary_run / "splits.json").read_text())
    parts = ("members", "aux_nonmembers", "eval_nonmembers")
    assert not any(i.startswith("canary:") for part in parts for i in splits[part])
    config = load_config(canary_run / "config.yaml", {"resume": False})
    members = load_instruction_dataset("demo:support", limit=24).by_ids(splits["members"])
    grown = with_canaries(config, members)
    control = next(c.secret for c in planted(config) if c.insertions == 0)
    assert len(grown) == len(members) + 21 and control not in grown.responses
    assert grown.responses.count(next(c["secret"] for c in manifest["canaries"] if c["insertions"] == 16)) == 16


def test_exposure_per_insertion_count_for_adapter_and_base(canary_run):
    from privlora.audit.runner import audit_run

    results = audit_run(canary_run)
    x = results["canary_exposure"]
    assert x["method"] == "exact" and x["format"]["space"] == 1000
    adapter, base = x["adapter"]["by_insertions"], x["base_control"]["by_insertions"]
    assert set(adapter) == set(base) == {"0", "1", "4", "16"}
    # 16 copies of a 3-digit secret among 8 records: the adapter ranks it near the top, the base does not
    assert adapter["16"] >= base["16"] + 3, (adapter, base)
    assert adapter["16"] > adapter["0"] + 3  # the never-inserted control stays unexposed
    assert all(0 <= v <= x["max_exposure"] + 1e-9 for v in [*adapter.values(), *base.values()])


def test_extraction_reports_verbatim_rates_for_adapter_and_base(canary_run):
    from privlora.audit.report import write_report
    from privlora.audit.runner import audit_run

    results = audit_run(canary_run, extraction=2)
    e = results["extraction"]
    assert e["kind"] == "prompting" and e["records"] == results["members"] and e["samples"] == 2
    for who in ("adapter", "base_control"):
        for mode, generations in (("greedy", results["members"]), ("sampled", 2 * results["members"])):
            figures = e[who][mode]
            assert figures["generations"] == generations
            assert 0 <= figures["verbatim_rate"] <= figures["near_verbatim_rate"] <= 1
    # trained on these very responses, the adapter's greedy answers are closer to them than the base's
    assert e["adapter"]["greedy"]["mean_distance"] < e["base_control"]["greedy"]["mean_distance"]
    stored = json.loads((canary_run / "audit" / "results.json").read_text())
    assert stored["extraction"]["adapter"]["greedy"]["verbatim_rate"] == e["adapter"]["greedy"]["verbatim_rate"]
    html = write_report([stored], canary_run / "audit" / "report.html").read_text()
    assert "Extraction by prompting" in html and "Canary exposure" in html


def test_references_train_from_a_causal_lm_config(plain_run, tmp_path):
    from privlora.audit.runner import audit_run

    results = audit_run(plain_run, references=2, reference_dir=tmp_path / "refs", attacks=("loss",))
    assert set(results["attacks"]) == {"loss", "lira", "rmia"}
    manifest = json.loads((tmp_path / "refs" / "references.json").read_text())
    assert len(manifest["inside"]) == 2
    labels, columns = _scores(plain_run)
    for name in ("lira", "rmia"):
        assert np.isfinite(columns[name]).all()
        assert results["attacks"][name]["adapter"]["auc"] == pytest.approx(roc_auc_score(labels, columns[name]),
                                                                         abs=1e-12)
    ref = load_config(tmp_path / "refs" / "ref-0" / "config.yaml", {"resume": False})
    assert ref.task == "causal-lm" and ref.mode == "plain" and not ref.canaries.insertions


def test_canaries_are_refused_outside_causal_lm():
    with pytest.raises(UserError, match="causal-lm"):
        load_config(None, {"task": "text", "canaries.insertions": [1]})
    with pytest.raises(UserError, match="insertions"):
        load_config(None, {"task": "causal-lm", "canaries.insertions": [0]})


def test_cli_pii_counts_leaked_spans_in_the_answers(canary_run):
    from conftest import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("audit", str(canary_run), "--attacks", "loss", "--pii"), "add --extraction")
    proc = run_cli("audit", str(canary_run), "--attacks", "loss", "--extraction", "1", "--pii", "-q", timeout=900)
    assert proc.returncode == 0, proc.stderr
    e = json.loads((canary_run / "audit" / "results.json").read_text())["extraction"]
    for who in ("adapter", "base_control"):
        for mode in ("greedy", "sampled"):
            pii = e[who][mode]["pii"]
            assert 0 <= pii["leaked"] <= pii["spans"]
            assert sum(t["spans"] for t in pii["by_type"].values()) == pii["spans"]
    # the adapter learnt the records' templates (names, e-mail addresses, account numbers): its answers hold
    # PII the scanner finds; what leaks is counted against the training records
    assert e["adapter"]["greedy"]["pii"]["spans"] + e["adapter"]["sampled"]["pii"]["spans"] > 0
    html = (canary_run / "audit" / "report.html").read_text()
    assert "PII leaked / found" in html
