"""Issue 23 item 4: the default split trains on the user's data (80 / 10 / 10 %), the split used is printed at
the start of training, ``data.split: audit`` (and ``train --split audit``) gives the old audit-heavy counts."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CONFIGS, assert_one_line_error, invoke_cli, run_cli
from privlora.config import load_config
from privlora.data.imageset import ImageSet
from privlora.data.split_presets import SPLIT_PRESETS
from privlora.data.splits import make_splits
from privlora.errors import UserError


def _ids(n: int) -> ImageSet:
    return ImageSet(ids=[f"i{k}" for k in range(n)], pixels=torch.zeros(n, 1, 2, 2), captions=[""] * n)


def _counts(config, n: int) -> tuple[int, int, int]:
    d = config.data
    s = make_splits(_ids(n), members=d.members, aux=d.aux, eval=d.eval, seed=0, source="x")
    return len(s.members), len(s.aux), len(s.eval)


def test_default_trains_on_80_percent_and_audit_preset_keeps_the_old_counts():
    assert _counts(load_config(None), 100) == (80, 10, 10)
    assert _counts(load_config(None, {"data.split": "audit"}), 100) == (32, 32, 36)  # the old default
    # the demo configs pin the preset, so their runs (and the numbers measured on them) do not change
    for mode in ("plain", "smp", "dp"):
        assert _counts(load_config(CONFIGS / f"demo-{mode}.yaml"), 100) == (32, 32, 36)


def test_explicit_fractions_override_the_preset_one_by_one():
    d = load_config(None, {"data.split": "audit", "data.members": 0.04}).data
    assert (d.members, d.aux, d.eval) == (0.04, 0.32, 0.36)
    assert load_config(CONFIGS / "text-plain.yaml").data.members == 0.5  # explicit numbers: unchanged


def test_unknown_preset_is_a_user_error_listing_the_presets():
    with pytest.raises(UserError) as e:
        load_config(None, {"data.split": "mostly"})
    assert "'mostly'" in str(e.value) and all(name in str(e.value) for name in SPLIT_PRESETS)
    assert_one_line_error(run_cli("train", "--set", "data.split=mostly", "--out", "never"), "train", "audit")


def test_cli_split_replaces_the_config_fractions_but_not_set():
    from privlora.cli.common import overrides

    config = CONFIGS / "demo-plain.yaml"
    train = load_config(config, overrides({"data.split": "train"}, []))
    assert (train.data.members, train.data.aux, train.data.eval) == (0.8, 0.1, 0.1)
    mixed = load_config(config, overrides({"data.split": "train"}, ["data.eval=0.05"]))
    assert (mixed.data.members, mixed.data.eval) == (0.8, 0.05)
    help_text = invoke_cli("train", "--help", env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"}).stdout
    assert "--split" in help_text and "train" in help_text and "audit" in help_text


def test_training_prints_the_split_it_used(tmp_path, capfd):
    from privlora.train.loop import train

    out = tmp_path / "run"
    train(load_config(None, {"data.source": "demo:digits", "data.limit": 20, "optim.max_steps": 1,
                             "optim.batch_size": 4, "out": str(out), "eval.timesteps": [200], "eval.samples": 0,
                             "lora.rank": 2}))
    lines = [line for line in capfd.readouterr().out.splitlines() if line.startswith("split:")]
    assert lines == ["split: 16 members (trained on), 2 aux non-members (MP/SMP's attacker only), 2 eval "
                     "non-members (audit only) of 20 (data.split train; splits.json)"]
    saved = json.loads((out / "splits.json").read_text())
    assert [len(saved[k]) for k in ("members", "aux_nonmembers", "eval_nonmembers")] == [16, 2, 2]
