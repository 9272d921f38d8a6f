"""Federated instruction tuning of a causal LM (``task: causal-lm``) on Flower's real simulation engine:
the global adapter is a peft CAUSAL_LM folder that plain peft loads and that scores the server's held-out
records as the server said it did; sample-level DP-SGD runs inside each client; the task's defaults and
refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from conftest import CONFIGS, assert_one_line_error, run_cli
from privlora.config import FederatedConfig, load_config
from privlora.federated.run import federate

SMALL = {"task": "causal-lm", "clients": 2, "rounds": 2, "data": {"limit": 60, "test": 0.25},
         "client": {"local_steps": 4, "batch_size": 8, "lr": 0.01}, "quiet": True}


def config(tmp_path: Path, name: str, **overrides) -> FederatedConfig:
    return FederatedConfig.model_validate({**SMALL, "out": str(tmp_path / name), **overrides})


def rounds_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_causal_lm_defaults_and_refusals() -> None:
    cfg = FederatedConfig.model_validate({"task": "causal-lm"})
    assert (cfg.base, cfg.data.source, cfg.data.alpha, cfg.lora.targets) == \
        ("embedded-lm", "demo:support", None, ("auto",))
    named = FederatedConfig.model_validate({"task": "causal-lm", "data": {"source": "x.jsonl", "alpha": 0.3}})
    assert (named.data.source, named.data.alpha) == ("x.jsonl", 0.3)  # what the user names is kept
    assert FederatedConfig.model_validate({}).base == "minilm"  # the text task is untouched
    with pytest.raises(ValidationError, match="flora is for task text"):
        FederatedConfig.model_validate({"task": "causal-lm", "strategy": "flora"})
    shipped = load_config(CONFIGS / "fed-lm.yaml", model=FederatedConfig)
    assert (shipped.task, shipped.strategy) == ("causal-lm", "ffa")


def test_cli_refuses_flora_for_a_causal_lm_in_one_line(tmp_path) -> None:
    proc = run_cli("federate", "--task", "causal-lm", "--strategy", "flora", "--out", str(tmp_path / "r"))
    assert_one_line_error(proc, "flora")


def test_size_skew_deals_records_without_labels(tmp_path) -> None:
    from privlora.federated.data import federated_data

    iid = federated_data(config(tmp_path, "iid", clients=3))
    skewed = federated_data(config(tmp_path, "skew", clients=3, data={"limit": 60, "test": 0.25, "alpha": 0.2}))
    for split in (iid, skewed):
        every = sorted(i for part in split.parts for i in part)
        assert every == list(range(len(split.train))) and all(split.parts)  # a partition, nobody empty
    sizes = sorted(len(p) for p in iid.parts)
    assert sizes[-1] - sizes[0] <= 1  # IID: equal shares
    assert sorted(len(p) for p in skewed.parts) != sizes  # Dirichlet α = 0.2: unequal shares


def test_ffa_on_a_causal_lm_learns_and_its_adapter_loads_in_plain_peft(tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from privlora.federated.data import federated_data
    from privlora.tasks.causal_lm import CausalLMTask
    from privlora.tasks.embedded_lm import embedded_lm_path

    cfg = config(tmp_path, "ffa")
    run = federate(cfg).run_dir
    rounds = rounds_of(run)
    assert [m["round"] for m in rounds] == [0, 1, 2]
    assert all(m["accepted"] == 2 and m["failures"] == 0 for m in rounds[1:])
    assert rounds[-1]["perplexity"] < 0.8 * rounds[0]["perplexity"]  # 8 local steps at lr 0.01 already fit
    adapter = run / "adapter"
    spec = json.loads((adapter / "adapter_config.json").read_text())
    assert spec["task_type"] == "CAUSAL_LM"
    # peft alone, on the plain base, reproduces the server's last held-out figure
    test = federated_data(cfg).test
    ours = CausalLMTask("embedded-lm", seed=0)  # only for the encoding of the same records
    encoded = ours.encode(test.batch(list(range(len(test)))))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded_lm_path()), adapter).eval()
    with torch.no_grad():
        logits = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
    labels, mask = encoded["labels"][:, 1:], encoded["response_mask"][:, 1:]  # the response tokens only
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none")
    token_loss = float((nll * mask).sum() / mask.sum())
    assert token_loss == pytest.approx(rounds[-1]["token_loss"], abs=1e-3)
    assert rounds[-1]["perplexity"] == pytest.approx(float(torch.exp(torch.tensor(token_loss))), rel=1e-3)
    # the federated membership audit covers text only: a causal-LM run is refused in one line, not crashed on
    assert_one_line_error(run_cli("audit", str(run)), "text task only")


@pytest.mark.slow
def test_sample_level_dp_sgd_trains_a_causal_lm_in_every_client(tmp_path) -> None:
    cfg = config(tmp_path, "dp", dp={"mechanism": "gaussian", "level": "sample", "noise_multiplier": 1.0,
                                     "clip": 1.0})
    run = federate(cfg).run_dir
    privacy = json.loads((run / "privacy.json").read_text())
    assert len(privacy["clients"]) == 2 and all(c["epsilon"] > 0 for c in privacy["clients"])
    rounds = rounds_of(run)
    assert all(m["accepted"] == 2 for m in rounds[1:])
    assert rounds[-1]["perplexity"] < rounds[0]["perplexity"]
