"""A toy Flower App (Message API) for testing the deployment-engine runner without models or data.

The ServerApp sends one ``train`` message to every connected node for ``num-rounds`` rounds; each
ClientApp replies with its ``partition-id`` (from the SuperNode's ``--node-config``) in a MetricRecord
and an ArrayRecord. The ServerApp writes which partitions replied per round to ``results-path`` as
JSON, plus the ``payload`` run-config value exactly as it arrived (to check that quoting survives).
A node whose partition id is ``fail-partition`` raises instead of replying; ``fail-server`` makes the
ServerApp raise before it sends anything.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server_app = ServerApp()
client_app = ClientApp()


def _wait_for_nodes(grid: Grid, want: int, timeout_s: float) -> list[int]:
    """The SuperNodes register with the SuperLink on their own schedule: wait until ``want`` have."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= want or time.monotonic() > deadline:
            return nodes
        time.sleep(0.5)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    if cfg["fail-server"]:
        raise RuntimeError("toy ServerApp fails on purpose")
    nodes = _wait_for_nodes(grid, int(cfg["num-nodes"]), timeout_s=60)
    rounds: list[dict] = []
    for rnd in range(1, int(cfg["num-rounds"]) + 1):
        content = RecordDict({"config": ConfigRecord({"round": rnd})})
        messages = [Message(content, dst_node_id=node, message_type="train", group_id=str(rnd)) for node in nodes]
        replies = list(grid.send_and_receive(messages, timeout=float(cfg["round-timeout"])))
        ok = sorted(int(r.content["metrics"]["partition-id"]) for r in replies if not r.has_error())
        errors = [r.error.reason for r in replies if r.has_error()]
        rounds.append({"round": rnd, "partitions": ok, "errors": errors})
    result = {"nodes": len(nodes), "rounds": rounds, "payload": cfg["payload"]}
    Path(str(cfg["results-path"])).write_text(json.dumps(result, indent=2))


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    if pid == int(context.run_config["fail-partition"]):
        raise RuntimeError(f"toy ClientApp: partition {pid} fails on purpose")
    content = RecordDict(
        {
            "arrays": ArrayRecord([np.full(2, pid, dtype=np.float32)]),
            "metrics": MetricRecord({"partition-id": pid, "num-examples": 1}),
        }
    )
    return Message(content=content, reply_to=msg)
