"""``privlora federate``: federated LoRA on Flower."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

from privlora.cli.choices import COMPRESSIONS, FED_DP, STRATEGIES
from privlora.cli.common import QUIET, choice, offline_defaults, one_line_errors, overrides


@one_line_errors
def federate(
    config: Path = typer.Option(None, "--config", "-c", help="YAML config (e.g. configs/fed-ffa.yaml); "
                                "options below override it."),
    task: str = typer.Option(None, click_type=choice(("text", "causal-lm")),
                             help="text (MiniLM classifier, demo:tweets) | causal-lm (instruction tuning of a causal "
                             "LM, default the embedded tiny GPT-2 on demo:support, FlowerTune-style)."),
    base: str = typer.Option(None, help="The base model (text: minilm; causal-lm: embedded-lm, or a local "
                             "folder / HF cache name of an AutoModelForCausalLM)."),
    strategy: str = typer.Option(None, click_type=choice(STRATEGIES),
                                 help="ffa (A frozen from a shared seed, exact, half the upload) | "
                                 "fedit (average A and B) | flora (stacking; clients may use different ranks)."),
    rounds: int = typer.Option(None, help="Federated rounds."),
    clients: int = typer.Option(None, help="Number of clients (partitions of the data)."),
    per_round: int = typer.Option(None, "--clients-per-round", help="Clients sampled per round (default: all)."),
    out: Path = typer.Option(None, help="Run directory to write (replaced atomically)."),
    data: str = typer.Option(None, help="text: demo:tweets or a CSV/TSV/JSONL file with text,label; causal-lm: "
                             "demo:support or a JSONL file of prompt/response or messages records."),
    alpha: float = typer.Option(None, "--dirichlet-alpha", help="Non-IID label skew (smaller: more skewed)."),
    secagg: bool = typer.Option(None, "--secagg/--no-secagg", help="Flower SecAgg+: the server sees only the sum."),
    dp: str = typer.Option(None, "--dp", click_type=choice(FED_DP),
                           help="none | gaussian | laplace (client-level, on each client)."),
    noise_multiplier: float = typer.Option(None, "--noise-multiplier", help="Gaussian DP: σ."),
    target_epsilon: float = typer.Option(None, "--target-epsilon", help="Gaussian DP: calibrate σ to this ε."),
    clip: float = typer.Option(None, help="DP: bound on one client's upload (L2 gaussian, L1 laplace); with "
                               "--clipping adaptive, the first round's."),
    clipping: str = typer.Option(None, click_type=choice(("fixed", "adaptive")),
                                 help="Gaussian client-level DP: fixed clip, or adaptive (the clip follows the "
                                 "median update norm, Andrew et al. 2021; dp.target_quantile, dp.clip_lr)."),
    compression: str = typer.Option(None, click_type=choice(COMPRESSIONS),
                                    help="none | int8 (per-tensor scale, about 4× fewer bytes up)."),
    deployment: bool = typer.Option(False, "--deployment", help="Run on Flower's deployment engine: a real "
                                    "SuperLink and one SuperNode process per client on localhost (gRPC)."),
    seed: int = typer.Option(None, help="Seed for data split, client sampling and initial adapter."),
    quiet: bool = QUIET,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower's INFO logs (default: warnings only)."),
    set_: list[str] = typer.Option([], "--set", help="Any config key, e.g. --set client.local_steps=20."),
) -> None:
    """Federated LoRA on Flower: clients train on their own data, only clipped/noised/compressed (or
    securely aggregated) LoRA updates reach the server; writes a run directory."""
    from privlora.config import FederatedConfig, load_config

    offline_defaults()
    named: dict[str, Any] = {
        "task": task, "base": base, "strategy": strategy, "rounds": rounds, "clients": clients,
        "clients_per_round": per_round,
        "out": str(out) if out else None, "data.source": data, "data.alpha": alpha, "secagg.enabled": secagg,
        "dp.mechanism": dp, "dp.noise_multiplier": noise_multiplier, "dp.target_epsilon": target_epsilon,
        "dp.clip": clip, "dp.clipping": clipping, "compression": compression,
        "engine": "deployment" if deployment else None,
        "seed": seed, "quiet": quiet or None,
    }
    settings = load_config(config, overrides(named, set_), model=FederatedConfig)
    from privlora.federated.run import federate as run_federated

    try:
        result = run_federated(settings, verbose=verbose)
    except KeyboardInterrupt:
        # the engine's processes are stopped and the partial run removed; its threads cannot be joined,
        # so leave now instead of waiting for them at interpreter exit
        typer.echo("interrupted: nothing was written", err=True)
        sys.stderr.flush()
        os._exit(130)
    first, last = result.rounds[0], result.final
    eps = result.privacy.get("epsilon")
    privacy = f"client-level ε={eps:.3g}" + (f" (δ={result.privacy['delta']:.2g})"
                                             if result.privacy["mechanism"] == "gaussian" else " (pure)") \
        if isinstance(eps, float) else "no DP"
    typer.echo(f"{settings.strategy}: {settings.rounds} rounds × {settings.per_round()} of {settings.clients} "
               f"clients → {result.run_dir}")
    from privlora.federated.tasks import federated_task

    key = federated_task(settings).headline  # accuracy (text) | perplexity (causal-lm)
    typer.echo(f"  server test {key} {first[key]:.3f} → {last[key]:.3f}, loss "
               f"{first['loss']:.3f} → {last['loss']:.3f}; {privacy}")
    typer.echo(f"  per client per round: {last.get('bytes_up_per_client', 0) / 1024:.0f} KiB up, "
               f"{last.get('bytes_down_per_client', 0) / 1024:.0f} KiB down; rejected updates: "
               f"{sum(len(m.get('rejected', [])) for m in result.rounds)}, failed clients: "
               f"{sum(m.get('failures', 0) for m in result.rounds)}")
