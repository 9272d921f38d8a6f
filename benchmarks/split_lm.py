"""Split learning of a causal LM: held-out perplexity of the provider's LoRA trained through dχ-noised hidden
states, against the same split without noise and the untrained base.

The embedded tiny GPT-2 cut after block 1 (the user keeps embeddings, block 0, ``ln_f`` and the LM head),
demo:support (400 records: 320 to train, 80 held out on the user's side), 150 steps × 16 records, the
provider's LoRA rank 8 at lr 1e-2, its input clip measured on public text. The service is called in-process
(:class:`~privlora.split.service.LocalTop`, the same code the HTTP server runs); noise from a seeded
generator so the figure reproduces. Clean token norms at the cut are about 21 (max 33); dχ's mean noise
norm is H/η = 128/η. Privacy: the white-box server's embedding inversion (EIA: relaxed one-hot inputs
optimised through the bottom's real block, 100 Adam steps from the residual nearest-neighbour guess,
:func:`privlora.split.attacks.eia_optimize`) on 16 held-out records — the share of their tokens it recovers,
and the empirical privacy 1 − that share.

    python benchmarks/split_lm.py        # ~3 min on 2 cores

Writes benchmarks/results/split_lm.json and the table benchmarks/results/split_lm.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from privlora.data.instructions import load_instruction_dataset
from privlora.split.attacks import eia_optimize, token_recovery
from privlora.split.lm_models import LMSplitBottom, LMSplitTop
from privlora.split.lm_run import lm_evaluate, lm_train_step
from privlora.split.privatizers import Privatizer
from privlora.split.run import hold_out
from privlora.split.service import LocalTop, TopService
from privlora.split.train import batches

RESULTS = Path(__file__).parent / "results" / "split_lm.json"
DEPTH, STEPS, BATCH, LR, RECORDS = 1, 150, 16, 1e-2, 400
POINTS = [("none", None), ("dchi", 20.0), ("dchi", 6.0), ("dchi", 2.0)]
ATTACKED = 16


def inversion(bottom: LMSplitBottom, privatizer: Privatizer, held) -> float:
    """EIA token recovery on the first ATTACKED held-out records (seeded noise and attack)."""
    encoded = bottom.encode(held.batch(list(range(min(ATTACKED, len(held))))))
    with torch.no_grad():
        clean = bottom.forward(encoded["input_ids"], encoded["attention_mask"])
    observed = privatizer(clean, encoded["input_ids"], torch.Generator().manual_seed(2))
    guess = bottom.nearest_tokens(observed, encoded["attention_mask"])
    recovered = eia_optimize(bottom, observed, encoded["attention_mask"], init=guess, steps=100,
                             generator=torch.Generator().manual_seed(3)) if bottom.depth else guess
    return token_recovery(recovered, encoded["input_ids"], encoded["attention_mask"], bottom.special_ids)


def run_point(name: str, eta: float | None, train, held) -> dict:
    torch.manual_seed(0)
    bottom = LMSplitBottom(DEPTH)
    service = TopService(LMSplitTop(DEPTH), lr=LR, base_name="embedded-lm")
    top, privatizer = LocalTop(service), Privatizer(name, eta)
    generator = torch.Generator().manual_seed(1)
    base = lm_evaluate(bottom, privatizer, top, held, batch_size=BATCH, generator=generator)
    start = time.perf_counter()
    for idx in batches(len(train), BATCH, STEPS, seed=0):
        lm_train_step(bottom, privatizer, top, train.batch(idx), generator)
    seconds = time.perf_counter() - start
    after = lm_evaluate(bottom, privatizer, top, held, batch_size=BATCH, generator=generator)
    clean = lm_evaluate(bottom, Privatizer("none"), top, held, batch_size=BATCH, generator=generator)
    recovery = inversion(bottom, privatizer, held)
    return {"privatizer": name, "eta": eta, "mean_noise_norm": None if eta is None else 128 / eta,
            "eia_token_recovery": recovery, "eia_empirical_privacy": 1 - recovery,
            "heldout_perplexity_noised": after["perplexity"], "heldout_perplexity_clean_inputs": clean["perplexity"],
            "base_heldout_perplexity_noised": base["perplexity"], "train_seconds": seconds,
            "records_per_second": STEPS * BATCH / seconds}


def main() -> None:
    data = load_instruction_dataset("demo:support", limit=RECORDS)
    train, held = hold_out(data, 0.2, seed=0)
    rows = []
    for name, eta in POINTS:
        rows.append(run_point(name, eta, train, held))
        r = rows[-1]
        print(f"{name} η={eta}: held-out perplexity {r['heldout_perplexity_noised']:.1f} (base through the same "
              f"noise {r['base_heldout_perplexity_noised']:.1f}; clean inputs "
              f"{r['heldout_perplexity_clean_inputs']:.1f})", flush=True)
    RESULTS.write_text(json.dumps({"depth": DEPTH, "steps": STEPS, "batch": BATCH, "lr": LR,
                                   "train_records": len(train), "heldout_records": len(held), "rows": rows},
                                  indent=2) + "\n")
    lines = ["| privatizer | η | mean noise norm | held-out perplexity (noised inputs) | base, same noise | "
             "trained top, clean inputs | EIA token recovery | EIA emp. privacy | records/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eta = "—" if r["eta"] is None else f"{r['eta']:g}"
        noise = "0" if r["mean_noise_norm"] is None else f"{r['mean_noise_norm']:.1f}"
        lines.append(f"| {r['privatizer']} | {eta} | {noise} | {r['heldout_perplexity_noised']:.1f} | "
                     f"{r['base_heldout_perplexity_noised']:.1f} | {r['heldout_perplexity_clean_inputs']:.1f} | "
                     f"{r['eia_token_recovery']:.3f} | {r['eia_empirical_privacy']:.3f} | "
                     f"{r['records_per_second']:.1f} |")
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
