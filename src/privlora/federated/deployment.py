"""Run a Flower App on Flower's deployment engine on this machine: real SuperLink and SuperNode processes.

The simulation engine runs every ClientApp inside one process, so it cannot show what a federated run
really does (separate processes, messages over the network, a client that crashes). This module starts
the deployment engine on localhost: one ``flower-superlink``, N ``flower-supernode`` s (SuperNode ``i``
gets ``--node-config "partition-id=i num-partitions=N"``), submits the app with ``flwr run``, waits for
the run to finish and always stops every process it started, including the ServerApp/ClientApp
processes Flower spawns underneath them. All output goes to ``log_dir``: ``superlink.log``,
``supernode-<i>.log``, ``flwr-run.log``.

Flower 1.42 quirks this relies on (checked against the installed flwr, not the older docs):

* The SuperLink serves its Fleet, Control and Runtime APIs over HTTP on ONE address, ``--host`` /
  ``--port`` (default 8000); ``--fleet-api-address`` / ``--control-api-address`` are deprecated. A
  SuperNode's Runtime API is ``--host`` / ``--port`` (default 9094); ``--clientappio-api-address`` is
  rejected. So: one free port for the SuperLink, one per SuperNode.
* ``flwr`` no longer reads ``[tool.flwr.federations]`` from the app's pyproject.toml: that is "legacy"
  and ``flwr run`` migrates it into ``$FLWR_HOME/config.toml`` (rewriting the pyproject). The
  SuperLink address lives in ``$FLWR_HOME/config.toml`` as ``[superlink.<name>] address = "host:port",
  insecure = true`` and ``flwr run <app_dir> <name>`` picks it. ``FLWR_HOME`` (default ``~/.flwr``)
  also holds the installed FABs, so every process here gets a throw-away one.
* The SuperLink and SuperNodes launch ``flower-superexec`` (found on ``PATH``) in a new session, which
  launches ``flwr-serverapp`` / ``flwr-clientapp``: a process-group kill misses them, so the whole
  process tree is collected with psutil and stopped. The venv's ``bin`` is put first on ``PATH``.
* The SuperLink installs an app's dependencies with ``uv sync`` unless told not to; it is told not to
  (``--disable-runtime-dependency-installation``), so the app must run in this environment as is.
* ``flwr run`` exits 0 once the run is submitted (with ``--stream``: once the logs end), whatever
  happened to the ServerApp or the ClientApps. The run's final status comes from ``flwr ls --run-id
  <id> --format json`` (``finished:completed`` / ``finished:failed`` / ``finished:stopped``). A ClientApp
  that raises does not fail the run: the ServerApp just gets an error reply, so the caller must check
  the app's own results; :class:`RunOutcome` lists the SuperNode logs that show a ClientApp error.
* Run-config overrides must name keys that exist in ``[tool.flwr.app.config]`` (Flower rejects others)
  and are passed as a TOML file (``--run-config overrides.toml``), not as ``key=value`` text: Flower
  cuts that text with a regex, so JSON fails to parse unless wrapped in single quotes, and with a ``'``
  inside it is silently truncated (``k='{"n": "it's"}'`` arrives as ``{"n": "it``). A TOML file
  carries any string intact.
* The ServerApp runs in a throw-away working directory: paths in the run config must be absolute.
* ``flwr run`` checks that the components' modules can be found (``privlora`` is installed; a toy
  module must sit in the app dir) and the FAB leaves out ``test_*.py`` / ``*_test.py`` files.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

from privlora.errors import UserError

ConfigValue = str | int | float | bool

CONNECTION = "privlora-local"  # the SuperLink connection's name in the throw-away $FLWR_HOME/config.toml
START_TIMEOUT_S = 60.0  # for the SuperLink to listen and for all SuperNodes to come online
_POLL_S = 0.5
_CLIENTAPP_ERROR = "ClientApp raised an exception"  # what a SuperNode logs when its ClientApp raised


@dataclass(frozen=True)
class RunOutcome:
    """What Flower reported about a run that finished."""

    run_id: int
    status: str  # Flower's final status, "finished:completed" here (others raise UserError)
    details: str  # Flower's status details, "N/A" when there are none
    clientapp_errors: tuple[Path, ...]  # SuperNode logs that show a ClientApp exception


# --- the app directory ----------------------------------------------------------------------------


def _toml_value(value: ConfigValue) -> str:
    """One TOML value. A JSON string literal is a valid TOML basic string (same escapes), except that
    TOML wants DEL escaped too."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    raise UserError(f"run-config values must be str, int, float or bool, got {type(value).__name__}: {value!r}")


def _toml_table(values: Mapping[str, ConfigValue]) -> str:
    """``"key" = value`` lines (keys quoted, so dots and odd characters stay one flat key); checked by
    reading them back."""
    text = "".join(f"{json.dumps(k, ensure_ascii=False)} = {_toml_value(v)}\n" for k, v in values.items())
    back = tomllib.loads(text)
    if back != dict(values) and not any(isinstance(v, float) and math.isnan(v) for v in values.values()):
        raise UserError(f"run-config does not survive TOML: {dict(values)!r} came back as {back!r}")
    return text


def write_app_dir(dest: Path, *, serverapp: str, clientapp: str, config: Mapping[str, ConfigValue],
                  include: Sequence[Path] = (), name: str = "privlora-federated",
                  publisher: str = "privlora") -> Path:
    """Write a minimal Flower App project to ``dest`` (created) and return it.

    ``serverapp`` / ``clientapp`` are ``module:attribute`` references; ``config`` becomes
    ``[tool.flwr.app.config]``, the defaults a run may override (and the only keys it may). Files in
    ``include`` (e.g. a module the components live in) are copied next to the pyproject.toml and ship
    in the FAB. No ``[tool.flwr.federations]``: Flower 1.42 treats that as legacy (see module doc)."""
    for what, ref in (("serverapp", serverapp), ("clientapp", clientapp)):
        module, _, attr = ref.partition(":")
        if not module or not attr:
            raise UserError(f"{what} must be 'module:attribute', got {ref!r}")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", name):
        raise UserError(f"Flower App name must start with a letter and hold only letters, digits and -: {name!r}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    pyproject = (
        "[build-system]\n"
        'requires = ["hatchling"]\n'
        'build-backend = "hatchling.build"\n\n'
        "[project]\n"
        f'name = "{name}"\n'
        'version = "1.0.0"\n'
        'description = "privlora federated run (generated)"\n'
        'license = "Apache-2.0"\n'
        "dependencies = []\n\n"
        "[tool.flwr.app]\n"
        f"publisher = {json.dumps(publisher)}\n\n"
        "[tool.flwr.app.components]\n"
        f"serverapp = {json.dumps(serverapp)}\n"
        f"clientapp = {json.dumps(clientapp)}\n\n"
        "[tool.flwr.app.config]\n" + _toml_table(config)
    )
    (dest / "pyproject.toml").write_text(pyproject, encoding="utf-8")
    for path in include:
        shutil.copy2(path, dest / Path(path).name)
    return dest


# --- processes ------------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (held open together so the OS gives different ones)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _executable(name: str) -> str:
    """A Flower console script from this interpreter's environment (else from PATH)."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise UserError(f"{name} not found: install Flower (pip install flwr) in this environment")
    return found


class _Processes:
    """The processes this run started, and every process they start in turn (collected as they appear:
    a child whose parent has died is re-parented and can no longer be found from the roots)."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.cwd = cwd
        self.roots: list[subprocess.Popen[bytes]] = []
        self.logs: list[IO[bytes]] = []
        self.seen: dict[int, psutil.Process] = {}

    def start(self, cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        out = log.open("wb")  # not appended to: the log is read to find this run's node ids and run id
        self.logs.append(out)
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.env, cwd=self.cwd)
        self.roots.append(proc)
        self.refresh()
        return proc

    def refresh(self) -> None:
        """Remember every live descendant of the roots."""
        for root in self.roots:
            try:
                p = psutil.Process(root.pid)
                self.seen.setdefault(p.pid, p)
                for child in p.children(recursive=True):
                    self.seen.setdefault(child.pid, child)
            except psutil.Error:
                continue

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM everything, SIGKILL what is left after ``grace_s``, reap the roots."""
        self.refresh()
        procs = list(self.seen.values())
        for p in procs:
            try:
                p.terminate()  # psutil checks the pid was not reused
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=grace_s)
        for root in self.roots:
            try:
                root.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        for out in self.logs:
            out.close()


def _listening(proc: subprocess.Popen[bytes], port: int) -> bool:
    """Whether ``proc`` itself (not some other process that has the port) listens on ``port``."""
    try:
        conns = psutil.Process(proc.pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


def _last_error(log: Path) -> str:
    """The last line of ``log`` that reports an error, without colour codes ("" if none)."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(encoding="utf-8", errors="replace")).splitlines()
    hit = next((ln for ln in reversed(lines) if re.search(r"\bERROR\b|^\w*(Error|Exception):", ln)), "")
    return " ".join(hit.split())[:200]


def _check_alive(proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    if proc.poll() is not None:
        error = _last_error(log)
        raise UserError(f"{what} exited with code {proc.returncode}{': ' + error if error else ''}; see {log}")


def _flwr_json(args: list[str], env: dict[str, str], cwd: Path, timeout_s: float) -> dict:
    """Run a ``flwr`` CLI command with ``--format json`` and parse its output."""
    try:
        res = subprocess.run([_executable("flwr"), *args, "--format", "json"], env=env, cwd=cwd,
                             capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        return json.loads(res.stdout)
    except (subprocess.TimeoutExpired, json.JSONDecodeError):
        return {}


def _run_status(run_id: int, env: dict[str, str], cwd: Path) -> tuple[str, str]:
    """Flower's ``(status, details)`` for a run, ``("", "")`` when it cannot be read."""
    runs = _flwr_json(["ls", CONNECTION, "--run-id", str(run_id)], env, cwd, timeout_s=30).get("runs", [])
    if not runs:
        return "", ""
    return str(runs[0].get("status", "")), str(runs[0].get("status-details", ""))


def _child_env(flwr_home: Path, extra_env: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "NO_COLOR": "1",
        "COLUMNS": "200",  # the flwr CLI wraps its error messages at the terminal width
        # flower-superexec, flwr-serverapp and flwr-clientapp are found on PATH: this environment's first
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    })
    env.update(extra_env or {})
    return env


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()


# --- the run --------------------------------------------------------------------------------------


def _start_superlink(procs: _Processes, tmp: Path, log_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start the SuperLink on a free port (its Fleet, Control and Runtime APIs all share it)."""
    (port,) = _free_ports(1)
    proc = procs.start([_executable("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                        "--database", str(tmp / "superlink.db"), "--disable-runtime-dependency-installation"],
                       log_dir / "superlink.log")
    return proc, port


def _start_supernodes(procs: _Processes, n: int, superlink_port: int, partition_key: str,
                      log_dir: Path) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """Start ``n`` SuperNodes (they keep retrying until the SuperLink answers)."""
    nodes = []
    for i, port in enumerate(_free_ports(n)):
        log = log_dir / f"supernode-{i}.log"
        proc = procs.start([_executable("flower-supernode"), "--insecure", "--superlink",
                            f"127.0.0.1:{superlink_port}", "--host", "127.0.0.1", "--port", str(port),
                            "--node-config", f"{partition_key}={i} num-partitions={n}"], log)
        nodes.append((proc, log))
    return nodes


def _activated_nodes(superlink_log: Path) -> int:
    """How many distinct SuperNodes the SuperLink has activated, from its log. (``flwr supernode ls`` says
    the same but each call is a CLI start-up of several seconds while the SuperNodes start.)"""
    text = superlink_log.read_text(encoding="utf-8", errors="replace")
    return len(set(re.findall(r"Activated node_id=(\d+)", text)))


def _wait_until_up(procs: _Processes, watched: list[tuple[subprocess.Popen[bytes], str, Path]], port: int,
                   log_dir: Path, deadline: float) -> None:
    """Wait until the SuperLink (``watched[0]``) listens on ``port`` and has activated every SuperNode
    (the rest of ``watched``)."""
    superlink, n = watched[0][0], len(watched) - 1
    start_deadline = min(deadline, time.monotonic() + START_TIMEOUT_S)
    while True:
        for proc, what, log in watched:
            _check_alive(proc, what, log)
        listening = _listening(superlink, port)
        online = _activated_nodes(log_dir / "superlink.log") if listening else 0
        if listening and online >= n:
            return
        if _remaining(start_deadline) <= 0:
            if not listening:
                raise UserError(f"flower-superlink did not listen on port {port} in time; see {watched[0][2]}")
            raise UserError(f"only {online} of {n} SuperNodes came online in time; see {log_dir}/supernode-*.log")
        procs.refresh()
        time.sleep(0.2)


def _submit_and_wait(procs: _Processes, app_dir: Path, run_config: Mapping[str, ConfigValue], tmp: Path,
                     log_dir: Path, deadline: float, watched: list[tuple[subprocess.Popen[bytes], str, Path]]) -> int:
    """``flwr run --stream`` the app; return the run id once the stream has ended."""
    cmd = [_executable("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
    if run_config:
        overrides = tmp / "run-config.toml"  # a file: --run-config 'k=v' text cannot carry JSON (module doc)
        overrides.write_text(_toml_table(run_config), encoding="utf-8")
        cmd += ["--run-config", str(overrides)]
    log = log_dir / "flwr-run.log"
    proc = procs.start(cmd, log)
    while proc.poll() is None:
        # only the SuperLink is vital once the run is on: a SuperNode that dies mid-run is a client
        # dropping out, which the ServerApp tolerates (its replies time out, the round goes on)
        superlink, what, plog = watched[0]
        _check_alive(superlink, what, plog)
        if _remaining(deadline) <= 0:
            raise UserError(f"the federated run did not finish in time; see {log}")
        procs.refresh()
        time.sleep(_POLL_S)
    text = log.read_text(encoding="utf-8", errors="replace")
    match = re.search(r"Successfully started run (\d+)", text)
    if proc.returncode != 0 or match is None:
        raise UserError(f"flwr run failed (exit code {proc.returncode}): {_cli_error(text)}; see {log}")
    return int(match.group(1))


def _cli_error(text: str) -> str:
    """The message of a failed ``flwr`` command: the text of its boxed "Error" panel, else its last line."""
    box = "".join(re.findall(r"^│(.*)│\s*$", text, flags=re.MULTILINE))
    message = " ".join(box.split()) or next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "")
    return (message or "no output")[:300]


_FIND_MODULES = """
import importlib.util, sys
sys.path.insert(0, sys.argv[1])
for name in sys.argv[2:]:
    try:
        found = importlib.util.find_spec(name) is not None
    except Exception:
        found = False
    if not found:
        print(name)
"""


def _flat_keys(table: Mapping[str, object], prefix: str = "") -> set[str]:
    """The run-config keys Flower makes of a (possibly nested) ``[tool.flwr.app.config]`` table."""
    keys: set[str] = set()
    for k, v in table.items():
        keys |= _flat_keys(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}"}
    return keys


def _check_app(app_dir: Path, run_config: Mapping[str, ConfigValue], env: dict[str, str]) -> None:
    """Fail before starting anything when the run config names keys the app does not declare, or a
    component's module cannot be imported in the processes' environment (``flwr run`` checks both too,
    but only after the SuperLink and SuperNodes are up)."""
    pyproject = app_dir / "pyproject.toml"
    try:
        with pyproject.open("rb") as f:
            app = tomllib.load(f)["tool"]["flwr"]["app"]
        refs = {what: str(app["components"][what]) for what in ("serverapp", "clientapp")}
        declared = _flat_keys(app.get("config", {}))
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{pyproject} is not a Flower App's pyproject.toml with [tool.flwr.app.components] "
                        f"serverapp and clientapp ({type(err).__name__}: {err}); write it with write_app_dir") from err
    unknown = sorted(set(run_config) - declared)
    if unknown:
        raise UserError(f"run-config keys {unknown} are not in [tool.flwr.app.config] of {pyproject} "
                        f"(Flower only overrides declared keys; it declares {sorted(declared)})")
    modules = sorted({ref.partition(":")[0] for ref in refs.values()})
    res = subprocess.run([sys.executable, "-c", _FIND_MODULES, str(app_dir), *modules], env=env, cwd=app_dir,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    missing = res.stdout.split()
    if missing or res.returncode != 0:
        detail = " ".join(res.stderr.split())[-200:]
        raise UserError(f"Flower App {app_dir}: cannot import {', '.join(missing or modules)} (components "
                        f"{refs['serverapp']!r}, {refs['clientapp']!r}){': ' + detail if detail else ''}")


def run_deployment(app_dir: Path, num_supernodes: int, run_config: Mapping[str, ConfigValue], *, log_dir: Path,
                   timeout_s: float = 600, partition_key: str = "partition-id",
                   extra_env: Mapping[str, str] | None = None) -> RunOutcome:
    """Run the Flower App in ``app_dir`` (see :func:`write_app_dir`) on a local SuperLink with
    ``num_supernodes`` SuperNodes, overriding its run config with ``run_config``.

    Returns when Flower reports the run ``finished:completed``; raises :class:`UserError` when a process
    fails to start or dies, when ``flwr run`` fails, when the run ends failed/stopped, or after
    ``timeout_s`` (all in). Every process started here is stopped before this returns or raises.
    ``extra_env`` is added to every process's environment (e.g. ``PYTHONPATH``)."""
    app_dir = Path(app_dir).resolve()
    if num_supernodes < 1:
        raise UserError(f"need at least one SuperNode, got {num_supernodes}")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    tmp = Path(tempfile.mkdtemp(prefix="privlora-flwr-"))
    flwr_home = tmp / "flwr-home"
    flwr_home.mkdir()
    procs = _Processes(_child_env(flwr_home, extra_env), cwd=tmp)
    try:
        _check_app(app_dir, run_config, procs.env)
        superlink, port = _start_superlink(procs, tmp, log_dir)
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n', encoding="utf-8")
        watched = [(superlink, "flower-superlink", log_dir / "superlink.log")]
        # SuperNodes started before the SuperLink listens back off for seconds between their retries
        _wait_until_up(procs, watched, port, log_dir, deadline)
        nodes = _start_supernodes(procs, num_supernodes, port, partition_key, log_dir)
        watched += [(p, f"flower-supernode {i}", log) for i, (p, log) in enumerate(nodes)]
        _wait_until_up(procs, watched, port, log_dir, deadline)
        run_id = _submit_and_wait(procs, app_dir, run_config, tmp, log_dir, deadline, watched)
        # the log stream has ended, so the run has; its status may lag a moment behind
        status_deadline = min(deadline, time.monotonic() + START_TIMEOUT_S)
        while not (status_details := _run_status(run_id, procs.env, procs.cwd))[0].startswith("finished"):
            _check_alive(superlink, "flower-superlink", log_dir / "superlink.log")
            if _remaining(status_deadline) <= 0:
                raise UserError(f"run {run_id} did not report finished (status {status_details[0]!r}); see {log_dir}")
            time.sleep(_POLL_S)
        status, details = status_details
        if status != "finished:completed":
            raise UserError(f"Flower run {run_id} ended {status} ({details}); see {log_dir / 'flwr-run.log'}")
        errors = tuple(log for _, log in nodes if _CLIENTAPP_ERROR in log.read_text(errors="replace"))
        return RunOutcome(run_id=run_id, status=status, details=details, clientapp_errors=errors)
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)
