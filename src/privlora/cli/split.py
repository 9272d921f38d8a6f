"""The ``split`` group: split-and-privatize training against a provider's server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from privlora.cli.choices import BOTTOMS, LOG_LEVELS, PRIVATIZERS
from privlora.cli.common import (
    QUIET,
    RUN_ALIAS_HELP,
    choice,
    group,
    names,
    offline_defaults,
    one_line_errors,
    overrides,
)
from privlora.errors import UserError

split_app = group(help="Split-and-privatize (SAP): the user keeps the bottom of the "
                  "model and the labels, the provider's server trains the top on dχ-noised hidden states.")
TOKEN_HELP = "Bearer token shared by server and client (or set PRIVLORA_SPLIT_TOKEN)."


@split_app.command("serve")
@one_line_errors
def split_serve(
    depth: int = typer.Option(1, "--split-depth", "--depth", help="Blocks on the user's side (MiniLM: 0..3)."),
    port: int = typer.Option(8765, help="TCP port."),
    host: str = typer.Option("127.0.0.1", help="Interface (0.0.0.0 to accept other machines; put TLS in front)."),
    token: str = typer.Option(None, envvar="PRIVLORA_SPLIT_TOKEN", show_envvar=False, help=TOKEN_HELP),
    task: str = typer.Option("text", click_type=choice(("text", "causal-lm")),
                             help="text (a classifier's top and head) | causal-lm (the middle blocks of a GPT-2-family "
                             "LM: the user keeps embeddings, first blocks and the LM head)."),
    num_labels: int = typer.Option(3, "--num-labels", help="Classes of the head (demo:tweets has 3; text only)."),
    base: str = typer.Option(None, help="Base model: minilm (text, offline from PyPI), embedded-lm (causal-lm) or "
                             "a local model folder. Default: the task's."),
    out: Path = typer.Option(Path("runs/split-server/adapter"), help="Where /save and shutdown write the adapter."),
    lr: float = typer.Option(1e-3, help="The top LoRA's learning rate (AdamW)."),
    rank: int = typer.Option(8, help="LoRA rank on the top blocks."),
    max_batch: int = typer.Option(64, "--max-batch", help="Largest batch a request may carry."),
    max_body_mb: float = typer.Option(16.0, "--max-body-mb", help="Largest request body (MiB); larger ones get 413."),
    input_clip: float = typer.Option(None, "--input-clip", help="Scale received token vectors longer than this "
                                     "down to it (0 = off). Default: text 14 (clean MiniLM states are < 13.4); "
                                     "causal-lm 1.25 × the largest clean norm at the cut on public text."),
    seed: int = typer.Option(0, help="Seed of the LoRA and head initialisation."),
    log_level: str = typer.Option("warning", "--log-level", click_type=choice(LOG_LEVELS),
                                  help="uvicorn log level (info shows each request)."),
) -> None:
    """Start the provider's server: the top of the model with its LoRA, trained through /forward and /backward."""
    import socket

    from privlora.split.server import serve
    from privlora.split.service import TopService

    offline_defaults()
    if not token:
        raise UserError("give the server a token: --token T or PRIVLORA_SPLIT_TOKEN=T")
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    base = base or DEFAULT_BASES[task]
    top = TOP_BUILDERS[task](depth, num_labels, rank, seed, base, input_clip)
    service = TopService(top, lr=lr, max_batch=max_batch, base_name=base)
    here = f"{num_labels} labels" if task == "text" else "no LM head: the user keeps it"
    typer.echo(f"split server on http://{host}:{port}: {base} ({task}) cut after block {depth} "
               f"({len(top.blocks)} blocks here, {here}); adapter → {out}", err=True)
    serve(service, token, host=host, port=port, out=out, log_level=log_level, max_body=int(max_body_mb * 2**20))


DEFAULT_BASES = {"text": "minilm", "causal-lm": "embedded-lm"}


def _text_top(depth: int, num_labels: int, rank: int, seed: int, base: str, input_clip: float | None) -> Any:
    from privlora.split.models import INPUT_CLIP, SplitTop
    from privlora.split.run import base_path
    from privlora.tasks.text import TextLora

    clip = INPUT_CLIP if input_clip is None else (input_clip or None)
    return SplitTop(depth, num_labels, lora=TextLora(rank=rank, alpha=2 * rank), seed=seed, base=base_path(base),
                    input_clip=clip)


def _lm_top(depth: int, num_labels: int, rank: int, seed: int, base: str, input_clip: float | None) -> Any:
    from privlora.split.lm_models import LMSplitTop
    from privlora.tasks.lora import LoraSpec

    clip = "public" if input_clip is None else (input_clip or None)
    return LMSplitTop(depth, lora=LoraSpec(rank=rank, alpha=2 * rank, targets=("auto",)), seed=seed, base=base,
                      input_clip=clip)


#: task → the provider's half (depth, labels, rank, seed, base, input clip or None for the task's default)
TOP_BUILDERS = {"text": _text_top, "causal-lm": _lm_top}


@split_app.command("train")
@one_line_errors
def split_train_cmd(
    config: Path = typer.Option(None, "--config", "-c", help="YAML config (e.g. configs/split-cti.yaml)."),
    server: str = typer.Option(None, help="Server URL (default http://127.0.0.1:8765)."),
    token: str = typer.Option(None, envvar="PRIVLORA_SPLIT_TOKEN", show_envvar=False, help=TOKEN_HELP),
    task: str = typer.Option(None, click_type=choice(("text", "causal-lm")),
                             help="text (classifier; default) | causal-lm (instruction records; the server must "
                             "run --task causal-lm)."),
    data: str = typer.Option(None, help="text: demo:tweets or a CSV/TSV/JSONL file with text,label; causal-lm: "
                             "demo:support or a JSONL file of prompt/response or messages records."),
    limit: int = typer.Option(None, help="Use a seeded sample of this many texts."),
    privatizer: str = typer.Option(None, click_type=choice(PRIVATIZERS),
                                   help="cti (default: dχ noise, less on label-carrying tokens) | dchi | none."),
    eta: float = typer.Option(None, help="dχ privacy parameter η (smaller: more noise; mean noise norm 384/η)."),
    bottom: str = typer.Option(None, click_type=choice(BOTTOMS),
                               help="frozen (default) | trainable (LoRA on the user's blocks too)."),
    steps: int = typer.Option(None, help="Training steps."),
    batch_size: int = typer.Option(None, "--batch-size", help="Texts per step."),
    out: Path = typer.Option(None, help="Run directory to write (replaced atomically)."),
    seed: int = typer.Option(None, help="Seed of the data split and batch order (noise is never seeded)."),
    quiet: bool = QUIET,
    set_: list[str] = typer.Option([], "--set", help="Any config key, e.g. --set privatizer.cti_boost=5."),
) -> None:
    """Train against a running split server: texts and labels stay here, only noised hidden states and the
    gradient of the logits are sent. Writes a run directory for `split predict`."""
    from privlora.config import SplitConfig, load_config
    from privlora.split.client import HttpTop
    from privlora.split.run import split_train

    offline_defaults()
    named = {"task": task, "server": server, "data.source": data, "data.limit": limit, "privatizer.name": privatizer,
             "privatizer.eta": eta, "bottom": bottom, "optim.steps": steps, "optim.batch_size": batch_size,
             "out": str(out) if out else None, "seed": seed, "quiet": quiet or None}
    settings = load_config(config, overrides(named, set_), model=SplitConfig)
    with HttpTop(settings.server, token or "", task=settings.task) as top:
        run = split_train(settings, top)
    s = run.summary
    p = s["privatizer"]
    spared = f", {p['contributing_count']} tokens spared (CTI)" if p["name"] == "cti" else ""
    typer.echo(f"split training ({p['name']}, η={p['eta']}{spared}; depth {s['depth']}, {s['bottom']} bottom) "
               f"→ {run.run_dir}")
    held = f"held-out perplexity {s['eval_perplexity']:.1f} (loss {run.loss:.3f}) on {s['eval_records']} records" \
        if settings.task == "causal-lm" else \
        f"held-out accuracy {run.accuracy:.3f} (loss {run.loss:.3f}) on {s['eval_texts']} texts"
    typer.echo(f"  {held}; {s['samples_per_second']:.1f} texts/s; {s.get('bytes_sent', 0) / 2**20:.1f} MiB sent")


@split_app.command("predict")
@one_line_errors
def split_predict_cmd(
    run: str = typer.Argument(None, metavar="RUN", show_default=False, help="The run directory `split train` "
                              "wrote."),
    texts: list[str] = typer.Argument(None, metavar="[TEXT]...", show_default=False, help="Texts to classify "
                                      "(or --input)."),
    run_alias: Path = typer.Option(None, "--run", hidden=True, help=RUN_ALIAS_HELP + " Every argument is then "
                                   "a text."),
    server: str = typer.Option("http://127.0.0.1:8765", help="Server URL."),
    token: str = typer.Option(None, envvar="PRIVLORA_SPLIT_TOKEN", show_envvar=False, help=TOKEN_HELP),
    input_file: Path = typer.Option(None, "--input", help="CSV/TSV/JSONL with a text column, or a .txt file "
                                    "with one text per line."),
) -> None:
    """Classify texts through the server with the same privatization as training; prints `label<TAB>text`."""
    from privlora.split.client import HttpTop
    from privlora.split.run import read_texts, split_predict

    offline_defaults()
    given = [run] if run is not None else []
    if run_alias is None:  # RUN is the first argument; with the older `--run RUN` every argument is a text
        if run is None:
            raise UserError("give the run directory: privlora split predict RUN [TEXT]...")
        run_dir, given = Path(run), []
    else:
        run_dir = run_alias
    items = given + list(texts or []) + (read_texts(input_file) if input_file else [])
    if not items:
        raise UserError("nothing to classify: give texts as arguments or --input FILE")
    with HttpTop(server, token or "") as top:
        labels = split_predict(run_dir, items, top)
    for label, text in zip(labels, items, strict=True):
        typer.echo(f"{label}\t{text}")


@split_app.command("sweep")
@one_line_errors
def split_sweep_cmd(
    depths: str = typer.Option("0,1", help="Split depths, comma-separated (MiniLM: 0..3)."),
    etas: str = typer.Option("6,3", help="dχ η values, comma-separated (smaller: more noise; mean noise norm "
                             "384/η against clean states of norm 8–13)."),
    privatizers: str = typer.Option("dchi,cti", help="Privatizers besides the no-noise baseline: dchi, cti."),
    bottoms: str = typer.Option("frozen", help="frozen, trainable or both (comma-separated)."),
    data: str = typer.Option("demo:tweets", help="demo:tweets or a CSV/TSV/JSONL text,label file (AIA needs the "
                             "tweets: it infers the airline a tweet addresses)."),
    limit: int = typer.Option(2000, help="Texts used (seeded sample)."),
    steps: int = typer.Option(150, help="Training steps per point."),
    attack_texts: int = typer.Option(16, "--attack-texts", help="Held-out texts the EIA inverts per point."),
    eia_steps: int = typer.Option(100, "--eia-steps", help="Optimisation steps of the EIA at depth ≥ 1."),
    cti_boost: float = typer.Option(100.0, "--cti-boost", help="CTI: spared tokens get η·boost."),
    cti_top_k: str = typer.Option("50,150", "--cti-top-k", help="CTI: how many label-carrying tokens are spared "
                                  "(comma-separated: one CTI point per value)."),
    out: Path = typer.Option(Path("runs/split-sweep"), help="Folder for sweep.json, sweep.md and sweep.png."),
    seed: int = typer.Option(0, help="Seed (data split, batches, noise: the sweep is reproducible)."),
    quiet: bool = QUIET,
) -> None:
    """Privacy–utility table: accuracy and empirical privacy (1 − attack success) against EIA and AIA for every
    η × depth × privatizer × bottom mode, trained in-process (no server needed). Takes minutes per point."""
    from privlora.split.sweep import SweepSettings, run_sweep

    offline_defaults()
    try:
        settings = SweepSettings(
            depths=tuple(int(d) for d in names(depths)), etas=tuple(float(e) for e in names(etas)),
            privatizers=names(privatizers), bottoms=names(bottoms), source=data, limit=limit, steps=steps,
            attack_texts=attack_texts, eia_steps=eia_steps, cti_boost=cti_boost,
            cti_top_ks=tuple(int(k) for k in names(cti_top_k)), seed=seed)
    except ValueError as e:
        raise UserError(f"--depths/--etas/--cti-top-k take comma-separated numbers ({e})") from None
    unknown = set(settings.privatizers) - {"dchi", "cti"} or set(settings.bottoms) - {"frozen", "trainable"}
    if unknown:
        raise UserError(f"unknown sweep value(s) {', '.join(sorted(unknown))}: privatizers dchi/cti, "
                        "bottoms frozen/trainable")
    rows = run_sweep(settings, out, quiet=quiet)
    from privlora.split.sweep import markdown

    typer.echo(markdown(rows), nl=False)
    typer.echo(f"wrote {out}/sweep.json, sweep.md, sweep.png")
