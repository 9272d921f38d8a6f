"""``privlora split sweep``: the paper-style privacy–utility table over η, depth, CTI and bottom mode.

Every point trains the same split model in-process (the server's :class:`TopService` through
:class:`LocalTop` — the HTTP path runs the same code), then measures, all on the user's held-out texts:

* utility — held-out accuracy through the privatized pipeline, and the drop against ``none`` at the same
  depth and bottom mode;
* EIA — the server inverts the privatized states of ``attack_texts`` held-out texts: nearest neighbour
  at depth 0, optimisation at depth ≥ 1 (white box: it knows the bottom's weights); success = share of
  real, non-special tokens recovered exactly;
* AIA — a linear probe learns the airline a tweet addresses from the privatized states of the
  attacker's users and predicts it for other users (tweets outside the user's data); success = accuracy
  (``aia_chance`` = guessing the commonest airline).

Empirical privacy = 1 − attack success (Shen et al.). Results: ``sweep.json``, ``sweep.md``, ``sweep.png``.
Each finished point is journalled beside the output (``.<out>.partial.jsonl``): an interrupted sweep
run again with the same settings skips what it already measured.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from privlora.config import SplitPrivatizerOptions
from privlora.data.text import TextSet, load_text_dataset, load_tweets
from privlora.errors import UserError
from privlora.split import attacks
from privlora.split.models import SplitBottom, SplitTop
from privlora.split.run import build_privatizer, hold_out
from privlora.split.service import LocalTop, TopService
from privlora.split.train import evaluate, train


@dataclass(frozen=True)
class SweepPoint:
    depth: int
    privatizer: str  # none | dchi | cti
    eta: float | None
    bottom: str = "frozen"
    cti_top_k: int | None = None  # CTI only: how many tokens are spared

    @property
    def label(self) -> str:
        name = "SAP-CTI" if self.privatizer == "cti" else "SAP" if self.privatizer == "dchi" else "no noise"
        k = f" k={self.cti_top_k}" if self.cti_top_k else ""
        return f"{name} η={self.eta:g}{k}" if self.eta else name


@dataclass
class SweepSettings:
    depths: tuple[int, ...] = (0, 1)
    etas: tuple[float, ...] = (6.0, 3.0)
    privatizers: tuple[str, ...] = ("dchi", "cti")
    bottoms: tuple[str, ...] = ("frozen",)
    source: str = "demo:tweets"
    limit: int = 2000
    eval: float = 0.3
    steps: int = 150
    batch_size: int = 32
    lr: float = 1e-3  # the top's (and a trainable bottom's)
    seed: int = 0
    cti_top_ks: tuple[int, ...] = (50, 150)
    cti_boost: float = 100.0
    cti_min_count: int = 5
    attack_texts: int = 16
    eia_steps: int = 100
    aia_texts: int = 600

    def points(self) -> list[SweepPoint]:
        out = []
        for depth in self.depths:
            for bottom in self.bottoms:
                if bottom == "trainable" and depth == 0:
                    continue  # nothing to train on the user's side at depth 0
                out.append(SweepPoint(depth, "none", None, bottom))
                for p in self.privatizers:
                    ks: tuple[int | None, ...] = self.cti_top_ks if p == "cti" else (None,)
                    out.extend(SweepPoint(depth, p, eta, bottom, k) for eta in self.etas for k in ks)
        if not out:
            raise UserError("the sweep has no point (a trainable bottom needs a depth ≥ 1)")
        return out


def _aia_pool(exclude: set[str], size: int, seed: int) -> tuple[list[str], list[int]]:
    """Tweets of other users that address exactly one airline (none of the user's own)."""
    import random

    tweets = load_tweets()
    labelled = [(t, a) for i, t, a in zip(tweets.ids, tweets.texts, attacks.airline(tweets.texts), strict=True)
                if a is not None and i not in exclude]
    random.Random(seed).shuffle(labelled)
    chosen = labelled[:size]
    return [t for t, _ in chosen], [a for _, a in chosen]


@torch.no_grad()
def _states(bottom: SplitBottom, privatizer: Any, texts: list[str], generator: torch.Generator,
            batch_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = bottom.encode(texts[start:start + batch_size])
        out.append((ids, mask, privatizer(bottom.forward(ids, mask), ids, generator)))
    return out


def run_point(point: SweepPoint, settings: SweepSettings, train_data: TextSet, eval_data: TextSet,
              aia: tuple[list[str], list[int]] | None) -> dict[str, Any]:
    """Train one configuration and attack it; one row of the table."""
    generator = torch.Generator().manual_seed(settings.seed + 7)
    start = time.perf_counter()
    bottom = SplitBottom(point.depth, trainable=point.bottom == "trainable", seed=settings.seed)
    options = SplitPrivatizerOptions(name=point.privatizer, eta=point.eta, cti_top_k=point.cti_top_k or 1,
                                     cti_boost=settings.cti_boost, cti_min_count=settings.cti_min_count)
    privatizer = build_privatizer(options, bottom, train_data)
    top = LocalTop(TopService(SplitTop(point.depth, len(train_data.classes), seed=settings.seed), lr=settings.lr))
    train(bottom, privatizer, top, train_data, steps=settings.steps, batch_size=settings.batch_size,
          lr=settings.lr, seed=settings.seed, generator=generator)
    accuracy, loss = evaluate(bottom, privatizer, top, eval_data, batch_size=settings.batch_size,
                              generator=generator)
    trained = time.perf_counter() - start
    row: dict[str, Any] = {**asdict(point), "label": point.label, "accuracy": round(accuracy, 4),
                           "loss": round(loss, 4), "train_seconds": round(trained, 1),
                           "noise_norm": round(bottom.hidden_size / point.eta, 3) if point.eta else 0.0}
    if point.privatizer == "cti":
        row["cti_tokens"] = len(privatizer.contributing)
    # EIA on held-out texts
    recovered, total = 0, 0  # pooled over batches of different lengths
    for ids, mask, observed in _states(bottom, privatizer, eval_data.texts[:settings.attack_texts], generator):
        guess = (attacks.eia_nearest(bottom, observed, mask) if point.depth == 0 else
                 attacks.eia_optimize(bottom, observed, mask, steps=settings.eia_steps, generator=generator))
        counted = attacks.counted_tokens(ids, mask, bottom.special_ids)
        recovered += int((guess == ids)[counted].sum())
        total += int(counted.sum())
    row["eia"] = "nearest" if point.depth == 0 else "optimization"
    row["eia_recovery"] = round(recovered / max(total, 1), 4)
    row["eia_privacy"] = round(attacks.empirical_privacy(row["eia_recovery"]), 4)
    if aia is not None:
        texts, labels = aia
        feats = [attacks.pooled_features(h, m) for _, m, h in _states(bottom, privatizer, texts, generator)]
        import numpy as np

        x = np.concatenate(feats)
        half = len(texts) // 2
        result = attacks.attribute_inference(x[:half], labels[:half], x[half:], labels[half:], seed=settings.seed)
        row.update(aia_success=round(result["success"], 4), aia_chance=round(result["chance"], 4),
                   aia_privacy=round(attacks.empirical_privacy(result["success"]), 4))
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def add_drops(rows: list[dict[str, Any]]) -> None:
    """Accuracy drop in points against the no-noise row of the same depth and bottom mode."""
    base = {(r["depth"], r["bottom"]): r["accuracy"] for r in rows if r["privatizer"] == "none"}
    for r in rows:
        ref = base.get((r["depth"], r["bottom"]))
        r["accuracy_drop"] = None if ref is None else round(100 * (ref - r["accuracy"]), 2)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| depth | bottom | privatizer | η | noise ‖n‖ | accuracy | drop (pts) | EIA recovery | EIA emp. privacy "
             "| AIA success (chance) | AIA emp. privacy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        aia = f"{r['aia_success']:.3f} ({r['aia_chance']:.3f})" if "aia_success" in r else "n/a"
        aia_p = f"{r['aia_privacy']:.3f}" if "aia_privacy" in r else "n/a"
        cti = f" ({r['cti_tokens']} spared)" if "cti_tokens" in r else ""
        drop = "" if r.get("accuracy_drop") is None else f"{r['accuracy_drop']:+.1f}"
        lines.append(f"| {r['depth']} | {r['bottom']} | {r['privatizer']}{cti} | {r['eta'] or '–'} | "
                     f"{r['noise_norm']:.2f} | {r['accuracy']:.3f} | {drop} | {r['eia_recovery']:.3f} ({r['eia']}) | "
                     f"{r['eia_privacy']:.3f} | {aia} | {aia_p} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against EIA empirical privacy, one series per (privatizer, depth, bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(f"{r['privatizer']} depth {r['depth']} {r['bottom']}", []).append(r)
    for name, points in sorted(series.items()):
        points = sorted(points, key=lambda r: r["eia_privacy"])
        ax.plot([p["eia_privacy"] for p in points], [p["accuracy"] for p in points],
                marker="o" if "none" in name else "s" if "cti" in name else "^", label=name)
        for p in points:
            if p["eta"]:
                k = f", k={p['cti_top_k']}" if p.get("cti_top_k") else ""
                ax.annotate(f"η={p['eta']:g}{k}", (p["eia_privacy"], p["accuracy"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("empirical privacy against EIA (1 − token recovery)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("SAP privacy–utility (MiniLM, tweets)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_sweep(settings: SweepSettings, out: Path, *, quiet: bool = False) -> list[dict[str, Any]]:
    """Run every point, write ``sweep.json``/``sweep.md``/``sweep.png`` into ``out`` atomically."""
    from privlora.progress import progress_bar
    from privlora.runs import atomic_dir

    points = settings.points()
    data = load_text_dataset(settings.source, limit=settings.limit)
    train_data, eval_data = hold_out(data, settings.eval, settings.seed)
    aia = _aia_pool(set(data.ids), settings.aia_texts, settings.seed) if settings.source == "demo:tweets" else None
    journal = Path(out).with_name(f".{Path(out).name}.partial.jsonl")
    done = _finished_points(journal, settings)
    rows = []
    with progress_bar("split sweep", total=len(points), quiet=quiet) as bar:
        for point in points:
            row = done.get(point) or run_point(point, settings, train_data, eval_data, aia)
            if point not in done:
                with journal.open("a") as f:  # an interrupted sweep resumes from here
                    f.write(json.dumps({"settings": _key(settings), "row": row}) + "\n")
            rows.append(row)
            bar.advance(accuracy=row["accuracy"], eia=row["eia_recovery"])
    add_drops(rows)
    with atomic_dir(out) as tmp:
        (tmp / "sweep.json").write_text(json.dumps({"settings": asdict(settings), "rows": rows}, indent=2) + "\n")
        (tmp / "sweep.md").write_text(markdown(rows))
        plot(rows, tmp / "sweep.png")
    journal.unlink(missing_ok=True)
    return rows


def _key(settings: SweepSettings) -> dict[str, Any]:
    """What a finished point depends on besides the point itself (the grid may grow between runs)."""
    grid = ("depths", "etas", "privatizers", "bottoms", "cti_top_ks")
    return {k: v for k, v in asdict(settings).items() if k not in grid}


def _finished_points(journal: Path, settings: SweepSettings) -> dict[SweepPoint, dict[str, Any]]:
    """Rows an earlier, interrupted run of the same settings already measured."""
    done: dict[SweepPoint, dict[str, Any]] = {}
    if not journal.is_file():
        return done
    key = json.loads(json.dumps(_key(settings)))  # tuples → lists, as stored
    for line in journal.read_text().splitlines():
        try:
            entry = json.loads(line)
            row = entry["row"]
            if entry["settings"] == key:
                done[SweepPoint(row["depth"], row["privatizer"], row["eta"], row["bottom"], row.get("cti_top_k"))] = row
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by the interruption
    return done
