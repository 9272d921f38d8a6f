"""Every command on its success path, through the real ``privlora`` CLI (issue 18).

The error paths live beside each subsystem's tests; here each command is run as a user runs it and its
output is checked against the state it reports on (files written, the server's records), so a command
that exits 0 but prints or writes the wrong thing fails. The split commands are in test_split_server.py,
next to the split server they need.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import subprocess
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import test_registry_server
from conftest import CONFIGS, FAST, invoke_cli, run_cli
from test_registry_server import adapter_body, auth, call, invoke, weights

#: the started registry server of the registry tests (module scope: one server for this module's tests)
reg = test_registry_server.reg

# --- base -------------------------------------------------------------------------------------------------


def test_base_info_describes_the_shipped_weights():
    from privlora.tasks.embedded import META, WEIGHTS, assets_dir

    shown = invoke_cli("base", "info")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    weights_file = assets_dir() / WEIGHTS
    with safe_open(str(weights_file), "pt") as f:  # counted from the file, not from the loaded model
        parameters = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert info["parameters"] == parameters > 1_000_000
    assert info["file_bytes"] == weights_file.stat().st_size
    meta = json.loads((assets_dir() / META).read_text())
    assert {k: v for k, v in info.items() if k not in ("parameters", "file_bytes")} == meta
    assert "privlora base pretrain" in info["provenance"]["command"]


def test_base_pretrain_writes_a_loadable_base(tmp_path):
    from privlora.tasks.embedded import META, WEIGHTS, assets_dir, load_embedded

    out = tmp_path / "base"
    made = invoke_cli("base", "pretrain", "--out", str(out), "--steps", "2", "--batch-size", "4", "--seed", "3",
                      "-q")
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([META, WEIGHTS])  # nothing else, no temp left
    assert not [p for p in tmp_path.iterdir() if p.name != "base"]
    meta = json.loads((out / META).read_text())
    assert meta["provenance"]["command"] == "privlora base pretrain --steps 2 --batch-size 4 --lr 0.002 --seed 3"
    assert made.stdout.startswith("pre-trained 2 steps") and str(out) in made.stdout
    assert f"loss {meta['provenance']['final_loss_ema']:.4f}" in made.stdout
    unet, _, loaded_meta = load_embedded(out)  # strict load: every weight of the architecture is there
    assert loaded_meta == meta
    shipped, remade = load_file(str(assets_dir() / WEIGHTS)), load_file(str(out / WEIGHTS))
    assert remade.keys() == shipped.keys()
    assert all(v.dtype == torch.float16 and v.shape == shipped[k].shape for k, v in remade.items())
    assert all(torch.isfinite(p).all() for p in unet.parameters())
    assert any(not torch.equal(remade[k], shipped[k]) for k in shipped)  # trained anew, not a copy


# --- registry: show, pull, export, approve, users, log ------------------------------------------------------
# Adapters are pushed over HTTP with no privacy claim and no audit of their own: what the registry accepts
# from any pusher, so these tests read the commands, not the push policy.


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def _push(reg, seed: int, name: str) -> str:
    body = {**adapter_body(seed, name=name), "privacy": {"mechanism": "none"}, "audit": {}}
    pushed = call(reg, "ana", "POST", "/adapters", json=body)
    assert pushed.status_code == 200, pushed.text
    return pushed.json()["id"]


def test_registry_show_prints_the_record(reg):
    adapter = _push(reg, 101, "shown")
    shown = json.loads(_ok(invoke(reg, "eve", "registry", "show", adapter)))
    assert shown == call(reg, "eve", "GET", f"/adapters/{adapter}").json()
    assert shown["id"] == adapter and shown["name"] == "shown" and shown["owner"] == "ana"
    assert shown["privacy"]["mechanism"] == "none" and shown["config"] == {"r": 4}
    assert shown["open_incidents"] == 0 and not shown["quarantined"]


def test_registry_pull_writes_the_weights(reg, tmp_path):
    adapter = _push(reg, 102, "pulled")
    out = tmp_path / "pulled.safetensors"
    assert str(out) in _ok(invoke(reg, "eve", "registry", "pull", adapter, "--out", str(out)))
    assert out.read_bytes() == weights(102)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == adapter
    assert not [p for p in tmp_path.iterdir() if p != out]  # no temporary left beside it


def test_registry_export_approve_download(reg, tmp_path):
    adapter = _push(reg, 103, "exported")
    # the export policy reads an audit an auditor established: attach one through an incident, then close it
    incident = call(reg, "aud", "POST", "/incidents", json={"adapter": adapter, "reason": "audit"}).json()["incident"]
    report = {"members": 2, "nonmembers": 2, "attacks": {"loss": {"adapter": {"auc": 0.51},
                                                                  "base_control": {"auc": 0.5}}}}
    assert call(reg, "aud", "POST", f"/incidents/{incident}/report",
                json={"status": "audited", "report": report}).status_code == 200
    assert call(reg, "aud", "POST", f"/incidents/{incident}/close", json={"resolution": "ok"}).status_code == 200

    requested = _ok(invoke(reg, "ana", "registry", "export", adapter))
    assert requested.startswith("export request ")
    export = int(requested.split()[2])
    assert call(reg, "ana", "GET", f"/exports/{export}/download").status_code == 409  # really only requested
    approved = _ok(invoke(reg, "rex", "registry", "approve", str(export)))
    assert approved.splitlines()[0] == f"export {export} approved by rex"
    out = tmp_path / "export.safetensors"
    assert str(out) in _ok(invoke(reg, "ana", "registry", "export", "--download", str(export), "--out", str(out)))
    assert out.read_bytes() == weights(103)


def test_registry_users_add_and_list(reg):
    added = _ok(invoke(reg, "adm", "registry", "users", "--add", "zoe", "--role", "auditor"))
    token = added.splitlines()[0].strip()
    # the printed token is the new user's: it authenticates, with the auditor's rights (the log)
    assert httpx.get(reg["url"] + "/log", headers=auth(token), timeout=60).status_code == 200
    assert httpx.post(reg["url"] + "/adapters", headers=auth(token), json=adapter_body(104),
                      timeout=60).status_code == 403
    listed = [line.split() for line in _ok(invoke(reg, "adm", "registry", "users")).splitlines() if line.strip()]
    pairs = {(row[0], row[1]) for row in listed}
    expected = {(u["name"], u["role"]) for u in call(reg, "adm", "GET", "/users").json()}
    assert pairs == expected
    assert {("zoe", "auditor"), ("ana", "researcher"), ("eve", "engineer"), ("root", "admin")} <= pairs


def test_registry_log_prints_the_ledger(reg):
    adapter = _push(reg, 105, "logged")
    assert call(reg, "eve", "GET", f"/adapters/{adapter}").status_code == 200
    assert call(reg, "eve", "POST", "/exports", json={"adapter": adapter}).status_code == 403
    printed = _ok(invoke(reg, "aud", "registry", "log"))
    entries = {e["seq"]: e for e in call(reg, "aud", "GET", "/log").json()}
    rows = [line.split() for line in printed.splitlines() if line.strip()]
    assert len(rows) >= 5 and [int(r[0]) for r in rows] == sorted(int(r[0]) for r in rows)
    for row in rows:  # every printed line is the ledger's entry: seq, time, actor, action, result
        e = entries[int(row[0])]
        when = datetime.datetime.fromtimestamp(e["time"], tz=datetime.UTC).isoformat(timespec="seconds")
        assert (row[1], row[2], row[3], row[-1]) == (when, e["actor"], e["action"], e["result"])
    seen = [(r[2], r[3], r[4], r[-1]) for r in rows]
    assert ("ana", "adapters.write", "logged", "allowed") in seen
    assert ("eve", "adapters.read", adapter[:20], "allowed") in seen
    assert ("eve", "export.request", adapter[:20], "denied") in seen
    assert seen[-1] == ("aud", "log.read", "*", "allowed")  # the read itself is logged first


# --- incident audit -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 3-step plain run of the faces demo, trained through the CLI."""
    out = tmp_path_factory.mktemp("incident") / "run"
    trained = invoke_cli("train", "--config", str(CONFIGS / "demo-plain.yaml"), "--max-steps", "3", "--batch-size",
                         "4", "--out", str(out), *FAST)
    assert trained.returncode == 0, trained.stderr
    return out


def test_incident_audit_attaches_the_reaudit(reg, tiny_run):
    from privlora.audit.runner import audit_run

    adapter = _ok(invoke(reg, "ana", "registry", "push", str(tiny_run), "--name", "incident-audit")).strip()
    opened = _ok(invoke(reg, "ana", "incident", "open", "--adapter", adapter, "--reason", "a face in an output",
                        "--no-reaudit"))
    incident = int(opened.split()[1])
    assert call(reg, "aud", "GET", f"/incidents/{incident}").json()["reports"] == []

    audited = _ok(invoke(reg, "aud", "incident", "audit", str(incident), "--attacks", "loss", "--extraction", "0",
                         "-q"))
    record = call(reg, "aud", "GET", f"/incidents/{incident}").json()
    assert record["closed"] is None and [r["status"] for r in record["reports"]] == ["audited"]
    report = record["reports"][0]["report"]
    assert report["run"] == f"registry:{adapter}" and report["incident"] == incident
    assert list(report["attacks"]) == ["loss"] and not report.get("extraction")  # the options reached the audit
    assert call(reg, "aud", "GET", f"/adapters/{adapter}").json()["audit"] == report  # now the latest audit
    lines = audited.splitlines()
    assert lines[0].startswith(f"re-audit attached to incident {incident}")
    loss = report["attacks"]["loss"]
    assert f"loss   AUC {loss['adapter']['auc']:.3f} (base model {loss['base_control']['auc']:.3f}; " \
           f"{report['members']} members vs {report['nonmembers']} held out)" in [line.strip() for line in lines]
    # the adapter the auditor rebuilt from the registry is the pushed run: the same audit, run locally
    local = audit_run(tiny_run, attacks=("loss",), extraction=0, seed=0, quiet=True)
    assert report["members"] == local["members"] == len(json.loads((tiny_run / "splits.json").read_text())
                                                        ["members"])
    for key in ("adapter", "base_control"):
        assert loss[key]["auc"] == pytest.approx(local["attacks"]["loss"][key]["auc"], abs=1e-12)


# --- federate -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_federate_writes_the_run_it_reports(tmp_path):
    """The smallest DP run on Flower's simulation engine (Ray): ~35 s on 2 cores, most of it Ray's start."""
    from opacus.accountants import RDPAccountant

    out = tmp_path / "fed"
    proc = run_cli("federate", "--clients", "2", "--rounds", "1", "--dp", "gaussian", "--noise-multiplier", "1.0",
                   "--clip", "0.5", "--set", "data.limit=120", "--set", "client.local_steps=2",
                   "--set", "client.batch_size=8", "--out", str(out), "-q", timeout=600)
    assert proc.returncode == 0, proc.stderr
    for name in ("config.yaml", "metrics.jsonl", "privacy.json", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rounds[0], rounds[-1]
    assert [m["round"] for m in rounds] == [0, 1] and last["accepted"] == 2
    privacy = json.loads((out / "privacy.json").read_text())
    accountant = RDPAccountant()  # σ = 1, both clients in the one round (q = 1)
    accountant.step(noise_multiplier=1.0, sample_rate=1.0)
    assert privacy["mechanism"] == "gaussian"
    assert privacy["epsilon"] == pytest.approx(accountant.get_epsilon(privacy["delta"]), rel=1e-6)
    lines = proc.stdout.splitlines()
    assert lines[0] == f"ffa: 1 rounds × 2 of 2 clients → {out}"
    assert lines[1].strip() == (f"server test accuracy {first['accuracy']:.3f} → {last['accuracy']:.3f}, loss "
                                f"{first['loss']:.3f} → {last['loss']:.3f}; client-level ε={privacy['epsilon']:.3g} "
                                f"(δ={privacy['delta']:.2g})")
    assert lines[2].strip().startswith(f"per client per round: {last['bytes_up_per_client'] / 1024:.0f} KiB up, "
                                       f"{last['bytes_down_per_client'] / 1024:.0f} KiB down; rejected updates: 0, "
                                       "failed clients: 0")
