"""``privlora unlearn RUN --out DIR``: remove training samples from an adapter and prove it with the audit.

Read top to bottom: load the source run → pick the forget set → measure the source (membership of the
forget set, utility) → apply the method → measure the result → get the exactly retrained reference (train
it, reuse ``--reference DIR``, or skip) and measure it → write a new run directory at ``out`` in one rename:

```
out/config.yaml     the source's config (out changed), so `privlora audit --run out` works as for any run
out/splits.json     members = the retained samples, aux/eval as in the source, plus "forget" and "source_run"
out/adapter/        the unlearned LoRA (peft + diffusers safetensors, like every run)
out/privacy.json    what the source's privacy claim means now (see below)
out/utility.json    the train command's utility figures for the new adapter
out/metrics.jsonl   one line per unlearning step
out/unlearn.json    method, options, forget ids, verification (before / after / reference), seconds
out/reference/      the retrained reference run, when it was trained here
```

privacy.json: an approximate method reads the forget and retained data without any DP mechanism, so a
DP source's ε does **not** cover the unlearned adapter; that is written down, with the source's figures
kept under ``source``. ``retrain`` is a fresh training run on the retained set: its own privacy.json (ε
for a DP config) is the claim.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from privlora.errors import UserError
from privlora.runs import atomic_dir, write_json_atomic
from privlora.unlearn import verify
from privlora.unlearn.methods import DEFAULTS, METHODS, Options
from privlora.unlearn.selection import MIN_MEANINGFUL, select_forget
from privlora.unlearn.source import Source, load_source

DEFAULT_DRAWS = 8
RETRAIN_TIME = "retrain.json"  # seconds a reference took to train, kept inside the reference run


def _check_reference(reference: Path, source: Source, retain_ids: list[str]) -> None:
    """A reused reference must be a retrain of this source on exactly this retained set."""
    from privlora.data.splits import Splits

    if not (reference / "splits.json").is_file():
        raise UserError(f"--reference {reference} is not a run directory (no splits.json)")
    splits = Splits.load(reference)
    if sorted(splits.members) != sorted(retain_ids):
        raise UserError(f"--reference {reference} was trained on {len(splits.members)} members, not on the "
                        f"{len(retain_ids)} retained ones of this forget set; retrain it (omit --reference)")
    if sorted(splits.eval) != sorted(source.splits.eval):
        raise UserError(f"--reference {reference} has other evaluation non-members than {source.path}")


def _privacy(source: Source, method: str, exact: bool, retrained: Path | None) -> dict[str, Any]:
    if exact and retrained is not None:
        own = json.loads((retrained / "privacy.json").read_text())
        return {**own, "unlearning": {"method": method, "source_run": str(source.path),
                                      "note": "exact retraining without the forget set: this run's own "
                                              "privacy figures above describe the adapter"}}
    mech = source.privacy.get("mechanism", "none")
    return {"mechanism": "none", "mode": source.config.mode, "source": source.privacy,
            "unlearning": {"method": method, "source_run": str(source.path),
                           "note": (f"the source's guarantee ({mech}, ε={source.privacy.get('epsilon')}) does "
                                    "not cover this adapter: the unlearning step read the forget and retained "
                                    "data without a DP mechanism. Retrain (--method retrain) for a run whose "
                                    "privacy accounting holds; the membership figures in unlearn.json are "
                                    "measured, not guaranteed.")}}


def _write_splits(path: Path, source: Source, retain_ids: list[str], forget_ids: list[str]) -> None:
    s = source.splits
    write_json_atomic(path / "splits.json", {
        "source": s.source, "seed": s.seed, "members": retain_ids, "aux_nonmembers": s.aux,
        "eval_nonmembers": s.eval, "forget": forget_ids, "source_run": str(source.path)})


def _measure_run(run: Path, forget_ids: list[str], retain_ids: list[str], *, attack: str, seed: int,
                 draws: int, source: Source) -> dict[str, Any]:
    """Measure another run (the reference) on the same forget / retained / held-out samples."""
    other = load_source(run)
    return verify.measure(other.task, source.members.by_ids(forget_ids), source.members.by_ids(retain_ids),
                          source.held_out, kind=source.config.task, attack=attack,
                          options=source.config.eval, seed=seed, draws=draws)


def unlearn(run: Path, out: Path, *, method: str = "target", forget_file: Path | None = None,
            forget_ids: str | list[str] | None = None, forget_fraction: float | None = None,
            steps: int = 100, lr: float | None = None, alpha: float | None = None, saliency: float = 0.5,
            batch_size: int | None = None, stop: str = "aux", check_every: int = 5, attack: str = "loss",
            draws: int = DEFAULT_DRAWS, reference: Path | None = None, train_reference: bool = True,
            seed: int = 0, quiet: bool = True) -> dict[str, Any]:
    """Forget samples from the adapter of ``run``; write the unlearned run to ``out``; return unlearn.json.

    ``reference``: an existing retrain of this source on the same retained set to verify against (it is
    trained into ``out/reference`` when not given and ``train_reference`` is true; with neither, the
    retrained-reference figures are left out). ``lr`` / ``alpha`` default to the method's own
    (:data:`privlora.unlearn.methods.DEFAULTS`).
    """
    run, out = Path(run), Path(out)
    if method not in METHODS:
        raise UserError(f"unknown unlearning method {method!r}; available: {', '.join(METHODS)}")
    defaults = DEFAULTS.get(method, {})
    lr = defaults.get("lr", Options.lr) if lr is None else lr
    alpha = defaults.get("alpha", Options.alpha) if alpha is None else alpha
    options = Options(steps=steps, lr=lr, alpha=alpha, saliency=saliency, batch_size=batch_size, stop=stop,
                      check_every=check_every, seed=seed, quiet=quiet)
    options.check()
    if draws < 1:
        raise UserError(f"--draws must be ≥ 1, got {draws}")
    if out.exists():
        raise UserError(f"output {out} already exists; choose another --out or remove it")
    if reference is not None and not Path(reference).is_dir():
        raise UserError(f"--reference {reference} does not exist (omit it to retrain the reference here)")
    source = load_source(run)
    kind = source.config.task
    verify.check_attack(kind, attack)
    forget_list = select_forget(list(source.splits.members), file=forget_file, ids=forget_ids,
                                fraction=forget_fraction, seed=seed)
    forget_set = set(forget_list)
    retain_ids = [m for m in source.splits.members if m not in forget_set]
    if len(source.held_out) < 2:
        raise UserError(f"{run} has {len(source.held_out)} evaluation non-members; verification needs at least 2 "
                        "(train with data.eval > 0)")
    if reference is not None:
        _check_reference(Path(reference), source, retain_ids)
    forget, retain = source.members.by_ids(forget_list), source.members.by_ids(retain_ids)
    impl = METHODS[method]
    warnings = []
    if len(forget_list) < MIN_MEANINGFUL:
        warnings.append(f"forget set of {len(forget_list)} < {MIN_MEANINGFUL} samples: its AUC is coarse")

    measure = {"kind": kind, "attack": attack, "options": source.config.eval, "seed": seed, "draws": draws}
    before = verify.measure(source.task, forget, retain, source.held_out, **measure)
    with atomic_dir(out) as tmp:
        outcome = impl(source, forget, retain, options, tmp)
        ref_dir: Path | None = None
        ref_seconds: float | None = None
        if impl.exact:
            assert outcome.run_dir is not None
            for item in outcome.run_dir.iterdir():  # the retrained run becomes the output run
                shutil.move(str(item), str(tmp / item.name))
            outcome.run_dir.rmdir()
            from privlora.config import dump_config, load_config

            retrained = load_config(tmp / "config.yaml", {"resume": False})
            (tmp / "config.yaml").write_text(dump_config(retrained.model_copy(update={"out": out, "quiet": False})))
            after = _measure_run(tmp, forget_list, retain_ids, source=source, **_kw(measure))
            reference_figures, ref_seconds, ref_dir = after, outcome.seconds, tmp
        else:
            after = verify.measure(source.task, forget, retain, source.held_out, **measure)
            reference_figures = None
            if reference is not None:
                ref_dir = Path(reference)
                ref_seconds = _retrain_seconds(ref_dir)
            elif train_reference:
                from privlora.unlearn.methods import retrain_run

                ref_dir, ref_seconds = retrain_run(source, retain_ids, tmp / "reference", quiet=quiet)
                write_json_atomic(ref_dir / RETRAIN_TIME, {"seconds": ref_seconds})
            if ref_dir is not None:
                reference_figures = _measure_run(ref_dir, forget_list, retain_ids, source=source, **_kw(measure))
            source.task.save_adapter(tmp / "adapter")
            (tmp / "config.yaml").write_text(_config_text(source, out))
            from privlora.train.loop import UTILITY

            utility = UTILITY[kind](source.task, members=retain, held_out=source.held_out,
                                    options=source.config.eval.model_copy(update={"samples": 0}),
                                    seed=source.config.seed, quiet=True)
            write_json_atomic(tmp / "utility.json", utility)
            with (tmp / "metrics.jsonl").open("w") as f:
                for line in outcome.logs:
                    f.write(json.dumps(line) + "\n")
        _write_splits(tmp, source, retain_ids, forget_list)
        write_json_atomic(tmp / "privacy.json", _privacy(source, method, impl.exact, tmp if impl.exact else None))
        result = {
            "method": method, "paper": impl.paper, "source_run": str(run), "out": str(out),
            "task": kind, "attack": attack, "draws": draws if kind == "image" and attack in verify.NOISY else 1,
            "seed": seed, "forget": forget_list, "forget_size": len(forget_list), "retain_size": len(retain_ids),
            "heldout_size": len(source.held_out),
            "options": None if impl.exact else {"steps": steps, "lr": lr, "alpha": alpha, "stop": stop,
                                                "check_every": check_every,
                                                "batch_size": batch_size or source.config.optim.batch_size,
                                                **({"saliency": saliency} if method == "salun" else {})},
            "steps_taken": outcome.steps, **outcome.extra,
            "reference_run": None if ref_dir is None else ("(this run)" if impl.exact else
                                                           str(out / "reference") if ref_dir.parent == tmp
                                                           else str(ref_dir)),
            "before": before, "after": after, "reference": reference_figures,
            "summary": verify.compare(kind, before, after, reference_figures),
            "seconds": {"method": outcome.seconds, "retrain": ref_seconds,
                        "ratio_to_retrain": None if not ref_seconds else outcome.seconds / ref_seconds},
            "warnings": warnings}
        write_json_atomic(tmp / "unlearn.json", result)
    return result


def _kw(measure: dict[str, Any]) -> dict[str, Any]:
    return {"attack": measure["attack"], "seed": measure["seed"], "draws": measure["draws"]}


def _retrain_seconds(run: Path) -> float | None:
    """How long a reused reference took to train: a ``--method retrain`` output's unlearn.json, or the
    ``retrain.json`` beside a reference trained inside another unlearn output."""
    try:
        if (run / "unlearn.json").is_file():
            info = json.loads((run / "unlearn.json").read_text())
            return info["seconds"]["method"] if info.get("method") == "retrain" else None
        if (run / RETRAIN_TIME).is_file():
            return float(json.loads((run / RETRAIN_TIME).read_text())["seconds"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return None


def _config_text(source: Source, out: Path) -> str:
    from privlora.config import dump_config

    return dump_config(source.config.model_copy(update={"out": out, "quiet": False}))


def format_table(result: dict[str, Any]) -> list[str]:
    """The lines the CLI prints: one row for the method, one for the retrained reference."""
    s, b, a, r = result["summary"], result["before"], result["after"], result["reference"]
    sec = result["seconds"]

    def f(x: float | None, spec: str = ".3f") -> str:
        return "n/a" if x is None else format(x, spec)

    metric = "accuracy" if result["task"] == "text" else "denoising loss"
    head = (f"{'method':<10} {'forget AUC before→after':>24} {'retrain AUC':>11} {'efficacy':>8} "
            f"{'|Δ retrain|':>11} {metric + ' retained':>24} {metric + ' held-out':>24} {'seconds':>8} "
            f"{'retrain s':>9}")
    um = lambda m, k: f(m["utility"][k], ".4f")  # noqa: E731
    rows = [head, (f"{result['method']:<10} {f(s['auc_before']) + ' → ' + f(s['auc_after']):>24} "
                   f"{f(s['auc_reference']):>11} {f(s['efficacy'], '.0%'):>8} "
                   f"{f(s.get('auc_gap_to_reference')):>11} {um(b, 'retain') + ' → ' + um(a, 'retain'):>24} "
                   f"{um(b, 'heldout') + ' → ' + um(a, 'heldout'):>24} {f(sec['method'], '.1f'):>8} "
                   f"{f(sec['retrain'], '.1f'):>9}")]
    if r is not None and result["method"] != "retrain":
        rows.append(f"{'retrain':<10} {f(s['auc_before']) + ' → ' + f(s['auc_reference']):>24} "
                    f"{f(s['auc_reference']):>11} {f(s.get('efficacy_reference'), '.0%'):>8} {'0.000':>11} "
                    f"{um(b, 'retain') + ' → ' + um(r, 'retain'):>24} "
                    f"{um(b, 'heldout') + ' → ' + um(r, 'heldout'):>24} {f(sec['retrain'], '.1f'):>8} "
                    f"{f(sec['retrain'], '.1f'):>9}")
    rows.append(f"utility drop: retained {f(s['utility_drop_retain'], '.1%')}, held-out "
                f"{f(s['utility_drop_heldout'], '.1%')} ({metric}, relative to the source); forget set "
                f"{result['forget_size']}, held-out {result['heldout_size']}; attack {result['attack']}"
                + (f" ({result['draws']} noise draws)" if result['draws'] > 1 else ""))
    ci = a["membership"]["forget"]
    rows.append(f"forget AUC after: {ci['auc']:.3f} [95% CI {ci['auc_ci_low']:.3f}, {ci['auc_ci_high']:.3f}]"
                + ("" if s.get("within_0.05_of_reference") is None else
                   f"; within 0.05 of the retrained reference: {'yes' if s['within_0.05_of_reference'] else 'no'}"))
    rows += [f"warning: {w}" for w in result.get("warnings", [])]
    return rows
