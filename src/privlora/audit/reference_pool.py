"""Train the audit's reference adapters one after another, or at once as Ray tasks.

K reference adapters (:mod:`privlora.audit.references`) are most of an audit's cost, and they are
independent: each is an ordinary :func:`privlora.train.loop.train` run with its own seed and its own half
of the population. A :class:`ReferencePool` runs exactly those calls — the same config and splits —
either in this process or as Ray tasks (a local Ray it starts and stops, or a cluster at an address), so
the reference directory, its manifest and every adapter tensor are the same whichever way they were
trained. Each task caps its torch threads so that N tasks share the CPUs instead of oversubscribing them.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privlora.data.splits import Splits
from privlora.errors import UserError
from privlora.extras import require

#: no telemetry, no log de-duplication, no uv runtime env: what an offline audit machine needs
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
#: variables a training needs to behave on a Ray worker as it does here (no hub downloads, no telemetry)
WORKER_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")
#: seconds to wait for a TCP answer from an explicit address before calling it unreachable
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ReferenceJob:
    """One reference adapter to train: exactly the arguments of its sequential ``train`` call."""

    index: int
    of: int  # K, the number of references in the set (for progress lines)
    config: Any  # TrainConfig; its ``out`` is the reference's run directory
    splits: Splits


@dataclass(frozen=True)
class ReferencePool:
    """How to train the missing references: ``workers`` at once (1: one after another in this process)
    as Ray tasks, on a local Ray or on the cluster at ``address`` (then all at once unless ``workers``)."""

    workers: int | None = None
    address: str | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--reference-workers must be ≥ 1, got {self.workers}")

    def check(self) -> None:
        """Fail before any work when the address is malformed or nothing answers there (a typo must not
        surface after the audit's first minutes, or pass unnoticed when every reference already exists)."""
        if self.address is not None:
            _check_reachable(self.address)

    def concurrency(self, jobs: int) -> int:
        """How many references train at once: never more than there are to train."""
        wanted = self.workers if self.workers is not None else (jobs if self.address else 1)
        return max(1, min(wanted, jobs))

    def uses_ray(self, jobs: int) -> bool:
        """Ray for a cluster address, or for more than one reference at once; else the plain loop."""
        return jobs > 0 and (self.address is not None or self.concurrency(jobs) > 1)

    def train(self, jobs: list[ReferenceJob], *, quiet: bool = True) -> None:
        """Train every job, each into its own ``config.out``; a failure names the reference."""
        if not self.uses_ray(len(jobs)):
            train_sequentially(jobs, quiet=quiet)
            return
        train_on_ray(jobs, concurrency=self.concurrency(len(jobs)), address=self.address, quiet=quiet)


def train_sequentially(jobs: list[ReferenceJob], *, quiet: bool = True) -> None:
    """Today's behaviour: one reference after another in this process."""
    from privlora.train.loop import train

    for job in jobs:
        if not quiet:
            print(f"training reference adapter {job.index + 1}/{job.of} on {len(job.splits.members)} images "
                  f"→ {job.config.out}")
        train(job.config, splits=job.splits)


def _check_reachable(address: str) -> None:
    """Ray retries an unreachable GCS for minutes, printing C++ warnings: ask the port once, quickly."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"--ray-address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise UserError(f"cannot reach Ray at {address!r}: {e.strerror or e}") from None


def _start_ray(address: str | None, cpus: int, gpus: int) -> bool:
    """Connect to (or start) Ray; True when this call started the connection and must shut it down."""
    require("federated", "ray")  # Ray comes with Flower's simulation engine
    import ray

    if ray.is_initialized():  # someone else's Ray (a notebook, a Ray job): use it, leave it running
        return False
    os.environ.update({k: v for k, v in RAY_ENV.items() if k not in os.environ})
    quiet_logs = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False,
                  "configure_logging": False}
    if address is None:
        ray.init(num_cpus=cpus, num_gpus=gpus, **quiet_logs)
        return True
    _check_reachable(address)
    try:
        ray.init(address=address, **quiet_logs)
    except Exception as e:  # ConnectionError, ValueError, RuntimeError: all mean "not a Ray we can use"
        message = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"cannot connect to Ray at {address!r}: {message}") from None
    return True


def _train_one(config: Any, splits: Splits, threads: int, cwd: str) -> str:
    """The Ray task: the sequential ``train`` call, with ``threads`` torch threads, run from the driver's
    working directory when the node has it (relative data sources and outputs then mean the same)."""
    import torch

    from privlora.train.loop import train

    if Path(cwd).is_dir():
        os.chdir(cwd)
    torch.set_num_threads(threads)
    train(config, splits=splits)
    return str(config.out)


def _resources(device: str, concurrency: int, local: bool) -> tuple[int, float, int, int]:
    """(torch threads and CPUs per task, GPUs per task, CPUs and GPUs of a local Ray) for ``concurrency``
    tasks: the CPUs are split between them, GPUs are shared (fractions) when there are fewer than tasks."""
    import torch

    cuda = device.startswith("cuda")
    if local:
        cpus_total = os.cpu_count() or 1
        threads = max(1, min(torch.get_num_threads(), cpus_total // concurrency))
        gpus_total = torch.cuda.device_count() if cuda else 0
    else:
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        biggest = max((int(r.get("CPU", 0)) for r in nodes), default=1)
        threads = max(1, min(biggest, int(ray.cluster_resources().get("CPU", 1)) // concurrency))
        gpus_total = int(ray.cluster_resources().get("GPU", 0)) if cuda else 0
    if cuda and gpus_total == 0:
        raise UserError(f"the references train on {device!r} but the Ray {'machine' if local else 'cluster'} "
                        "has no GPU; train them with --device cpu or on a cluster with GPUs")
    per_task_gpu = min(1.0, gpus_total / concurrency) if cuda else 0.0
    return threads, per_task_gpu, threads * concurrency, gpus_total


def train_on_ray(jobs: list[ReferenceJob], *, concurrency: int, address: str | None, quiet: bool = True) -> None:
    """Train ``jobs`` as Ray tasks, at most ``concurrency`` at a time; wait for all; raise on the first failure."""
    require("federated", "ray")
    import ray
    from ray.exceptions import RayError

    device = str(jobs[0].config.device)
    local = address is None and not ray.is_initialized()
    if local:
        threads, gpu, cpus, gpus = _resources(device, concurrency, local=True)
        started = _start_ray(None, cpus, gpus)
    else:
        started = _start_ray(address, 0, 0)
    try:
        if not local:
            threads, gpu, _, _ = _resources(device, concurrency, local=False)
        # a local Ray's workers inherit this environment; a cluster's get its offline switches explicitly
        # (a runtime env starts dedicated workers: measured 36 s instead of 20 s of imports on 2 loaded cores)
        env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ and not local}
        task = ray.remote(_train_one).options(num_cpus=threads, num_gpus=gpu, max_retries=0,
                                              runtime_env={"env_vars": env} if env else None)
        where = f"Ray at {address}" if address else "a local Ray"
        if not quiet:
            print(f"training {len(jobs)} reference adapters on {where}, {concurrency} at once "
                  f"({threads} CPU thread{'s' * (threads > 1)} each)")
        pending = list(jobs)
        running: dict[Any, ReferenceJob] = {}
        while pending or running:
            while pending and len(running) < concurrency:
                job = pending.pop(0)
                # cuda:N names a GPU of this machine; a task sees only the GPU Ray gives it, as cuda
                config = job.config.model_copy(update={"quiet": True, "device": "cuda"}) \
                    if device.startswith("cuda:") else job.config.model_copy(update={"quiet": True})
                running[task.remote(config, job.splits, threads, os.getcwd())] = job
            done, _ = ray.wait(list(running), num_returns=1)
            job = running.pop(done[0])
            try:
                ray.get(done[0])
            except RayError as e:
                for ref in running:
                    ray.cancel(ref)
                cause = getattr(e, "cause", None) or e
                message = " ".join(str(cause).split()).split(" Traceback ")[0][:400]
                raise UserError(f"reference adapter {job.index} ({job.config.out}) failed on {where}: "
                                f"{message}") from None
            if not (Path(job.config.out) / "adapter").is_dir():
                raise UserError(f"reference adapter {job.index} trained on {where}, but {job.config.out} is not "
                                "visible here: put --reference-dir on storage every Ray node shares")
            if not quiet:
                print(f"reference adapter {job.index + 1}/{job.of} done → {job.config.out}")
    finally:
        if started:
            ray.shutdown()
