"""The split server, really started (`privlora split serve` in a subprocess), exercised over HTTP."""

from __future__ import annotations

import json
import math
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save as st_save

from conftest import assert_one_line_error, run_cli
from privlora.config import SplitConfig
from privlora.errors import UserError
from privlora.split.client import HttpTop
from privlora.split.models import SplitBottom
from privlora.split.privatizers import Privatizer
from privlora.split.run import split_predict, split_train
from privlora.split.train import train_step

TOKEN = "test-token-7f3a"
DEPTH = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str, token: str = TOKEN) -> tuple[subprocess.Popen, str]:
    """``privlora split serve ARGS`` on a free port, once /health answers: (the process, its URL)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "privlora", "split", "serve", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PRIVLORA_SPLIT_TOKEN": token})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("server") / "adapter"
    proc, url = start_server("--depth", str(DEPTH), "--out", str(out), "--max-body-mb", "1", "--max-batch", "16",
                             "--log-level", "info")
    yield {"url": url, "out": out, "proc": proc}
    proc.terminate()
    log = proc.communicate(timeout=60)[0]
    assert TOKEN not in log  # the token never reaches the server's log
    assert "saved the adapter" in log  # SIGTERM: the shutdown handler saved what was trained


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def forward_body(batch: int = 2, tokens: int = 5, hidden: int = 384, *, dtype=torch.float32) -> bytes:
    return st_save({"hidden": torch.randn(batch, tokens, hidden).to(dtype),
                    "attention_mask": torch.ones(batch, tokens, dtype=torch.int64)})


def assert_refused(response: httpx.Response, status: int, needle: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert needle in response.json()["error"], response.json()


def test_health_is_open_everything_else_needs_the_token(server):
    url = server["url"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    for method, path in [("GET", "/info"), ("POST", "/forward"), ("POST", "/backward"), ("POST", "/save")]:
        for headers in ({}, auth("wrong"), {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
            r = httpx.request(method, url + path, headers=headers, content=forward_body())
            assert_refused(r, 401, "bearer token")
            assert r.headers["www-authenticate"] == "Bearer"
    info = httpx.get(url + "/info", headers=auth()).json()
    assert info["depth"] == DEPTH and info["num_labels"] == 3 and info["hidden_size"] == 384


@pytest.mark.parametrize("body, status, needle", [
    (b"garbage", 400, "not safetensors"),
    (pickle.dumps({"hidden": [1.0]}), 400, "pickle"),
    (struct.pack("<Q", 10**9) + b"{}", 400, "header length"),
    (struct.pack("<Q", 4) + b"nope", 400, "not JSON"),
    (st_save({"hidden": torch.zeros(2, 5, 384)}), 422, "expected tensors"),
    (st_save({"hidden": torch.zeros(2, 5, 384, dtype=torch.int32),
              "attention_mask": torch.ones(2, 5, dtype=torch.int64)}), 422, "dtype I32"),
    (forward_body(hidden=383), 422, "does not match"),
    (st_save({"hidden": torch.zeros(2, 5, 384), "attention_mask": torch.ones(2, 4, dtype=torch.int64)}), 422,
     "attention_mask shape"),
    (st_save({"hidden": torch.full((2, 5, 384), math.nan), "attention_mask": torch.ones(2, 5, dtype=torch.int64)}),
     422, "NaN"),
    (st_save({"hidden": torch.zeros(2, 5, 384), "attention_mask": torch.full((2, 5), 3)}), 422, "0/1"),
    (st_save({"hidden": torch.zeros(2, 5, 384), "attention_mask": torch.zeros(2, 5, dtype=torch.int64)}), 422,
     "at least one 1"),
    (forward_body(batch=17, tokens=2), 422, "batch of 17"),
    (forward_body(tokens=129, batch=1), 422, "129 tokens"),
])
def test_malformed_forward_is_refused_and_server_stays_up(server, body, status, needle):
    r = httpx.post(server["url"] + "/forward", headers=auth(), content=body)
    assert_refused(r, status, needle)
    ok = httpx.post(server["url"] + "/forward", headers=auth(), content=forward_body())
    assert ok.status_code == 200 and ok.headers.get("x-privlora-step") is None


def test_oversized_bodies_are_refused_declared_or_streamed(server):
    big = forward_body(batch=1, tokens=700)  # 1.03 MiB > the server's 1 MiB
    assert_refused(httpx.post(server["url"] + "/forward", headers=auth(), content=big), 413, "limit")

    def chunks():  # no Content-Length: the server must count while reading
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    assert_refused(httpx.post(server["url"] + "/forward", headers=auth(), content=chunks()), 413, "limit")
    assert httpx.get(server["url"] + "/health").status_code == 200


def test_backward_protocol_errors(server):
    url = server["url"]
    grad = st_save({"grad_logits": torch.zeros(2, 3)})
    assert_refused(httpx.post(url + "/backward", params={"step": "nope"}, headers=auth(), content=grad), 409,
                   "unknown or expired step")
    assert_refused(httpx.post(url + "/forward", params={"train": "maybe"}, headers=auth(), content=forward_body()),
                   422, "must be 0 or 1")
    r = httpx.post(url + "/forward", params={"train": 1}, headers=auth(), content=forward_body())
    step = r.headers["x-privlora-step"]
    bad = st_save({"grad_logits": torch.zeros(3, 3)})
    assert_refused(httpx.post(url + "/backward", params={"step": step}, headers=auth(), content=bad), 422,
                   "does not match")
    ok = httpx.post(url + "/backward", params={"step": step}, headers=auth(), content=grad)
    assert ok.status_code == 204
    # the step is used up
    assert_refused(httpx.post(url + "/backward", params={"step": step}, headers=auth(), content=grad), 409, "step")


def _config(tmp_path: Path, url: str, **changes) -> SplitConfig:
    base = {"out": str(tmp_path / "run"), "server": url, "quiet": True,
            "data": {"limit": 160, "eval": 0.25}, "optim": {"steps": 4, "batch_size": 8},
            "privatizer": {"name": "cti", "eta": 100.0, "cti_top_k": 10, "cti_min_count": 2}}
    base.update(changes)
    return SplitConfig.model_validate(base)


def test_train_then_predict_over_http(server, tmp_path):
    url = server["url"]
    before = httpx.get(url + "/info", headers=auth()).json()["steps"]
    with HttpTop(url, TOKEN) as top:
        run = split_train(_config(tmp_path, url), top)
        summary = json.loads((run.run_dir / "split.json").read_text())
        assert summary["privatizer"]["contributing_count"] == len(summary["privatizer"]["contributing"]) > 0
        assert 0 <= run.accuracy <= 1 and summary["bytes_sent"] > 4 * 8 * 384 * 4
        assert {"config.yaml", "metrics.jsonl", "split.json"} <= {p.name for p in run.run_dir.iterdir()}
        assert TOKEN not in (run.run_dir / "config.yaml").read_text()
        labels = split_predict(run.run_dir, ["great flight, thanks!", "lost my bag again"], top)
    assert set(labels) <= {"negative", "neutral", "positive"} and len(labels) == 2
    info = httpx.get(url + "/info", headers=auth()).json()
    assert info["steps"] == before + 4
    assert (server["out"] / "adapter_model.safetensors").is_file()  # split_train asked the server to save


def test_server_adapter_loads_in_peft_and_matches_the_server(server, tmp_path):
    """The saved top adapter is a peft SEQ_CLS adapter for the full model: logits equal the server's."""
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    from privlora.tasks.text import minilm_path

    url = server["url"]
    with HttpTop(url, TOKEN) as top:
        bottom = SplitBottom(DEPTH)
        step_texts = ["an example to move the adapter", "another one"] * 2
        train_step(bottom, Privatizer("none"), top, step_texts, [0, 2, 0, 2], None, torch.Generator())
        top.save()
        texts = ["the flight was fine", "worst service ever"]
        ids, mask = bottom.encode(texts)
        with torch.no_grad():
            served = top.forward(bottom.forward(ids, mask), mask, train=False)[1]
    base = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=3, local_files_only=True)
    model = PeftModel.from_pretrained(base, str(server["out"])).eval()
    with torch.no_grad():
        direct = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(served, direct, atol=1e-4), (served, direct)
    lora_b = [v for k, v in model.state_dict().items() if "lora_B" in k and "layer.0." not in k]
    assert lora_b and all(float(b.abs().sum()) > 0 for b in lora_b)  # the server's training moved every B
    assert not any("layer.0." in k and "lora" in k for k in model.state_dict())  # bottom block has no LoRA


def test_trainable_bottom_over_http_moves_the_users_lora(server, tmp_path):
    with HttpTop(server["url"], TOKEN) as top:
        run = split_train(_config(tmp_path, server["url"], bottom="trainable",
                                  privatizer={"name": "dchi", "eta": 200.0}), top)
    from safetensors.torch import load_file

    state = load_file(str(run.run_dir / "bottom_adapter" / "adapter_model.safetensors"))
    b = {k: v for k, v in state.items() if "lora_B" in k}
    assert b and all("layer.0." in k for k in state)  # only the user's block
    assert all(float(v.abs().sum()) > 0 for v in b.values())  # gradients from the server arrived


def test_eight_concurrent_clients_lose_no_step(server):
    url = server["url"]
    before = httpx.get(url + "/info", headers=auth()).json()["steps"]
    errors: list[BaseException] = []
    bottom = SplitBottom(DEPTH)
    lock = threading.Lock()

    def client(k: int) -> None:
        try:
            with HttpTop(url, TOKEN) as top:
                for _ in range(3):
                    with lock:  # the tokenizer/bottom is shared between threads here; the server is not
                        ids, mask = bottom.encode([f"client {k} text", "another"])
                        with torch.no_grad():
                            hidden = bottom.forward(ids, mask)
                    step, logits = top.forward(hidden, mask, train=True)
                    assert step is not None
                    top.backward(step, torch.ones_like(logits) / logits.numel())
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert httpx.get(url + "/info", headers=auth()).json()["steps"] == before + 24


def test_client_errors_are_one_line(server, tmp_path):
    with pytest.raises(UserError, match="refused /info \\(401\\)"):
        HttpTop(server["url"], "wrong").info()
    port = free_port()
    proc = run_cli("split", "train", "--server", f"http://127.0.0.1:{port}", "--token", "t", "--steps", "1",
                   "--limit", "40", "--out", str(tmp_path / "x"), "-q")
    assert_one_line_error(proc, "cannot reach")
    assert not (tmp_path / "x").exists()
    assert_one_line_error(run_cli("split", "predict", "--run", str(tmp_path), "--server", server["url"],
                                  "--token", TOKEN, "hello"), "not a split run")
    env_free = {k: v for k, v in os.environ.items() if k != "PRIVLORA_SPLIT_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "privlora", "split", "serve", "--port", str(port)],
                          capture_output=True, text=True, env=env_free, timeout=120)
    assert_one_line_error(proc, "token")
    taken = server["url"].rsplit(":", 1)[1]
    assert_one_line_error(run_cli("split", "serve", "--port", taken, "--token", "t"), "cannot listen")
    assert_one_line_error(run_cli("split", "serve", "--depth", "6", "--port", str(port), "--token", "t"),
                          "split depth")


def test_split_train_and_predict_commands(server, tmp_path):
    """`privlora split train` / `split predict` on their success path, token from the environment as documented.
    No noise (privatizer none), so the CLI's labels can be checked against the same run's labels computed here."""
    from conftest import invoke_cli

    url, env = server["url"], {"PRIVLORA_SPLIT_TOKEN": TOKEN}
    before = httpx.get(url + "/info", headers=auth()).json()["steps"]
    run_dir = tmp_path / "cli-run"
    trained = invoke_cli("split", "train", "--server", url, "--limit", "160", "--steps", "3", "--batch-size", "8",
                         "--privatizer", "none", "--out", str(run_dir), "-q", env=env)
    assert trained.returncode == 0, (trained.stdout, trained.stderr)
    assert httpx.get(url + "/info", headers=auth()).json()["steps"] == before + 3  # each step reached the server
    summary = json.loads((run_dir / "split.json").read_text())
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    assert TOKEN not in (run_dir / "config.yaml").read_text()
    assert summary["depth"] == DEPTH and summary["privatizer"]["name"] == "none"
    assert summary["train_texts"] + summary["eval_texts"] == 160
    head, stats = (line.strip() for line in trained.stdout.splitlines()[:2])
    assert head == f"split training (none, η={summary['privatizer']['eta']}; depth {DEPTH}, frozen bottom) → {run_dir}"
    words = stats.split()
    assert stats.startswith("held-out accuracy ")
    assert float(words[2]) == pytest.approx(summary["eval_accuracy"], abs=5e-4)
    assert float(words[4].rstrip(")")) == pytest.approx(summary["eval_loss"], abs=5e-4)
    assert f"on {summary['eval_texts']} texts" in stats
    assert f"{summary['bytes_sent'] / 2**20:.1f} MiB sent" in stats

    texts = ["great flight, thanks!", "lost my bag again", "the flight left on time"]
    listed = tmp_path / "more.txt"
    listed.write_text("worst customer service ever\nwhere is my refund\n")
    predicted = invoke_cli("split", "predict", *texts, "--input", str(listed), "--run", str(run_dir), "--server", url,
                           env=env)
    assert predicted.returncode == 0, (predicted.stdout, predicted.stderr)
    everything = texts + ["worst customer service ever", "where is my refund"]
    with HttpTop(url, TOKEN) as top:
        expected = split_predict(run_dir, everything, top)
    lines = [f"{label}\t{text}" for label, text in zip(expected, everything, strict=True)]
    assert predicted.stdout.splitlines() == lines
    assert set(expected) <= set(summary["classes"])
    assert httpx.get(url + "/info", headers=auth()).json()["steps"] == before + 3  # prediction trains nothing


def test_openapi_documents_every_route_and_its_refusals(server):
    """Issue 18: /openapi.json is generated from the routes, with every refusal ({"error": ...}) declared."""
    schema = httpx.get(server["url"] + "/openapi.json").json()
    assert set(schema["paths"]) == {"/health", "/info", "/forward", "/backward", "/save"}
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            if path != "/health":
                assert "401" in op["responses"], (method, path)
    forward = schema["paths"]["/forward"]["post"]
    assert {"413", "422"} <= set(forward["responses"])
    assert "application/octet-stream" in forward["requestBody"]["content"]
