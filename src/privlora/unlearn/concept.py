"""Concept erasure for text-to-image LoRAs: ESD (Gandikota et al. 2023, "Erasing Concepts from Diffusion
Models") on the Stable Diffusion path.

Sample unlearning removes *images*; this removes a *prompt's* effect. The adapter is fine-tuned so that,
for the concept prompt ``c``, the UNet predicts what the frozen source model (base + source LoRA, θ*)
predicts *without* the concept, pushed further away by the negative-guidance scale η:

    ε_θ(x_t, c, t)  →  ε_θ*(x_t, ∅, t) − η · (ε_θ*(x_t, c, t) − ε_θ*(x_t, ∅, t))

x_t comes, as in the paper, from partially denoising fresh noise with the model being trained, conditioned
on ``c`` with classifier-free guidance, stopped at a random step of a ``sample_steps`` DDIM schedule. The
erasure reads no training data: the adapter is post-processed with its own samples and the prompt only, so
a source run's DP ε still holds for the erased adapter (post-processing), and the run's data never needs
to be reachable.

Why the frozen copy is a weight swap, not a second UNet: θ* differs from θ only in the LoRA tensors, so the
source tensors are copied into the adapter for the two frozen forward passes and the trained ones copied
back — no second 860M-parameter UNet on SD 1.5. The target is linear in the UNet's output, and for a fixed
x_t the ε, v and x0 parametrisations are affine in each other with the same offset, so the target is
applied to the raw output whatever the scheduler's ``prediction_type``.

Which LoRA tensors train (``params``): ``xattn`` (ESD-x, the paper's choice for styles/artists: only the
cross-attention ``attn2`` layers, which read the prompt), ``noxattn`` (ESD-u, everything else: for concepts
that should vanish whatever the prompt) or ``all``.

Verification (written to ``unlearn.json``) for the concept and preserved prompts, on fixed x_t taken from
the source model's own trajectories for each prompt and with fixed-seed generations:

* concept guidance ``Δ = ε(x_t, p) − ε(x_t, ∅)``: its RMS before/after, and ``toward`` — the share of the
  source's guidance direction left, ``⟨Δ_after, Δ_before⟩ / ‖Δ_before‖²`` (1: unchanged; 0: the prompt no
  longer steers; −η: ESD's ideal, steering away). With η = 0 the RMS drops to 0; with η > 0 the RMS
  ideally becomes η·RMS_before with the sign flipped, so ``toward`` is the figure that shows erasure
  for every η.
* generations (CFG, fixed seed, same noise): pixel MSE of the prompt's images to the unconditional ones
  and to the source's images for the same prompt, before vs after.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from privlora.errors import UserError
from privlora.progress import progress_bar
from privlora.runs import atomic_dir, write_json_atomic

NOT_SD = "concept erasure needs a text-conditioned (Stable Diffusion) run"

#: params option → which LoRA tensors ESD trains, by module path (the ESD repo's ``train_method``)
PARAM_GROUPS: dict[str, Callable[[str], bool]] = {
    "xattn": lambda name: ".attn2." in name,  # ESD-x: cross-attention only
    "noxattn": lambda name: ".attn2." not in name,  # ESD-u: everything but cross-attention
    "all": lambda name: True,
}
VARIANTS = {"xattn": "ESD-x", "noxattn": "ESD-u", "all": "ESD-all"}

#: prompts kept as "other concepts" when the caller names none (generic, so they exist for any SD base)
DEFAULT_PRESERVE = ("a photo", "a painting of a house", "a portrait of a person")


# --- the objective ----------------------------------------------------------------------------------

def esd_target(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD's target for ε_θ(x_t, c): ``ε*(x_t, ∅) − η · (ε*(x_t, c) − ε*(x_t, ∅))`` (frozen model θ*)."""
    return eps_uncond - eta * (eps_cond - eps_uncond)


@contextmanager
def swapped(params: list[nn.Parameter], values: list[torch.Tensor]) -> Iterator[None]:
    """Run with ``values`` in ``params`` (the frozen source adapter), then put the current ones back."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def _outputs(task: Any, x: torch.Tensor, t: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Raw UNet output for each (x, caption) pair."""
    return task.denoise(x, t.expand(x.shape[0]).to(x.device), {"captions": captions})


@torch.no_grad()
def denoise_until(task: Any, prompt: str, noise: torch.Tensor, *, steps: int, stop: int,
                  guidance_scale: float, record: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """CFG DDIM from ``noise`` for ``stop`` of ``steps`` steps: x at timestep ``timesteps[stop]``
    (``stop == steps``: the finished sample), and every visited state when ``record``. The loop is the
    Task's own (:meth:`privlora.tasks.diffusion.DiffusionTask.ddim`), so ESD's x_t are the states a
    user's generation passes through."""
    visited: list[torch.Tensor] = []
    x = task.ddim(noise, steps, batch={"captions": [prompt] * noise.shape[0]}, until=stop,
                  guidance_scale=guidance_scale, callback=(lambda i, t, x: visited.append(x)) if record else None)
    return x, visited


# --- loading the source run ---------------------------------------------------------------------------

def _load_source(run: Path) -> tuple[Any, Any, Path]:
    """(config, SD task with the source adapter loaded, adapter dir), refusing anything that is not an SD
    LoRA run."""
    from privlora.config import load_config
    from privlora.generate import adapter_base
    from privlora.tasks.loading import load_task
    from privlora.tasks.lora import PEFT_CONFIG, read_spec

    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist")
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run directory (no config.yaml)")
    adapter = run / "adapter"
    if not (adapter / PEFT_CONFIG).is_file():
        raise UserError(f"{run} has no LoRA adapter to erase a concept from (missing adapter/{PEFT_CONFIG})")
    config = load_config(run / "config.yaml", {"resume": False})
    if config.task != "image" or config.base == "embedded":
        what = "a text-classification run" if config.task != "image" else "an unconditional embedded-UNet run"
        raise UserError(f"{NOT_SD}; {run} is {what} (base {config.base!r}); train one with "
                        "--base <Stable Diffusion pipeline folder>")
    base = adapter_base(adapter)
    if base != config.base:
        raise UserError(f"the adapter in {run} was trained on base {base!r}, the run's config says "
                        f"{config.base!r}; fix config.yaml or the adapter")
    task = load_task(config.base, read_spec(adapter), seed=config.seed, trust_pickle=config.trust_pickle,
                     device=config.device)
    # imported only now: load_task imports diffusers' SD pipeline with the hub's import-time warnings muted
    from privlora.tasks.sd import StableDiffusionTask

    if not isinstance(task, StableDiffusionTask):
        raise UserError(f"{NOT_SD}; {run} was trained on {config.base!r}, an unconditional UNet")
    task.load_adapter(adapter)
    task.model.eval()
    return config, task, adapter


def _trainable(task: Any, params: str) -> tuple[list[str], list[nn.Parameter]]:
    if params not in PARAM_GROUPS:
        raise UserError(f"unknown params {params!r}; choose one of {', '.join(PARAM_GROUPS)}")
    chosen = [(n, p) for n, p in task.model.named_parameters() if "lora_" in n and PARAM_GROUPS[params](n)]
    if not chosen:
        raise UserError(f"the adapter has no LoRA layers in the {params!r} group ({VARIANTS[params]}); its "
                        "targets do not reach those layers — choose params 'all' or retrain with "
                        "to_q/to_k/to_v/to_out.0 targets")
    for _, p in task.model.named_parameters():
        p.requires_grad_(False)
    for _, p in chosen:
        p.requires_grad_(True)
    return [n for n, _ in chosen], [p for _, p in chosen]


# --- verification ---------------------------------------------------------------------------------------

def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.float().flatten(1).pow(2).mean(1).sqrt()


@torch.no_grad()
def probe_states(task: Any, prompts: list[str], *, n: int, steps: int, guidance_scale: float,
                 seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed x_t for each prompt: every state of ``n`` source-model trajectories (and their timesteps)."""
    ddim = task.ddim_scheduler(steps)
    states = {}
    for i, prompt in enumerate(prompts):
        g = torch.Generator().manual_seed(seed + 7919 * (i + 1))
        noise = torch.randn((n, *task.sample_shape()), generator=g)
        _, visited = denoise_until(task, prompt, noise, steps=steps, stop=steps,
                                   guidance_scale=guidance_scale, record=True)
        xs = torch.cat(visited)
        ts = torch.cat([t.expand(n) for t in ddim.timesteps])
        states[prompt] = (xs, ts)
    return states


@torch.no_grad()
def guidance(task: Any, prompt: str, xs: torch.Tensor, ts: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Δ = ε(x_t, prompt) − ε(x_t, ∅) at each given state, as float32 on the CPU."""
    out = []
    for i in range(0, xs.shape[0], chunk):
        x, t = xs[i:i + chunk].to(task.device), ts[i:i + chunk].to(task.device)
        n = x.shape[0]
        both = task.denoise(torch.cat([x, x]), torch.cat([t, t]), {"captions": [prompt] * n + [""] * n})
        out.append((both[:n] - both[n:]).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def generations(task: Any, prompts: list[str], *, n: int, steps: int, guidance_scale: float,
                seed: int) -> dict[str, torch.Tensor]:
    """Fixed-seed CFG samples (pixels in [-1, 1]) for each prompt, all from the same noise."""
    noise = torch.randn((n, *task.sample_shape()), generator=torch.Generator().manual_seed(seed))
    out = {}
    for prompt in prompts:
        x, _ = denoise_until(task, prompt, noise, steps=steps, stop=steps, guidance_scale=guidance_scale)
        out[prompt] = task.to_pixels(x).float().cpu()
    return out


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


def prompt_figures(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """Guidance figures from Δ before/after on the same states (see the module docstring)."""
    rms_b, rms_a = _rms(before), _rms(after)
    toward = float((after * before).sum() / before.pow(2).sum().clamp_min(1e-20))
    return {"guidance_rms_before": float(rms_b.mean()), "guidance_rms_after": float(rms_a.mean()),
            "guidance_ratio": float(rms_a.mean() / rms_b.mean().clamp_min(1e-20)),
            "guidance_toward": toward,
            "guidance_change": float(_rms(after - before).mean() / rms_b.mean().clamp_min(1e-20))}


# --- the command ------------------------------------------------------------------------------------------

def _check_options(concept: str, steps: int, lr: float, eta: float, sample_steps: int, guidance_scale: float,
                   n_eval: int, batch_size: int) -> str:
    concept = (concept or "").strip()
    if not concept:
        raise UserError("give the concept to erase as a non-empty prompt, e.g. --concept 'a painting by X'")
    for name, value, low in (("steps", steps, 1), ("sample-steps", sample_steps, 1), ("n-eval", n_eval, 1),
                             ("batch-size", batch_size, 1)):
        if value < low:
            raise UserError(f"--{name} must be at least {low}, got {value}")
    if not lr > 0:
        raise UserError(f"--lr must be positive, got {lr}")
    if not eta >= 0:
        raise UserError(f"--eta (negative guidance) must be ≥ 0, got {eta}; 0 maps the concept to the "
                        "unconditional prediction, 1 is the paper's default")
    if not guidance_scale >= 1:
        raise UserError(f"--guidance-scale must be ≥ 1, got {guidance_scale}")
    return concept


def erase_concept(run: Path, concept: str, out: Path, *, steps: int = 200, lr: float = 1e-4, eta: float = 1.0,
                  seed: int = 0, quiet: bool = True, params: str = "xattn", sample_steps: int = 50,
                  guidance_scale: float = 3.0, batch_size: int = 1, preserve: tuple[str, ...] | None = None,
                  preserve_weight: float = 0.0, anchors: tuple[str, ...] | None = None,
                  n_eval: int = 4) -> dict[str, Any]:
    """Erase ``concept`` from the SD LoRA run ``run`` with ESD; write the erased run to ``out``.

    ``out`` gets ``config.yaml`` (copied), ``adapter/`` (diffusers/peft loadable), ``privacy.json`` (the
    source's, noting the source and the erasure), ``splits.json`` (copied, so the erased run can be audited
    like its source), ``metrics.jsonl`` (ESD loss) and ``unlearn.json`` (the returned figures), all at once.
    ``preserve``: prompts that should keep working, measured in the figures (default: a few generic ones);
    ``n_eval``: trajectories and images per prompt for the figures.

    ``preserve_weight`` > 0 adds an anchor term that is not in ESD: ``λ · ‖ε_θ(x_t, a) − ε*(x_t, a)‖²`` for
    the ``anchors`` prompts (default: the preserved ones and ∅) at the same x_t. Pure ESD (λ = 0, the
    default) relies on the base model keeping prompts apart; where prompts share one guidance direction
    (a random-init pipeline; close concepts on a real one) it erases the neighbours with the concept.
    """
    start = time.time()
    concept = _check_options(concept, steps, lr, eta, sample_steps, guidance_scale, n_eval, batch_size)
    if not preserve_weight >= 0:
        raise UserError(f"--preserve-weight must be ≥ 0, got {preserve_weight}")
    if params not in PARAM_GROUPS:
        raise UserError(f"unknown params {params!r}; choose one of {', '.join(PARAM_GROUPS)}")
    run, out = Path(run), Path(out)
    if out.exists():
        raise UserError(f"output {out} already exists; choose another --out or remove it")
    if out.resolve().is_relative_to(run.resolve()):
        raise UserError(f"--out {out} is inside the source run {run}; write the erased run beside it")
    privacy = _source_privacy(run)
    config, task, _ = _load_source(run)
    names, trained = _trainable(task, params)
    source = [p.detach().clone() for p in trained]
    kept = [p for p in dict.fromkeys(preserve if preserve is not None else DEFAULT_PRESERVE)
            if p.strip() and p.strip() != concept]
    prompts = [concept, *kept]
    anchored = tuple(dict.fromkeys(anchors if anchors is not None else (*kept, ""))) if preserve_weight > 0 \
        else ()
    if concept in anchored:
        raise UserError(f"the concept {concept!r} cannot also be an anchor prompt to preserve")
    torch.manual_seed(seed)

    probe_kw = {"steps": sample_steps, "guidance_scale": guidance_scale}
    states = probe_states(task, prompts, n=n_eval, seed=seed, **probe_kw)
    before = {p: guidance(task, p, *states[p]) for p in prompts}
    gen_before = generations(task, ["", *prompts], n=n_eval, seed=seed + 1, **probe_kw)

    losses = _train(task, concept, trained, source, steps=steps, lr=lr, eta=eta, seed=seed,
                    sample_steps=sample_steps, guidance_scale=guidance_scale, batch_size=batch_size,
                    anchors=anchored, preserve_weight=preserve_weight, quiet=quiet)
    task.model.eval()

    after = {p: guidance(task, p, *states[p]) for p in prompts}
    gen_after = generations(task, prompts, n=n_eval, seed=seed + 1, **probe_kw)
    per_prompt: dict[str, Any] = {}
    for p in prompts:
        per_prompt[p] = {"role": "erased" if p == concept else "preserved", "anchored": p in anchored,
                         **prompt_figures(before[p], after[p]),
                         "gen_mse_to_uncond_before": _mse(gen_before[p], gen_before[""]),
                         "gen_mse_to_uncond_after": _mse(gen_after[p], gen_before[""]),
                         "gen_mse_to_source": _mse(gen_after[p], gen_before[p])}
    figures: dict[str, Any] = {
        "method": "esd", "variant": VARIANTS[params], "params": params, "concept": concept,
        "source_run": str(run), "base": config.base, "eta": eta, "steps": steps, "lr": lr, "seed": seed,
        "sample_steps": sample_steps, "guidance_scale": guidance_scale, "batch_size": batch_size,
        "preserve_weight": preserve_weight, "anchors": list(anchored),
        "trained_tensors": len(names), "trained_parameters": int(sum(p.numel() for p in trained)),
        "adapter_change_rms": float(torch.cat([(p.detach() - s).flatten() for p, s in zip(trained, source,
                                                                                             strict=True)])
                                    .pow(2).mean().sqrt()),
        "loss_first": losses[0], "loss_last": float(sum(losses[-10:]) / len(losses[-10:])),
        "eval": {"trajectories_per_prompt": n_eval, "states_per_prompt": int(states[concept][0].shape[0]),
                 "images_per_prompt": n_eval},
        "prompts": per_prompt,
        "summary": _summary(per_prompt, concept),
    }
    figures["seconds"] = round(time.time() - start, 2)
    _write(run, out, task, figures, losses, privacy)
    return figures


def _summary(per_prompt: dict[str, Any], concept: str) -> dict[str, float | None]:
    kept = [v for p, v in per_prompt.items() if p != concept]
    c = per_prompt[concept]

    def mean(key: str) -> float | None:
        return sum(v[key] for v in kept) / len(kept) if kept else None

    return {"concept_guidance_toward": c["guidance_toward"], "concept_guidance_ratio": c["guidance_ratio"],
            "preserved_guidance_toward": mean("guidance_toward"),
            "preserved_guidance_ratio": mean("guidance_ratio"),
            "preserved_guidance_change": mean("guidance_change"),
            "concept_gen_mse_to_uncond_before": c["gen_mse_to_uncond_before"],
            "concept_gen_mse_to_uncond_after": c["gen_mse_to_uncond_after"],
            "concept_gen_mse_to_source": c["gen_mse_to_source"],
            "preserved_gen_mse_to_source": mean("gen_mse_to_source"),
            "preserved_gen_mse_to_uncond_before": mean("gen_mse_to_uncond_before")}


def esd_batch(task: Any, concept: str, x_t: torch.Tensor, t: torch.Tensor, trained: list[nn.Parameter],
              source: list[torch.Tensor], *, eta: float, anchors: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """One ESD batch at states ``x_t`` (timestep ``t``): the trained model's ε_θ(x_t, c) (with grad), ESD's
    target from the frozen source model, and — for each anchor prompt — ε_θ(x_t, a) and ε*(x_t, a).

    Each model runs one batched forward pass: the frozen one over ``[c, ∅, anchors…]``, the trained one
    over ``[c, anchors…]``.
    """
    n = x_t.shape[0]
    frozen_prompts = [concept, "", *anchors]
    with torch.no_grad(), swapped(trained, source):
        frozen = _outputs(task, x_t.repeat(len(frozen_prompts), 1, 1, 1), t,
                          [p for p in frozen_prompts for _ in range(n)]).float()
    live_prompts = [concept, *anchors]
    live = _outputs(task, x_t.repeat(len(live_prompts), 1, 1, 1), t,
                    [p for p in live_prompts for _ in range(n)]).float()
    return {"pred": live[:n], "target": esd_target(frozen[:n], frozen[n:2 * n], eta),
            "anchor_pred": live[n:], "anchor_target": frozen[2 * n:]}


def _train(task: Any, concept: str, trained: list[nn.Parameter], source: list[torch.Tensor], *, steps: int,
           lr: float, eta: float, seed: int, sample_steps: int, guidance_scale: float, batch_size: int,
           anchors: tuple[str, ...], preserve_weight: float, quiet: bool) -> list[float]:
    """The ESD loop: x_t from the current model, targets from the frozen source, MSE on ε_θ(x_t, c)
    (+ ``preserve_weight`` × MSE of the anchors' outputs to the source's)."""
    optimizer = torch.optim.Adam(trained, lr=lr)
    ddim = task.ddim_scheduler(sample_steps)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    with progress_bar(f"erase {concept[:30]!r}", total=steps, quiet=quiet) as bar:
        for _ in range(steps):
            stop = int(torch.randint(0, sample_steps, (1,), generator=generator))
            noise = torch.randn((batch_size, *task.sample_shape()), generator=generator)
            task.model.eval()
            x_t, _ = denoise_until(task, concept, noise, steps=sample_steps, stop=stop,
                                   guidance_scale=guidance_scale)
            task.model.train()
            optimizer.zero_grad(set_to_none=True)
            out = esd_batch(task, concept, x_t, ddim.timesteps[stop], trained, source, eta=eta,
                            anchors=anchors if preserve_weight > 0 else ())
            loss = torch.nn.functional.mse_loss(out["pred"], out["target"])
            if preserve_weight > 0 and anchors:
                loss = loss + preserve_weight * torch.nn.functional.mse_loss(out["anchor_pred"],
                                                                             out["anchor_target"])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.advance(loss=losses[-1])
    return losses


def _source_privacy(run: Path) -> dict[str, Any]:
    """The source run's privacy.json (read before the work, so a broken one fails fast)."""
    file = Path(run) / "privacy.json"
    try:
        privacy = json.loads(file.read_text()) if file.is_file() else {"mechanism": "none"}
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{file} is not valid JSON ({e}); restore it from the source run") from None
    if not isinstance(privacy, dict):
        raise UserError(f"{file} is not a JSON object; restore it from the source run")
    return privacy


def _write(run: Path, out: Path, task: Any, figures: dict[str, Any], losses: list[float],
           privacy: dict[str, Any]) -> None:
    privacy = {**privacy, "source_run": str(run),
               "unlearning": {"method": "esd", "variant": figures["variant"], "concept": figures["concept"],
                              "note": "concept erasure post-processes the source adapter with its own samples "
                                      "and the prompt only (no training data), so the source's guarantee, "
                                      "if any, still holds; it removes a prompt's effect, not the "
                                      "membership of any training image"}}
    with atomic_dir(out) as tmp:
        shutil.copy2(run / "config.yaml", tmp / "config.yaml")
        if (run / "splits.json").is_file():
            shutil.copy2(run / "splits.json", tmp / "splits.json")
        task.save_adapter(tmp / "adapter")
        write_json_atomic(tmp / "privacy.json", privacy)
        write_json_atomic(tmp / "unlearn.json", figures)
        with (tmp / "metrics.jsonl").open("w") as f:
            for i, loss in enumerate(losses, 1):
                f.write(json.dumps({"step": i, "esd_loss": loss}) + "\n")
