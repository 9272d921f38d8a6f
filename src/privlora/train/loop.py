"""The one training loop, for every Task and every objective: ``train(config) -> TrainResult``.

Read top to bottom: resolve the run directory → load base + LoRA → load data and split it → pick the
objective (plain / MP / SMP) and, for ``dp``, wrap the optimizer with DP-SGD → loop → save adapter,
``privacy.json``, utility figures → rename ``<out>.partial`` to ``<out>``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from privlora.config import TrainConfig, dump_config
from privlora.data.imageset import ImageSet
from privlora.data.split_presets import FRACTIONS, split_label
from privlora.data.splits import Splits, make_splits
from privlora.errors import UserError, file_error
from privlora.progress import progress_bar
from privlora.runs import rename_dir, write_json_atomic
from privlora.tasks.diffusion import DiffusionTask
from privlora.tasks.latent_cache import attach_cache
from privlora.tasks.lora import LoraSpec
from privlora.train.augment import Augmenter
from privlora.train.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from privlora.train.data import load_task_and_data
from privlora.train.distributed import World, refuse_small_batch, sum_before_noise
from privlora.train.distributed import start as start_processes
from privlora.train.dp import GradientCanaryHook, PrivateTraining, resolve
from privlora.train.epochs import with_epoch_steps
from privlora.train.lm_canaries import with_canaries, write_canaries
from privlora.train.lm_utility import measure_lm_utility
from privlora.train.objectives import OBJECTIVES, Objective
from privlora.train.precision import Precision
from privlora.train.privacy_stop import PrivacyStop
from privlora.train.reporters import MetricsLog, check_reporter, open_reporter
from privlora.train.schedule import make_scheduler
from privlora.train.step import Sampler as _Sampler
from privlora.train.step import StepParts as _StepParts
from privlora.train.step import chunks as _chunks  # noqa: F401 - loop._chunks, as before the split
from privlora.train.step import one_step as _one_step  # called as loop._one_step: tests patch it here
from privlora.train.step import plain_step as _plain_step  # noqa: F401 - loop._plain_step
from privlora.train.step import private_step as _private_step  # noqa: F401 - loop._private_step
from privlora.train.text_utility import measure_text_utility
from privlora.train.utility import measure_utility
from privlora.train.validation import Validation

#: config.task → utility measure written to utility.json
UTILITY = {"image": measure_utility, "text": measure_text_utility, "causal-lm": measure_lm_utility}


class Interrupted(UserError):
    """Ctrl-C during training: a checkpoint was written; ``--resume`` continues."""

    exit_code = 130


class _StopRequest:
    """Ctrl-C handling during the loop: the first Ctrl-C lets the current step finish, so the checkpoint
    is taken at a step boundary and a resumed run matches an uninterrupted one exactly; a second
    Ctrl-C stops at once (KeyboardInterrupt). Signal handlers exist only in the main thread; elsewhere
    Ctrl-C is not ours to handle and nothing is installed."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            previous = self._previous if self._previous is not None else signal.default_int_handler
            signal.signal(signal.SIGINT, previous)


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    mode: str
    steps: int
    final_loss: float
    privacy: dict[str, Any]
    utility: dict[str, Any]
    seconds: float
    #: steps this process ran (``steps`` minus ``resumed_at``); both are reported for a resumed run
    steps_run: int | None = None
    resumed_at: int | None = None  # the checkpoint's step a resumed run continued from; None: fresh


def _run_dirs(config: TrainConfig) -> tuple[Path, Path, bool]:
    """``(out, out.partial, resuming)``. ``--resume`` with nothing to resume — no ``.partial``, or one killed
    before its first checkpoint — starts over with a note instead of refusing, so the command that was
    interrupted can simply be repeated with ``--resume``."""
    out = Path(config.out)
    partial = out.with_name(out.name + ".partial")
    if out.exists():
        raise UserError(f"run directory {out} already exists; choose another --out or remove it")
    has_checkpoint = (partial / CHECKPOINT).is_file()
    if config.resume and has_checkpoint:
        return out, partial, True
    if config.resume:
        why = "no checkpoint was written yet" if partial.exists() else f"{partial} does not exist"
        print(f"note: nothing to resume ({why}); starting from step 0", file=sys.stderr, flush=True)
        shutil.rmtree(partial, ignore_errors=True)
    elif has_checkpoint:
        raise UserError(f"an interrupted run is in {partial}: continue it with --resume, or remove it")
    elif partial.exists():
        raise UserError(f"{partial} holds a run stopped before its first checkpoint (or one still running): "
                        "start it over with --resume, or remove it")
    partial.mkdir(parents=True)
    return out, partial, False


def _make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    o = config.optim
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=0.9, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def _lora_spec(config: TrainConfig) -> LoraSpec | None:
    if config.lora.full_finetune:
        return None
    return LoraSpec(rank=config.lora.rank, alpha=config.lora.alpha, targets=tuple(config.lora.targets))


def _check_resumable(config: TrainConfig, run: Path) -> None:
    """A resumed run must continue the run it resumes: same config up to how it is shown and where."""
    from privlora.config import load_config

    saved = load_config(run / "config.yaml").model_dump(mode="json")
    now = config.model_dump(mode="json")
    # out: the same run, however its path is spelt; how often checkpoints are taken changes no result
    ignored = {"resume", "quiet", "device", "out", "checkpoint_every", "checkpoint_minutes", "report_to",
               "data.split"}  # the preset's name: its fractions are compared

    def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        items: dict[str, Any] = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                items.update(flat(value, f"{prefix}{key}."))
            elif f"{prefix}{key}" not in ignored:
                items[f"{prefix}{key}"] = value
        return items

    a, b = flat(saved), flat(now)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if changed:
        k = changed[0]
        raise UserError(f"--resume must repeat the interrupted run's settings, but {k} was {a.get(k)!r} "
                        f"and is now {b.get(k)!r} (see {run / 'config.yaml'}); "
                        f"{len(changed)} setting(s) differ")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint a resumed run continues from (and torn lines)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(kept))


def train(config: TrainConfig, *, splits: Splits | None = None, extra: ImageSet | None = None,
          gradient_canaries: GradientCanaryHook | None = None) -> TrainResult:
    """Train a LoRA adapter as ``config`` says and write the run directory (see DESIGN.md).

    ``splits`` replaces the seeded split of ``config.data`` — the audit's reference adapters train on
    chosen halves of a population this way. ``extra`` adds samples to the dataset before ``splits``
    picks from it (the one-run DP audit's canaries, which ``splits.members`` then names); they are not
    in ``config.data.source``, so a resume must pass them again. ``gradient_canaries`` (DP runs only):
    the white-box audit's hook into every DP-SGD step (:class:`privlora.train.dp.GradientCanaryHook`).

    Under ``torchrun`` / ``accelerate launch`` every process calls this; they share each step's global
    batch and only rank 0 writes (:mod:`privlora.train.distributed`).
    """
    if gradient_canaries is not None and config.mode != "dp":
        raise UserError(f"gradient canaries need a DP-SGD run (mode: dp), this config is mode {config.mode!r}")
    check_reporter(config.report_to)  # a missing tensorboard/mlflow package: refused before any work
    world = start_processes(config.device)
    if gradient_canaries is not None and world.distributed:
        raise UserError("gradient canaries need a one-process run (they see one process's gradient sum)")
    refuse_small_batch(world, config.mode, config.optim.batch_size * config.optim.gradient_accumulation_steps)
    start = time.time()
    torch.manual_seed(config.seed)
    out, run, resuming = world.on_rank0(_run_dirs, config)
    if config.resume != resuming:  # --resume with nothing to resume: a fresh run from here on
        config = config.model_copy(update={"resume": resuming})
    try:
        task, data = load_task_and_data(config, _lora_spec(config))
        attach_cache(task, enabled=config.data.cache_latents, cache_dir=config.data.cache_dir)
        if extra is not None:
            data = data.concat(extra)
        splits = Splits.load(run) if config.resume else splits or make_splits(
            data, members=config.data.members, aux=config.data.aux, eval=config.data.eval,
            seed=config.seed, source=config.data.source)
        if world.writes and not config.quiet:  # which share of the data trains is never silent
            fractions = {k: getattr(config.data, k) for k in FRACTIONS}
            print(splits.summary(len(data), split_label(config.data.split, fractions)), flush=True)
        members, aux = data.by_ids(splits.members), data.by_ids(splits.aux)
        members = with_canaries(config, members)  # causal-lm: secret-sharer canaries join the members only
        if isinstance(members, ImageSet):  # kohya repeat folders: split by source image, then repeat
            members = members.expanded()
        config = with_epoch_steps(config, len(members))  # --num-train-epochs → optim.max_steps
        held_out = data.by_ids(splits.eval)
        if config.resume:
            _check_resumable(config, run)
        elif world.writes:
            splits.save(run)
            (run / "config.yaml").write_text(dump_config(config))
            write_canaries(config, run)
        return _train_loop(config, task, members, aux, held_out, out, run, start, gradient_canaries, world)
    except Interrupted:
        raise  # a resumable checkpoint was written: keep <out>.partial
    except BaseException as e:
        # bad input found during set-up (e.g. an impossible target ε) or a failed write (full or
        # read-only disk): leave nothing half-written, or only the last complete checkpoint to resume from
        kept = config.resume or (run / CHECKPOINT).exists()
        if not kept and world.writes:
            shutil.rmtree(run, ignore_errors=True)
        failure = None if isinstance(e, UserError) else file_error(e)
        if failure is None:
            raise
        if kept:
            raise UserError(f"{failure}; the last checkpoint is in {run}: fix that and continue with --resume"
                            ) from None
        raise UserError(f"{failure}; nothing of {out} was kept") from None


def _train_loop(config: TrainConfig, task: DiffusionTask, members: ImageSet, aux: ImageSet,
                held_out: ImageSet, out: Path, run: Path, start: float,
                gradient_canaries: GradientCanaryHook | None = None, world: World = World()) -> TrainResult:
    opts = config.optim
    accumulation = opts.gradient_accumulation_steps
    objective: Objective = OBJECTIVES[config.mode](task, members=members, aux=aux, options=config.mp,
                                                   batch_size=opts.batch_size)
    if opts.gradient_checkpointing:
        task.enable_gradient_checkpointing()
    params = task.trainable_parameters()
    guard = PrivacyStop(config, task, members, aux, params)  # privacy-aware early stop; inert when off
    optimizer = _make_optimizer(config, params)
    scheduler = make_scheduler(optimizer, opts)  # on the inner optimizer: DP's wrapper shares its groups
    precision = Precision(opts.mixed_precision, torch.device(str(task.device)))
    augment = Augmenter(config.data, seed=config.seed)
    private = None
    if config.mode == "dp":
        # one logical batch per step: expected size K·B, so q = K·B/N is what is sampled and accounted
        dp_params = resolve(config.dp, n=len(members), batch_size=opts.batch_size * accumulation,
                            steps=opts.max_steps)
        private = PrivateTraining(task, optimizer, dp_params, n=len(members), seed=config.seed,
                                  gradient_canaries=gradient_canaries, accumulation=accumulation,
                                  physical_batch=opts.batch_size, clipping=config.dp.clipping)
        sum_before_noise(world, private.optimizer)
    generator = torch.Generator().manual_seed(config.seed)
    sampler = _Sampler(len(members), opts.batch_size * accumulation, generator, private)
    step_parts = _StepParts(task, objective, private, optimizer, params, sampler, members, generator,
                            precision=precision, augment=augment, chunk=opts.batch_size,
                            grad_clip=opts.grad_clip, world=world)
    step = 0
    resumed_at: int | None = None
    if config.resume:
        state = load_checkpoint(run)
        step = resumed_at = int(state["step"])
        with torch.no_grad():
            for p, saved in zip(params, state["params"], strict=True):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        objective.load_state_dict(state["objective"])
        sampler.load_state_dict(state["sampler"])
        if "rng" in state:  # dropout in MP/SMP's proxy attacker draws from the global generator
            torch.set_rng_state(state["rng"])
        if private is not None:
            private.load_state_dict(state["private"])
        if "scheduler" in state:  # checkpoints from before schedules existed: constant lr
            scheduler.load_state_dict(state["scheduler"])
        precision.load_state_dict(state.get("scaler", {}))
        augment.load_state_dict(state.get("augment", {}))
        guard.load_state_dict(state.get("privacy_stop", {}))
        if world.writes:
            _truncate_metrics(run / "metrics.jsonl", step)
    last_saved: int | None = step if config.resume else None
    every_seconds = config.checkpoint_minutes * 60
    saved_at = time.monotonic()

    def checkpoint() -> None:
        # everything a step reads or changes, so that a resumed run repeats the uninterrupted one exactly
        nonlocal last_saved, saved_at
        if world.writes:  # the ranks' states are replicas: rank 0's is the global state
            save_checkpoint(run, {"step": step, "params": [p.detach().cpu() for p in params],
                                  "optimizer": optimizer.state_dict(), "objective": objective.state_dict(),
                                  "sampler": sampler.state_dict(), "rng": torch.get_rng_state(),
                                  "private": private.state_dict() if private is not None else {},
                                  "privacy_stop": guard.state_dict(), "scheduler": scheduler.state_dict(),
                                  "scaler": precision.state_dict(), "augment": augment.state_dict()})
        last_saved, saved_at = step, time.monotonic()

    def due() -> bool:
        """Every ``checkpoint_every`` steps, and by time as well: a slow run (large base, CPU) may take
        hours to reach step 100, and a kill before then must not lose all of it."""
        return step % config.checkpoint_every == 0 or (
            every_seconds > 0 and time.monotonic() - saved_at >= every_seconds)

    validation = Validation(config.validation, task, run, seed=config.seed, sample_steps=config.eval.sample_steps,
                            writes=world.writes)
    last_loss, ema = float("nan"), None
    checked = False  # has the no-dead-gradient check passed (plain/MP/SMP once; DP on a non-empty batch)?
    updated = False  # has an update with lr > 0 happened yet (only then can LoRA A's gradient be non-zero)?
    task.train()
    # --report-to: a copy of every metrics.jsonl row and validation grid, closed before <out>.partial is renamed
    reporter = open_reporter(config.report_to, run, out, resumed_at=resumed_at, writes=world.writes)
    try:
        metrics_file = run / "metrics.jsonl" if world.writes else Path(os.devnull)
        with metrics_file.open("a") as jsonl, _StopRequest() as stop, \
                progress_bar(f"train {config.mode}", total=opts.max_steps, completed=step,
                             quiet=config.quiet or not world.writes) as bar:
            metrics = MetricsLog(jsonl, reporter)
            while step < opts.max_steps and not guard.stopped:
                lr = float(optimizer.param_groups[0]["lr"])  # the rate this update uses
                # not before an update has moved the weights: LoRA B starts at zero, so A's gradient is exactly
                # zero until then (step 0, and every step of a warmup that starts at lr 0). Counted by updates,
                # not by B ≠ 0: a B that never gets a gradient stays zero, and that is what the check must catch.
                check = not checked and updated
                logs = _one_step(step_parts, check=check)
                checked = checked or (check and (private is None or private.checked))
                updated = updated or lr > 0
                scheduler.step()
                logs["lr"] = lr
                step += 1
                last_loss = logs.get("loss", last_loss)
                ema = last_loss if ema is None else 0.9 * ema + 0.1 * last_loss
                if step % config.log_every == 0 or step == opts.max_steps:
                    if private is not None:
                        logs["epsilon"] = private.epsilon()
                    metrics.write(json.dumps({"step": step, **logs}) + "\n")
                    metrics.flush()
                guard.after_step(step, metrics)  # may restore the last passing check's LoRA and stop
                grid = validation.after_step(step)  # --validation-prompt: a grid every N steps, RNG untouched
                if grid is not None:
                    reporter.image(step, "validation", grid)
                stopping = world.any(stop.requested)  # every rank stops at the same step
                # the last step is checkpointed too: an interrupt during evaluation then repeats no step
                if due() or step == opts.max_steps or stopping or guard.stopped:
                    checkpoint()
                bar.advance(loss=ema)
                if stopping:
                    raise Interrupted(f"interrupted at step {step}; checkpoint saved in {run}; "
                                      "continue with the same command and --resume")
    except KeyboardInterrupt:
        # a second Ctrl-C, or an interrupt raised inside a step: that step is torn, so a resume continues
        # from the last checkpoint written at a step boundary
        if last_saved is None:
            raise  # nothing resumable: train() removes <out>.partial
        raise Interrupted(f"interrupted during step {step + 1}; the checkpoint of step {last_saved} is in "
                          f"{run}; continue with the same command and --resume") from None
    finally:
        reporter.close()  # flushed into <out>.partial: renamed with it, appended to by a resume
    world.check_replicas({"params": params, "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(),
                          "objective": objective.state_dict(), "rng": torch.get_rng_state(),
                          "private": private.state_dict() if private is not None else {}})
    try:
        if not world.writes:  # rank 0 evaluates and saves; the others wait for its result
            return world.share(None)
        return world.share(_finish(config, task, private, members, held_out, out, run, step, ema, last_loss,
                                   start, resumed_at, guard.report()))
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while saving the results; the checkpoint of step {step} is in {run}; "
                          "continue with the same command and --resume") from None


def _finish(config: TrainConfig, task: DiffusionTask, private: PrivateTraining | None, members: ImageSet,
            held_out: ImageSet, out: Path, run: Path, step: int, ema: float | None, last_loss: float,
            start: float, resumed_at: int | None = None,
            early_stop: dict[str, Any] | None = None) -> TrainResult:
    """Adapter, privacy.json and utility.json into ``<out>.partial``, then rename it to ``<out>``.

    privacy.json's ``training`` block says how many steps this process ran and where it resumed: the
    total alone would hide that a run was continued from a checkpoint."""
    privacy: dict[str, Any] = {"mechanism": "none", "mode": config.mode}
    if private is not None:
        privacy = {"mode": config.mode, **private.report()}
        private.unwrap()
    elif config.mode in ("mp", "smp"):
        privacy = {"mode": config.mode, "mechanism": "empirical membership privacy (proxy attacker)",
                   "epsilon": None, "alpha": config.mp.alpha, "beta": config.mp.beta,
                   "attacker": config.mp.attacker,
                   "note": "no formal guarantee; measure it with the membership audit"}
    steps_run = step - (resumed_at or 0)
    privacy["training"] = {"steps": step, "steps_this_run": steps_run, "resumed_at_step": resumed_at}
    if early_stop is not None:  # the adapter saved is the one of early_stop["kept_step"]
        privacy["early_stop"] = early_stop
    task.model.eval()
    if not config.lora.full_finetune:
        task.save_adapter(run / "adapter")
    write_json_atomic(run / "privacy.json", privacy)
    utility = UTILITY[config.task](task, members=members, held_out=held_out, options=config.eval,
                                   seed=config.seed, quiet=config.quiet)
    write_json_atomic(run / "utility.json", utility)
    (run / "checkpoint.pt").unlink(missing_ok=True)
    rename_dir(run, out)  # one rename; file by file inside an SGX enclave (privlora tee)
    return TrainResult(run_dir=out, mode=config.mode, steps=step, final_loss=float(ema or last_loss),
                       privacy=privacy, utility=utility, seconds=time.time() - start, steps_run=steps_run,
                       resumed_at=resumed_at)
