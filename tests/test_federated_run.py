"""End to end on Flower's real simulation engine (Ray): run directories, adapters peft loads, the privacy
ledger against Opacus' accountant, faults, SecAgg+ against plain aggregation.

Flower's "success" is never the assertion: every check reads what the server wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFIGS, assert_one_line_error, run_cli
from privlora.config import FederatedConfig
from privlora.errors import UserError
from privlora.federated.run import federate

SMALL = {"clients": 3, "rounds": 2, "data": {"limit": 240}, "client": {"local_steps": 3, "batch_size": 8},
         "quiet": True}


def config(tmp_path: Path, name: str, **overrides) -> FederatedConfig:
    tree = {**SMALL, "out": str(tmp_path / name), **overrides}
    return FederatedConfig.model_validate(tree)


def peft_accuracy(adapter: Path, texts: list[str], labels: list[int]) -> float:
    """Accuracy of the saved adapter loaded by peft itself (not by privlora)."""
    from peft import PeftModel
    from transformers import AutoTokenizer, BertForSequenceClassification

    from privlora.tasks.text import minilm_path

    base = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=3, local_files_only=True)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    with torch.no_grad():
        enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1)
    return float((pred == torch.tensor(labels)).float().mean())


def test_ffa_run_writes_a_run_directory_whose_adapter_peft_loads(tmp_path) -> None:
    result = federate(config(tmp_path, "ffa"))
    run = result.run_dir
    for name in ("config.yaml", "metrics.jsonl", "metrics.png", "privacy.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (run / name).exists(), name
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in rounds] == [0, 1, 2]
    assert all(m["accepted"] == 3 and m["failures"] == 0 for m in rounds[1:])
    assert json.loads((run / "privacy.json").read_text())["mechanism"] == "none"
    # FFA: A in the adapter is the initial, seeded A (never trained); B moved
    state = load_file(str(run / "adapter/adapter_model.safetensors"))
    Bs = [v for k, v in state.items() if "lora_B" in k]
    assert Bs and all(float(b.abs().max()) > 0 for b in Bs)
    # the server's own final accuracy, recomputed independently through peft
    from privlora.federated.data import federated_data

    test = federated_data(config(tmp_path, "ffa")).test
    assert peft_accuracy(run / "adapter", test.texts, test.labels) == pytest.approx(rounds[-1]["accuracy"])


def test_dp_int8_with_a_crashing_and_a_corrupt_client(tmp_path) -> None:
    from opacus.accountants import RDPAccountant

    from privlora.federated.compression import wire_bytes

    cfg = config(tmp_path, "faults", clients=4, compression="int8",
                 dp={"mechanism": "gaussian", "noise_multiplier": 1.2, "clip": 0.5},
                 simulation={"crash_clients": [1], "corrupt_clients": [2]})
    result = federate(cfg)
    for m in result.rounds[1:]:
        assert m["failures"] == 1  # the crashed client: the round went on without it
        assert [r["client"] for r in m["rejected"]] == [2]  # NaNs on the wire: rejected, logged
        assert m["accepted"] == 2
    # ε: the same Opacus RDP accountant, driven independently: σ=1.2, every client every round (q=1)
    accountant = RDPAccountant()
    for _ in range(2):
        accountant.step(noise_multiplier=1.2, sample_rate=1.0)
    privacy = json.loads((result.run_dir / "privacy.json").read_text())
    assert privacy["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)
    assert result.final["epsilon"] == pytest.approx(privacy["epsilon"])
    # int8 on the wire: ≤ 0.27 × the float32 upload of the same tensors
    n = (len(_state_shapes(cfg)) - 2) // 2
    fp32 = wire_bytes([np.zeros(s, np.float32) for s in _state_shapes(cfg)[n:]])
    assert result.final["bytes_up_per_client"] <= 0.27 * fp32


def _state_shapes(cfg: FederatedConfig) -> list[tuple[int, ...]]:
    from privlora.federated.client import task_for
    from privlora.federated.rules import get_rule

    return [a.shape for a in get_rule("ffa").initial_state(task_for(cfg, 3, cfg.lora.rank).model)]


def test_secagg_plus_flat_and_inside_edges_computes_the_plain_adapter(tmp_path) -> None:
    plain = federate(config(tmp_path, "plain", rounds=1, clients=4))
    secure = federate(config(tmp_path, "secure", rounds=1, clients=4, secagg={"enabled": True}))
    edges = federate(config(tmp_path, "edges", rounds=1, clients=4, secagg={"enabled": True},
                            hierarchy={"edges": 2}))
    assert edges.final["edges"] == 2 and edges.final["accepted"] == 4
    a = load_file(str(plain.run_dir / "adapter/adapter_model.safetensors"))
    for other in (secure, edges):
        b = load_file(str(other.run_dir / "adapter/adapter_model.safetensors"))
        for key in [k for k in a if "lora_B" in k or "classifier" in k]:
            diff = float(torch.linalg.norm(a[key] - b[key]) / torch.linalg.norm(a[key]))
            assert diff < 1e-3, (key, diff)  # SecAgg+ quantises to 2^22 levels over ±1: ~1e-4 relative


def test_a_run_where_every_client_fails_leaves_no_run_directory(tmp_path) -> None:
    cfg = config(tmp_path, "dead", rounds=1, simulation={"crash_clients": [0, 1, 2]})
    with pytest.raises(UserError, match="no client update was accepted"):
        federate(cfg)
    assert not (tmp_path / "dead").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dead")]


def test_cli_bad_config_key_and_missing_data_are_one_line_errors(tmp_path) -> None:
    proc = run_cli("federate", "--config", str(CONFIGS / "fed-ffa.yaml"), "--set", "lora.rnak=4",
                   "--out", str(tmp_path / "x"))
    assert_one_line_error(proc, "rnak")
    proc = run_cli("federate", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x"), "-q")
    assert_one_line_error(proc, "does not exist")
    assert not (tmp_path / "x").exists()


def test_fed_configs_validate() -> None:
    from privlora.config import load_config

    for path in sorted(CONFIGS.glob("fed-*.yaml")):
        cfg = load_config(path, model=FederatedConfig)
        assert cfg.rounds >= 1, path

