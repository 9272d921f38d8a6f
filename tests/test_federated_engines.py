"""Slow: our app on Flower's deployment engine (real SuperLink + SuperNode processes over gRPC) —
same adapter as the simulation, a SuperNode killed mid-run — and asynchronous buffered aggregation
with a slow client."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from privlora.config import FederatedConfig
from privlora.federated.run import federate, read_metrics

pytestmark = pytest.mark.slow

SMALL = {"clients": 3, "rounds": 2, "data": {"limit": 240}, "client": {"local_steps": 3, "batch_size": 8},
         "quiet": True, "round_timeout": 60}


def cfg(tmp_path: Path, name: str, **overrides) -> FederatedConfig:
    return FederatedConfig.model_validate({**SMALL, "out": str(tmp_path / name), **overrides})


def test_deployment_engine_gives_the_simulations_adapter(tmp_path) -> None:
    deployed = federate(cfg(tmp_path, "deployed", engine="deployment"))
    simulated = federate(cfg(tmp_path, "simulated"))
    assert (deployed.run_dir / "logs" / "superlink.log").exists()
    assert [m["accepted"] for m in deployed.rounds[1:]] == [3, 3]
    a = load_file(str(deployed.run_dir / "adapter/adapter_model.safetensors"))
    b = load_file(str(simulated.run_dir / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        # same computation in other processes: equal up to float round-off (kernels may sum in another order)
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)
    assert not [p for p in psutil.process_iter(["cmdline"])
                if "flower-supernode" in " ".join(p.info["cmdline"] or [])]


def _kill_supernode(partition: int) -> int:
    killed = 0
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if "flower-supernode" in line and f"partition-id={partition} " in line:
            for p in [*proc.children(recursive=True), proc]:
                p.kill()
                killed += 1
    return killed


def test_a_supernode_killed_mid_run_does_not_stop_the_run(tmp_path) -> None:
    config = cfg(tmp_path, "killed", engine="deployment", rounds=3, round_timeout=25)
    result: list = []
    thread = threading.Thread(target=lambda: result.append(federate(config)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait for round 1 in the run's working copy
        lines = [m for f in tmp_path.glob(".killed.*/metrics.jsonl") for m in read_metrics(f)]
        if any(m["round"] == 1 for m in lines):
            break
        time.sleep(0.5)
    assert _kill_supernode(2) >= 1
    thread.join(timeout=600)
    assert result, "the run did not finish"
    rounds = result[0].rounds
    assert len(rounds) == 4 and (result[0].run_dir / "adapter").is_dir()
    assert rounds[1]["accepted"] == 3
    assert rounds[-1]["accepted"] == 2 and rounds[-1]["failures"] >= 1


def test_buffered_async_merges_without_waiting_for_the_slow_client(tmp_path) -> None:
    config = cfg(tmp_path, "async", rounds=3, asynchronous={"enabled": True, "buffer": 2},
                 simulation={"slow_clients": [0], "slow_seconds": 8.0})
    result = federate(config)
    merges = result.rounds[1:]
    assert len(merges) == 3 and all(m["accepted"] == 2 for m in merges)
    assert 0 not in merges[0]["clients"]  # the first merge did not wait for client 0
    assert any(t > 0 for m in merges for t in m["staleness"])  # late uploads were merged, down-weighted
    assert result.final["accuracy"] >= 0.0 and (result.run_dir / "adapter").is_dir()


def test_secagg_survives_a_client_that_drops_out(tmp_path) -> None:
    result = federate(cfg(tmp_path, "secdrop", clients=4, rounds=1, secagg={"enabled": True},
                          simulation={"crash_clients": [3]}))
    assert result.final["accepted"] == 3  # the dropped client's masks were removed via its shares


def test_flora_with_heterogeneous_ranks_and_a_rank_schedule(tmp_path) -> None:
    flora = federate(cfg(tmp_path, "flora", strategy="flora", lora={"client_ranks": [2, 4, 8]}))
    assert all(m["accepted"] == 3 for m in flora.rounds[1:])
    scheduled = federate(cfg(tmp_path, "sched", strategy="fedit", rounds=3,
                             lora={"rank": 4, "rank_schedule": {1: 4, 2: 8, 3: 2}}))
    assert [m["rank"] for m in scheduled.rounds[1:]] == [4, 8, 2]
    import json

    assert json.loads((scheduled.run_dir / "adapter/adapter_config.json").read_text())["r"] == 2
