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


def _copy_run(src: Path, dst: Path, *, adapter: bool = True) -> Path:
    dst.mkdir()
    for name in ("config.yaml", "splits.json", "privacy.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    if adapter:
        (dst / "adapter").mkdir()
        for f in (src / "adapter").iterdir():
            (dst / "adapter" / f.name).write_bytes(f.read_bytes())
    return dst


def test_audit_refuses_runs_it_cannot_audit_faithfully(tmp_path, audited):
    no_adapter = _copy_run(audited, tmp_path / "no-adapter", adapter=False)
    assert_one_line_error(run_cli("audit", "--run", str(no_adapter)), "no adapter")

    foreign = _copy_run(audited, tmp_path / "foreign")
    cfg = json.loads((foreign / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "runwayml/stable-diffusion-v1-5"
    (foreign / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_cli("audit", "--run", str(foreign)), "trained on base")

    resized = _copy_run(audited, tmp_path / "resized")
    config = (resized / "config.yaml").read_text()
    assert "resolution: null" in config
    (resized / "config.yaml").write_text(config.replace("resolution: null", "resolution: 16"))
    assert_one_line_error(run_cli("audit", "--run", str(resized)), "base model takes")

    changed = _copy_run(audited, tmp_path / "changed")
    splits = json.loads((changed / "splits.json").read_text())
    splits["members"][0] = "faces/not-there"
    (changed / "splits.json").write_text(json.dumps(splits))
    assert_one_line_error(run_cli("audit", "--run", str(changed)), "not in")
    for run in (no_adapter, foreign, resized, changed):
        assert not (run / "audit").exists()
