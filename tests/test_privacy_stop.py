"""Privacy-aware early stopping end to end on the embedded UNet: the rule stops at the first check over the
bound and saves the adapter of the last check that passed, a loose bound runs to the end without changing
training, the probe never reads evaluation non-members, DP and a missing aux split are refused, and a
resumed run decides as the uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFIGS, assert_nothing_written, assert_one_line_error, invoke_cli
from privlora.config import TrainConfig, load_config
from privlora.errors import UserError
from privlora.train import loop
from privlora.train.loop import Interrupted, TrainResult, train

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Optimal order",
                                        "ignore::RuntimeWarning")

# 12 members, 8 aux, 8 eval faces; two probe timesteps keep a check to about half a second
FAST = {"eval.timesteps": [200], "eval.samples": 0, "quiet": True, "optim.batch_size": 4,
        "optim.max_steps": 5, "data.members": 0.12, "data.aux": 0.08, "data.eval": 0.08,
        "lora.rank": 4, "lora.alpha": 4, "checkpoint_every": 1, "log_every": 1,
        "privacy_stop.timesteps": [100, 300]}


def _config(out: Path, **changes) -> TrainConfig:
    """``changes`` use ``__`` for dots (``privacy_stop__every=2``)."""
    return load_config(CONFIGS / "demo-plain.yaml",
                       {**FAST, **{k.replace("__", "."): v for k, v in changes.items()}, "out": str(out)})


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = _adapter(a), _adapter(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def _record(run: Path) -> dict:
    return json.loads((run / "privacy.json").read_text())["early_stop"]


def _probe_lines(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "probe_auc" in m]


@pytest.fixture(scope="module")
def loose(tmp_path_factory) -> TrainResult:
    """Bound 1.0 (never exceeded), a check every 2 steps over 5 steps: checks at 2, 4 and the last."""
    return train(_config(tmp_path_factory.mktemp("loose") / "run", privacy_stop__every=2,
                         privacy_stop__max_advantage=1.0))


def test_loose_bound_runs_to_max_steps_records_every_check_and_leaves_training_alone(loose, tmp_path):
    record = _record(loose.run_dir)
    assert loose.steps == 5 and record["stopped_at"] is None and record["kept_step"] == 5
    assert [c[0] for c in record["checks"]] == [2, 4, 5]
    for _step, area, adv in record["checks"]:
        assert 0 <= area <= 1 and adv == pytest.approx(2 * area - 1)
    assert [(m["step"], m["probe_auc"], m["probe_advantage"]) for m in _probe_lines(loose.run_dir)] == \
        [tuple(c) for c in record["checks"]]
    assert loose.privacy["early_stop"] == record  # the result the CLI summarises says the same
    # the checks draw nothing from training's generators: the adapter is that of a run without them
    plain = train(_config(tmp_path / "plain"))
    _assert_same_adapter(loose.run_dir, plain.run_dir)
    assert "early_stop" not in plain.privacy


def test_tiny_bound_stops_at_the_first_breach_and_saves_the_start(tmp_path):
    result = train(_config(tmp_path / "run", privacy_stop__every=1, privacy_stop__max_advantage=0.0))
    record = _record(result.run_dir)
    (step, _, adv), = record["checks"]  # the first check breached: no second one
    assert adv > 0 and record["stopped_at"] == step == result.steps == 1 and record["kept_step"] == 0
    assert _probe_lines(result.run_dir)[-1]["probe_passed"] is False
    lora_b = {k: v for k, v in _adapter(result.run_dir).items() if "lora_B" in k}
    assert lora_b and all(not v.any() for v in lora_b.values())  # step 0: B is still all zero


def test_bound_between_checks_keeps_the_last_passing_step(loose, tmp_path):
    (_, _, first), (_, _, second), _ = _record(loose.run_dir)["checks"]
    assert second > first, "setup: the probe advantage must grow from step 2 to step 4 in this run"
    result = train(_config(tmp_path / "run", privacy_stop__every=2, privacy_stop__max_advantage=first))
    record = _record(result.run_dir)
    assert [c[0] for c in record["checks"]] == [2, 4]
    assert record["stopped_at"] == 4 and record["kept_step"] == 2 and result.steps == 4
    _assert_same_adapter(result.run_dir, train(_config(tmp_path / "two", optim__max_steps=2)).run_dir)


def test_probe_is_training_members_and_aux_never_evaluation_non_members(loose):
    splits = json.loads((loose.run_dir / "splits.json").read_text())
    probe = _record(loose.run_dir)["probe"]
    assert len(probe["members"]) == len(probe["aux_nonmembers"]) == 8  # min(64, 12 members, 8 aux)
    assert set(probe["members"]) <= set(splits["members"])
    assert set(probe["aux_nonmembers"]) <= set(splits["aux_nonmembers"])
    assert not set(splits["eval_nonmembers"]) & {*probe["members"], *probe["aux_nonmembers"]}


def test_dp_and_a_missing_aux_split_are_refused(tmp_path):
    with pytest.raises(UserError, match="mode dp"):
        train(_config(tmp_path / "dp", mode="dp", dp__noise_multiplier=1.0, privacy_stop__every=2))
    assert_nothing_written(tmp_path / "dp")
    with pytest.raises(UserError, match="data.aux"):
        train(_config(tmp_path / "aux", data__aux=0.0, privacy_stop__every=2))
    assert_nothing_written(tmp_path / "aux")
    out = tmp_path / "cli"
    proc = invoke_cli("train", "--config", str(CONFIGS / "demo-dp.yaml"), "--out", str(out), "-q",
                      "--set", "privacy_stop.every=50")
    assert_one_line_error(proc, "privacy_stop", "mode dp")
    assert_nothing_written(out)


def test_resume_mid_run_decides_as_the_uninterrupted_run(loose, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    real = loop._one_step

    def one_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # after the check at step 2, inside step 4 (checkpoint of step 3 on disk)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    config = _config(out, privacy_stop__every=2, privacy_stop__max_advantage=1.0)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_one_step", one_step)
        with pytest.raises(Interrupted, match="checkpoint of step 3"):
            train(config)
    resumed = train(config.model_copy(update={"resume": True}))
    assert resumed.resumed_at == 3
    ours, theirs = _record(out), _record(loose.run_dir)
    ours.pop("seconds"), theirs.pop("seconds")
    assert ours == theirs
    assert _probe_lines(out) == _probe_lines(loose.run_dir)
    _assert_same_adapter(out, loose.run_dir)


def test_resume_after_the_stop_trains_no_further(tmp_path, monkeypatch):
    """An interrupt while evaluating a stopped run: the resumed run must not train past the stop."""
    out = tmp_path / "run"
    config = _config(out, privacy_stop__every=1, privacy_stop__max_advantage=0.0)

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setitem(loop.UTILITY, "image", broken)
        with pytest.raises(Interrupted, match="--resume"):
            train(config)
    resumed = train(config.model_copy(update={"resume": True}))
    assert resumed.steps == 1 and resumed.steps_run == 0
    assert _record(out)["stopped_at"] == 1 and _record(out)["kept_step"] == 0
    assert all(not v.any() for k, v in _adapter(out).items() if "lora_B" in k)


@pytest.mark.slow  # two reference trainings and an audit: 36 s measured on the loaded 2-core machine
def test_a_stopped_run_can_be_audited_with_reference_adapters(loose, tmp_path):
    """References reuse the target's config but have no aux split: they must train without the rule."""
    from privlora.audit.runner import audit_run

    results = audit_run(loose.run_dir, attacks=("loss",), references=2, reference_dir=tmp_path / "refs")
    assert {"lira", "rmia"} <= set(results["attacks"])
    ref = load_config(tmp_path / "refs" / "ref-0" / "config.yaml")
    assert ref.privacy_stop.every is None and ref.optim.max_steps == 5


def test_the_cli_flags_reach_the_rule_and_the_summary_says_what_was_kept(tmp_path):
    out = tmp_path / "cli-stop"
    sets = [a for k, v in FAST.items() if k != "quiet" for a in ("--set", f"{k}={json.dumps(v)}")]
    proc = invoke_cli("train", "--config", str(CONFIGS / "demo-plain.yaml"), "--out", str(out), "-q", *sets,
                      "--privacy-stop-every", "1", "--max-advantage", "0")
    assert proc.returncode == 0, proc.stderr
    assert "privacy stop: the probe attack passed the bound at step 1" in proc.stdout
    assert "kept the adapter of step 0" in proc.stdout
    stop = json.loads((out / "privacy.json").read_text())["early_stop"]
    assert (stop["every"], stop["max_advantage"], stop["kept_step"]) == (1, 0.0, 0)
