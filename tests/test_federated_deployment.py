"""The deployment-engine runner against real Flower processes on localhost, with the toy app.

Every process the runner starts carries a tag in its environment (``extra_env``), so a scan of all
processes finds them, orphans re-parented to init included; a sampler thread proves the scan sees
them while the run is on.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest

from privlora.errors import UserError
from privlora.federated import deployment
from privlora.federated.deployment import RunOutcome, run_deployment, write_app_dir
from process_tag import TAG_VAR, new_tag, tagged_alive

pytestmark = pytest.mark.slow

TOY = Path(__file__).with_name("federated_toy_app.py")
DEFAULTS = {"num-nodes": 3, "num-rounds": 2, "round-timeout": 60.0, "results-path": "", "payload": "",
            "fail-partition": -1, "fail-server": False}
# what the real app's "privlora-config" will look like: JSON with quotes, braces, spaces, = and worse
PAYLOAD = json.dumps({"method": "ffa", "lr": 1e-4, "note": "it's \"quoted\" {x} = y 'z'", "path": "C:\\tmp\\a b",
                      "list": [1, 2.5, None, True], "text": "tab\there\nnewline ünïcødé 😀 \x7f"})


class Watch:
    """Samples the processes that carry ``tag`` in their environment while the run is on."""

    def __init__(self) -> None:
        self.tag = new_tag()
        self.env = {TAG_VAR: self.tag}
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def alive(self) -> list[psutil.Process]:
        return tagged_alive(self.tag)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for p in self.alive():
                try:
                    self.seen.add(" ".join(Path(a).name for a in p.cmdline()[:2]))
                except psutil.Error:
                    pass
            time.sleep(0.3)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def saw(self, name: str) -> bool:
        return any(name in s for s in self.seen)

    def assert_all_gone(self) -> None:
        left = [(p.pid, p.cmdline()) for p in self.alive()]
        assert not left, f"processes left running: {left}"


def _app(tmp: Path, clientapp: str = "federated_toy_app:client_app") -> Path:
    return write_app_dir(tmp / "app", serverapp="federated_toy_app:server_app", clientapp=clientapp,
                         config=DEFAULTS, include=[TOY])


def _run(tmp: Path, num: int = 3, timeout_s: float = 120, app: Path | None = None,
         **overrides: object) -> tuple[RunOutcome | UserError, dict | None, Watch, float]:
    results = tmp / "results.json"
    t0 = time.monotonic()
    with Watch() as watch:
        try:
            outcome: RunOutcome | UserError = run_deployment(
                app or _app(tmp), num, {"results-path": str(results), **overrides}, log_dir=tmp / "logs",
                timeout_s=timeout_s, extra_env=watch.env)
        except UserError as err:
            outcome = err
    elapsed = time.monotonic() - t0
    watch.assert_all_gone()  # right away: the runner has already waited for them
    return outcome, json.loads(results.read_text()) if results.exists() else None, watch, elapsed


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunOutcome, dict, Watch, Path]:
    tmp = tmp_path_factory.mktemp("good")
    outcome, results, watch, _ = _run(tmp, payload=PAYLOAD)
    assert isinstance(outcome, RunOutcome), outcome
    return outcome, results, watch, tmp


def test_three_supernodes_all_partitions_reply_and_nothing_is_left(good_run) -> None:
    outcome, results, watch, tmp = good_run
    assert outcome.status == "finished:completed" and outcome.clientapp_errors == ()
    assert results["nodes"] == 3
    assert [r["partitions"] for r in results["rounds"]] == [[0, 1, 2], [0, 1, 2]]
    for name in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp"):
        assert watch.saw(name), f"never saw {name} running: {watch.seen}"
    logs = {p.name for p in (tmp / "logs").iterdir()}
    assert logs == {"superlink.log", "flwr-run.log", "supernode-0.log", "supernode-1.log", "supernode-2.log"}
    assert f"Successfully started run {outcome.run_id}" in (tmp / "logs" / "flwr-run.log").read_text()


def test_json_run_config_value_survives_intact(good_run) -> None:
    _, results, _, _ = good_run
    assert results["payload"] == PAYLOAD
    assert json.loads(results["payload"])["note"] == "it's \"quoted\" {x} = y 'z'"


def test_crashing_clientapp_is_missing_from_results_and_does_not_hang(tmp_path: Path) -> None:
    outcome, results, _, elapsed = _run(tmp_path, **{"fail-partition": 1})
    # flwr reports the run completed: a ClientApp crash reaches the ServerApp as an error reply
    assert isinstance(outcome, RunOutcome) and outcome.status == "finished:completed", outcome
    assert outcome.clientapp_errors == (tmp_path / "logs" / "supernode-1.log",)
    assert [r["partitions"] for r in results["rounds"]] == [[0, 2], [0, 2]]
    assert all("fails on purpose" in r["errors"][0] for r in results["rounds"])
    assert elapsed < 100


def test_failing_serverapp_raises_although_flwr_run_exits_0(tmp_path: Path) -> None:
    outcome, results, _, _ = _run(tmp_path, num=1, **{"fail-server": True})
    assert isinstance(outcome, UserError) and "finished:failed" in str(outcome), outcome
    assert "\n" not in str(outcome) and results is None


def test_bad_app_path_raises_user_error_and_leaves_nothing(tmp_path: Path) -> None:
    # a module that does not exist: caught before any process starts
    app = write_app_dir(tmp_path / "nomod", serverapp="no_such_module:app", clientapp="no_such_module:app",
                        config=DEFAULTS)
    outcome, _, watch, elapsed = _run(tmp_path, app=app)
    assert isinstance(outcome, UserError) and "cannot import no_such_module" in str(outcome)
    assert not watch.saw("flower-superlink") and elapsed < 10
    # no app directory at all
    outcome, _, _, _ = _run(tmp_path, app=tmp_path / "missing")
    assert isinstance(outcome, UserError) and "pyproject.toml" in str(outcome)
    # a run-config key the app does not declare
    outcome, _, _, _ = _run(tmp_path, **{"no-such-key": 1})
    assert isinstance(outcome, UserError) and "no-such-key" in str(outcome)
    # a module without the attribute: only `flwr run` finds out, after the SuperLink and SuperNodes are up
    outcome, _, watch, _ = _run(tmp_path, num=2, app=_app(tmp_path, clientapp="federated_toy_app:nope"))
    assert isinstance(outcome, UserError), outcome
    assert "flwr run failed" in str(outcome) and "nope" in str(outcome) and "flwr-run.log" in str(outcome)
    assert "\n" not in str(outcome) and watch.saw("flower-supernode")


def test_superlink_port_taken_raises_pointing_at_its_log(tmp_path: Path, monkeypatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(deployment, "_free_ports", lambda n: [port] * n)
        outcome, _, _, _ = _run(tmp_path)
    assert isinstance(outcome, UserError) and "flower-superlink exited" in str(outcome)
    assert "address already in use" in str(outcome) and str(tmp_path / "logs" / "superlink.log") in str(outcome)


def test_timeout_kills_everything(tmp_path: Path) -> None:
    # the ServerApp waits (up to 60 s) for 5 nodes that never come
    outcome, _, watch, elapsed = _run(tmp_path, num=2, timeout_s=15, **{"num-nodes": 5})
    assert isinstance(outcome, UserError) and "did not finish in time" in str(outcome), outcome
    assert watch.saw("flwr-serverapp") and elapsed < 30
