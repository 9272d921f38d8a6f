"""What ``privlora train`` reads, as host paths: the interpreter, its standard library, the installed
distributions a training run imports (and what they require), privlora itself.

Everything here becomes an ``sgx.trusted_files`` entry: ``gramine-sgx-sign`` hashes each file into the
signed manifest and the enclave refuses any file whose hash differs, so the host cannot swap code or
weights. Entries are whole top-level folders of site-packages (``torch/``, ``numpy.libs/``): packages import
their own submodules and data files lazily, and a missing file inside an enclave is an ``EACCES`` at some
late point of training, not an import error at startup.

The distribution set is computed from installed metadata (``Requires-Dist``, markers evaluated, extras not
followed), starting from :data:`TRAIN_DISTRIBUTIONS` — not from privlora's whole dependency list, which also
pulls Flower/Ray, spaCy and the registry server that a training run never imports — and joined with what
training really imports: :func:`imported_tops` imports :data:`TRAIN_MODULES` in a fresh interpreter and
reads back every module file and mapped shared library. Metadata alone is not enough: transformers imports
psutil without declaring it (it was trusted only because accelerate happens to require it), and any such
undeclared import is a file the strict policy would refuse inside the enclave.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from privlora.errors import UserError

#: distributions ``privlora train`` imports on every path (CLI, config, Task, loop, DP, utility metrics)
TRAIN_DISTRIBUTIONS = ("torch", "numpy", "diffusers", "transformers", "peft", "opacus", "accelerate",
                       "safetensors", "pydantic", "pyyaml", "typer", "rich", "pillow", "scipy")

#: privlora modules whose imports are the training run's: the CLI, the loop and everything it loads lazily
#: (tasks of every base, DP, objectives, utility metrics, checkpoints, built-in data)
TRAIN_MODULES = ("privlora.cli", "privlora.train.loop", "privlora.train.dp", "privlora.train.objectives",
                 "privlora.train.data", "privlora.train.utility", "privlora.train.text_utility",
                 "privlora.train.checkpoint", "privlora.train.accounting", "privlora.tasks.loading",
                 "privlora.tasks.unet", "privlora.tasks.sd", "privlora.tasks.text", "privlora.tasks.embedded",
                 "privlora.data.demo", "privlora.data.folder", "privlora.data.text", "privlora.data.splits",
                 # torch loads dynamo/inductor lazily on the first functorch (Opacus) call, and they import
                 # whatever optional packages happen to be installed (colorama, pulled by mkdocs-material, was
                 # one): importing them here puts those files in the manifest as well
                 "torch._dynamo", "torch._inductor.utils")

#: run in a fresh interpreter by :func:`imported_files`: import the modules named in argv, print as JSON every
#: module file and every file mapped into the process (extension modules' shared libraries and theirs)
_IMPORT_PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
files = {getattr(m, '__file__', None) for m in list(sys.modules.values())}
with open('/proc/self/maps') as maps:
    files |= {p[5].strip() for p in (line.split(None, 5) for line in maps) if len(p) == 6 and p[5].startswith('/')}
print(json.dumps(sorted(f for f in files if f)))
"""

#: standard-library folders a training run never needs (tests, IDLE, Tk, static libpython for embedding)
STDLIB_SKIP = ("site-packages", "dist-packages", "test", "idlelib", "turtledemo", "tkinter", "ensurepip",
               "lib2to3", "__phello__")


@dataclass(frozen=True)
class Interpreter:
    """The running Python as host paths (the one that runs ``privlora train`` inside the enclave)."""

    executable: Path  # as invoked (a venv's bin/python, possibly a symlink): argv[0] and libos.entrypoint
    binary: Path  # the real ELF file behind the symlinks
    prefix: Path  # sys.prefix (the venv)
    base_prefix: Path  # the installation the venv was made from
    libdir: Path | None  # where libpython lives (shared builds)
    entries: tuple[Path, ...]  # files and folders to trust


def interpreter() -> Interpreter:
    exe = Path(sys.executable)
    if not exe.is_absolute() or not exe.exists():
        raise UserError(f"cannot locate the Python interpreter ({sys.executable!r}); run privlora from an "
                        "installed interpreter or virtual environment")
    entries: list[Path] = [exe, exe.resolve()]
    prefix, base = Path(sys.prefix), Path(sys.base_prefix)
    if (prefix / "pyvenv.cfg").is_file():  # CPython finds the venv (and its site-packages) through this
        entries.append(prefix / "pyvenv.cfg")
    libdir: Path | None = None
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir = Path(sysconfig.get_config_var("LIBDIR"))
        soname = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
        if soname and (libdir / soname).exists():
            entries.append(libdir / soname)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for child in sorted(stdlib.iterdir()):
        if child.name in STDLIB_SKIP or child.name.startswith("config-"):
            continue
        entries.append(child)
    platstdlib = Path(sysconfig.get_path("platstdlib", vars={"platbase": sys.base_exec_prefix,
                                                            "base": sys.base_prefix}))
    dynload = platstdlib / "lib-dynload"
    if dynload.is_dir() and not dynload.is_relative_to(stdlib):
        entries.append(dynload)
    zipped = stdlib.parent / f"python{sys.version_info[0]}{sys.version_info[1]}.zip"
    if zipped.is_file():
        entries.append(zipped)
    return Interpreter(exe, exe.resolve(), prefix, base, libdir, tuple(entries))


def _requirement_names(dist: metadata.Distribution) -> list[str]:
    """``Requires-Dist`` names whose markers hold here, extras not followed."""
    from packaging.requirements import InvalidRequirement, Requirement

    names = []
    for text in dist.requires or ():
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        names.append(req.name)
    return names


def _canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def probe_env(pythonpath: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment the manifest's probes run Python in: the enclave's, as far as imports go. Gramine
    passes nothing from the host, so a host ``PYTHONPATH`` (Flower's Ray backend sets one to its whole
    ``sys.path``, Ray's vendored psutil and colorama first) and the user site must not decide which copy
    of a package is trusted; ``pythonpath`` names extra import folders explicitly."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONWARNINGS": "ignore",
                "PYTHONNOUSERSITE": "1"})
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    return env


@functools.lru_cache(maxsize=8)
def startup_path(pythonpath: tuple[str, ...] = ()) -> tuple[str, ...]:
    """``sys.path`` of a fresh interpreter in :func:`probe_env`: where the enclave's Python finds
    distributions. This process's own path may have grown since it started (importing Ray puts its vendored
    copies first), and resolving a name there would trust a copy training never loads."""
    proc = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path))"],
                          capture_output=True, text=True, timeout=120, env=probe_env(pythonpath))
    if proc.returncode != 0:
        raise UserError(f"cannot start {sys.executable} to read its import path: "
                        f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return tuple(p for p in json.loads(proc.stdout) if p)


def installed(name: str | None = None, pythonpath: tuple[str, ...] = ()) -> list[metadata.Distribution]:
    """Installed distributions (``name``'s only, first on the path first) as a fresh interpreter sees them."""
    path = list(startup_path(pythonpath))
    return list(metadata.distributions(path=path) if name is None else metadata.distributions(name=name, path=path))


def distribution_closure(roots: Iterable[str], pythonpath: tuple[str, ...] = ()) -> list[metadata.Distribution]:
    """The installed distributions ``roots`` need, transitively. A root that is not installed is a user
    error (privlora would fail to import it); a missing optional transitive requirement is skipped."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [(name, True) for name in roots]
    while todo:
        name, required = todo.pop()
        key = _canonical(name)
        if key in seen:
            continue
        found = installed(name, pythonpath)
        if not found:
            if required:
                raise UserError(f"package {name!r} is not installed in {sys.prefix}; install privlora's "
                                "dependencies there (pip install -e .) before generating the manifest")
            continue
        dist = found[0]
        seen[key] = dist
        todo.extend((req, False) for req in _requirement_names(dist))
    return [seen[k] for k in sorted(seen)]


def _site_dir(dist: metadata.Distribution) -> Path:
    return Path(str(dist.locate_file(""))).resolve()


def _record_tops(dist: metadata.Distribution) -> set[str]:
    """First path components of the files a distribution installed (RECORD, read as text: building
    ``dist.files`` makes ~100k PackagePath objects for this venv and takes seconds)."""
    text = dist.read_text("RECORD")
    if text is None:  # egg-info or a hand-made install: fall back to the generic listing
        return {Path(str(f)).parts[0] for f in dist.files or () if Path(str(f)).parts}
    tops = set()
    for line in text.splitlines():
        path = line.rsplit(",", 2)[0].strip('"') if line.count(",") >= 2 else line
        if path:
            tops.add(path.split("/", 1)[0])
    return tops


def top_level_entries(dist: metadata.Distribution) -> list[Path]:
    """The top-level files and folders a distribution installed into its site-packages (from RECORD):
    ``torch/``, ``torchgen/``, ``numpy.libs/``, ``typing_extensions.py``, its ``.dist-info``, …"""
    site = _site_dir(dist)
    # ".." entries are scripts in bin/ and data files outside site-packages
    return sorted(site / top for top in _record_tops(dist) if top not in ("", "..") and (site / top).exists())


def site_entries(dists: Iterable[metadata.Distribution], pythonpath: tuple[str, ...] = ()) -> list[Path]:
    """Trusted entries in site-packages for ``dists``, plus what Python itself reads there at startup
    and while importing: every ``.pth`` file (``site`` executes them), the distributions that own them
    (``distutils-precedence.pth`` imports setuptools' ``_distutils_hack``) and every ``.dist-info``
    folder — transformers and diffusers probe optional packages with ``importlib.metadata``, which opens
    the METADATA of whatever is installed, and an untrusted file there fails with ``EACCES`` rather than
    "not installed"."""
    dists = list(dists)
    entries: set[Path] = set()
    sites = {_site_dir(d) for d in dists}
    for dist in dists:
        entries.update(top_level_entries(dist))
    pth_owners: list[metadata.Distribution] = []
    for site in sorted(sites):
        for child in site.iterdir():
            if child.suffix == ".pth" or child.name.endswith((".dist-info", ".egg-info")):
                entries.add(child)
    pths = {p for p in entries if p.suffix == ".pth"}
    for dist in installed(pythonpath=pythonpath):
        site = _site_dir(dist)
        if any((site / top) in pths for top in _record_tops(dist) if top.endswith(".pth")):
            pth_owners.append(dist)
    for dist in pth_owners:
        entries.update(top_level_entries(dist))
    return sorted(entries)


@functools.lru_cache(maxsize=8)
def imported_files(modules: tuple[str, ...], pythonpath: tuple[str, ...] = ()) -> tuple[Path, ...]:
    """Every file a fresh interpreter holds after importing ``modules``: module sources and the shared
    libraries mapped into it. Run offline and single-threaded, as in the enclave; a module that fails to
    import is a user error (training would fail the same way). Cached per process: it takes seconds."""
    proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *modules], capture_output=True, text=True,
                          env=probe_env(pythonpath), timeout=600)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"cannot import what `privlora train` imports in {sys.prefix} ({last}); install "
                        "privlora's dependencies there (pip install -e .) before generating the manifest")
    return tuple(Path(f) for f in json.loads(proc.stdout.strip().splitlines()[-1]))


def imported_tops(files: Iterable[Path], sites: Iterable[Path]) -> set[Path]:
    """The site-packages top-level entries (``psutil/``, ``typing_extensions.py``) that hold ``files``."""
    roots = [s.resolve() for s in sites]
    tops = set()
    for file in files:
        real = Path(os.path.abspath(file))
        for candidate in dict.fromkeys((real, real.resolve())):
            site = next((s for s in roots if candidate.is_relative_to(s) and candidate != s), None)
            if site is not None:
                tops.add(site / candidate.relative_to(site).parts[0])
    return tops


def _owners(tops: set[Path], pythonpath: tuple[str, ...] = ()) -> list[str]:
    """Names of the installed distributions whose RECORD lists one of ``tops``."""
    names = []
    for dist in installed(pythonpath=pythonpath):
        site = _site_dir(dist)
        if any((site / top) in tops for top in _record_tops(dist)):
            names.append(dist.metadata["Name"])
    return names


def _site_dirs() -> list[Path]:
    """This interpreter's site-packages folders (purelib, platlib)."""
    paths = sysconfig.get_paths()
    return [Path(paths[k]).resolve() for k in ("purelib", "platlib") if Path(paths[k]).is_dir()]


@functools.lru_cache(maxsize=8)
def python_environment(roots: tuple[str, ...], modules: tuple[str, ...] = TRAIN_MODULES,
                       pythonpath: tuple[str, ...] = ()) -> tuple[Interpreter, tuple[Path, ...], tuple[Path, ...]]:
    """(interpreter, site-packages entries, site-packages folders) for the distributions ``roots`` need and
    those that importing ``modules`` really loads (with what they require, and any imported top-level entry
    no installed metadata owns); cached per process (the import probe and reading ~300 RECORD files are the
    slow part of building a manifest)."""
    sites = {*_site_dirs(), *(_site_dir(d) for d in distribution_closure(roots, pythonpath))}
    tops = imported_tops(imported_files(modules, pythonpath), sites) if modules else set()
    dists = distribution_closure((*roots, *_owners(tops, pythonpath)), pythonpath)
    sites |= {_site_dir(d) for d in dists}
    entries = {*site_entries(dists, pythonpath), *(t for t in tops if t.exists())}
    return interpreter(), tuple(sorted(entries)), tuple(sorted(sites))
