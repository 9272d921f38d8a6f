"""What federation costs on this machine: SecAgg+ time per round vs plain aggregation (side by side, same
run), and memory and time per round of 20- and 100-client simulations.

* SecAgg+ overhead: 5 clients, 3 rounds of FFA-LoRA, with and without SecAgg+; median round time of
  rounds 2–3 (round 1 includes the workers' model loading). Ratio secure ÷ plain from this one run.
* Scale: 20 clients (all every round) and 100 clients (10 sampled per round), 3 rounds; peak resident
  memory of the whole process tree (this process + Ray workers), sampled every 0.2 s with psutil.

    python benchmarks/federated_cost.py        # ~8 min on 2 cores

Writes benchmarks/results/federated_cost.json.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil

from privlora.config import FederatedConfig
from privlora.federated.run import federate

RESULTS = Path(__file__).parent / "results" / "federated_cost.json"
COMMON = {"strategy": "ffa", "rounds": 3, "data": {"limit": 2000}, "client": {"local_steps": 10, "batch_size": 16},
          "quiet": True}


class PeakMemory:
    """Peak summed RSS of this process and all its descendants (Ray's workers included)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run(out: Path, **overrides) -> dict:
    config = FederatedConfig.model_validate({**COMMON, "out": str(out), **overrides})
    start = time.perf_counter()
    with PeakMemory() as mem:
        result = federate(config)
    rounds = [m["round_seconds"] for m in result.rounds[1:]]
    return {"clients": config.clients, "per_round": config.per_round(), "round_seconds": rounds,
            "median_round_seconds_after_first": statistics.median(rounds[1:]), "total_seconds":
            time.perf_counter() - start, "peak_rss_mib": mem.peak / 2**20, "accuracy": result.final["accuracy"]}


def main() -> None:
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results["plain_5"] = run(work / "plain", clients=5)
        results["secagg_5"] = run(work / "secagg", clients=5, secagg={"enabled": True})
        results["secagg_time_ratio"] = (results["secagg_5"]["median_round_seconds_after_first"]
                                        / results["plain_5"]["median_round_seconds_after_first"])
        print(f"SecAgg+ / plain round time: {results['secagg_time_ratio']:.2f}")
        results["clients_20"] = run(work / "c20", clients=20)
        results["clients_100"] = run(work / "c100", clients=100, clients_per_round=10)
    for k, v in results.items():
        if isinstance(v, dict):
            print(f"{k:<12} median round {v['median_round_seconds_after_first']:.1f} s, peak RSS "
                  f"{v['peak_rss_mib']:.0f} MiB, accuracy {v['accuracy']:.3f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
