"""Federated vs centralised accuracy, with and without client-level DP, and bytes on the wire.

FFA-LoRA on 5 non-IID clients (Dirichlet α = 0.5) of 2 000 tweets (configs/fed-ffa.yaml: 10 rounds ×
20 local steps × batch 16) against centralised LoRA trained on the union of the clients' data with the
same optimiser and the same number of samples processed (10 × 5 × 20 × 16), both evaluated on the
server's held-out 20 %. Then the same federation with client-level Gaussian DP at ε = 8 and ε = 3
(δ = 1e-5, SecAgg+ with distributed noise: each client adds σC/√5, the sum carries σC), and with int8
uploads; and client-level DP at ε = 8 with 100 clients, each joining a round with q = 0.1 (Poisson, ≈ 10
per round; `--only NAME` runs one variant and adds it to the results file). Every number comes from one run
of this script.

    python benchmarks/federated_accuracy.py            # ~25 min on 2 cores

Writes benchmarks/results/federated_accuracy.json; keeps the run directories in benchmarks/.work/fed/
(the membership benchmark audits them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from privlora.config import FederatedConfig, load_config
from privlora.federated.client import fresh_task, local_train
from privlora.federated.data import federated_data
from privlora.federated.partition import label_skew
from privlora.federated.run import federate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "federated_accuracy.json"
WORK = Path(__file__).parent / ".work" / "fed"

VARIANTS = {
    "ffa": {},
    "ffa_int8": {"compression": "int8"},
    "ffa_dp_eps8": {"secagg": {"enabled": True},
                    "dp": {"mechanism": "gaussian", "target_epsilon": 8.0, "clip": 0.5, "placement": "distributed"}},
    "ffa_dp_eps3": {"secagg": {"enabled": True},
                    "dp": {"mechanism": "gaussian", "target_epsilon": 3.0, "clip": 0.5, "placement": "distributed"}},
    # client-level DP needs many clients: 100 clients, Poisson q = 0.1 (≈ 10 per round), same 2 000 tweets
    "ffa_dp_eps8_100_clients": {"clients": 100, "clients_per_round": 10, "secagg": {"enabled": True},
                                "dp": {"mechanism": "gaussian", "target_epsilon": 8.0, "clip": 0.5,
                                       "placement": "distributed"}},
}


def base_config(name: str, **overrides) -> FederatedConfig:
    tree = load_config(ROOT / "configs" / "fed-ffa.yaml", model=FederatedConfig).model_dump(mode="json")
    tree.update({"out": str(WORK / name), "quiet": True, "name": name})
    for key, value in overrides.items():
        tree[key] = {**tree[key], **value} if isinstance(value, dict) else value
    return FederatedConfig.model_validate(tree)


#: centralised baselines: the clients' learning rate, and the text recipe's (configs/text-plain.yaml)
CENTRAL_LR = {"centralised": None, "centralised_lr1e-3": 1e-3}


def centralised(config: FederatedConfig, lr: float | None = None) -> dict:
    """LoRA on the union of the clients' data, same optimiser, same samples processed as the federation."""
    if lr is not None:
        config = config.model_copy(update={"client": config.client.model_copy(update={"lr": lr})})
    data = federated_data(config)
    torch.manual_seed(config.seed)
    task = fresh_task(config, len(data.train.classes), config.lora.rank)
    # same local optimiser settings; steps = every client's steps of every round, in one place
    steps = config.rounds * config.clients * config.client.local_steps
    central = config.model_copy(update={"client": config.client.model_copy(update={"local_steps": steps})})
    start = time.perf_counter()
    loss = local_train(task, data.train, central, config.seed)
    return {"accuracy": task.score(data.test)[0], "train_loss": loss, "steps": steps, "lr": config.client.lr,
            "seconds": time.perf_counter() - start}


def run_variant(name: str) -> dict:
    start = time.perf_counter()
    run = federate(base_config(name, **VARIANTS[name]))
    last = run.final
    out = {"accuracy": last["accuracy"], "loss": last["loss"], "epsilon": run.privacy.get("epsilon"),
           "noise_multiplier": run.privacy.get("noise_multiplier"),
           "bytes_up_per_client_per_round": last["bytes_up_per_client"],
           "bytes_down_per_client_per_round": last["bytes_down_per_client"],
           "seconds": time.perf_counter() - start, "accuracy_per_round": [m["accuracy"] for m in run.rounds]}
    print(f"{name:<14} accuracy {last['accuracy']:.3f}  ε {out['epsilon']}  "
          f"up {last['bytes_up_per_client'] / 1024:.0f} KiB  ({out['seconds']:.0f} s)")
    return out


def main(only: str | None = None) -> None:
    """Every variant, or (``--only NAME``) one variant added to the existing results file."""
    if only is not None:
        results = json.loads(RESULTS.read_text())
        results[only] = centralised(base_config("ffa"), CENTRAL_LR[only]) if only in CENTRAL_LR else run_variant(only)
        best = max(results[k]["accuracy"] for k in CENTRAL_LR if k in results)
        results["ffa_minus_best_centralised_points"] = 100 * (results["ffa"]["accuracy"] - best)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        return
    WORK.mkdir(parents=True, exist_ok=True)
    config = base_config("ffa")
    data = federated_data(config)
    majority = max(data.test.labels.count(c) for c in set(data.test.labels)) / len(data.test)
    results: dict = {"config": "configs/fed-ffa.yaml", "clients": config.clients, "rounds": config.rounds,
                     "dirichlet_alpha": config.data.alpha,
                     "label_skew_tv": label_skew(data.parts, data.train.labels, len(data.train.classes)),
                     "client_sizes": [len(p) for p in data.parts], "test_size": len(data.test),
                     "majority_class_test": majority}
    for name, lr in CENTRAL_LR.items():
        results[name] = centralised(config, lr)
        print(f"{name}: accuracy {results[name]['accuracy']:.3f} ({results[name]['steps']} steps)")
    for name in VARIANTS:
        results[name] = run_variant(name)
    best = max(results[k]["accuracy"] for k in CENTRAL_LR)
    results["ffa_minus_best_centralised_points"] = 100 * (results["ffa"]["accuracy"] - best)
    results["int8_bytes_ratio"] = (results["ffa_int8"]["bytes_up_per_client_per_round"]
                                   / results["ffa"]["bytes_up_per_client_per_round"])
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"FFA − best centralised: {results['ffa_minus_best_centralised_points']:+.1f} points; "
          f"int8/fp32 bytes {results['int8_bytes_ratio']:.3f}; wrote {RESULTS}")


if __name__ == "__main__":
    import sys

    main(sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None)
