"""The embedded causal LM (``base: embedded-lm``): a tiny GPT-2 pre-trained by privlora on the Python docs.

Shipped as a standard Hugging Face folder, ``assets/tiny_lm/`` (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json), plus ``provenance.json``: the source text and its sha256, the
training settings, the final loss and the sha256 of the weights. ``scripts/build_tiny_lm.py`` rebuilds it.

Why check the weights' sha256 at every load: the folder is what every LM run, test and audit starts from;
a truncated or edited file would otherwise load (safetensors only checks its header) and silently change
every number measured on it. Any folder that carries a ``provenance.json`` with ``weights_sha256`` is checked
the same way, so a copy of the model is held to its record too.
"""

from __future__ import annotations

import json
from pathlib import Path

from privlora.errors import UserError

EMBEDDED_LM = "embedded-lm"
FOLDER = "tiny_lm"
PROVENANCE = "provenance.json"


def embedded_lm_path() -> Path:
    """The shipped folder (checked against its provenance)."""
    from privlora.tasks.embedded import assets_dir

    folder = assets_dir() / FOLDER
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} holds no model: the privlora install lacks its embedded LM "
                        "(rebuild it with scripts/build_tiny_lm.py)")
    verify_weights(folder)
    return folder


def provenance(folder: Path) -> dict[str, object] | None:
    """The folder's ``provenance.json``, or None when it has none (any other model folder)."""
    path = folder / PROVENANCE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else None


def verify_weights(folder: Path) -> None:
    """Refuse a folder whose weights are not the ones its provenance records."""
    record = provenance(folder)
    if record is None or "weights_sha256" not in record:
        return
    weights = folder / str(record.get("weights_file", "model.safetensors"))
    if not weights.is_file():
        raise UserError(f"{weights} is missing (the provenance in {folder / PROVENANCE} records it)")
    from privlora.weights import sha256  # hashed once per process for the same file, size and mtime

    digest = sha256(weights)
    if digest != record["weights_sha256"]:
        raise UserError(f"{weights} does not match its provenance: sha256 {digest[:16]}…, recorded "
                        f"{str(record['weights_sha256'])[:16]}… (a damaged or modified copy; reinstall privlora "
                        "or rebuild with scripts/build_tiny_lm.py)")


def resolve_lm_base(base: str | Path) -> tuple[Path | str, str]:
    """``(what from_pretrained loads, the name an adapter records)`` for ``base``: ``embedded-lm``, a local
    model folder, or a model name already in the local Hugging Face cache (nothing is downloaded)."""
    if str(base) == EMBEDDED_LM:
        folder = embedded_lm_path()
        return folder, str(folder)
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"causal-LM base {base} is a folder without config.json (not a transformers model)")
        verify_weights(path)
        return path, str(path.resolve())
    if path.exists() or str(base).startswith((".", "/", "~")):
        raise UserError(f"causal-LM base {base!r} is not a model folder")
    return str(base), str(base)  # a hub name: from_pretrained(local_files_only=True) says if it is not cached
