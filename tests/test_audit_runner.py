"""`privlora audit --run` on a real (tiny) run: files written, figures recomputable from scores.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import CONFIGS, FAST, assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audit") / "run"
    proc = run_cli("train", "--config", str(CONFIGS / "demo-plain.yaml"), "--max-steps", "3",
                   "--batch-size", "4", "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("audit", "--run", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "AUC" in proc.stdout and "base AUC" in proc.stdout
    return out


def test_scores_csv_recomputes_results(audited):
    rows = list(csv.DictReader((audited / "audit" / "scores.csv").open()))
    results = json.loads((audited / "audit" / "results.json").read_text())
    splits = json.loads((audited / "splits.json").read_text())
    assert [r["id"] for r in rows] == splits["members"] + splits["eval_nonmembers"]
    labels = np.array([int(r["member"]) for r in rows])
    assert labels.sum() == len(splits["members"]) == results["members"]
    for column, key in (("loss", "adapter"), ("loss_base", "base_control")):
        scores = np.array([float(r[column]) for r in rows])
        assert results["attacks"]["loss"][key]["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    adapter = np.array([float(r["loss"]) for r in rows])
    base = np.array([float(r["loss_base"]) for r in rows])
    assert not np.allclose(adapter, base)  # the adapter changes the scores; the control is the base


def test_audit_is_deterministic_and_replaces_old_results(audited):
    before = (audited / "audit" / "scores.csv").read_bytes()
    assert run_cli("audit", "--run", str(audited)).returncode == 0
    assert (audited / "audit" / "scores.csv").read_bytes() == before
    assert not [p for p in (audited / "audit").iterdir() if p.name.startswith(".")]  # no temporaries left


def test_audit_bad_input(tmp_path, audited):
    assert_one_line_error(run_cli("audit", "--run", str(tmp_path / "missing")), "does not exist")
    assert_one_line_error(run_cli("audit", "--run", str(audited), "--attacks", "magic"), "magic")
    bad = tmp_path / "overlap"
    bad.mkdir()
    for name in ("config.yaml", "privacy.json"):
        (bad / name).write_bytes((audited / name).read_bytes())
    (bad / "adapter").symlink_to(audited / "adapter")
    splits = json.loads((audited / "splits.json").read_text())
    splits["eval_nonmembers"].append(splits["members"][0])
    (bad / "splits.json").write_text(json.dumps(splits))
    assert_one_line_error(run_cli("audit", "--run", str(bad)), "both member and evaluation")
    assert not (bad / "audit").exists()
