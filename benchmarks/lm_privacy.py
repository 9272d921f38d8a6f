"""Private instruction tuning of a causal LM: plain LoRA vs DP-LoRA at ε = 8 and 3 vs SMP-LoRA, each audited.

configs/lm-lora.yaml (privlora's embedded tiny GPT-2 on demo:support: invented customer-service records with
planted names, e-mail addresses and account numbers) with secret-sharer canaries (Carlini et al. 2019) planted
among the members — "my account number is " + 9 random digits, 2 secrets each inserted 1, 4 and 16 times, 2
never inserted — and every run audited by ``privlora audit``'s causal-LM kind: loss, zlib, reference (base
model) and Min-K% attacks against the evaluation non-members, canary exposure (bits; the maximum is
log2 10^9 ≈ 29.9), and extraction by prompting (greedy and one sampled continuation per member prompt,
verbatim / near-verbatim rates) — each beside the base model's control.

The DP recipe (Poisson batch 32, 200 steps, lr 5e-3, C = 1, δ = 1e-5) was fixed before any run, not tuned
on these members.

    python benchmarks/lm_privacy.py [--only NAME ...]     # ~1 h on 2 busy cores

Writes benchmarks/results/lm_privacy.json (resumable: finished rows are kept unless named in ``--only``)
and the table of BENCHMARKS.md and docs/guide/causal-lm.md, benchmarks/results/lm_privacy.md (rewritten
from the JSON on every call, also when nothing is left to compute); run directories in benchmarks/.work/lm/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from privlora.audit.runner import audit_run
from privlora.config import load_config
from privlora.runs import write_json_atomic
from privlora.train.loop import train

HERE = Path(__file__).parent
CONFIG = HERE.parent / "configs" / "lm-lora.yaml"
RESULTS = HERE / "results" / "lm_privacy.json"
TABLE = RESULTS.with_suffix(".md")
WORK = HERE / ".work" / "lm"
DELTA = 1e-5
CANARIES = {"canaries.insertions": [1, 4, 16], "canaries.per_count": 2, "canaries.controls": 2}
DP = {"mode": "dp", "optim.batch_size": 32, "optim.max_steps": 200, "optim.lr": 5e-3, "dp.max_grad_norm": 1.0,
      "dp.delta": DELTA}
ROWS: dict[str, dict[str, Any]] = {
    "plain": {"mode": "plain"},
    "dp-eps8": {**DP, "dp.target_epsilon": 8.0},
    "dp-eps3": {**DP, "dp.target_epsilon": 3.0},
    "smp-a1": {"mode": "smp", "mp.alpha": 1.0},
}
ATTACKS = ("loss", "zlib", "reference", "min_k")


def run_row(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Train (or reuse) and audit one row; the row's figures from utility.json, privacy.json, audit/results.json."""
    out = WORK / name
    seconds: dict[str, float] = {}
    if not (out / "utility.json").exists():
        start = time.perf_counter()
        train(load_config(CONFIG, {**CANARIES, **overrides, "out": str(out), "name": f"lm-{name}", "quiet": True}))
        seconds["train"] = time.perf_counter() - start
    start = time.perf_counter()
    results = audit_run(out, attacks=ATTACKS, extraction=1)
    seconds["audit"] = time.perf_counter() - start
    utility = json.loads((out / "utility.json").read_text())
    privacy = json.loads((out / "privacy.json").read_text())
    attacks = results["attacks"]
    strongest = max(attacks, key=lambda a: attacks[a]["adapter"]["auc"])
    exposure = results.get("canary_exposure", {})
    extraction = results.get("extraction", {})
    return {
        "run": name, "mode": privacy.get("mode"), "epsilon": privacy.get("epsilon"),
        "delta": privacy.get("delta") if privacy.get("epsilon") is not None else None,
        "members": results["members"], "nonmembers": results["nonmembers"], "utility": utility,
        "heldout_perplexity": utility.get("perplexity_heldout"),
        "base_heldout_perplexity": utility.get("base_perplexity_heldout"),
        "strongest_attack": strongest, "strongest_auc": attacks[strongest]["adapter"]["auc"],
        "strongest_base_auc": attacks[strongest]["base_control"]["auc"],
        "auc_by_attack": {a: {"adapter": v["adapter"]["auc"], "base": v["base_control"]["auc"]}
                          for a, v in attacks.items()},
        "exposure_bits": {side: exposure.get(side, {}).get("by_insertions") for side in ("adapter", "base_control")},
        "extraction": {side: {mode: {k: v for k, v in figures.items() if isinstance(v, (int, float))}
                              for mode, figures in (extraction.get(side) or {}).items()}
                       for side in ("adapter", "base_control")},
        "scores_csv": str(out / "audit" / "scores.csv"), "seconds": seconds,
    }


def _bits(row: dict[str, Any], side: str, count: str) -> str:
    value = (row["exposure_bits"].get(side) or {}).get(count)
    return "n/a" if value is None else f"{value:.1f}"


def table(rows: dict[str, Any]) -> str:
    """The markdown table: perplexity, exposure per insertion count (adapter / base), extraction, AUC."""
    lines = ["| run | ε | held-out perplexity (base) | exposure bits 16× / 4× / 1× / never (base 16×) "
             "| greedy verbatim / near-verbatim | strongest attack | AUC (base) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        eps = "n/a" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        exposure = " / ".join(_bits(r, "adapter", c) for c in ("16", "4", "1", "0"))
        greedy = (r["extraction"].get("adapter") or {}).get("greedy", {})
        nan = float("nan")
        extraction = f"{greedy.get('verbatim_rate', nan):.3f} / {greedy.get('near_verbatim_rate', nan):.3f}"
        lines.append(f"| {name} | {eps} | {r['heldout_perplexity']:.1f} ({r['base_heldout_perplexity']:.0f}) | "
                     f"{exposure} ({_bits(r, 'base_control', '16')}) | {extraction} | {r['strongest_attack']} | "
                     f"{r['strongest_auc']:.3f} ({r['strongest_base_auc']:.3f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="rows to (re)compute; default: the missing ones")
    args = parser.parse_args()
    rows: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name, overrides in ROWS.items():
        if (args.only is not None and name not in args.only) or (args.only is None and name in rows):
            continue
        print(f"== {name}", flush=True)
        rows[name] = run_row(name, overrides)
        write_json_atomic(RESULTS, rows)
        r = rows[name]
        print(f"   ppl {r['heldout_perplexity']:.1f} (base {r['base_heldout_perplexity']:.1f}); strongest "
              f"{r['strongest_attack']} AUC {r['strongest_auc']:.3f} (base {r['strongest_base_auc']:.3f}); "
              f"exposure {r['exposure_bits']['adapter']}", flush=True)
    if rows:
        TABLE.write_text(table(rows))
        print(f"table → {TABLE}")


if __name__ == "__main__":
    main()
