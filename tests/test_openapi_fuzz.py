"""Both servers under schemathesis (issue 18): their own /openapi.json drives the requests, with a valid token;
no answer may be a 5xx, and every status must be one the schema documents."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from test_registry_server import auth, start_server

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def fuzz(url: str, token: str, tmp: Path, examples: int = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCHEMATHESIS), "run", f"{url}/openapi.json",
                           "--header", f"Authorization: Bearer {token}",
                           "--checks", "not_a_server_error,status_code_conformance", "--max-examples", str(examples),
                           "--phases", "examples,coverage,fuzzing", "--seed", "18", "--workers", "1",
                           "--suppress-health-check", "all", "--no-color"],
                          capture_output=True, text=True, timeout=400, cwd=tmp,
                          env={**os.environ, "SCHEMATHESIS_HOOKS": ""})


@pytest.mark.slow
def test_the_registry_under_schemathesis(tmp_path):
    from privlora.registry.service import Registry

    root = tmp_path / "registry"
    admin = Registry(root).bootstrap_admin("root")
    proc, url = start_server(root, "--max-body-mb", "1", "--audit-attacks", "")
    try:
        token = httpx.post(url + "/users", json={"name": "ana", "role": "researcher"},
                           headers=auth(admin)).json()["token"]
        result = fuzz(url, token, tmp_path)
        assert result.returncode == 0 and " generated, " in result.stdout, result.stdout[-6000:]
        assert httpx.get(url + "/health").status_code == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.slow
def test_the_split_server_under_schemathesis(tmp_path):
    from test_registry_server import free_port

    port, token = free_port(), "fuzz-token-18"
    proc = subprocess.Popen([sys.executable, "-m", "privlora", "split", "serve", "--depth", "2", "--port", str(port),
                             "--max-body-mb", "1", "--max-batch", "4"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PRIVLORA_SPLIT_TOKEN": token})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if proc.poll() is not None:
                    raise RuntimeError(proc.stdout.read() if proc.stdout else "split server died") from None
                time.sleep(0.2)
        result = fuzz(url, token, tmp_path)
        assert result.returncode == 0 and " generated, " in result.stdout, result.stdout[-6000:]
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
