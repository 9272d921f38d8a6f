"""The registry on a real PostgreSQL (Debian's package, started here in a temporary folder): `registry init`
and `registry serve --db postgresql+psycopg://…`, then push → list → export approve → download → verify-log,
8 concurrent pushes, and tampering detected in the PostgreSQL rows. `make test-slow` installs PostgreSQL."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import pytest

from conftest import assert_one_line_error, run_cli
from test_registry_server import adapter_body, auth, free_port, start_server, weights

pytestmark = pytest.mark.slow


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its tools as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed: `make test-slow` installs it (apt-get install postgresql)")
    bindir = Path(found[-1]).parent
    home = Path(tempfile.mkdtemp(prefix="privlora-pg-"))  # not under pytest's root-only tmp: postgres must enter
    data, sockets = home / "data", home / "run"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(home, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "--auth=trust", "--username=privlora",
                                 "--encoding=UTF8", "--no-sync"]), check=True, capture_output=True)
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(home / "log"),
                                 "-w", "start"]), check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://privlora@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def served(postgres, tmp_path_factory):
    root = tmp_path_factory.mktemp("pg-registry")
    init = run_cli("registry", "init", "--root", str(root), "--db", postgres, "--admin", "root")
    assert init.returncode == 0, init.stderr
    admin = init.stdout.strip()
    assert not (root / "registry.db").exists()  # the rows live in PostgreSQL, only blobs under root
    proc, url = start_server(root, "--db", postgres)
    tokens = {"root": admin}
    for name, role in [("ana", "researcher"), ("aud", "auditor")]:
        r = httpx.post(url + "/users", json={"name": name, "role": role}, headers=auth(admin))
        assert r.status_code == 200, r.text
        tokens[name] = r.json()["token"]
    yield {"url": url, "root": root, "tokens": tokens, "db": postgres}
    proc.terminate()
    output = proc.communicate(timeout=30)[0]
    assert not any(t in output for t in tokens.values())


def _call(reg, who: str, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, reg["url"] + path, headers=auth(reg["tokens"][who]), timeout=60, **kw)


def _verify_cli(reg) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PRIVLORA_REGISTRY_URL": reg["url"], "PRIVLORA_REGISTRY_TOKEN": reg["tokens"]["aud"]}
    return subprocess.run([sys.executable, "-m", "privlora", "registry", "verify-log"], capture_output=True,
                          text=True, env=env, timeout=120)


def test_push_list_export_download_verify_on_postgresql(served):
    pushed = _call(served, "ana", "POST", "/adapters", json=adapter_body(1, name="pg"))
    assert pushed.status_code == 200, pushed.text
    adapter = pushed.json()["id"]
    assert adapter == hashlib.sha256(weights(1)).hexdigest()
    assert adapter in [a["id"] for a in _call(served, "aud", "GET", "/adapters").json()]
    export = _call(served, "ana", "POST", "/exports", json={"adapter": adapter}).json()["export"]
    assert _call(served, "ana", "POST", f"/exports/{export}/approve").status_code == 403  # own request
    assert _call(served, "aud", "POST", f"/exports/{export}/approve").status_code == 409  # nobody audited it yet
    audit = {"attacks": {"loss": {"adapter": {"auc": 0.52}, "base_control": {"auc": 0.5}}}}
    assert _call(served, "aud", "POST", f"/adapters/{adapter}/audit", json=audit).status_code == 200
    assert _call(served, "aud", "POST", f"/exports/{export}/approve").status_code == 200
    got = _call(served, "ana", "GET", f"/exports/{export}/download")
    assert got.status_code == 200 and got.content == weights(1)
    ok = _verify_cli(served)
    assert ok.returncode == 0 and "intact" in ok.stdout, ok.stderr


def test_concurrent_pushes_and_tampering_on_postgresql(served):
    import psycopg

    ids: list[str] = []

    def push(k: int) -> None:
        r = _call(served, "ana", "POST", "/adapters", json=adapter_body(100 + k, name=f"pg{k}"))
        if r.status_code == 200:
            ids.append(r.json()["id"])

    threads = [threading.Thread(target=push, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ids) == sorted(hashlib.sha256(weights(100 + k)).hexdigest() for k in range(8))
    assert _call(served, "aud", "GET", "/log/verify").json()["intact"]
    dsn = served["db"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as db:
        original = db.execute("SELECT actor FROM audit_log WHERE seq = 4").fetchone()[0]
        db.execute("UPDATE audit_log SET actor = 'nobody' WHERE seq = 4")
        bad = _verify_cli(served)
        db.execute("UPDATE audit_log SET actor = %s WHERE seq = 4", (original,))
    assert bad.returncode == 1 and "entry 4" in bad.stderr, bad.stderr
    assert _call(served, "aud", "GET", "/log/verify").json()["intact"]


def test_an_unreachable_database_is_one_line(tmp_path):
    url = f"postgresql+psycopg://privlora@127.0.0.1:{free_port()}/postgres"
    assert_one_line_error(run_cli("registry", "init", "--root", str(tmp_path), "--db", url, "--admin", "x"),
                          "cannot open the registry database")
    assert_one_line_error(run_cli("registry", "init", "--root", str(tmp_path), "--db", "nosuch://x", "--admin", "x"),
                          "not a database URL")
