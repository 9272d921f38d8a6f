"""`privlora train --task text`: the centralised text baseline in every mode, through the real CLI."""

from __future__ import annotations

import json

import pytest

from conftest import CONFIGS, assert_one_line_error, run_cli

FAST = ["--set", "data.limit=60", "--batch-size", "8", "-q"]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "plain"
    proc = run_cli("train", "--config", str(CONFIGS / "text-plain.yaml"), "--max-steps", "4", "--out", str(out),
                   *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "held-out accuracy" in proc.stdout
    return out


def test_text_run_directory(plain_run):
    for name in ("config.yaml", "splits.json", "metrics.jsonl", "privacy.json", "utility.json",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (plain_run / name).is_file(), name
    utility = json.loads((plain_run / "utility.json").read_text())
    assert 0 <= utility["accuracy_heldout"] <= 1 and utility["classes"] == ["negative", "neutral", "positive"]
    assert utility["heldout"] == 18  # 30 % of 60
    splits = json.loads((plain_run / "splits.json").read_text())
    assert len(splits["members"]) == 30 and not set(splits["members"]) & set(splits["eval_nonmembers"])
    config = (plain_run / "config.yaml").read_text()
    assert "task: text" in config and "base: minilm" in config and "query" in config


def test_text_adapter_loads_in_peft(plain_run):
    import torch
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    from privlora.tasks.text import TextClassificationTask, minilm_path

    task = TextClassificationTask(3, seed=5)
    task.load_adapter(plain_run / "adapter")
    texts = ["the bank answered fast", "still waiting for my card"]
    base = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=3, local_files_only=True)
    model = PeftModel.from_pretrained(base, plain_run / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**task.encode(texts)).logits, task.logits({"texts": texts}),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode,extra", [("dp", ["--target-epsilon", "8"]), ("smp", [])])
def test_text_private_modes(tmp_path, mode, extra):
    out = tmp_path / mode
    proc = run_cli("train", "--config", str(CONFIGS / "text-plain.yaml"), "--mode", mode, "--max-steps", "3",
                   "--out", str(out), *extra, *FAST)
    assert proc.returncode == 0, proc.stderr
    privacy = json.loads((out / "privacy.json").read_text())
    if mode == "dp":
        assert abs(privacy["epsilon"] - 8) < 0.05 and privacy["noise_multiplier"] > 0
    else:
        assert privacy["mechanism"].startswith("empirical")


def test_text_bad_input(tmp_path):
    proc = run_cli("train", "--task", "text", "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "r"),
                   "-q")
    assert_one_line_error(proc, "does not exist")
    assert not (tmp_path / "r").exists()
    proc = run_cli("train", "--task", "text", "--base", str(tmp_path), "--out", str(tmp_path / "r"), "-q")
    assert_one_line_error(proc, "BERT model folder")


def test_dp_canary_audit_refuses_text_runs(plain_run):
    # the membership audit covers text runs (tests/test_audit_text.py); the one-run DP audit's canaries are images
    assert_one_line_error(run_cli("audit", "--run", str(plain_run), "--dp-canaries", "8", "-q"), "text run")
