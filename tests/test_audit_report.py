"""The audit report: two real runs audited together, with extraction; self-contained HTML; Chromium renders it."""

from __future__ import annotations

import base64
import hashlib
import html
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
    assert len(re.findall(r"class=\"verdict (pass|fail)\" data-verdict", doc)) == 2  # at a glance, per run
    for name in ("plain", "smp"):
        results = json.loads((session / name / "audit" / "results.json").read_text())
        prov = results["provenance"]
        sha = hashlib.sha256((session / name / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert prov["adapter_sha256"] == sha and f"{sha} — matches the audited adapter" in doc
        assert prov["argv"][1:3] == ["audit", "--run"] and prov["date"].endswith("+00:00")


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
  const verdicts = [...document.querySelectorAll('.card .verdict')].filter(v => {
    const box = v.getBoundingClientRect(), style = getComputedStyle(v);
    return box.width > 0 && box.height > 0 && style.visibility === 'visible' && /^(PASS|FAIL) — /.test(v.innerText);
  });
  document.body.setAttribute('data-verdicts', verdicts.length + '/' + document.querySelectorAll('.card').length);
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
    match = re.search(r'data-verdicts="(\d+)/(\d+)"', dom.stdout)
    assert match and match.group(1) == match.group(2) == "2", match  # one visible PASS/FAIL per run card
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


# --- verdict and provenance on hand-built audits (no training: fast) ---------------------------------
def _hand_run(root: Path, name: str, *, leak: float, nonmembers: int = 200) -> dict:
    """A run directory as ``privlora audit`` leaves it: adapter weights, config, scores.csv, results.json.
    ``leak`` shifts the members' adapter scores (0: the adapter scores like the base model)."""
    from privlora.audit.metrics import summarize

    run = root / name
    (run / "adapter").mkdir(parents=True)
    (run / "audit").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(name.encode() * 1000)
    (run / "config.yaml").write_text(f"mode: plain  # {name} <script>alert(1)</script>\n")
    rng = np.random.default_rng(len(name))
    labels = np.r_[np.ones(200, int), np.zeros(nonmembers, int)]
    base = rng.normal(size=labels.size)
    adapter = base + leak * labels + rng.normal(scale=0.1, size=labels.size)
    with (run / "audit" / "scores.csv").open("w") as f:
        f.write("id,member,loss,loss_base\n")
        for i, (m, a, b) in enumerate(zip(labels, adapter, base, strict=True)):
            f.write(f"i{i},{m},{float(a)!r},{float(b)!r}\n")
    results = {"run": str(run), "mode": "plain", "members": 200, "nonmembers": nonmembers, "epsilon": None,
               "delta": None, "utility": {}, "references": None,
               "attacks": {"loss": {"adapter": summarize(adapter, labels), "base_control": summarize(base, labels)}}}
    (run / "audit" / "results.json").write_text(json.dumps(results))
    return results


def test_verdict_passes_a_control_like_audit_and_fails_a_leaking_one(tmp_path):
    from privlora.audit.report import verdict, write_report
    from privlora.registry.policy import ExportPolicy

    quiet, leaky = _hand_run(tmp_path, "quiet", leak=0.0), _hand_run(tmp_path, "leaky", leak=1.5, nonmembers=1000)
    ok, bad = verdict(quiet), verdict(leaky)
    assert ok.passed and ok.line.startswith("PASS — strongest attack loss: AUC ") and "≤ +0.05" in ok.line
    assert not bad.passed and bad.line.startswith("FAIL — strongest attack loss: AUC ") and "> +0.05" in bad.line
    assert "TPR@0.1%FPR" in bad.line and "TPR@1%FPR" in ok.line  # the lowest FPR the non-members resolve
    assert not verdict(quiet, ExportPolicy(max_auc=0.4)).passed  # the registry's rule, whichever bound it has
    assert "ε 12 (as the run's privacy.json records it) > policy 10" in verdict({**quiet, "epsilon": 12.0}).line
    assert "TPR at low FPR n/a" in verdict(_hand_run(tmp_path, "small", leak=0.0, nonmembers=50)).line
    doc = write_report([quiet, leaky], tmp_path / "report.html").read_text()
    assert f'data-verdict="pass">quiet (plain): {html.escape(ok.line)}<' in doc
    assert f'data-verdict="fail">leaky (plain): {html.escape(bad.line)}<' in doc
    assert "&lt;script&gt;alert(1)" in doc and "<script>" not in doc  # config shown, autoescaped
    assert "<details><summary>config.yaml" in doc


def test_report_shows_the_adapters_sha256_and_notices_a_changed_adapter(tmp_path):
    from privlora.audit.provenance import provenance
    from privlora.audit.report import write_report

    results = _hand_run(tmp_path, "run", leak=0.0)
    weights = tmp_path / "run" / "adapter" / "adapter_model.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    doc = write_report([results], tmp_path / "a.html").read_text()
    assert f"{sha} — not recorded at audit time" in doc and "command line</dt><dd>not recorded" in doc
    results["provenance"] = {**provenance(tmp_path / "run"), "argv": ["privlora", "audit", "--run", "x y"]}
    assert results["provenance"]["adapter_sha256"] == sha
    doc = write_report([results], tmp_path / "b.html").read_text()
    assert f"{sha} — matches the audited adapter" in doc and "privlora audit --run &#39;x y&#39;" in doc
    weights.write_bytes(b"tampered")
    doc = write_report([results], tmp_path / "c.html").read_text()
    assert f"DIFFERS from the audited adapter ({sha})" in doc
    assert hashlib.sha256(b"tampered").hexdigest() in doc


def test_small_sample_grids_are_enlarged_by_whole_pixels(tmp_path):
    from privlora.audit.report import MIN_IMAGE_PX, write_report

    results = _hand_run(tmp_path, "run", leak=0.0)
    Image.fromarray(np.arange(64 * 96, dtype=np.uint8).reshape(64, 96)).save(tmp_path / "run" / "samples.png")
    doc = write_report([results], tmp_path / "r.html").read_text()
    width = int(re.search(r"<img class=\"pixels\" alt='samples' width=\"(\d+)\"", doc).group(1))
    assert width == 96 * 3 and width >= MIN_IMAGE_PX and "image-rendering:pixelated" in doc
