"""Client-level DP at 100 and 1,000 clients: no DP vs a fixed clip vs adaptive clipping (Andrew et al. 2021).

FFA-LoRA on the tweets task (MiniLM), small non-IID clients (Dirichlet α = 1 over 16,000 training tweets: a
median of 14 at 1,000 clients, 160 at 100), Poisson client sampling with the q the accountant assumes (q = 30
/ clients), ε = 8 at δ = 1e-5 after all rounds, every client's noise added locally (the server never sees a
clear update; ``fixed-secagg`` splits it over the round's clients under SecAgg+, so the secure sum carries σC
once, as DP-FedAvg's central noise). The fixed clip is C = 1 (configs/fed-ffa-secure.yaml's); adaptive
clipping starts there and tracks the median update norm (γ = 0.5, η_C = 0.2, σ_b = m/20 = 1.5), the ledger
counting updates and bits together at the effective noise multiplier. Per run: final server accuracy, ε, the
clip per round, median wall time per round (rounds 2+), and the peak resident memory of the whole process tree
(this process + Ray's workers, sampled every 0.2 s).

    python benchmarks/federated_many_clients.py [--clients 100 1000] [--only NAME ...]   # ~7 min per run

Writes benchmarks/results/federated_many_clients.json (resumable: finished runs are kept unless named in
``--only``) and its table, benchmarks/results/federated_many_clients.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from federated_cost import PeakMemory

from privlora.config import FederatedConfig
from privlora.federated.run import federate
from privlora.runs import write_json_atomic

RESULTS = Path(__file__).parent / "results" / "federated_many_clients.json"
TABLE = RESULTS.with_suffix(".md")
WORK = Path(__file__).parent / ".work" / "fed-many"
PER_ROUND = 30
EPSILON, DELTA = 8.0, 1e-5
COMMON: dict[str, Any] = {
    "strategy": "ffa", "rounds": 15, "quiet": True,
    "data": {"source": "demo:tweets", "limit": 17000, "test": 0.06, "alpha": 1.0},
    "client": {"local_steps": 5, "batch_size": 16, "lr": 0.002}, "lora": {"rank": 8, "alpha": 16},
}
DP = {"mechanism": "gaussian", "target_epsilon": EPSILON, "delta": DELTA, "clip": 1.0}
KINDS: dict[str, dict[str, Any]] = {
    "nodp": {},
    "fixed": {"dp": DP},
    "adaptive": {"dp": {**DP, "clipping": "adaptive", "target_quantile": 0.5, "clip_lr": 0.2}},
    # the same fixed clip with the noise split over the round's clients under SecAgg+: the secure sum carries
    # σC once (DP-FedAvg's central noise) without a server that sees clear updates
    "fixed-secagg": {"dp": {**DP, "placement": "distributed"}, "secagg": {"enabled": True}},
}


def config_for(kind: str, clients: int) -> FederatedConfig:
    name = f"{kind}-{clients}"
    return FederatedConfig.model_validate({**COMMON, **KINDS[kind], "name": name, "out": str(WORK / name),
                                           "clients": clients, "clients_per_round": PER_ROUND})


def run_one(config: FederatedConfig) -> dict[str, Any]:
    start = time.perf_counter()
    with PeakMemory() as memory:
        result = federate(config)
    rounds = [m for m in result.rounds if m["round"] > 0]
    privacy = result.privacy
    return {
        "clients": config.clients, "clients_per_round": config.per_round(), "rounds": config.rounds,
        "clipping": privacy.get("clipping", "fixed" if privacy.get("mechanism") == "gaussian" else None),
        "accuracy": result.final["accuracy"], "accuracy_per_round": [m["accuracy"] for m in result.rounds],
        "epsilon": privacy.get("epsilon"), "delta": privacy.get("delta"),
        "noise_multiplier": privacy.get("noise_multiplier"),
        "update_noise_multiplier": privacy.get("update_noise_multiplier", privacy.get("noise_multiplier")),
        "clip_per_round": privacy.get("clip_per_round"),
        "sampled_per_round": privacy.get("sampled_per_round") or [m.get("sampled") for m in rounds],
        "round_seconds_median": statistics.median(m["round_seconds"] for m in rounds[1:]) if len(rounds) > 1
        else rounds[0]["round_seconds"],
        "peak_rss_gib": memory.peak / 2**30, "seconds": time.perf_counter() - start,
    }


def table(rows: dict[str, Any]) -> str:
    lines = ["| run | clients (per round) | accuracy | ε | z (updates) | clip first → last | s / round | "
             "peak memory |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        eps = "n/a" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        z = "n/a" if r["noise_multiplier"] is None else \
            f"{r['noise_multiplier']:.3f} ({r['update_noise_multiplier']:.3f})"
        clips = r["clip_per_round"] or ([1.0] if r["clipping"] == "fixed" else None)
        clip = "n/a" if not clips else f"{clips[0]:.3g} → {clips[-1]:.3g}"
        lines.append(f"| {name} | {r['clients']} ({r['clients_per_round']}) | {r['accuracy']:.3f} | {eps} | {z} | "
                     f"{clip} | {r['round_seconds_median']:.1f} | {r['peak_rss_gib']:.1f} GiB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="*", default=[1000, 100])
    parser.add_argument("--only", nargs="*", default=None, help="runs to (re)do, e.g. adaptive-1000")
    args = parser.parse_args()
    rows: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for clients in args.clients:
        for kind in KINDS:
            name = f"{kind}-{clients}"
            if (args.only is not None and name not in args.only) or (args.only is None and name in rows):
                continue
            rows[name] = run_one(config_for(kind, clients))
            write_json_atomic(RESULTS, rows)
            r = rows[name]
            print(f"{name:<16} accuracy {r['accuracy']:.3f}  ε {r['epsilon']}  "
                  f"{r['round_seconds_median']:.1f} s/round  {r['peak_rss_gib']:.1f} GiB", flush=True)
    if rows:
        TABLE.write_text(table(rows))
        print(f"table → {TABLE}")


if __name__ == "__main__":
    main()
