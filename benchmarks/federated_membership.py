"""A loss-based membership attack against one client's data, from the global federated adapter.

The attacker holds the final global adapter (what every client, and the server, receives) and asks of
each sample "was it in client 0's training data?". Members: client 0's samples. Non-members: the
server's held-out samples, resampled to client 0's label mix (client 0's data is label-skewed, so an
unmatched comparison would measure the label, not membership). Score: −cross-entropy (the audit's
:func:`privlora.audit.text_attacks.text_loss_attack`). Figures from
``privlora.audit.metrics.summarize`` (AUC with bootstrap CI, TPR at 1 % FPR, empirical privacy =
1 − balanced accuracy); the AUC is cross-checked with scikit-learn.

Runs on the run directories of benchmarks/federated_accuracy.py (FFA without DP, with client-level DP at
ε = 8 and ε = 3; runs them first if they are missing), and with ``--sample-dp`` on those of
benchmarks/federated_sample_dp.py (FFA-LoRA and FedIT without DP and with sample-level DP at ε = 8, 3, 1),
where client 0's own ε (its ledger in privacy.json) stands beside the AUC (runs not made yet are named
and skipped).

    python benchmarks/federated_membership.py [--sample-dp]

Writes benchmarks/results/federated_membership.json.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from privlora.audit.metrics import summarize
from privlora.audit.text_attacks import text_loss_attack
from privlora.config import FederatedConfig, load_config
from privlora.federated.data import federated_data
from privlora.tasks.text import TextClassificationTask, TextLora

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "federated_membership.json"
WORK = HERE / ".work" / "fed"
RUNS = ("ffa", "ffa_dp_eps8", "ffa_dp_eps3")
SAMPLE_DP_WORK = HERE / ".work" / "fed-sample-dp"
SAMPLE_DP_RUNS = tuple(f"{s}-5c{dp}" for s in ("ffa", "fedit")
                       for dp in ("", *(f"-sdp{c}-eps{e}" for e in (8, 3, 1) for c in ("", "-own"))))


def matched_non_members(members_labels: list[int], test_labels: list[int], seed: int) -> list[int]:
    """Indices into the test set with the members' label histogram (sampling with replacement per class)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(test_labels):
        by_class.setdefault(y, []).append(i)
    return [rng.choice(by_class[y]) for y in members_labels if by_class.get(y)]


def client_epsilon(privacy: dict, client: int) -> float | None:
    """The audited client's own ε: its ledger entry under sample-level DP, the run's ε otherwise."""
    entries = privacy.get("clients")  # client-level privacy.json: the client count, not a list
    if not isinstance(entries, list) or not entries:
        return privacy.get("epsilon")
    entry = next((c for c in entries if c.get("client") == client), None)
    return None if entry is None else entry.get("epsilon")


def main(sample_dp: bool = False, only: tuple[str, ...] = ()) -> None:
    """Attack every run (``only``: just these, the others' figures kept)."""
    work, names = (SAMPLE_DP_WORK, SAMPLE_DP_RUNS) if sample_dp else (WORK, RUNS)
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise SystemExit(f"unknown runs: {', '.join(unknown)}; known: {', '.join(names)}")
        names = tuple(only)
    missing = [r for r in names if not (work / r / "adapter").is_dir()]
    if missing and sample_dp:
        # its runs take ~8 min each: attack the ones that exist, name the rest
        names = tuple(r for r in names if r not in missing)
        print(f"not run yet (benchmarks/federated_sample_dp.py): {', '.join(missing)}")
        if not names:
            raise SystemExit("run benchmarks/federated_sample_dp.py first")
    elif missing:
        from federated_accuracy import main as run_accuracy

        run_accuracy()
    results: dict = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.update({"client": 0, "score": "-cross_entropy"})
    results.setdefault("runs", {})
    for name in names:
        run = work / name
        config = load_config(run / "config.yaml", model=FederatedConfig)
        data = federated_data(config)
        members = data.parts[0]
        non = matched_non_members([data.train.labels[i] for i in members], data.test.labels, config.seed)
        task = TextClassificationTask(len(data.train.classes), lora=TextLora(rank=config.lora.rank,
                                      alpha=config.lora.alpha, targets=tuple(config.lora.targets)))
        task.load_adapter(run / "adapter")
        task.model.eval()
        scores = np.concatenate([text_loss_attack(task, data.train.subset(members)),
                                 text_loss_attack(task, data.test.subset(non))])
        labels = np.concatenate([np.ones(len(members)), np.zeros(len(non))])
        figures = summarize(scores, labels, delta=0.0)
        figures["auc_sklearn"] = float(roc_auc_score(labels, scores))
        privacy = json.loads((run / "privacy.json").read_text())
        figures.update({"epsilon": client_epsilon(privacy, 0), "members": len(members), "non_members": len(non),
                        "dp_level": (privacy.get("level") or "client") if privacy.get("epsilon") is not None
                        or privacy.get("clients") else None})
        results["runs"][name] = figures
        print(f"{name:<18} ε {figures['epsilon']}  AUC {figures['auc']:.3f} "
              f"[{figures['auc_ci_low']:.3f}, {figures['auc_ci_high']:.3f}]  TPR@1%FPR {figures['tpr_at_0.01_fpr']}"
              f"  empirical privacy {figures['empirical_privacy']:.3f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    import sys

    rest = sys.argv[sys.argv.index("--only") + 1:] if "--only" in sys.argv else []
    main(sample_dp="--sample-dp" in sys.argv, only=tuple(a for a in rest if not a.startswith("--")))
