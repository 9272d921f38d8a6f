"""Tensors on the wire: safetensors bytes, checked before a single tensor is built.

Why check the header ourselves first: ``safetensors`` validates the file format, not the *meaning* — a
request for 10⁹ elements, an int tensor where floats were expected, or NaNs would reach the model. Here
the 8-byte length and JSON header are read, keys/dtypes/shapes are compared with what the endpoint
expects, and only then the tensors are built (no pickle anywhere: safetensors holds raw buffers only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from privlora import tensorfiles
from privlora.httpapi import Refusal

#: safetensors dtype names → torch dtypes accepted on the wire
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
          "I32": torch.int32, "BOOL": torch.bool, "U8": torch.uint8}
MAX_HEADER = 64 * 1024


class WireError(Refusal):
    """A tensor payload the server refuses: HTTP status and a one-line reason."""


@dataclass(frozen=True)
class Expect:
    """One expected tensor: allowed dtypes and its shape, with ``None`` for a free dimension."""

    dtypes: tuple[str, ...]
    shape: tuple[int | None, ...]
    finite: bool = True


def pack(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def read_header(data: bytes) -> dict[str, dict]:
    """The safetensors header (without ``__metadata__``), or a 400 WireError saying what is wrong."""
    try:
        return tensorfiles.read_header(data, max_header=MAX_HEADER)
    except tensorfiles.HeaderError as e:
        raise WireError(400, f"body is {e}") from None


def unpack(data: bytes, expect: dict[str, Expect]) -> dict[str, torch.Tensor]:
    """Validate ``data`` against ``expect`` and return the tensors (float ones as float32).

    Free (``None``) dimensions are not compared across tensors here: callers check that agreement.
    """
    header = read_header(data)
    if set(header) != set(expect):
        raise WireError(422, f"expected tensors {sorted(expect)}, got {sorted(header)}")
    for name, spec in expect.items():
        info = header[name]
        if info["dtype"] not in spec.dtypes:
            raise WireError(422, f"tensor {name!r}: dtype {info['dtype']} not accepted (use {'/'.join(spec.dtypes)})")
        shape = info["shape"]
        if len(shape) != len(spec.shape) or any(
                w is not None and s != w for s, w in zip(shape, spec.shape, strict=True)):
            want = "×".join("*" if w is None else str(w) for w in spec.shape)
            raise WireError(422, f"tensor {name!r}: shape {list(shape)} does not match {want}")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error type for every malformed file
        raise WireError(400, f"body is not valid safetensors: {str(e).splitlines()[0]}") from None
    out = {}
    for name, spec in expect.items():
        t = tensors[name]
        if t.is_floating_point():
            t = t.float()
            if spec.finite and not bool(torch.isfinite(t).all()):
                raise WireError(422, f"tensor {name!r} holds NaN or infinite values")
        out[name] = t
    return out
