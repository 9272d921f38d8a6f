"""The audit report: two real runs audited together, with extraction; self-contained HTML; Chromium renders it."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CONFIGS, FAST, assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    for name, mode in (("plain", "plain"), ("smp", "smp")):
        proc = run_cli("train", "--config", str(CONFIGS / f"demo-{mode}.yaml"), "--max-steps", "3",
                       "--batch-size", "4", "--out", str(root / name), *FAST)
        assert proc.returncode == 0, proc.stderr
    proc = run_cli("audit", "--run", str(root / "plain"), "--run", str(root / "smp"), "--attacks", "loss,pia",
                   "--extraction", "8", "-q", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "held-out loss" in proc.stdout and "smp" in proc.stdout  # the terminal table
    return root


def _images(doc: str) -> list[str]:
    return re.findall(r"<img [^>]*src='([^']*)'", doc)


def test_report_is_self_contained_and_shows_every_part(session):
    doc = (session / "report.html").read_text()
    sources = _images(doc)
    # ROC per run, frontier (2 runs), spectrum, an extraction gallery per run
    assert len(sources) == 2 + 1 + 1 + 2, len(sources)
    for src in sources:
        assert src.startswith("data:image/png;base64,")  # nothing fetched from disk or network
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert np.asarray(image.convert("L")).std() > 1  # not a blank canvas
    for needle in ("Privacy–utility frontier", "LoRA spectrum", "Extraction", "Latent probe", "ε = ∞"):
        assert needle in doc, needle
    assert not re.search(r"(src|href)=['\"](https?:|file:|/)", doc)


def test_extraction_json_has_adapter_and_base_control(session):
    for name in ("plain", "smp"):
        e = json.loads((session / name / "audit" / "extraction.json").read_text())
        assert e["generated"] == 8 and 0 <= e["extracted"] <= 8 and 0 <= e["base_extracted"] <= 8
        assert set(e["latent_probe"]) >= {"adapter", "base_control"}
        assert 0 <= e["latent_probe"]["adapter"]["auc"] <= 1
        assert (session / name / "audit" / "extraction_gallery.png").is_file()
        results = json.loads((session / name / "audit" / "results.json").read_text())
        assert results["extraction"]["extracted"] == e["extracted"]


def test_session_refuses_before_any_work(session, tmp_path):
    proc = run_cli("audit", "--run", str(session / "plain"), "--run", str(tmp_path / "nope"))
    assert_one_line_error(proc, "does not exist")
    proc = run_cli("audit", "--run", str(session / "plain"), "--run", str(session / "plain"))
    assert_one_line_error(proc, "twice")
    proc = run_cli("audit", "--run", str(session / "plain"), "--fpr", "0.001")
    assert_one_line_error(proc, "non-members")  # 36 non-members cannot measure TPR at 0.1% FPR


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("Chromium is missing: `make test-slow` installs Debian's chromium package")
    return found


@pytest.mark.slow
def test_report_renders_in_headless_chromium(session, tmp_path):
    """Open the report in a real browser: every embedded plot decodes and has a size on the page."""
    doc = (session / "report.html").read_text()
    probe = doc.replace("</body>", """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0);
  document.body.setAttribute('data-rendered', ok.length + '/' + imgs.length);
});
</script></body>""")
    page = tmp_path / "probe.html"
    page.write_text(probe)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--virtual-time-budget=10000"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    match = re.search(r'data-rendered="(\d+)/(\d+)"', dom.stdout)
    assert match, dom.stderr[-2000:]
    rendered, total = map(int, match.groups())
    assert total == len(_images(doc)) and rendered == total
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), *flags, "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10  # text, tables and plots, not an empty page


def test_pareto_front_keeps_only_undominated_runs():
    from privlora.audit.report import pareto_front

    points = [(0.07, 0.9), (0.06, 0.95), (0.08, 0.6), (0.09, 0.7), (0.065, 0.92)]
    assert pareto_front(points) == [(0.06, 0.95), (0.065, 0.92), (0.07, 0.9), (0.08, 0.6)]


def test_sweep_audits_every_run_in_a_folder(session, tmp_path):
    assert_one_line_error(run_cli("audit", "--sweep", str(tmp_path / "none")), "does not exist")
    assert_one_line_error(run_cli("audit", "--sweep", str(tmp_path)), "no run directories")
    assert_one_line_error(run_cli("audit"), "nothing to audit")
    report = tmp_path / "sweep.html"
    proc = run_cli("audit", "--sweep", str(session), "--attacks", "loss", "--report", str(report), "-q")
    assert proc.returncode == 0, proc.stderr
    doc = report.read_text()
    assert "plain (plain)" in doc and "smp (smp)" in doc and "Privacy–utility frontier" in doc
