"""`privlora audit RUN` on a text run: loss, LiRA and RMIA on a tiny MiniLM classifier, figures recomputable."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import CONFIGS, assert_one_line_error, run_cli

# 120 tweets → 60 members, 36 evaluation non-members; a high learning rate overfits the members in 16 steps
TRAIN = ["--set", "data.limit=120", "--set", "optim.lr=0.005", "--batch-size", "16", "--max-steps", "16", "-q"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audit-text") / "plain"
    proc = run_cli("train", "--config", str(CONFIGS / "text-plain.yaml"), "--out", str(out), *TRAIN)
    assert proc.returncode == 0, proc.stderr
    return out


def _check_recomputable(run: Path) -> dict:
    """Every AUC in results.json equals scikit-learn's on the saved scores.csv columns, adapter and base."""
    results = json.loads((run / "audit" / "results.json").read_text())
    rows = list(csv.DictReader((run / "audit" / "scores.csv").open()))
    splits = json.loads((run / "splits.json").read_text())
    assert [r["id"] for r in rows] == splits["members"] + splits["eval_nonmembers"]
    labels = np.array([int(r["member"]) for r in rows])
    assert results["task"] == "text" and results["members"] == labels.sum() == 60
    for name, figures in results["attacks"].items():
        for column, key in ((name, "adapter"), (f"{name}_base", "base_control")):
            scores = np.array([float(r[column]) for r in rows])
            assert np.isfinite(scores).all(), column
            assert figures[key]["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12), column
    return results


def test_text_loss_audit(text_run):
    proc = run_cli("audit", str(text_run), "--attacks", "loss")
    assert proc.returncode == 0, proc.stderr
    assert "AUC" in proc.stdout
    results = _check_recomputable(text_run)
    assert list(results["attacks"]) == ["loss"]
    assert results["utility"]["accuracy_heldout"] is not None and "loss_heldout" in results["utility"]
    loss = results["attacks"]["loss"]
    # planted signal: the overfitted members are found; the untrained start model (the control) is near chance
    assert loss["adapter"]["auc"] > 0.6
    assert loss["base_control"]["auc_ci_low"] < 0.5 < loss["base_control"]["auc_ci_high"]
    assert (text_run / "audit" / "report.html").is_file()


def test_text_audit_refuses_image_only_options(text_run):
    assert_one_line_error(run_cli("audit", str(text_run), "--attacks", "secmi", "-q"), "secmi")
    assert_one_line_error(run_cli("audit", str(text_run), "--extraction", "4", "-q"), "does not apply")


@pytest.mark.slow
def test_text_reference_audit(text_run, tmp_path):
    proc = run_cli("audit", str(text_run), "--references", "2", "--reference-dir", str(tmp_path / "refs"), "-q")
    assert proc.returncode == 0, proc.stderr
    results = _check_recomputable(text_run)
    assert list(results["attacks"]) == ["loss", "lira", "rmia"]
    assert results["references"]["k"] == 2
    assert len(list((tmp_path / "refs" / "signals").glob("*.npy"))) == 4  # 2 references × (population, z)
    for name in ("lira", "rmia"):
        assert results["attacks"][name]["adapter"]["auc"] > 0.55, name


class _FixedLogits:
    """A classifier whose logits are given: enough to check the signal arithmetic exactly."""

    def __init__(self, logits: list[list[float]]) -> None:
        import torch

        self.table = torch.tensor(logits, dtype=torch.float64)

    def logits(self, batch):
        return self.table[[int(t) for t in batch["texts"]]]


def test_text_signals_are_the_papers():
    from privlora.audit.text_attacks import logit_confidence, rmia_signal, text_signal
    from privlora.data.text import TextSet

    logits = [[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [40.0, -40.0, 0.0], [-30.0, 30.0, 0.0]]
    data = TextSet(ids=list("abcd"), texts=["0", "1", "2", "3"], labels=[0, 2, 0, 0], classes=["x", "y", "z"])
    phi = logit_confidence(_FixedLogits(logits), data)
    z = np.array(logits)
    p = np.exp(z - np.log(np.exp(z).sum(1, keepdims=True)))[np.arange(4), data.labels]
    np.testing.assert_allclose(phi[:2], np.log(p[:2] / (1 - p[:2])), rtol=1e-12)
    assert np.isfinite(phi).all() and phi[2] > 39 and phi[3] < -59  # exact where p rounds to 1 or 0
    np.testing.assert_allclose(rmia_signal(text_signal(_FixedLogits(logits), data)), -np.log(p), rtol=1e-9, atol=1e-12)


def test_base_control_is_the_untrained_start(text_run):
    import torch

    from privlora.audit.runner import load_run
    from privlora.tasks.text import TextClassificationTask

    loaded = load_run(text_run, tasks=("text",))
    batch = loaded.held_out.batch([0, 1, 2])
    with torch.no_grad():
        adapter = loaded.task.logits(batch)
        start = TextClassificationTask(3, seed=loaded.config.seed).logits(batch)  # what train began from
        with loaded.base_control():
            control = loaded.task.logits(batch)
        after = loaded.task.logits(batch)
    torch.testing.assert_close(control, start)
    torch.testing.assert_close(after, adapter)  # the run's adapter and head are back
    assert not torch.allclose(control, adapter)
