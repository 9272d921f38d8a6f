"""ESD concept erasure on the tiny random-init Stable Diffusion pipeline (the one tests/test_sd.py builds).

Three settings, each from the same 1-step source LoRA run, erasing "sks dog":

* ``esd-x``: the paper (ESD-x, η = 1, no anchors);
* ``esd-x+anchors``: η = 1 plus privlora's anchor term (λ = 3) on two preserved prompts and ∅;
* ``esd-x-eta0+anchors``: η = 0 (map the concept onto ∅) with the same anchors.

"a blue house" is preserved but never anchored: it shows whether the anchors protect prompts they never
saw. Figures are those ``erase_concept`` returns (see privlora/unlearn/concept.py), plus the cosine
between the source's guidance directions of the concept and each other prompt, which says how far a
pipeline keeps prompts apart at all.

Run: ``OMP_NUM_THREADS=1 python benchmarks/concept_erasure.py`` → benchmarks/results/concept_erasure.json
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CONCEPT = "sks dog"
ANCHORED = ("zebra on grass", "a red car")
HELD_OUT = "a blue house"
SETTINGS = {
    "esd-x": {"eta": 1.0, "preserve_weight": 0.0},
    "esd-x+anchors": {"eta": 1.0, "preserve_weight": 3.0},
    "esd-x-eta0+anchors": {"eta": 0.0, "preserve_weight": 3.0},
}
COMMON = {"steps": 100, "lr": 3e-3, "batch_size": 4, "sample_steps": 10, "n_eval": 4, "seed": 0,
          "preserve": (*ANCHORED, HELD_OUT), "anchors": (*ANCHORED, "")}


def _source(tmp: Path) -> Path:
    from privlora.config import load_config
    from privlora.train.loop import train
    from test_sd import _image_folder, _tiny_pipeline

    _tiny_pipeline(tmp).save_pretrained(tmp / "pipe", safe_serialization=True)
    images = _image_folder(tmp / "images", captions=True)
    train(load_config(None, {
        "base": str(tmp / "pipe"), "out": str(tmp / "run"), "quiet": True, "seed": 3,
        "data": {"source": str(images), "members": 0.5, "aux": 0.25, "eval": 0.25},
        "optim": {"max_steps": 1, "batch_size": 2, "lr": 0.05}, "lora": {"rank": 4, "alpha": 8},
        "eval": {"timesteps": [200], "samples": 0}}))
    return tmp / "run"


def _direction_cosines(run: Path) -> dict[str, float]:
    """cos(Δ_concept, Δ_p) of the source model on the concept's own trajectories."""
    from privlora.unlearn.concept import _load_source, guidance, probe_states

    _, task, _ = _load_source(run)
    xs, ts = probe_states(task, [CONCEPT], n=4, steps=COMMON["sample_steps"], guidance_scale=3.0, seed=0)[CONCEPT]
    ref = guidance(task, CONCEPT, xs, ts).flatten()
    return {p: float(torch.nn.functional.cosine_similarity(ref, guidance(task, p, xs, ts).flatten(), dim=0))
            for p in (*ANCHORED, HELD_OUT)}


def main() -> None:
    from privlora.unlearn.concept import erase_concept

    torch.set_num_threads(1)
    results: dict = {"concept": CONCEPT, "anchored": list(ANCHORED), "held_out_preserved": HELD_OUT,
                     "common": {k: list(v) if isinstance(v, tuple) else v for k, v in COMMON.items()},
                     "machine": platform.processor() or platform.machine(), "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        run = _source(Path(tmp))
        results["source_guidance_cosine_to_concept"] = _direction_cosines(run)
        for name, setting in SETTINGS.items():
            start = time.time()
            kw = {**COMMON, **setting}
            if not kw["preserve_weight"]:
                kw.pop("anchors")
            figures = erase_concept(run, CONCEPT, Path(tmp) / name, **kw)
            figures["wall_s"] = round(time.time() - start, 1)
            results["settings"][name] = figures
            print(name, json.dumps({p: {k: round(v, 3) for k, v in f.items() if isinstance(v, float)}
                                    for p, f in figures["prompts"].items()}), flush=True)
    out = ROOT / "benchmarks" / "results" / "concept_erasure.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
