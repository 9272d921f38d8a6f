"""FFA-LoRA vs FedIT under the same sample-level DP (DP-SGD inside every client), at ε = 8, 3 and 1.

The FFA-LoRA paper's setting (Sun et al. 2024): every client runs DP-SGD on its own data (Poisson batches,
per-sample clipping, Gaussian noise on what the strategy trains — B only for FFA-LoRA, A and B for FedIT),
and freezing A is claimed to make LoRA more robust to that noise. Here: the tweets task of
configs/fed-ffa.yaml (10 rounds × 20 local steps × expected batch 16, MiniLM, Dirichlet α = 0.5), 5 clients
(and, with ``--clients 20``, 20 clients with 5 local steps: the same samples processed), against

* the same federation without DP (FFA-LoRA and FedIT), and
* centralised DP-LoRA at the same ε: one client holding the union of the clients' data, trained for every
  client's steps of every round (the same samples processed), accounted the same way.

Two calibrations. *Shared σ* (``…-sdp-eps8``): one σ per (ε, clients), set so that the median-sized
client ends at the target ε after every round, and ``dp.budget`` = the target: a smaller client (larger
q = B/n) refuses the rounds that would take it past its budget and stops being sampled, a larger one
spends less. (Calibrating for the smallest client instead would give σ ≈ 9.5 at ε = 1 for everyone,
because one client of 5 holds only 99 tweets.) *Own σ* (``…-sdp-own-eps8``): ``dp.target_epsilon`` at
sample level, each client calibrating σ to its own q so that it ends at the target after every round
(federated/sample_dp.client_sigma) — every client trains every round. Every client's ε is at most the
target, by its own ledger. The
per-sample clip is fixed at C = 1 before any run (not tuned on these data). Each client's own ledger
(privacy.json's ``clients`` list) is what the table reports, as its maximum over clients.

    python benchmarks/federated_sample_dp.py [--clients 5|20] [--only NAME ...]   # ~6 min per run, 2 cores

Writes benchmarks/results/federated_sample_dp.json (resumable: finished variants are kept unless named in
``--only``); run directories in benchmarks/.work/fed-sample-dp/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from privlora.config import FederatedConfig, load_config
from privlora.federated.data import federated_data
from privlora.federated.run import federate
from privlora.federated.sample_dp import sample_rate
from privlora.privacy.calibrate import noise_multiplier
from privlora.runs import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "federated_sample_dp.json"
TABLE = RESULTS.with_suffix(".md")
WORK = Path(__file__).parent / ".work" / "fed-sample-dp"
EPSILONS = (8.0, 3.0, 1.0)
DELTA = 1e-5
CLIP = 1.0
STRATEGIES = ("ffa", "fedit")
#: run-name infix → one σ shared by every client (True) or each client's own (False)
CALIBRATIONS = {"": True, "-own": False}
#: local steps per round by client count: 5 × 20 = 20 × 5 client-steps per round, the same samples processed
LOCAL_STEPS = {5: 20, 20: 5}


def config_for(name: str, clients: int, local_steps: int, **overrides: Any) -> FederatedConfig:
    """configs/fed-ffa.yaml at ``clients`` clients, ``local_steps`` per round, ``overrides`` set."""
    tree = load_config(ROOT / "configs" / "fed-ffa.yaml", model=FederatedConfig).model_dump(mode="json")
    tree.update({"out": str(WORK / name), "quiet": True, "name": name, "clients": clients, **overrides})
    tree["client"] = {**tree["client"], "local_steps": local_steps}
    return FederatedConfig.model_validate(tree)


def calibrated_sigma(config: FederatedConfig, epsilon: float) -> tuple[float, float]:
    """(σ, q of the median-sized client): that client's ε after every round = ``epsilon``."""
    q = float(np.median([sample_rate(config, len(part)) for part in federated_data(config).parts]))
    steps = config.rounds * config.client.local_steps
    return noise_multiplier(epsilon, sample_rate=q, steps=steps, delta=DELTA), q


def sample_dp(sigma: float | None, budget: float) -> dict[str, Any]:
    """Sample-level DP at one shared σ, or (``sigma`` None) each client's own σ for the target ``budget``."""
    calibration = {"noise_multiplier": sigma} if sigma is not None else {"target_epsilon": budget}
    return {"level": "sample", "mechanism": "gaussian", **calibration, "clip": CLIP, "delta": DELTA,
            "budget": budget}


def variants(clients: int) -> dict[str, FederatedConfig]:
    """Every run of the table at ``clients`` clients, by name."""
    local = LOCAL_STEPS[clients]
    out = {f"{s}-{clients}c": config_for(f"{s}-{clients}c", clients, local, strategy=s) for s in STRATEGIES}
    for eps in EPSILONS:
        sigma, _ = calibrated_sigma(config_for("probe", clients, local), eps)
        for strategy in STRATEGIES:
            for calibration, shared in CALIBRATIONS.items():
                name = f"{strategy}-{clients}c-sdp{calibration}-eps{eps:g}"
                out[name] = config_for(name, clients, local, strategy=strategy,
                                       dp=sample_dp(sigma if shared else None, eps))
        # centralised: the clients' DP-SGD on the union of their data, for every client's steps of every round
        name = f"central-{clients}c-dp-eps{eps:g}"
        central = config_for(name, clients, config_for("probe", clients, local).rounds * clients * local,
                             strategy="fedit")
        n = len(federated_data(central).train)
        sigma = noise_multiplier(eps, sample_rate=sample_rate(central, n), steps=central.client.local_steps,
                                 delta=DELTA)
        out[name] = central.model_copy(update={"dp": config_for(name, clients, local, dp=sample_dp(sigma, eps)).dp})
    return out


def run_centralised(config: FederatedConfig) -> dict[str, Any]:
    """Centralised DP-LoRA with the clients' own DP-SGD (federated/sample_dp.py) on the union of their data:
    A and B trained (ordinary LoRA), ``client.local_steps`` Poisson steps at q = B/N, one accountant."""
    import torch

    from privlora import privacy
    from privlora.federated.client import fresh_task
    from privlora.federated.sample_dp import dp_local_train, dp_parameters

    data = federated_data(config)
    torch.manual_seed(config.seed)
    task = fresh_task(config, len(data.train.classes), config.lora.rank)
    params = dp_parameters(config, len(data.train))
    start = time.perf_counter()
    loss = dp_local_train(task, data.train, config, params)
    eps = privacy.epsilon(privacy.History.uniform(params.noise_multiplier, params.sample_rate, params.steps), DELTA)
    out = {"accuracy": task.score(data.test)[0], "loss": loss, "strategy": "centralised", "clients": 1,
           "local_steps": params.steps, "rounds": 1, "noise_multiplier": params.noise_multiplier, "clip": CLIP,
           "epsilon_max_client": eps, "epsilon_min_client": eps, "seconds": time.perf_counter() - start}
    print(f"{config.name:<24} accuracy {out['accuracy']:.3f}  ε {eps:.2f}  ({out['seconds']:.0f} s)", flush=True)
    return out


def run_variant(config: FederatedConfig) -> dict[str, Any]:
    start = time.perf_counter()
    run = federate(config)
    last = run.final
    clients = run.privacy.get("clients") or []
    epsilons = [c["epsilon"] for c in clients if c.get("epsilon") is not None]
    out = {"accuracy": last["accuracy"], "loss": last["loss"], "strategy": config.strategy,
           "clients": config.clients, "local_steps": config.client.local_steps, "rounds": config.rounds,
           "noise_multiplier": config.dp.noise_multiplier if config.dp else None,
           "clip": config.dp.clip if config.dp else None,
           "epsilon_max_client": max(epsilons) if epsilons else None,
           "epsilon_min_client": min(epsilons) if epsilons else None,
           "client_rounds": [c.get("rounds") for c in clients],
           "client_noise_multipliers": [c.get("noise_multipliers") for c in clients],
           "exhausted": [c.get("exhausted") for c in clients],
           "seconds": time.perf_counter() - start, "accuracy_per_round": [m["accuracy"] for m in run.rounds]}
    eps = out["epsilon_max_client"]
    print(f"{config.name:<24} accuracy {out['accuracy']:.3f}  ε(max client) {'n/a' if eps is None else f'{eps:.2f}'}"
          f"  ({out['seconds']:.0f} s)", flush=True)
    return out


def table(results: dict[str, Any]) -> str:
    """Accuracy by ε (columns) for each strategy (rows), the non-DP run first; ε is the largest client's."""
    runs = results.get("runs", {})
    lines = ["| run | no DP | ε = 8 | ε = 3 | ε = 1 |", "|---|---|---|---|---|"]
    for clients in sorted({r["clients"] for r in runs.values() if r["strategy"] != "centralised"}):
        rows = [(s, c) for s in STRATEGIES for c in CALIBRATIONS] + [("central", "")]
        for strategy, calibration in rows:
            cells = []
            plain = runs.get(f"{strategy}-{clients}c")
            cells.append(f"{plain['accuracy']:.3f}" if plain else "—")
            for eps in EPSILONS:
                key = f"central-{clients}c-dp-eps{eps:g}" if strategy == "central" else \
                    f"{strategy}-{clients}c-sdp{calibration}-eps{eps:g}"
                r = runs.get(key)
                cells.append("—" if r is None else f"{r['accuracy']:.3f} (ε {r['epsilon_max_client']:.2f})")
            sigma = "each client's own σ" if calibration else "one σ"
            label = f"centralised DP-LoRA ({clients} clients' data)" if strategy == "central" else \
                f"{'FFA-LoRA' if strategy == 'ffa' else 'FedIT'}, {clients} clients, {sigma}"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, choices=sorted(LOCAL_STEPS), default=5)
    parser.add_argument("--only", nargs="*", default=None, help="variant names to (re)run; default: the missing ones")
    parser.add_argument("--list", action="store_true", help="print the variant names and exit")
    parser.add_argument("--table", action="store_true", help="only rewrite the table from the JSON")
    args = parser.parse_args()
    if args.table:
        TABLE.write_text(table(json.loads(RESULTS.read_text())))
        print(f"wrote {TABLE}")
        return
    planned = variants(args.clients)
    if args.list:
        print("\n".join(planned))
        return
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.setdefault("config", "configs/fed-ffa.yaml")
    results.setdefault("delta", DELTA)
    results.setdefault("clip", CLIP)
    runs = results.setdefault("runs", {})
    for name, config in planned.items():
        if (args.only is not None and name not in args.only) or (args.only is None and name in runs):
            continue
        runs[name] = run_centralised(config) if name.startswith("central-") else run_variant(config)
        write_json_atomic(RESULTS, results)
    for clients in sorted({r["clients"] for r in runs.values() if r["strategy"] != "centralised"}):
        for strategy in STRATEGIES:
            base = runs.get(f"{strategy}-{clients}c")
            if base is None:
                continue
            for calibration in CALIBRATIONS:
                gaps = {f"eps{e:g}": round(100 * (base["accuracy"] - runs[k]["accuracy"]), 1)
                        for e in EPSILONS if (k := f"{strategy}-{clients}c-sdp{calibration}-eps{e:g}") in runs}
                results.setdefault("points_below_non_dp", {})[f"{strategy}-{clients}c{calibration}"] = gaps
    write_json_atomic(RESULTS, results)
    TABLE.write_text(table(results))
    print(f"wrote {RESULTS} and {TABLE}")


if __name__ == "__main__":
    main()
