"""``federate(config)``: one federated training run, start to finish, on Flower's simulation or
deployment engine, into a run directory (DESIGN.md) that appears complete or not at all.

Flower's own success signals are not trusted (``flwr run`` exits 0 when clients crash; a simulation
whose clients all fail still "finishes"): the run is judged by what the server wrote — one metrics
line per round, the adapter and the privacy ledger.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privlora.config import FederatedConfig, dump_config
from privlora.errors import UserError
from privlora.progress import progress_bar
from privlora.runs import atomic_dir, write_json_atomic

OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


@dataclass(frozen=True)
class FederatedResult:
    run_dir: Path
    rounds: list[dict[str, Any]]
    privacy: dict[str, Any]

    @property
    def final(self) -> dict[str, Any]:
        return self.rounds[-1]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _simulate(config: FederatedConfig, workdir: Path) -> None:
    from flwr.simulation import run_simulation

    from privlora.federated.app import client_app_for, server_app_for

    cpus = max(1, os.cpu_count() or 1)
    backend = {"client_resources": {"num_cpus": config.simulation.client_cpus, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": logging.ERROR,
                             "log_to_driver": False, "configure_logging": False}}
    run_simulation(server_app=server_app_for(config, workdir), client_app=client_app_for(config),
                   num_supernodes=config.clients, backend_config=backend, verbose_logging=False)


def _deploy(config: FederatedConfig, workdir: Path) -> None:
    import tempfile

    from privlora.federated.app import CONFIG_KEY, WORKDIR_KEY
    from privlora.federated.deployment import run_deployment, write_app_dir

    client = "privlora.federated.app:secagg_client_app" if config.secagg.enabled else \
        "privlora.federated.app:client_app"
    run_config = {CONFIG_KEY: config.model_dump_json(), WORKDIR_KEY: str(workdir.resolve())}
    with tempfile.TemporaryDirectory(prefix="privlora-app-") as app:
        # Flower only accepts run-config keys the app declares: declare ours with empty defaults
        app_dir = write_app_dir(Path(app), serverapp="privlora.federated.app:server_app", clientapp=client,
                                config={CONFIG_KEY: "{}", WORKDIR_KEY: ""})
        run_deployment(app_dir, config.clients, run_config, log_dir=workdir / "logs",
                       timeout_s=config.round_timeout * config.rounds + 300)


ENGINES = {"simulation": _simulate, "deployment": _deploy}


def _quiet_flower(verbose: bool = False) -> None:
    """Flower logs every round at INFO (and its shutdown at DEBUG); our progress bar and metrics say the same.
    Warnings stay; ``verbose`` (``privlora federate -v``) brings back INFO. Flower's records go through its own
    console handler only: propagated to the root logger — which a library imported along the way may have
    given a handler — they printed once more there, DEBUG included (measured: ~25 lines per DP run)."""
    from flwr.supercore.logger import update_console_handler

    update_console_handler(level=logging.INFO if verbose else logging.WARNING, timestamps=False, colored=False)
    logging.getLogger("flwr").propagate = False
    logging.getLogger("ray").setLevel(logging.WARNING)
    for name in ("flwr", "ray._private.worker"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _NotActionable) for f in log.filters):
            log.addFilter(_NotActionable())


class _NotActionable(logging.Filter):
    """Notices a user can do nothing about: Flower 1.42 warns that ``run_simulation`` and the legacy
    strategy API are deprecated (true and known: SecAgg+ exists only there, docs/architecture.md), and
    Ray that it sets no SIGTERM handler outside the main thread (the engine runs in our worker thread;
    Ctrl-C still stops the command)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "deprecated" not in text.lower() and "SIGTERM handler is not set" not in text


def federate(config: FederatedConfig, *, overwrite: bool = True, verbose: bool = False) -> FederatedResult:
    """Run ``config.rounds`` federated rounds; returns the per-round metrics and the privacy ledger.
    ``verbose``: Flower's INFO logs too (default: its warnings only)."""
    os.environ.update(OFFLINE_ENV)
    _quiet_flower(verbose)
    from privlora.federated.data import federated_data
    from privlora.federated.tasks import federated_task

    split = federated_data(config)  # bad data source / too few samples: fail before any engine starts
    out = Path(config.out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    with atomic_dir(out) as work:
        (work / "config.yaml").write_text(dump_config(config))
        write_json_atomic(work / "splits.json", split.record(config))  # who trained on what, for the audit
        engine = ENGINES[config.engine]
        failure: list[BaseException] = []

        def target() -> None:
            try:
                engine(config, work)
            except BaseException as e:  # re-raised in the calling thread
                failure.append(e)

        thread = threading.Thread(target=target, name="privlora-federate", daemon=True)
        thread.start()
        try:
            _follow(config, work, thread)
        except KeyboardInterrupt:
            _stop_engine(thread)
            raise
        if failure:
            raise failure[0]
        result = _check_results(config, work)
        from privlora.federated.report import plot_metrics

        plot_metrics(result.rounds, work / "metrics.png", title=f"{config.strategy} · {config.clients} clients",
                     headline=federated_task(config).headline)
    return FederatedResult(out, result.rounds, result.privacy)


def _follow(config: FederatedConfig, work: Path, thread: threading.Thread) -> None:
    """Wait for the engine thread, advancing the progress bar as the server writes rounds."""
    from privlora.federated.tasks import federated_task

    kind = federated_task(config)  # text: accuracy; causal-lm: perplexity
    with progress_bar(f"federated {config.strategy}", total=config.rounds, quiet=config.quiet) as bar:
        done = 0
        while thread.is_alive():
            thread.join(timeout=0.5)
            rounds = [m for m in read_metrics(work / "metrics.jsonl") if m["round"] > 0]
            for m in rounds[done:]:
                fields = {kind.short: m[kind.headline]}
                if m.get("epsilon") is not None:
                    fields["eps"] = m["epsilon"]
                bar.advance(1, **fields)
            done = max(done, len(rounds))


def _stop_engine(thread: threading.Thread) -> None:
    """Ctrl-C: the engine runs in a thread that a signal cannot reach. Stopping every process it started
    (Ray's workers and daemons, or the deployment's SuperLink and SuperNodes) makes it fail fast; the
    half-written run directory is then removed by ``atomic_dir``."""
    import psutil
    from flwr.supercore.logger import update_console_handler

    update_console_handler(level=logging.CRITICAL)  # the engine's threads now fail loudly: not news
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(children, timeout=10)
    thread.join(timeout=15)


def _check_results(config: FederatedConfig, work: Path) -> FederatedResult:
    rounds = read_metrics(work / "metrics.jsonl")
    done = [m for m in rounds if m["round"] > 0]
    if len(done) < config.rounds or not (work / "adapter").is_dir() or not (work / "privacy.json").exists():
        logs = work / "logs"
        raise UserError(f"the federated run stopped after {len(done)} of {config.rounds} rounds"
                        + (f"; see {logs}" if logs.exists() else "") + " (nothing was written to "
                        f"{config.out})")
    if all(m.get("accepted", 0) == 0 for m in done):
        raise UserError("no client update was accepted in any round (all clients failed or were rejected); "
                        f"nothing was written to {config.out}")
    return FederatedResult(work, rounds, json.loads((work / "privacy.json").read_text()))

