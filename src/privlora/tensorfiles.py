"""Reading a safetensors header without building a tensor — shared by every place that accepts tensors
from outside (the split server's requests, the registry's uploads).

Why: ``safetensors`` checks the file format, not the meaning. Reading the 8-byte length and the JSON
header first lets callers refuse wrong keys, dtypes, shapes or sizes before any buffer is allocated;
a pickle (or torch zip) file fails here with a clear reason instead of ever reaching an unpickler.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

MAX_HEADER = 64 * 1024 * 1024  # the format allows 100 MB; real adapter headers are a few KB


class HeaderError(ValueError):
    """Not a safetensors file (the message says why)."""


def sniff_pickle(data: bytes) -> str | None:
    """A name for pickle-like content (pickle protocol 2+ or a torch zip archive), else None."""
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle"
    if data[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save format, which holds a pickle)"
    return None


def read_header(data: bytes, *, max_header: int = MAX_HEADER) -> dict[str, dict]:
    """The header's tensor entries (``__metadata__`` removed); raises :class:`HeaderError`."""
    kind = sniff_pickle(data)
    if kind is not None:
        raise HeaderError(f"{kind}, not safetensors: pickles can run code when loaded and are refused")
    if len(data) < 8:
        raise HeaderError("not safetensors (shorter than its 8-byte header length)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > max_header or 8 + size > len(data):
        raise HeaderError("not safetensors (header length out of range)")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HeaderError("not safetensors (header is not JSON)") from None
    if not isinstance(header, dict):
        raise HeaderError("not safetensors (header is not a JSON object)")
    header.pop("__metadata__", None)
    for name, info in header.items():
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) \
                or not isinstance(info.get("shape"), list) or not all(isinstance(d, int) for d in info["shape"]):
            raise HeaderError(f"not safetensors (malformed entry for {name!r})")
    return header


def first_nonfinite(tensors: Mapping[str, Any]) -> str | None:
    """The name of the first floating-point tensor holding NaN or ±inf, else None.

    Every place that loads an adapter asks this (``tasks.lora.read_lora``, the registry's upload check): a
    non-finite LoRA weight makes every output NaN while the file looks like any other adapter.
    """
    import torch

    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None
