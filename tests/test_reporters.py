"""``--report-to`` (TensorBoard, MLflow), plain progress lines off a terminal, the audit's progress and Flower's
logs kept quiet: the logs people look at say what metrics.jsonl says."""

from __future__ import annotations

import importlib.util
import json
import re
import time
import typing
from pathlib import Path

import pytest

from conftest import CONFIGS, assert_one_line_error, invoke_cli, run_cli

STEPS = 10
#: a tiny plain run: small splits and rank, one eval timestep, no FD, 2-step DDIM validation grids
TINY = ["--max-steps", str(STEPS), "--batch-size", "4", "--rank", "4", "--set", "lora.alpha=4",
        "--set", "data.members=0.12", "--set", "data.aux=0.08", "--set", "data.eval=0.08",
        "--set", "eval.timesteps=[200]", "--set", "eval.samples=0", "--set", "eval.sample_steps=2",
        "--set", "log_every=1"]
LINE = re.compile(r"^train plain: (\d+)/10 \((\d+)%\) \d\d:\d\d:\d\d  loss [0-9.e-]+$")


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory) -> tuple[Path, str]:
    """``privlora train --report-to tensorboard`` with a validation prompt, stdout piped and no -q."""
    out = tmp_path_factory.mktemp("report") / "run"
    proc = run_cli("train", "--config", str(CONFIGS / "demo-plain.yaml"), "--out", str(out), *TINY,
                   "--report-to", "tensorboard", "--validation-prompt", "a face", "--validation-steps", "5",
                   "--num-validation-images", "1")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return out, proc.stdout


def test_tensorboard_event_files_written(tb_run):
    """Event files in the final run directory (none left in .partial) that TensorBoard reads back as the very
    scalars of metrics.jsonl, step by step."""
    run, _ = tb_run
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert not run.with_name(run.name + ".partial").exists()
    rows = _rows(run)
    events = _events(run)
    for key in ("loss", "lr"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in logged] == [r["step"] for r in rows] == list(range(1, STEPS + 1))
        assert [v for _, v in logged] == pytest.approx([r[key] for r in rows], rel=1e-6)  # stored as float32


def test_validation_grids_reach_tensorboard(tb_run):
    """The embedded base is unconditional: the prompt is ignored but the grids are still sampled, and each one
    written to validation/ is in TensorBoard at its step, as the same picture."""
    import io

    import numpy as np
    from PIL import Image

    run, _ = tb_run
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["step-10.png", "step-5.png"]
    images = _events(run).Images("validation")
    assert [i.step for i in images] == [5, 10]
    logged = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    written = np.asarray(Image.open(run / "validation" / "step-10.png").convert("RGB"))
    assert np.array_equal(logged, written)


def test_progress_lines_when_stdout_is_not_a_terminal(tb_run):
    """Piped stdout: one plain line per tenth of the run (here every step), each with the loss, ending at 100%."""
    _, stdout = tb_run
    lines = [line for line in stdout.splitlines() if line.startswith("train plain:")]
    assert lines, stdout
    assert all(LINE.match(line) for line in lines), lines
    done = [int(LINE.match(line).group(1)) for line in lines]
    assert done == list(range(1, STEPS + 1)), lines
    assert lines[-1].startswith(f"train plain: {STEPS}/{STEPS} (100%)")


def test_progress_lines_also_come_by_time(monkeypatch, capsys):
    """A slow job whose tenth takes long still prints: a line once LINE_SECONDS passed, none before."""
    from privlora import progress

    monkeypatch.setattr(progress, "LINE_SECONDS", 0.2)
    with progress.progress_bar("slow", total=1000) as bar:
        bar.advance()  # 0.1 %: not a tenth, and no time has passed
        time.sleep(0.25)
        bar.advance(loss=0.5)  # 0.2 %, but 0.25 s later
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("slow: 2/1000 (0%) ") and lines[0].endswith("loss 0.5"), lines
    with progress.progress_bar("quiet", total=10, quiet=True) as bar:
        bar.advance(10)
    assert capsys.readouterr().out == ""


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint(tmp_path):
    """A resume from step 2 appends a new event file; TensorBoard then shows steps 1–2 of the first process
    and 3… of the resumed one, not both processes' step 3 (as metrics.jsonl is truncated to the checkpoint)."""
    from privlora.train.reporters import open_reporter

    first = open_reporter("tensorboard", tmp_path, tmp_path)
    for step in (1, 2, 3):
        first.log(step, {"step": step, "loss": 10.0 + step, "note": "not a scalar", "passed": True})
    first.close()
    time.sleep(1.1)  # event file names carry the second they were opened in
    resumed = open_reporter("tensorboard", tmp_path, tmp_path, resumed_at=2)
    for step in (3, 4):
        resumed.log(step, {"loss": 20.0 + step})
    resumed.close()
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    loss = [(e.step, e.value) for e in _events(tmp_path).Scalars("loss")]
    assert loss == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
    assert [e.value for e in _events(tmp_path).Scalars("passed")] == [1.0, 1.0]  # only the purged file had it


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed here")
def test_report_to_mlflow_without_mlflow_is_one_line(tmp_path):
    out = tmp_path / "run"
    proc = invoke_cli("train", "--config", str(CONFIGS / "demo-plain.yaml"), "--out", str(out), *TINY, "-q",
                      "--report-to", "mlflow")
    assert_one_line_error(proc, "mlflow", "pip install 'privlora[mlflow]'")
    assert not out.exists() and not out.with_name("run.partial").exists()  # refused before any work


def test_mlflow_run_survives_resume_and_rename(tmp_path):
    """Where mlflow is installed (the optional extra): one MLflow run across a resume, its artifacts found
    after ``<out>.partial`` is renamed to ``<out>`` (MLflow records absolute paths)."""
    pytest.importorskip("mlflow")
    import numpy as np
    from mlflow.tracking import MlflowClient

    from privlora.train.reporters import open_reporter

    run, out = tmp_path / "x.partial", tmp_path / "x"
    run.mkdir()
    first = open_reporter("mlflow", run, out)
    first.log(1, {"step": 1, "loss": 1.0})
    first.image(1, "validation", np.zeros((4, 4, 3)))
    first.close()
    resumed = open_reporter("mlflow", run, out, resumed_at=1)
    resumed.log(2, {"loss": 2.0})
    resumed.image(2, "validation", np.ones((4, 4)))
    resumed.close()
    run.rename(out)
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("privlora").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "loss")] == [(1, 1.0), (2, 2.0)]
    assert [f.path for f in client.list_artifacts(found.info.run_id, "validation")] == [
        "validation/step-1.png", "validation/step-2.png"]


def test_report_to_choices_are_the_config_and_the_registry():
    from privlora.cli.choices import REPORTERS
    from privlora.config import TrainConfig
    from privlora.train import reporters

    assert set(REPORTERS) == set(reporters.REPORTERS) == set(
        typing.get_args(TrainConfig.model_fields["report_to"].annotation))
    assert_one_line_error(invoke_cli("train", "--report-to", "wandb"), "wandb")


def test_audit_prints_progress_when_piped(tb_run):
    """The membership audit (a minute on a real run) says how far it is: lines counting the samples scored."""
    run, _ = tb_run
    proc = run_cli("audit", str(run), "--attacks", "loss")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(f"audit {run.name}:")]
    assert lines and lines[-1].split()[3] == "(100%)", proc.stdout
    done, total = (int(x) for x in lines[-1].split()[2].split("/"))
    splits = json.loads((run / "splits.json").read_text())
    assert done == total == 2 * (len(splits["members"]) + len(splits["eval_nonmembers"]))  # adapter and base control


@pytest.mark.slow
def test_federate_keeps_flower_quiet_unless_verbose(tmp_path):
    """``federate --dp`` printed ~25 Flower INFO/DEBUG lines; without -v none, with -v its INFO lines."""
    args = ["federate", "--clients", "2", "--rounds", "1", "--dp", "gaussian", "--noise-multiplier", "1.0",
            "--clip", "0.5", "--set", "data.limit=120", "--set", "client.local_steps=2",
            "--set", "client.batch_size=8"]
    quiet = run_cli(*args, "--out", str(tmp_path / "quiet"), timeout=600)
    assert quiet.returncode == 0, quiet.stderr
    assert not re.search(r"INFO|DEBUG", quiet.stdout + quiet.stderr), quiet.stdout + quiet.stderr
    loud = run_cli(*args, "--out", str(tmp_path / "loud"), "-v", timeout=600)
    assert loud.returncode == 0, loud.stderr
    assert "INFO" in loud.stdout + loud.stderr
