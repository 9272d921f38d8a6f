"""`privlora tee manifest`: the Gramine manifest for `privlora train` inside SGX.

Gramine is not installed here, so the manifest is checked the way gramine-sgx-sign reads it: TOML parsed by
tomllib, the keys and shapes Gramine's schema requires, every trusted entry present on disk (files without a
trailing '/', folders with one), and — in the slow test — every file a real training run opens lies under a
trusted entry, the encrypted run folder or the in-enclave tmpfs.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import CONFIGS, assert_one_line_error, run_cli
from privlora.errors import UserError
from privlora.tee import TeeOptions, build_manifest, write_manifest
from privlora.tee import toml as tee_toml
from privlora.tee.manifest import DATA_MOUNT, OUT_MOUNT, parse_enclave_size

DEMO = CONFIGS / "demo-dp.yaml"


def _load(path: Path) -> dict:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _uris(manifest: dict) -> list[str]:
    entries = manifest["sgx"]["trusted_files"]
    assert all(isinstance(e, dict) and set(e) == {"uri"} for e in entries), entries[:3]
    uris = [e["uri"] for e in entries]
    assert all(u.startswith("file:") for u in uris)
    return [u[len("file:"):] for u in uris]


def _covered(path: Path, uris: list[str]) -> bool:
    """Would Gramine find ``path`` among the trusted files (a file entry, or inside a folder entry)?"""
    path = Path(os.path.abspath(path))
    return any(path == Path(u) or (u.endswith("/") and path.is_relative_to(Path(u))) for u in uris)


#: the keys and value types Gramine v1.9's manifest schema (graminelibos/manifest_check.py) accepts, for the
#: parts privlora emits — catches pre-1.6 names such as sgx.thread_num or a string loader.entrypoint
SCHEMA = {
    "libos": {"entrypoint": str},
    "loader": {"log_level": str, "argv": list, "entrypoint": dict, "env": dict},
    "fs": {"mounts": list},
    "sys": {"stack": dict},
    "sgx": {"debug": bool, "edmm_enable": bool, "enclave_size": str, "max_threads": int, "remote_attestation": str,
            "file_check_policy": str, "trusted_files": list},
}


def _check_schema(m: dict) -> None:
    assert set(m) == set(SCHEMA), set(m) ^ set(SCHEMA)
    for section, keys in SCHEMA.items():
        assert set(m[section]) <= set(keys), set(m[section]) - set(keys)
        for key, kind in keys.items():
            if key in m[section]:
                assert type(m[section][key]) is kind, (section, key)
    assert set(m["loader"]["entrypoint"]) == {"uri"} and all(isinstance(a, str) for a in m["loader"]["argv"])
    assert m["loader"]["log_level"] in ("none", "error") and m["sgx"]["remote_attestation"] in ("none", "dcap")
    assert m["sgx"]["file_check_policy"] == "strict" and set(m["sys"]["stack"]) == {"size"}
    for mount in m["fs"]["mounts"]:
        kind = mount.get("type", "chroot")
        allowed = {"chroot": {"path", "uri"}, "encrypted": {"type", "path", "uri", "key_name"},
                   "tmpfs": {"type", "path"}}[kind]
        assert set(mount) <= allowed and {"path"} <= set(mount), mount


def _gramine_dir(manifest: dict) -> Path:
    return Path(manifest["loader"]["entrypoint"]["uri"][len("file:"):]).parent


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The README command on the embedded defaults, run through the real CLI."""
    tmp = tmp_path_factory.mktemp("tee")
    out = tmp / "privlora.manifest"
    proc = run_cli("tee", "manifest", "--config", str(DEMO), "--output", str(out), "--out-dir", str(tmp / "runs"),
                   "--threads", "6", cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return tmp, out, _load(out), proc.stdout


def test_demo_manifest_has_required_keys(demo):
    tmp, out, m, stdout = demo
    _check_schema(m)
    exe = m["libos"]["entrypoint"]
    assert exe == m["loader"]["argv"][0] and Path(exe).is_absolute()
    assert m["loader"]["entrypoint"]["uri"].endswith("/libsysdb.so")
    assert m["loader"]["argv"][1:5] == ["-m", "privlora", "train", "--config"]
    assert m["loader"]["argv"][5] == str(DEMO.resolve())
    # the command line is measured, never taken from the host; so is the environment
    assert "insecure__use_cmdline_argv" not in m["loader"] and "insecure__use_host_env" not in m["loader"]
    assert m["loader"]["log_level"] == "error"
    env = m["loader"]["env"]
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["OMP_NUM_THREADS"] == "6" and m["sgx"]["max_threads"] >= 6 + 4
    assert all(isinstance(v, str) for v in env.values())
    # the dynamic loader must find this interpreter's libpython before any other one on the search path
    # (Debian's /usr/lib/x86_64-linux-gnu has its own libpython3.11 of another patch release)
    import sysconfig

    search = env["LD_LIBRARY_PATH"].split(":")
    assert search[0] == "/lib"  # Gramine's glibc (the runtime mount)
    soname = sysconfig.get_config_var("INSTSONAME")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and soname:
        first = next(d for d in search[1:] if (Path(d) / soname).exists())
        assert Path(first) == Path(sysconfig.get_config_var("LIBDIR")), (first, search)
    assert m["sgx"]["debug"] is False and m["sgx"]["edmm_enable"] is False
    assert m["sgx"]["remote_attestation"] == "none"
    assert "allowed_files" not in m["sgx"] and "insecure__keys" not in m["fs"]
    assert not any(k.startswith("insecure") for k in m.get("sys", {}))  # no eventfd, no RPC threads
    size = m["sgx"]["enclave_size"]
    unit = {"K": 2**10, "M": 2**20, "G": 2**30}[size[-1]]
    n = int(size[:-1]) * unit
    assert n >= 2**30 and n & (n - 1) == 0
    assert f"wrote {out}" in stdout and "gramine-sgx-sign --manifest" in stdout and "gramine-sgx " in stdout


def test_demo_mounts_encrypt_outputs_and_keep_tmp_inside(demo):
    tmp, _, m, _ = demo
    mounts = m["fs"]["mounts"]
    assert all(set(x) <= {"type", "path", "uri", "key_name"} and x["path"].startswith("/") for x in mounts)
    encrypted = [x for x in mounts if x.get("type") == "encrypted"]
    assert encrypted == [{"type": "encrypted", "path": OUT_MOUNT, "uri": f"file:{(tmp / 'runs').resolve()}",
                          "key_name": "_sgx_mrenclave"}]  # built-in data: no data mount at all
    argv = m["loader"]["argv"]
    assert argv[argv.index("--out") + 1] == f"{OUT_MOUNT}/demo-dp"
    assert "--data" not in argv
    assert {"type": "tmpfs", "path": "/tmp"} in mounts
    assert mounts[0]["path"] == "/lib" and mounts[0]["uri"].endswith("/runtime/glibc")
    # chroot mounts are identity mounts (host path = enclave path), each mounted once, parents first
    chroot = [x for x in mounts[1:] if "type" not in x]
    assert all(x["uri"] == f"file:{x['path']}" for x in chroot)
    paths = [Path(x["path"]) for x in chroot]
    assert not any(a != b and b.is_relative_to(a) for a in paths for b in paths)
    # every trusted entry is reachable through a mount (else the enclave could not open it)
    gramine = str(_gramine_dir(m))
    for u in _uris(m):
        if u.startswith(gramine):
            continue
        assert any(Path(u.rstrip("/")).is_relative_to(p) for p in paths), u
    assert (tmp / "runs").is_dir()  # created so gramine-sgx finds the output folder


def test_demo_trusted_entries_exist(demo):
    _, _, m, _ = demo
    uris = _uris(m)
    assert len(uris) == len(set(uris))
    gramine = _gramine_dir(m)
    for u in uris:
        if Path(u).is_relative_to(gramine) and not gramine.exists():
            continue  # Gramine is not installed here: these are its runtime files on the SGX host
        path = Path(u)
        assert path.exists(), u
        assert u.endswith("/") == path.is_dir(), u  # what gramine-sgx-sign requires of directory URIs


def test_demo_trusts_interpreter_privlora_base_and_demo_data(demo):
    _, _, m, _ = demo
    uris = _uris(m)
    import privlora

    package = Path(privlora.__file__).resolve().parent
    assert f"{package}/" in uris
    for name in ("base_unet.safetensors", "base_unet.json"):
        assert str(package / "assets" / name) in uris
    # the names the loader uses (read from tasks/embedded.py without importing torch)
    tree = ast.parse((package / "tasks" / "embedded.py").read_text())
    names = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
             if isinstance(t, ast.Name) and t.id in ("WEIGHTS", "META")}
    assert set(names) == {"WEIGHTS", "META"}
    assert all(_covered(package / "assets" / f, uris) and (package / "assets" / f).is_file() for f in names.values())
    assert sys.executable in uris and str(Path(sys.executable).resolve()) in uris
    assert _covered(Path(sys.prefix) / "pyvenv.cfg", uris) or sys.prefix == sys.base_prefix
    assert _covered(Path(os.__file__), uris)  # the standard library
    assert str(DEMO.resolve()) in uris
    # demo:faces is scikit-image's package data, read inside the enclave: it must be hashed too
    skimage = Path(importlib.util.find_spec("skimage").origin).parent
    assert _covered(skimage / "data" / "lfw_subset.npy", uris)
    # what privlora never imports for training stays out (Flower/Ray, spaCy, the registry server)
    for absent in ("flwr", "ray", "spacy", "fastapi"):
        spec = importlib.util.find_spec(absent)
        if spec is not None and spec.origin:
            assert not _covered(Path(spec.origin), uris), absent


def test_folder_base_files_are_trusted_and_mounted(tmp_path):
    base = tmp_path / "my base"
    (base / "unet").mkdir(parents=True)
    (base / "model_index.json").write_text("{}")
    (base / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 8)
    plan = write_manifest(TeeOptions(config=DEMO, output=tmp_path / "app.manifest", base=str(base),
                                     out_dir=tmp_path / "out"))
    m = _load(tmp_path / "app.manifest")
    uris = _uris(m)
    assert f"{base.resolve()}/" in uris
    for f in base.rglob("*"):
        assert _covered(f, uris), f
    argv = m["loader"]["argv"]
    assert argv[argv.index("--base") + 1] == str(base.resolve())
    assert {"path": str(base.resolve()), "uri": f"file:{base.resolve()}"} in m["fs"]["mounts"]
    assert not any("base_unet" in u for u in uris if "/assets/" in u and not u.endswith("/"))
    assert plan.app == "app"


def test_provisioned_keys_mount_the_data_encrypted(tmp_path):
    data, ca = tmp_path / "data", tmp_path / "ca.crt"
    data.mkdir()
    (data / "0.png").write_bytes(b"ciphertext")
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    write_manifest(TeeOptions(config=DEMO, output=tmp_path / "p.manifest", data=data, out_dir=tmp_path / "out",
                              keys="provisioned", key_server="10.1.2.3:4433", ca_cert=ca))
    m = _load(tmp_path / "p.manifest")
    _check_schema(m)
    enc = {x["path"]: x for x in m["fs"]["mounts"] if x.get("type") == "encrypted"}
    assert enc[DATA_MOUNT] == {"type": "encrypted", "path": DATA_MOUNT, "uri": f"file:{data.resolve()}",
                               "key_name": "privlora"}
    assert enc[OUT_MOUNT]["key_name"] == "privlora"
    argv = m["loader"]["argv"]
    assert argv[argv.index("--data") + 1] == DATA_MOUNT
    uris = _uris(m)
    assert not _covered(data / "0.png", uris)  # data is never a trusted (plaintext, hashed) file
    assert "allowed_files" not in m["sgx"]
    assert not any(x.get("type") != "encrypted" and Path(x["path"]) == data.resolve() for x in m["fs"]["mounts"])
    env = m["loader"]["env"]
    assert env["SECRET_PROVISION_SET_KEY"] == "privlora" and env["SECRET_PROVISION_SERVERS"] == "10.1.2.3:4433"
    assert env["LD_PRELOAD"] == "libsecret_prov_attest.so" and m["sgx"]["remote_attestation"] == "dcap"
    assert str(ca.resolve()) in uris and env["SECRET_PROVISION_CA_CHAIN_PATH"] == str(ca.resolve())


def test_paths_with_quotes_backslashes_and_unicode_round_trip(tmp_path):
    odd = tmp_path / 'we"ird \\ dir ü 名 \t tab'
    odd.mkdir()
    config = odd / 'conf "x" \\.yaml'
    config.write_text(DEMO.read_text())
    out_dir = odd / "out ✓"
    write_manifest(TeeOptions(config=config, output=odd / "o.manifest", out_dir=out_dir))
    m = _load(odd / "o.manifest")
    argv = m["loader"]["argv"]
    assert argv[argv.index("--config") + 1] == str(config.resolve())
    assert str(config.resolve()) in _uris(m)
    assert {"path": str(config.resolve()), "uri": f"file:{config.resolve()}"} in m["fs"]["mounts"]
    assert any(x.get("uri") == f"file:{out_dir.resolve()}" for x in m["fs"]["mounts"])


def test_toml_writer_round_trips_every_character_class():
    nasty = "".join(chr(c) for c in range(0x80)) + "é名\u2028\U0001F600" + '\\"' + "\\u0041"
    tree = {"a": {"s": nasty, "n": 3, "t": True, "f": False, "l": [nasty, "x"],
                  "tables": [{"uri": nasty}, {"k": "v", "weird key.": 1}], "b": {"c": {"d": "e"}}},
            "top": "x", "empty": []}
    assert tomllib.loads(tee_toml.dumps(tree, "header\nline")) == tree
    with pytest.raises(UserError, match="UTF-8"):
        tee_toml.quote(os.fsdecode(b"/data/\xff.png"))


def test_enclave_size_must_be_a_power_of_two():
    assert parse_enclave_size("16G") == 2**34 and parse_enclave_size("1024m") == 2**30
    for bad in ("12G", "16", "16GB", "0G", "256M", "-8G"):
        with pytest.raises(UserError):
            parse_enclave_size(bad)


@pytest.mark.parametrize("kwargs, needle", [
    ({"keys": "sealed", "data": "HERE"}, "--keys provisioned"),
    ({"keys": "provisioned"}, "--ca-cert"),
    ({"keys": "nope"}, "unknown --keys"),
    ({"output": "x.toml"}, "<app>.manifest"),
    ({"threads": 4, "max_threads": 6}, "max-threads"),
    ({"base": "runwayml/stable-diffusion-v1-5"}, "offline"),
    ({"out_dir": "VENV"}, "overlaps"),
])
def test_bad_options_are_user_errors(tmp_path, kwargs, needle):
    kwargs = {k: (tmp_path if v == "HERE" else Path(sys.prefix) / "lib" if v == "VENV" else v)
              for k, v in kwargs.items()}
    kwargs.setdefault("output", tmp_path / "x.manifest")
    with pytest.raises(UserError, match=needle.replace("<", ".").replace(">", ".")):
        build_manifest(TeeOptions(config=DEMO, **kwargs))


def _fake_dist(site: Path, name: str, files: dict[str, str], requires: tuple[str, ...] = ()) -> None:
    """A wheel-style install into ``site``: the files, METADATA (Requires-Dist) and RECORD."""
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: " + name + "\nVersion: 1.0\n"
                                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
    (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in [*files, f"{info.name}/METADATA",
                                                                   f"{info.name}/RECORD"]))


def test_trusted_files_follow_what_training_imports_not_only_metadata(tmp_path, monkeypatch):
    """Metadata misses undeclared imports (transformers imports psutil without declaring it): here `app`
    imports `helper` from a distribution it does not declare and `bare`, a module no metadata owns. Both are
    trusted because the import probe saw them load; the undeclared distribution comes whole (its other
    module and its dist-info), and an installed package nothing imports stays out."""
    from privlora.tee import trusted

    site = tmp_path / "site"
    _fake_dist(site, "appdist", {"app/__init__.py": "import helper\nimport bare\n"}, requires=("otherdist",))
    _fake_dist(site, "helperdist", {"helper/__init__.py": "", "helper_extra/__init__.py": ""})
    _fake_dist(site, "otherdist", {"other/__init__.py": ""})
    _fake_dist(site, "unuseddist", {"unused/__init__.py": ""})
    (site / "bare.py").write_text("")
    extra = (str(site),)
    assert "helperdist" not in [d.metadata["Name"] for d in trusted.distribution_closure(["appdist"], extra)]
    _, entries, sites = trusted.python_environment(("appdist",), ("app",), extra)
    inside = {p.relative_to(site).as_posix() for p in entries if p.is_relative_to(site)}
    assert {"app", "helper", "bare.py", "helper_extra", "helperdist-1.0.dist-info", "other"} <= inside, inside
    assert "unused" not in inside and site.resolve() in sites
    # and the real training imports: psutil is trusted even when no root distribution requires it
    _, real, _ = trusted.python_environment(("torch",))
    import psutil
    import transformers

    for module in (psutil, transformers):
        assert Path(module.__file__).resolve().parent in real, module.__name__


def test_distributions_resolve_as_a_fresh_interpreter_sees_them(tmp_path, monkeypatch):
    """Flower's Ray backend puts Ray's vendored psutil first on the building process's sys.path *and* in its
    PYTHONPATH, which every later subprocess inherits; the enclave has neither, so the manifest must still
    trust the psutil that training there loads."""
    import psutil

    from privlora.tee import trusted

    vendored = tmp_path / "thirdparty_files"
    _fake_dist(vendored, "psutil", {"psutil/__init__.py": ""})
    monkeypatch.syspath_prepend(str(vendored))
    monkeypatch.setenv("PYTHONPATH", str(vendored))
    (dist,) = [d for d in trusted.distribution_closure(["psutil"]) if d.metadata["Name"] == "psutil"]
    assert dist.version == psutil.__version__
    assert Path(psutil.__file__).resolve().parent in trusted.top_level_entries(dist)
    _, entries, _ = trusted.python_environment(("accelerate",), ())
    assert not [p for p in entries if p.is_relative_to(vendored)]


def test_cli_errors_are_one_line_and_leave_the_old_manifest(tmp_path):
    good = tmp_path / "keep.manifest"
    good.write_text("old")
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("name: x\nbogus_key: 1\n")
    blocker = tmp_path / "afile"
    blocker.write_text("")
    cases = [
        (["--config", str(tmp_path / "missing.yaml"), "--output", str(good)], "does not exist"),
        (["--config", str(bad_cfg), "--output", str(good)], "unknown config key 'bogus_key'"),
        (["--config", str(DEMO), "--output", str(blocker / "x.manifest")], "cannot write"),
        (["--config", str(DEMO), "--output", str(good), "--keys", "provisioned", "--ca-cert", str(blocker),
          "--data", str(tmp_path / "no-data")], "does not exist"),
    ]
    for args, needle in cases:
        assert_one_line_error(run_cli("tee", "manifest", *args, cwd=tmp_path), needle)
    assert good.read_text() == "old" and not list(tmp_path.glob(".*.tmp"))


def test_run_folder_rename_falls_back_to_files_where_gramine_cannot_rename_folders(tmp_path, monkeypatch):
    """Gramine's encrypted mounts answer ENOSYS to a directory rename (libos do_rename renames only regular
    files); the trainer's `<out>.partial` → `<out>` must still end with every file in place."""
    import errno

    from privlora.runs import rename_dir

    src = tmp_path / "run.partial"
    (src / "adapter" / "deep").mkdir(parents=True)
    files = {"privacy.json": b"{}", "adapter/adapter_model.safetensors": b"\x01" * 100, "adapter/deep/x": b"y"}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    real_rename = os.rename
    renamed_dirs = []

    def gramine_rename(a, b):
        if Path(a).is_dir():
            renamed_dirs.append(a)
            raise OSError(errno.ENOSYS, "Function not implemented")
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", gramine_rename)
    rename_dir(src, tmp_path / "run")
    assert renamed_dirs == [src] and not src.exists()
    assert {p.relative_to(tmp_path / "run").as_posix(): p.read_bytes()
            for p in (tmp_path / "run").rglob("*") if p.is_file()} == files
    monkeypatch.setattr(os, "rename", real_rename)
    rename_dir(tmp_path / "run", tmp_path / "again")  # a real file system: one rename
    assert (tmp_path / "again" / "adapter" / "deep" / "x").read_bytes() == b"y"


@pytest.mark.slow
def test_a_real_training_run_opens_only_trusted_files(tmp_path, demo):
    """Run the manifest's own command line (outside an enclave) with an audit hook that records every file
    Python opens or imports, plus every shared library mapped into the process (/proc/self/maps); all must
    be trusted, in the (encrypted) run folder, or in /tmp, /proc, /dev."""
    import subprocess

    _, _, m, _ = demo
    argv = list(m["loader"]["argv"])
    run = tmp_path / "run"
    argv[argv.index("--out") + 1] = str(run)
    log = tmp_path / "opened.txt"
    probe = (
        "import os, sys, atexit, runpy\n"
        "seen = set()\n"
        "def hook(ev, args):\n"
        "    if ev == 'open' and args and isinstance(args[0], (str, bytes, os.PathLike)):\n"
        "        seen.add(os.path.abspath(os.fsdecode(args[0])))\n"
        "sys.addaudithook(hook)\n"
        "def dump():\n"
        "    files = {getattr(mod, '__file__', None) for mod in list(sys.modules.values())}\n"
        "    maps = [line.split(None, 5) for line in open('/proc/self/maps')]\n"  # shared libraries
        "    files |= {m[5].strip() for m in maps if len(m) == 6 and m[5].startswith('/')}\n"
        f"    open({str(log)!r}, 'w').write('\\n'.join(sorted(seen | {{f for f in files if f}})))\n"
        "atexit.register(dump)\n"
        f"sys.argv = ['privlora'] + {argv[3:]!r} + ['--max-steps', '1', '--set', 'eval.timesteps=[200]',"
        " '--set', 'eval.samples=0', '-q']\n"
        "runpy.run_module('privlora', run_name='__main__')\n"
    )
    # exactly the enclave's environment (Gramine passes nothing from the host), one thread on this small CPU
    env = {**m["loader"]["env"], "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "adapter").is_dir()
    uris = _uris(m)
    outside = []
    for line in log.read_text().splitlines():
        p = Path(line)
        if not p.is_absolute() or not p.exists() or p.is_relative_to(run.parent) or str(p).startswith(
                ("/proc/", "/dev/", "/sys/", "/tmp/")):
            continue
        if not _covered(p, uris):
            outside.append(line)
    # the editable install's egg-info beside src/privlora is not mounted in the enclave (invisible there)
    outside = [p for p in outside if ".egg-info/" not in p]
    if outside:  # say what the manifest trusts under the same site folder, to tell a missing entry from a moved one
        top = Path(outside[0]).parent
        near = [u for u in uris if top.parent.name in u][:10]
        assert not outside, (outside[:20], near, [u for u in uris if "psutil" in u])
