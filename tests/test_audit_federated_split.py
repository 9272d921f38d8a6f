"""`privlora audit` on a federated run (global adapter vs one client's or all clients' data, held out by the
server) and on a split (SAP) run (composed bottom + provider's top vs held-out texts): the same results.json
and scores.csv as every audit, each AUC recomputable by scikit-learn from scores.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import assert_one_line_error, invoke_cli, run_cli
from privlora.config import FederatedConfig, SplitConfig

FED = {"clients": 3, "rounds": 2, "data": {"limit": 240}, "client": {"local_steps": 3, "batch_size": 8, "lr": 0.005},
       "quiet": True}


def _check_recomputable(run: Path) -> tuple[dict, list[dict]]:
    """Every AUC in results.json equals scikit-learn's on scores.csv's columns (adapter and control)."""
    results = json.loads((run / "audit" / "results.json").read_text())
    rows = list(csv.DictReader((run / "audit" / "scores.csv").open()))
    labels = np.array([int(r["member"]) for r in rows])
    assert results["members"] == labels.sum() and results["nonmembers"] == len(labels) - labels.sum()
    assert results["attacks"], results
    for name, figures in results["attacks"].items():
        for column, key in ((name, "adapter"), (f"{name}_base", "base_control")):
            scores = np.array([float(r[column]) for r in rows])
            assert np.isfinite(scores).all(), column
            assert figures[key]["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6), column
    return results, rows


@pytest.fixture(scope="module")
def fed_run(tmp_path_factory) -> Path:
    from privlora.federated.run import federate

    out = tmp_path_factory.mktemp("audit-fed") / "fed"
    return federate(FederatedConfig.model_validate({**FED, "out": str(out)})).run_dir


@pytest.fixture(scope="module")
def split_run(tmp_path_factory) -> Path:
    """A tiny in-process SAP run (no noise, so it is deterministic) with the provider's top adapter copied into
    the run directory, as the audit asks a user to do."""
    from privlora.split.models import SplitTop
    from privlora.split.run import split_train
    from privlora.split.service import LocalTop, TopService

    out = tmp_path_factory.mktemp("audit-split") / "split"
    config = SplitConfig.model_validate({"out": str(out), "quiet": True, "privatizer": {"name": "none"},
                                         "data": {"limit": 120, "eval": 0.3}, "optim": {"steps": 4, "batch_size": 16}})
    service = TopService(SplitTop(1, 3, seed=0), lr=5e-3)
    run = split_train(config, LocalTop(service), progress=False)
    service.save(run.run_dir / "server_adapter")
    return run.run_dir


@pytest.mark.slow  # a Flower simulation (Ray) and two audits: about a minute on 2 cores
def test_federated_audit_one_client_and_all(fed_run):
    splits = json.loads((fed_run / "splits.json").read_text())
    assert len(splits["clients"]) == 3 and not set(splits["members"]) & set(splits["eval_nonmembers"])
    proc = run_cli("audit", str(fed_run), "--client", "0", "-q")
    assert proc.returncode == 0, proc.stderr
    one, rows = _check_recomputable(fed_run)
    assert one["run_kind"] == "federated" and one["task"] == "text" and one["federated"]["client"] == 0
    assert [r["id"] for r in rows] == splits["clients"][0] + splits["eval_nonmembers"]
    assert (fed_run / "audit" / "report.html").is_file()

    proc = run_cli("audit", str(fed_run), "--client", "all", "-q")
    assert proc.returncode == 0, proc.stderr
    every, rows = _check_recomputable(fed_run)
    assert every["federated"]["client"] == "all"
    assert every["members"] == len(splits["members"]) != one["members"]
    assert every["nonmembers"] == one["nonmembers"] == len(splits["eval_nonmembers"])
    assert [r["id"] for r in rows] == splits["members"] + splits["eval_nonmembers"]


@pytest.mark.slow  # needs the federated run above
def test_federated_audit_refuses_a_bad_client(fed_run):
    assert_one_line_error(invoke_cli("audit", str(fed_run), "--client", "3", "-q"), "--client 3", "3 clients")
    assert_one_line_error(invoke_cli("audit", str(fed_run), "--client", "x", "-q"), "--client x")


def test_federated_splits_are_a_function_of_the_config(tmp_path):
    """What federate writes as splits.json: the same record for the same config, another for another seed."""
    from privlora.federated.data import _key, _load, federated_data

    config = FederatedConfig.model_validate({**FED, "out": str(tmp_path / "x")})
    first = federated_data(config).record(config)
    _load.cache_clear()
    assert _load(_key(config)).record(config) == first
    other = config.model_copy(update={"seed": 1})
    assert federated_data(other).record(other)["clients"] != first["clients"]
    assert sorted(first["members"]) == sorted(i for c in first["clients"] for i in c)


def test_split_audit(split_run):
    proc = run_cli("audit", str(split_run), "-q")
    assert proc.returncode == 0, proc.stderr
    results, rows = _check_recomputable(split_run)
    assert results["run_kind"] == "split" and list(results["attacks"]) == ["loss"]
    summary = json.loads((split_run / "split.json").read_text())
    assert results["nonmembers"] == summary["eval_texts"]
    assert results["members"] + results["split"]["training_texts_unused"] == summary["train_texts"]
    assert results["provenance"]["adapter"].endswith("server_adapter")
    assert (split_run / "audit" / "report.html").is_file()


def test_split_audit_refusals(split_run, tmp_path):
    assert_one_line_error(invoke_cli("audit", str(split_run), "--references", "2", "-q"), "not available for split")
    assert_one_line_error(invoke_cli("audit", str(split_run), "--client", "0", "-q"), "--client")
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(split_run, bare, ignore=shutil.ignore_patterns("server_adapter", "audit"))
    assert_one_line_error(invoke_cli("audit", str(bare), "-q"), "server_adapter")


@pytest.mark.slow  # two central reference adapters and an audit: about 80 s on 2 cores
def test_federated_reference_audit(fed_run, tmp_path):
    proc = run_cli("audit", str(fed_run), "--client", "1", "--references", "2", "--reference-dir",
                   str(tmp_path / "refs"), "-q")
    assert proc.returncode == 0, proc.stderr
    results, _ = _check_recomputable(fed_run)
    assert list(results["attacks"]) == ["loss", "lira", "rmia"] and results["federated"]["client"] == 1
    manifest = json.loads((tmp_path / "refs" / "references.json").read_text())
    assert results["references"]["k"] == 2 and len(manifest["inside"]) == 2
    splits = json.loads((fed_run / "splits.json").read_text())
    assert set(manifest["identity"]["population"]) == {*splits["clients"][1], *splits["eval_nonmembers"]}
