"""Aggregation exactness: relative error between the aggregated adapter's ΔW and the weighted mean of
the clients' ΔW, for FedIT, FFA-LoRA and FLoRA (issue 6's first figure).

Layer 384 × 384 (a MiniLM attention projection), 5 clients with non-uniform weights, rank 8 (FLoRA also
with ranks 4/8/8/16/16), factors drawn like trained LoRA factors (A ~ N(0, 1/in), B ~ N(0, 0.1²)),
float32 as clients send them; 20 seeded trials, median and max reported. Expected: FFA and FLoRA at
float32 round-off (~1e-7), FedIT visibly off (its cross terms B_i A_j).

    python benchmarks/aggregation_exactness.py

Writes benchmarks/results/aggregation_exactness.json.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from privlora.federated.aggregation import fedit, ffa, flora, relative_error, weights

RESULTS = Path(__file__).parent / "results" / "aggregation_exactness.json"
SIZE, CLIENTS, TRIALS, ALPHA = 384, 5, 20, 16.0


def trial(seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    p = weights(torch.randint(50, 500, (CLIENTS,), generator=g).tolist())

    def factors(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(rank, SIZE, generator=g) / SIZE ** 0.5, torch.randn(SIZE, rank, generator=g) * 0.1)

    def target(As, Bs, scalings):
        return sum(pi * s * (b.double() @ a.double()) for pi, s, a, b in zip(p, scalings, As, Bs, strict=True))

    pairs = [factors(8) for _ in range(CLIENTS)]
    As, Bs = [a for a, _ in pairs], [b for _, b in pairs]
    s = ALPHA / 8
    A, B = fedit(As, Bs, p)
    out = {"fedit": relative_error(s * (B.double() @ A.double()), target(As, Bs, [s] * CLIENTS))}
    shared = As[0]
    out["ffa"] = relative_error(s * (ffa(shared, Bs, p).double() @ shared.double()),
                                target([shared] * CLIENTS, Bs, [s] * CLIENTS))
    A, B = flora(As, Bs, p, [s] * CLIENTS)
    out["flora"] = relative_error(B.double() @ A.double(), target(As, Bs, [s] * CLIENTS))
    ranks = [4, 8, 8, 16, 16]
    pairs = [factors(r) for r in ranks]
    As, Bs = [a for a, _ in pairs], [b for _, b in pairs]
    scalings = [ALPHA / r for r in ranks]
    A, B = flora(As, Bs, p, scalings)
    out["flora_mixed_ranks"] = relative_error(B.double() @ A.double(), target(As, Bs, scalings))
    return out


def main() -> None:
    runs = [trial(seed) for seed in range(TRIALS)]
    result = {"layer": [SIZE, SIZE], "clients": CLIENTS, "trials": TRIALS, "dtype": "float32", "methods": {
        m: {"median": statistics.median(r[m] for r in runs), "max": max(r[m] for r in runs)} for m in runs[0]}}
    print(f"{'method':<18} {'median rel. error':>18} {'max':>10}")
    for m, v in result["methods"].items():
        print(f"{m:<18} {v['median']:>18.2e} {v['max']:>10.2e}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
