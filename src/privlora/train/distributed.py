"""Data-parallel training under ``torchrun`` / ``accelerate launch``: one global batch, sharded over processes.

Every process builds the same model (same seed) and runs the same seeded sampler, so every process draws the
*same global batch* — and, under a diffusion Task's :meth:`~privlora.tasks.diffusion.DiffusionTask.logical_batch`,
the same timesteps and noise for all of its samples. Each process then takes its contiguous shard of it
(:meth:`World.shard`); the shards' gradients are summed with one ``all_reduce`` per step. The result is the
update one process computes on the whole batch (up to float summation order), and it is the same, bit for
bit, on every process — so the optimizer, the sampler, the noise generators and MP/SMP's proxy attacker stay
replicas without further messages (the attacker's turn runs on every process on the same draws; the global
RNG its dropout reads is re-synchronised from rank 0 after each step, :meth:`World.sync_rng`).

Weighting: plain/MP/SMP weight each physical chunk by ``size / global batch``, so the sum over processes is
the global mean even when the batch does not split evenly. For MP/SMP (whose loss is not a sum over samples)
that is what gradient accumulation with one chunk per process would compute — the ranks stay identical,
but the run is not bit-comparable with a one-process run (nor is a model with dropout, e.g. the text
task's: every rank draws its shard's masks from the same synchronised RNG state).

DP-SGD (why an explicit ``all_reduce``, not Opacus' ``DistributedDPOptimizer``/``DPDDP``): Opacus'
distributed optimizer assumes each process Poisson-samples its *own* batch with its own (integer) expected
batch size, adds noise on rank 0 only and divides by the world size afterwards. Here the one Poisson batch
at ``q = global expected batch / N`` is drawn identically everywhere and sharded — the sampling the single
accountant assumes — so :func:`sum_before_noise` instead wraps the optimizer's ``add_noise``: every process
clips its own samples (clipping is per sample), the clipped sums are all-reduced, and then every process
adds the *same* Gaussian draw (same seeded generator), so exactly one noise draw enters the update, which
Opacus then divides by the global expected batch size. Noise generators stay equal on every process, so the
checkpoint rank 0 writes is global state and resumes under any world size. ε is that of one process running
the same global batch.

Only rank 0 writes (run directory, metrics, checkpoints, adapter); the others wait for its result.
Assumes the run directory is on a file system every process sees (always so on one machine).
"""

from __future__ import annotations

import atexit
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

from privlora.errors import UserError

T = TypeVar("T")

#: what torchrun and accelerate launch set for every process
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: collectives wait this long: the other ranks wait out rank 0's final evaluation (utility, samples)
TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; ``World()`` is a one-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writes(self) -> bool:
        """Only rank 0 touches the run directory."""
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's contiguous share of a global batch of ``n`` (sizes differ by ≤ 1)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    # --- collectives (no-ops in one process) ---------------------------------------------------
    def on_rank0(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on rank 0 only (it creates or checks the run directory); its result — or its
        error, raised again on every rank — is shared, so no rank waits forever for a rank 0 that failed."""
        if not self.distributed:
            return fn(*args)
        import torch.distributed as dist

        box: list[Any] = [None]
        if self.writes:
            try:
                box = [("ok", fn(*args))]
            except BaseException as e:
                dist.broadcast_object_list([("error", str(e))], src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise UserError(value)
        return value

    def share(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (the final result: also the barrier the others wait at)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value if self.writes else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _all_reduce(self, flat: torch.Tensor, op: str = "sum") -> torch.Tensor:
        import torch.distributed as dist

        device = _collective_device()
        moved = flat.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return moved.to(flat.device)

    def sum_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` over ranks in place, in one message (flattened, per dtype)."""
        if not self.distributed or not tensors:
            return
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            group = [t for t in tensors if t.dtype == dtype]
            summed = self._all_reduce(torch.cat([t.detach().reshape(-1) for t in group]))
            offset = 0
            for t in group:
                t.detach().copy_(summed[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Each rank's shard-weighted gradients → the global batch's gradient, on every rank."""
        if not self.distributed:
            return
        for p in params:
            if p.grad is None:  # this rank's shard gave it no gradient: it adds zero
                p.grad = torch.zeros_like(p)
        self.sum_tensors([p.grad for p in params])

    def sum_values(self, values: dict[str, float]) -> dict[str, float]:
        """Per-rank partial figures (already weighted by shard / global batch) → their global value."""
        if not self.distributed or not values:
            return values
        keys = sorted(values)
        summed = self._all_reduce(torch.tensor([values[k] for k in keys], dtype=torch.float64))
        return dict(zip(keys, summed.tolist(), strict=True))

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (Ctrl-C reaches ranks at different steps)."""
        if not self.distributed:
            return flag
        return bool(self._all_reduce(torch.tensor([int(flag)], dtype=torch.int64), op="max").item())

    def sync_rng(self) -> None:
        """Rank 0's global RNG state on every rank: dropout (MP/SMP's attacker) drew for shards of different
        sizes during the step; the attacker's own turn must draw the same masks everywhere."""
        if not self.distributed:
            return
        import torch.distributed as dist

        device = _collective_device()
        state = torch.get_rng_state().to(device)
        dist.broadcast(state, src=0)
        torch.set_rng_state(state.cpu())
        if device.type == "cuda":
            cuda_state = torch.cuda.get_rng_state().to(device)
            dist.broadcast(cuda_state, src=0)
            torch.cuda.set_rng_state(cuda_state.cpu())

    def check_replicas(self, state: Any) -> None:
        """Fail loudly if the ranks' copies of the training state (nested dicts/lists of tensors and
        numbers, e.g. what a checkpoint holds) drifted apart: they must be bit-equal."""
        if not self.distributed:
            return
        import torch.distributed as dist

        digest = hashlib.sha256()
        _digest(state, digest)
        digests: list[Any] = [None] * self.size
        dist.all_gather_object(digests, digest.hexdigest())
        if len(set(digests)) != 1:
            raise RuntimeError(f"the {self.size} training processes ended with different states "
                               "(a bug in privlora's data parallelism); the run is not saved")

    # --- the global batch -------------------------------------------------------------------------
    @contextmanager
    def global_batch(self, task: Any, batch: dict[str, Any], n: int, generator: torch.Generator,
                     autocast: Callable[[], Any]) -> Iterator[tuple[dict[str, Any], int]]:
        """This rank's shard of a global batch of ``n``, inside the Task's logical batch: the timesteps and
        noise are drawn once for all ``n`` samples (as one process would) and this rank gets its slice, so
        every sample sees the numbers it would see in a one-process run."""
        start, stop = self.shard(n)
        mine = {key: value[start:stop] for key, value in batch.items()}
        logical = getattr(task, "logical_batch", None)
        if logical is None:  # no random draws per sample (the text task)
            yield mine, stop - start
            return
        with logical(n, generator, start=start):
            if start == stop and n:  # nothing for this rank: draw the batch's noise anyway, to stay in step
                with torch.no_grad(), autocast():
                    x0 = task.encode({key: value[:1] for key, value in batch.items()})
                task.sample_t_noise(x0[:0], generator)
            yield mine, stop - start


def _digest(value: Any, digest: Any) -> None:
    if isinstance(value, torch.Tensor):
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(repr(key).encode())
            _digest(value[key], digest)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _digest(item, digest)
    else:
        digest.update(repr(value).encode())


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_before_noise(world: World, dp_optimizer: Any) -> None:
    """Wrap Opacus' ``add_noise`` (it runs after ``clip_and_accumulate`` summed this rank's clipped
    per-sample gradients into ``p.summed_grad``, before ``scale_grad`` divides by the expected batch
    size): sum the clipped gradients over ranks first, then every rank adds the same noise draw."""
    if not world.distributed:
        return
    add_noise = dp_optimizer.add_noise

    def add_noise_to_global_sum() -> None:
        world.sum_tensors([p.summed_grad for p in dp_optimizer.params])
        add_noise()

    dp_optimizer.add_noise = add_noise_to_global_sum


def refuse_small_batch(world: World, mode: str, global_batch: int) -> None:
    """plain/MP/SMP: every rank needs a sample per step (DP's Poisson shards may be empty, handled)."""
    if world.distributed and mode != "dp" and global_batch < world.size:
        raise UserError(f"batch_size × gradient_accumulation_steps = {global_batch} is smaller than the "
                        f"{world.size} processes: each process needs at least one sample per step")


def start(device: str) -> World:
    """The launch's :class:`World`: one process, or — when ``WORLD_SIZE`` > 1 — join the process group
    (gloo on the CPU, NCCL on CUDA, each process on ``cuda:LOCAL_RANK``)."""
    size = os.environ.get("WORLD_SIZE", "1")
    if not size.isdigit() or int(size) <= 1:
        return World()
    missing = [name for name in LAUNCH_ENV if not os.environ.get(name)]
    if missing:
        raise UserError(f"WORLD_SIZE={size} is set but {', '.join(missing)} is not: launch many processes "
                        "with torchrun or accelerate launch, or unset WORLD_SIZE for one process")
    world = World(rank=int(os.environ["RANK"]), size=int(size), local_rank=int(os.environ["LOCAL_RANK"]))
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        if device != "cuda":
            raise UserError(f"--device {device} names one GPU, but each of the {world.size} processes takes "
                            "its own (cuda:LOCAL_RANK): give --device cuda")
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        atexit.register(_close)
    return world


def _close() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that reports to the user."""
    return os.environ.get("RANK", "0") in ("", "0")
