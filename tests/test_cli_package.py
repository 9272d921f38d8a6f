"""The ``privlora.cli`` package itself: version, ``-h``, choices in the help, RUN as an argument with the old
``--run`` kept, one-line usage errors, and modules small enough to read."""

from __future__ import annotations

import importlib
import typing
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import assert_one_line_error, invoke_cli, run_cli

CLI_DIR = Path(__file__).resolve().parents[1] / "src" / "privlora" / "cli"
WIDE = {"COLUMNS": "200"}  # rich wraps the option table to the terminal; keep each option on one line


def test_version_is_the_installed_distributions():
    for flag in ("--version", "-V"):
        shown = invoke_cli(flag)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout == f"privlora {version('privlora')}\n"
    real = run_cli("--version")  # the console entry point, not only the app object
    assert (real.returncode, real.stdout.strip()) == (0, f"privlora {version('privlora')}")


@pytest.mark.parametrize("command", [[], ["audit"], ["registry", "dataset", "push"]])
def test_short_help_is_the_long_help(command):
    short, long = invoke_cli(*command, "-h", env=WIDE), invoke_cli(*command, "--help", env=WIDE)
    assert short.returncode == long.returncode == 0, short.stderr
    assert short.stdout == long.stdout and "Usage: " in short.stdout


def _option_line(help_text: str, option: str) -> str:
    return next(line for line in help_text.splitlines() if f" {option} " in line)


@pytest.mark.parametrize(("command", "option", "metavar"), [
    (["train"], "--mode", "[plain|dp|mp|smp]"),
    (["train"], "--task", "[image|text|causal-lm]"),
    (["federate"], "--strategy", "[ffa|fedit|flora]"),
    (["unlearn"], "--method", "[target|neggrad+|salun|retrain]"),
    (["audit"], "--dp-canary-kind", "[noise|blocks|coarse|gradient]"),
])
def test_choice_options_list_their_choices(command, option, metavar):
    shown = invoke_cli(*command, "--help", env=WIDE)
    assert shown.returncode == 0, shown.stderr
    line = _option_line(shown.stdout, option)
    assert metavar in line and "TEXT" not in line, line


def test_a_value_outside_the_choices_is_one_line():
    assert_one_line_error(invoke_cli("unlearn", "runs/x", "--out", "o", "--method", "forget-it"), "--method",
                          "target")
    assert_one_line_error(invoke_cli("train", "--no-such-flag"), "--no-such-flag")


def test_bare_command_still_prints_help():
    shown = invoke_cli()
    assert "Usage: " in shown.stdout + shown.stderr and "error:" not in shown.stderr


def test_run_is_an_argument_and_run_stays_an_alias(tmp_path):
    missing = tmp_path / "no-run-here"
    positional = invoke_cli("audit", str(missing))
    alias = invoke_cli("audit", "--run", str(missing))
    assert_one_line_error(positional, "does not exist", str(missing))
    assert_one_line_error(alias, "does not exist", str(missing))
    assert positional.stderr == alias.stderr
    assert_one_line_error(invoke_cli("audit", str(missing), "--run", str(missing)), "not both")
    assert_one_line_error(invoke_cli("audit"), "nothing to audit")
    assert "--run" not in invoke_cli("audit", "--help", env=WIDE).stdout  # hidden: RUN is the documented way


def test_one_run_commands_refuse_both_and_neither(tmp_path):
    detect = ("canary", "detect", "--key", "1", "--manifest", str(tmp_path / "canary.json"))
    assert_one_line_error(invoke_cli(*detect), "privlora canary detect RUN")
    assert_one_line_error(invoke_cli(*detect, str(tmp_path), "--run", str(tmp_path)), "not both")
    assert_one_line_error(invoke_cli("split", "predict", "--server", "http://127.0.0.1:9"),
                          "privlora split predict RUN")


def test_every_cli_module_stays_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in CLI_DIR.glob("*.py")}
    assert {"__init__.py", "common.py", "train.py", "audit.py"} <= set(sizes)
    assert all(n <= 400 for n in sizes.values()), sizes


def _literal(model: str, path: str) -> tuple[str, ...]:
    cls = getattr(importlib.import_module("privlora.config"), model)
    *parents, leaf = path.split(".")
    for name in parents:
        cls = cls.model_fields[name].annotation
    return typing.get_args(cls.model_fields[leaf].annotation)


@pytest.mark.parametrize(("name", "truth"), [
    ("MODES", lambda: _literal("TrainConfig", "mode")),
    ("TASKS", lambda: _literal("TrainConfig", "task")),
    ("LR_SCHEDULERS", lambda: _literal("TrainConfig", "optim.lr_scheduler")),
    ("PRECISIONS", lambda: _literal("TrainConfig", "optim.mixed_precision")),
    ("DP_CLIPPINGS", lambda: _literal("TrainConfig", "dp.clipping")),
    ("DP_CLIPPINGS", lambda: importlib.import_module("privlora.train.dp_clipping").CLIPPING),
    ("STRATEGIES", lambda: _literal("FederatedConfig", "strategy")),
    ("FED_DP", lambda: _literal("FederatedConfig", "dp.mechanism")),
    ("COMPRESSIONS", lambda: _literal("FederatedConfig", "compression")),
    ("PRIVATIZERS", lambda: _literal("SplitConfig", "privatizer.name")),
    ("BOTTOMS", lambda: _literal("SplitConfig", "bottom")),
    ("ROLES", lambda: importlib.import_module("privlora.registry.access").ROLES),
    ("TEE_KEYS", lambda: importlib.import_module("privlora.tee.manifest").KEY_SOURCES),
    ("REDACTIONS", lambda: importlib.import_module("privlora.data.sanitize.redact").REDACTORS),
    ("PII_OPERATORS", lambda: importlib.import_module("privlora.data.sanitize.pii").OPERATORS),
    ("ATTACKS", lambda: importlib.import_module("privlora.audit.attacks").ATTACKS),
    ("UNLEARN_METHODS", lambda: importlib.import_module("privlora.unlearn.methods").METHODS),
    ("LOG_LEVELS", lambda: importlib.import_module("uvicorn.config").LOG_LEVELS),
    ("DP_AUDIT_KINDS", lambda: importlib.import_module("privlora.audit.dp_audit_kinds").DP_AUDIT_KINDS),
    ("SPLITS", lambda: importlib.import_module("privlora.data.split_presets").SPLIT_PRESETS),
])
def test_written_out_choices_match_the_library(name, truth):
    """The CLI spells its choice sets out (listing them must not import torch); they are the library's."""
    from privlora.cli import choices

    assert set(getattr(choices, name)) == set(truth())
