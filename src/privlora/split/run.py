"""The user's commands as library calls: ``split_train`` writes a run directory, ``split_predict`` reads it.

Run directory (written atomically): ``config.yaml`` (what ran; never the token), ``split.json`` (depth,
classes, privatizer with CTI's spared tokens, accuracy, bytes on the wire), ``metrics.jsonl`` (one row
per step) and, for a trainable bottom, ``bottom_adapter/`` (a peft folder for the blocks below the cut).
The server keeps the top adapter; ``split predict`` needs the run directory *and* the server.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from privlora.config import SplitConfig, SplitPrivatizerOptions, dump_config
from privlora.data.text import TextSet, load_text_dataset
from privlora.errors import UserError
from privlora.split.models import SplitBottom
from privlora.split.privatizers import Privatizer, contributing_tokens, os_generator
from privlora.split.train import TopEndpoint, evaluate, logits_for, train
from privlora.tasks.text import TextLora

SPLIT_JSON = "split.json"
BOTTOM_ADAPTER = "bottom_adapter"


@dataclass
class SplitRun:
    run_dir: Path
    accuracy: float
    loss: float
    summary: dict[str, Any]


def base_path(base: str) -> str | None:
    """``minilm`` → None (the packaged MiniLM); anything else is a local model folder."""
    return None if base == "minilm" else base


def hold_out(data: TextSet, fraction: float, seed: int) -> tuple[TextSet, TextSet]:
    """Seeded (train, eval) split of the user's data."""
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(fraction * len(data))))
    if n_eval >= len(data):
        raise UserError(f"{len(data)} texts leave nothing to train on after holding out {n_eval}")
    return data.subset(sorted(order[n_eval:])), data.subset(sorted(order[:n_eval]))


def build_privatizer(options: SplitPrivatizerOptions, bottom: SplitBottom, train_data: TextSet) -> Privatizer:
    """The configured privatizer; CTI finds its tokens on the user's own training texts here."""
    contributing: dict[int, dict[str, Any]] = {}
    if options.name == "cti":
        ids = bottom.tokenizer(train_data.texts, truncation=True, max_length=bottom.task.max_length)["input_ids"]
        contributing = contributing_tokens(ids, train_data.labels, top_k=options.cti_top_k,
                                           min_count=options.cti_min_count, exclude=bottom.special_ids,
                                           decode=bottom.tokenizer.convert_ids_to_tokens)
        for info in contributing.values():
            info["class"] = train_data.classes[info["class"]]
    return Privatizer(options.name, options.eta, options.cti_boost if options.name == "cti" else 1.0, contributing)


def check_server(info: dict[str, Any], config: SplitConfig, classes: list[str] | None = None) -> int:
    """The server's split depth; refuses a server of another task or base, or whose head cannot hold the
    user's ``classes`` (a text classifier's; a causal LM has none)."""
    served = info.get("task", "text")
    if served != config.task:
        raise UserError(f"the split server hosts a {served} model but this client trains task {config.task}: "
                        f"give both the same --task ({served} here, or restart the server with --task {config.task})")
    if info.get("base") != config.base:
        raise UserError(f"the split server runs base {info.get('base')!r} but this client is set to "
                        f"{config.base!r}; both halves must come from the same model")
    if classes is not None and info.get("num_labels") != len(classes):
        raise UserError(f"the split server's head has {info.get('num_labels')} labels but the data has "
                        f"{len(classes)} ({', '.join(classes)}); restart it with --num-labels {len(classes)}")
    if config.optim.batch_size > int(info.get("max_batch", 64)):
        raise UserError(f"batch size {config.optim.batch_size} over the server's limit {info['max_batch']}")
    return int(info["depth"])


def split_train(config: SplitConfig, top: TopEndpoint, *, progress: bool = True) -> SplitRun:
    """Train against a split server (or a :class:`LocalTop`) and write the user's run directory: the
    classifier's loop below, or the causal LM's (:func:`privlora.split.lm_run.lm_split_train`)."""
    from privlora.split.lm_run import lm_split_train

    trainers = {"text": _split_train_text, "causal-lm": lm_split_train}
    return trainers[config.task](config, top, progress=progress)


def _split_train_text(config: SplitConfig, top: TopEndpoint, *, progress: bool = True) -> SplitRun:
    from privlora.progress import progress_bar

    data = load_text_dataset(config.data.source, limit=config.data.limit)
    train_data, eval_data = hold_out(data, config.data.eval, config.seed)
    depth = check_server(top.info(), config, data.classes)
    bottom = SplitBottom(depth, trainable=config.bottom == "trainable", seed=config.seed,
                         lora=TextLora(config.lora.rank, config.lora.alpha), base=base_path(config.base))
    privatizer = build_privatizer(config.privatizer, bottom, train_data)
    generator = os_generator()
    start = time.perf_counter()
    with progress_bar("split training", total=config.optim.steps, quiet=config.quiet or not progress) as bar:
        rows = train(bottom, privatizer, top, train_data, steps=config.optim.steps,
                     batch_size=config.optim.batch_size, lr=config.optim.lr, seed=config.seed,
                     generator=generator, on_step=lambda step, loss: bar.advance(loss=loss))
    seconds = time.perf_counter() - start
    accuracy, loss = evaluate(bottom, privatizer, top, eval_data, batch_size=config.optim.batch_size,
                              generator=generator)
    saved = top.save() if hasattr(top, "save") else {}
    summary = {
        "depth": depth, "base": config.base, "bottom": config.bottom, "classes": data.classes,
        "privatizer": privatizer.describe(),
        "server": config.server, "server_adapter": saved.get("path"), "server_steps": saved.get("steps"),
        "train_texts": len(train_data), "eval_texts": len(eval_data), "eval_accuracy": round(accuracy, 4),
        "eval_loss": round(loss, 4), "train_seconds": round(seconds, 2),
        "samples_per_second": round(config.optim.steps * config.optim.batch_size / seconds, 2),
    }
    write_split_run(config, top, rows, summary, bottom=bottom if bottom.trainable else None)
    return SplitRun(Path(config.out), accuracy, loss, summary)


def write_split_run(config: SplitConfig, top: TopEndpoint, rows: list[dict[str, Any]], summary: dict[str, Any],
                    *, bottom: Any = None) -> None:
    """The user's run directory, atomically: config.yaml, metrics.jsonl, split.json (with the bytes the
    transport counted) and, for a trainable ``bottom``, its adapter."""
    from privlora.runs import atomic_dir

    for key in ("bytes_sent", "bytes_received"):
        if hasattr(top, key):
            summary[key] = int(getattr(top, key))
    with atomic_dir(config.out) as tmp:
        (tmp / "config.yaml").write_text(dump_config(config))
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / SPLIT_JSON).write_text(json.dumps(summary, indent=2) + "\n")
        if bottom is not None:
            bottom.save_adapter(tmp / BOTTOM_ADAPTER)


def load_split_run(run_dir: Path) -> tuple[dict[str, Any], SplitBottom, Privatizer]:
    """A run directory's summary, its bottom (with its adapter) and its privatizer — for prediction."""
    path = Path(run_dir) / SPLIT_JSON
    if not path.is_file():
        raise UserError(f"{run_dir} is not a split run directory (no {SPLIT_JSON}; run `privlora split train`)")
    try:
        summary = json.loads(path.read_text())
        if isinstance(summary, dict) and summary.get("task", "text") != "text":
            raise UserError(f"{run_dir} is a split {summary['task']} run; split predict labels texts with a split "
                            "classifier")
        depth, classes, spec = int(summary["depth"]), list(summary["classes"]), summary["privatizer"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UserError(f"{path} is not a valid split summary") from None
    trainable = summary.get("bottom") == "trainable"
    bottom = SplitBottom(depth, trainable=trainable, base=base_path(summary.get("base", "minilm")))
    if trainable:
        bottom.load_adapter(Path(run_dir) / BOTTOM_ADAPTER)
    contributing = {int(c["id"]): {k: v for k, v in c.items() if k != "id"} for c in spec.get("contributing", [])}
    privatizer = Privatizer(spec["name"], spec.get("eta"), float(spec.get("boost", 1.0)), contributing)
    summary["classes"] = classes
    return summary, bottom, privatizer


def split_predict(run_dir: Path, texts: list[str], top: TopEndpoint, *, batch_size: int = 32) -> list[str]:
    """Label names for ``texts``, privatized exactly as in training (fresh OS-entropy noise)."""
    summary, bottom, privatizer = load_split_run(run_dir)
    info = top.info()
    if int(info.get("depth", -1)) != bottom.depth or int(info.get("num_labels", -1)) != len(summary["classes"]):
        raise UserError(f"the server splits at depth {info.get('depth')} with {info.get('num_labels')} labels, "
                        f"but {run_dir} was trained at depth {bottom.depth} with {len(summary['classes'])}")
    if not texts:
        return []
    logits = logits_for(bottom, privatizer, top, texts, batch_size=min(batch_size, int(info.get("max_batch", 64))),
                        generator=os_generator())
    return [summary["classes"][int(i)] for i in torch.as_tensor(logits).argmax(-1)]


def read_texts(path: Path) -> list[str]:
    """Texts to classify: one per line of a .txt, or the ``text`` column of a CSV/TSV/JSONL file."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line for line in raw.splitlines() if line.strip()]
    if suffix == ".jsonl":
        out = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if line.strip():
                try:
                    out.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{path}:{number} is not a JSON object with 'text'") from None
        return out
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(raw.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        if "text" not in (reader.fieldnames or []):
            raise UserError(f"{path} has no 'text' column")
        return [row["text"] for row in reader if row.get("text")]
    raise UserError(f"{path}: expected .txt, .csv, .tsv or .jsonl")
