"""The privacy–utility sweep: rows, files, drops against the no-noise row, resume after an interruption."""

from __future__ import annotations

import json

from conftest import assert_one_line_error, run_cli
from privlora.split.sweep import SweepPoint, SweepSettings, _key, markdown, run_sweep

TINY = dict(depths=(0,), etas=(8.0,), privatizers=("dchi", "cti"), limit=80, steps=2, batch_size=8,
            attack_texts=6, aia_texts=60, cti_top_ks=(5,), cti_min_count=2)


def test_tiny_sweep_writes_the_table_and_resumes(tmp_path):
    settings = SweepSettings(**TINY)
    out = tmp_path / "sweep"
    # a journal left by an interrupted run of the same settings: its point is not measured again
    journal = tmp_path / ".sweep.partial.jsonl"
    planted = {"depth": 0, "privatizer": "dchi", "eta": 8.0, "bottom": "frozen", "label": "SAP η=8",
               "accuracy": 0.123, "loss": 1.0, "train_seconds": 0.0, "noise_norm": 48.0, "eia": "nearest",
               "eia_recovery": 0.5, "eia_privacy": 0.5, "seconds": 0.0}
    other = dict(planted, accuracy=0.999)
    journal.write_text(json.dumps({"settings": json.loads(json.dumps(_key(settings))), "row": planted}) + "\n"
                       + json.dumps({"settings": {"steps": 999}, "row": other}) + "\n" + '{"cut')
    rows = run_sweep(settings, out, quiet=True)
    assert [(r["privatizer"], r["eta"]) for r in rows] == [("none", None), ("dchi", 8.0), ("cti", 8.0)]
    assert rows[1]["accuracy"] == 0.123  # resumed, not re-measured; the foreign-settings row ignored
    assert not journal.exists()
    none = rows[0]
    assert none["eia_recovery"] == 1.0 and none["eia_privacy"] == 0.0  # depth 0, no noise: all tokens back
    for r in rows:
        assert r["accuracy_drop"] == round(100 * (none["accuracy"] - r["accuracy"]), 2)
    for r in (rows[0], rows[2]):  # measured here (rows[1] came from the journal)
        assert 0 <= r["aia_success"] <= 1 and 0 < r["aia_chance"] < 1
        assert abs(r["aia_privacy"] - (1 - r["aia_success"])) < 1e-9
    assert rows[2]["cti_tokens"] == 5
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["rows"] == rows and saved["settings"]["steps"] == 2
    table = (out / "sweep.md").read_text()
    assert table == markdown(rows) and table.count("\n") == 2 + len(rows)
    assert (out / "sweep.png").stat().st_size > 10_000


def test_points_skip_trainable_at_depth_zero():
    points = SweepSettings(depths=(0, 1), etas=(8.0,), privatizers=("cti",), bottoms=("frozen", "trainable"),
                           cti_top_ks=(50,)).points()
    assert SweepPoint(0, "none", None, "trainable") not in points
    assert SweepPoint(1, "cti", 8.0, "trainable", 50) in points and len(points) == 6


def test_sweep_cli_bad_values(tmp_path):
    assert_one_line_error(run_cli("split", "sweep", "--etas", "a,b", "--out", str(tmp_path / "s")), "comma-separated")
    assert_one_line_error(run_cli("split", "sweep", "--privatizers", "laplace", "--out", str(tmp_path / "s")),
                          "laplace")
    assert_one_line_error(run_cli("split", "sweep", "--depths", "0", "--bottoms", "trainable",
                                  "--out", str(tmp_path / "s")), "no point")
    assert not (tmp_path / "s").exists()
