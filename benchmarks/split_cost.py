"""What split learning costs on this machine: throughput over loopback HTTP vs the same training in one
process, bytes per sample on the wire, and the server's memory with 8 concurrent clients.

* Throughput: the same bottom (depth 1, frozen), CTI privatizer (η=8), batch 32 and top; `--steps` steps
  through `privlora split serve` on 127.0.0.1 (HttpTop) and through the same TopService in-process
  (LocalTop), in alternating blocks of 5 steps so machine noise hits both alike. Ratio HTTP ÷ in-process.
* Bytes: request + response bodies per training sample (forward + backward) and per inference sample.
* Memory: the server process's RSS idle, then its peak while 8 client processes train concurrently
  (8 steps each), sampled every 0.1 s with psutil; every step must land (server steps = 64).

    python benchmarks/split_cost.py            # ~5 min on 2 cores

Writes benchmarks/results/split_cost.json.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import torch

from privlora.data.text import load_tweets
from privlora.split.client import HttpTop
from privlora.split.models import SplitBottom, SplitTop
from privlora.split.privatizers import Privatizer
from privlora.split.service import LocalTop, TopService
from privlora.split.train import batches, logits_for, train_step

RESULTS = Path(__file__).parent / "results" / "split_cost.json"
TOKEN = "bench-token"
DEPTH, BATCH, ETA = 1, 32, 8.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "privlora", "split", "serve", "--depth", str(DEPTH), "--port",
                             str(port), "--out", str(out)], env={**os.environ, "PRIVLORA_SPLIT_TOKEN": TOKEN},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def throughput(steps: int, port: int) -> dict:
    data = load_tweets(2000)
    bottom = SplitBottom(DEPTH)
    privatizer = Privatizer("dchi", ETA)
    local = LocalTop(TopService(SplitTop(DEPTH, 3, seed=0)))
    remote = HttpTop(f"http://127.0.0.1:{port}", TOKEN)
    g = torch.Generator().manual_seed(0)
    order = batches(len(data), BATCH, 2 * steps, seed=0)
    elapsed = {"http": 0.0, "local": 0.0}
    for block in range(0, steps, 5):
        for name, top in (("local", local), ("http", remote)):
            t = time.perf_counter()
            for idx in order[block:block + 5]:
                b = data.batch(idx)
                train_step(bottom, privatizer, top, b["texts"], b["labels"], None, g)
            elapsed[name] += time.perf_counter() - t
    sent, received = remote.bytes_sent, remote.bytes_received
    samples = steps * BATCH
    remote.bytes_sent = remote.bytes_received = 0
    logits_for(bottom, privatizer, remote, data.texts[:256], batch_size=BATCH, generator=g)
    infer = (remote.bytes_sent + remote.bytes_received) / 256
    ids, mask = bottom.encode(data.texts[:256])
    remote.close()
    return {"steps": steps, "batch": BATCH, "seconds_http": round(elapsed["http"], 2),
            "seconds_local": round(elapsed["local"], 2),
            "samples_per_s_http": round(samples / elapsed["http"], 2),
            "samples_per_s_local": round(samples / elapsed["local"], 2),
            "throughput_ratio_http_over_local": round(elapsed["local"] / elapsed["http"], 3),
            "train_bytes_per_sample": round((sent + received) / samples),
            "train_bytes_up_per_sample": round(sent / samples), "inference_bytes_per_sample": round(infer),
            "mean_real_tokens_per_text": round(float(mask.sum(1).float().mean()), 1),
            "padded_tokens_per_text": int(ids.shape[1])}


CLIENT = """
import sys, torch
from privlora.data.text import load_tweets
from privlora.split.client import HttpTop
from privlora.split.models import SplitBottom
from privlora.split.privatizers import Privatizer
from privlora.split.train import train_step
k, port = int(sys.argv[1]), int(sys.argv[2])
data = load_tweets(400, seed=k)
bottom, p = SplitBottom(1), Privatizer("dchi", 8.0)
with HttpTop(f"http://127.0.0.1:{port}", "bench-token") as top:
    for s in range(8):
        b = data.batch(list(range(s * 16, s * 16 + 16)))
        train_step(bottom, p, top, b["texts"], b["labels"], None, torch.Generator())
"""


def concurrent_memory(port: int, server: subprocess.Popen) -> dict:
    proc = psutil.Process(server.pid)
    idle = proc.memory_info().rss
    peak = [idle]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.1)

    before = httpx.get(f"http://127.0.0.1:{port}/info", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    clients = [subprocess.Popen([sys.executable, "-c", CLIENT, str(k), str(port)]) for k in range(8)]
    codes = [c.wait(timeout=1800) for c in clients]
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    after = httpx.get(f"http://127.0.0.1:{port}/info", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    return {"clients": 8, "steps_each": 8, "client_exit_codes": codes,
            "steps_landed": after["steps"] - before["steps"], "seconds": round(seconds, 1),
            "server_rss_idle_mib": round(idle / 2**20), "server_rss_peak_mib": round(peak[0] / 2**20)}


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(port, Path(tmp) / "adapter")
        try:
            result = {"throughput": throughput(steps, port), "memory": concurrent_memory(port, server)}
        finally:
            server.terminate()
            server.wait(timeout=60)
    result["machine"] = f"{os.cpu_count()} CPUs, torch {torch.__version__}"
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
