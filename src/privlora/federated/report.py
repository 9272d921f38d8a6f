"""The run directory's picture of a federated run: accuracy, loss, bytes on the wire and ε per round."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_metrics(rounds: list[dict[str, Any]], out: Path, *, title: str, headline: str = "accuracy") -> None:
    """``headline``: the task's main figure beside the loss (federated/tasks.py: accuracy or perplexity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [m["round"] for m in rounds]
    trained = [m for m in rounds if m["round"] > 0]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    ax.plot(xs, [m[headline] for m in rounds], "o-", label=headline)
    ax.plot(xs, [m["loss"] for m in rounds], "s--", label="loss")
    ax.set_xlabel("round")
    ax.set_title("global adapter on the server's test set")
    ax.legend()
    ax = axes[1]
    tx = [m["round"] for m in trained]
    ax.bar([x - 0.2 for x in tx], [m.get("bytes_up_per_client", 0) / 1024 for m in trained], 0.4, label="up")
    ax.bar([x + 0.2 for x in tx], [m.get("bytes_down_per_client", 0) / 1024 for m in trained], 0.4, label="down")
    ax.set_xlabel("round")
    ax.set_ylabel("KiB per client")
    ax.set_title("bytes on the wire")
    ax.legend()
    ax = axes[2]
    eps = [m.get("epsilon") for m in trained]
    if any(e is not None for e in eps):
        ax.plot(tx, [e or 0.0 for e in eps], "o-")
        ax.set_title("ε spent (client level)")
    else:
        ax.text(0.5, 0.5, "no differential privacy", ha="center", va="center")
        ax.set_title("ε spent")
    ax.set_xlabel("round")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
