"""The registry over real HTTP (`privlora registry serve` in a subprocess): roles cell by cell, exports,
incidents, bad input, concurrency, the tamper-evident log."""

from __future__ import annotations

import base64
import hashlib
import os
import pickle
import socket
import sqlite3
import subprocess
import sys
import threading
import time

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


def adapter_body(seed: int, *, name: str = "a", auc: float = 0.55, eps: float = 8.0) -> dict:
    return {"name": name, "weights_b64": base64.b64encode(weights(seed)).decode(), "config": {"r": 4},
            "privacy": {"epsilon": eps}, "audit": {"attacks": {"loss": {"auc": auc}}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    admin = Registry(root).bootstrap_admin("root")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "privlora", "registry", "serve", "--root", str(root), "--port",
                             str(port), "--max-body-mb", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError(proc.stdout.read() if proc.stdout else "registry did not start")
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
    export = call(reg, "ana", "POST", "/exports", json={"adapter": main}).json()["export"]
    data = {}
    for kind in ("sanitized", "full"):
        body = {"name": "tweets", "kind": kind, "data_b64": base64.b64encode(f"{kind} rows".encode()).decode()}
        data[kind] = call(reg, "ana", "POST", "/datasets", json=body).json()["id"]
    call(reg, "ana", "POST", "/generations", json={"adapter": main, "prompt": "a private prompt", "params": {"seed": 1},
                                                   "image_b64": base64.b64encode(b"png bytes").decode()})
    return {"main": main, "export": export, "data": data}


def _cell_request(reg, fixtures, resource: str, action: str, who: str, k: int) -> httpx.Response:
    if (resource, action) == ("adapters", "read"):
        return call(reg, who, "GET", f"/adapters/{fixtures['main']}")
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
    ("adapters", "read"), ("adapters", "write"), ("users", "manage"), ("export", "request"), ("export", "approve"),
    ("incidents", "open"), ("incidents", "close"), ("log", "read"), ("training_data", "read_sanitized"),
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
                         ("GET", "/log/verify"), ("GET", "/adapters/x/weights"), ("POST", "/users")]:
        for headers in ({}, auth("wrong-token"), {"Authorization": reg["tokens"]["ana"]}):
            r = httpx.request(method, reg["url"] + path, headers=headers, json={})
            assert r.status_code == 401, (method, path, r.text)


def test_export_needs_another_approver_and_the_policy(reg):
    ok = call(reg, "ana", "POST", "/adapters", json=adapter_body(11, name="ok")).json()["id"]
    leaky = call(reg, "ana", "POST", "/adapters", json=adapter_body(12, name="leaky", auc=0.9)).json()["id"]
    first = call(reg, "ana", "POST", "/exports", json={"adapter": ok}).json()["export"]
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
    (b'{"name": "x", "weights_b64": "%%%", "config": {}}', 422, "base64"),
    (b'{"name": 3, "weights_b64": "", "config": {}}', 422, "must be str"),
])
def test_malformed_pushes_are_refused(reg, body, status, needle):
    r = call(reg, "ana", "POST", "/adapters", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status and needle in r.json()["error"], r.text


def test_pickles_and_oversized_uploads_are_refused(reg):
    body = {"name": "evil", "config": {}, "weights_b64": base64.b64encode(pickle.dumps({"w": 1})).decode()}
    r = call(reg, "ana", "POST", "/adapters", json=body)
    assert r.status_code == 422 and "pickle" in r.json()["error"]
    big = {"name": "big", "config": {}, "weights_b64": "A" * (1024 * 1024 + 10)}
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
