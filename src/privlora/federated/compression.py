"""How a client's update travels: codecs that shrink the LoRA factors before Flower ships them.

Upload bandwidth is the scarce resource in federated training, and LoRA factors tolerate coarse
quantisation well. A codec turns a list of float32 arrays into another flat list of numpy arrays —
Flower's wire format is exactly that (each array ``np.save``-d) — and back.

* ``"none"``: the float32 arrays as they are.
* ``"int8"``: symmetric per-tensor quantisation, ``scale = max|x| / 127``,
  ``q = round(x / scale)`` in ``[-127, 127]``; the encoded list is the int8 tensors (original shapes)
  followed by one float32 array of the per-tensor scales. About a quarter of the float32 bytes; each
  element is off by at most ``scale / 2``. With ``stochastic=True`` rounding goes up with probability
  equal to the fractional part, which makes the decoded update unbiased (``E[decode(encode(x))] = x``),
  so quantisation errors average out in the server's mean instead of accumulating.

The server decodes what clients send, so :meth:`decode` treats its input as untrusted and rejects
anything malformed with a :class:`~privlora.errors.UserError`.
"""

from __future__ import annotations

import io
from typing import Protocol

import numpy as np

from privlora.errors import UserError

INT8_MAX = 127


class Codec(Protocol):
    """Turns a list of float32 arrays into a list of numpy arrays for the wire, and back."""

    name: str

    def encode(self, arrays: list[np.ndarray]) -> list[np.ndarray]: ...

    def decode(self, arrays: list[np.ndarray]) -> list[np.ndarray]: ...


def _as_float32(arrays: list[np.ndarray]) -> list[np.ndarray]:
    out = []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if not np.issubdtype(a.dtype, np.floating):
            raise UserError(f"update array {i} has dtype {a.dtype}; codecs take floating-point arrays")
        if not np.isfinite(a).all():
            raise UserError(f"update array {i} holds NaN or infinite values; fix the training step before sending")
        out.append(a.astype(np.float32, copy=True))
    return out


class NoneCodec:
    """No compression: float32 arrays as they are."""

    name = "none"

    def encode(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return _as_float32(arrays)

    def decode(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        for i, a in enumerate(arrays):
            if not isinstance(a, np.ndarray) or a.dtype != np.float32:
                raise UserError(f"malformed uncompressed update: array {i} is not float32; "
                                "client and server must use the same codec")
        return [a.copy() for a in arrays]


class Int8Codec:
    """Symmetric per-tensor int8 quantisation; ``stochastic=True`` rounds randomly (unbiased) with ``rng``
    (a fresh unseeded generator when none is given)."""

    name = "int8"

    def __init__(self, stochastic: bool = False, rng: np.random.Generator | None = None) -> None:
        self.stochastic = stochastic
        self.rng = rng if rng is not None else np.random.default_rng()

    def encode(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        xs = _as_float32(arrays)
        qs, scales = [], np.ones(len(xs), dtype=np.float32)
        for i, x in enumerate(xs):
            peak = float(np.abs(x).max()) if x.size else 0.0
            if peak > 0:
                scales[i] = np.float32(peak / INT8_MAX)
                if scales[i] == 0:  # peak so small its scale underflows float32: keep it representable
                    scales[i] = np.finfo(np.float32).smallest_subnormal
            y = x.astype(np.float64) / float(scales[i])
            y = np.floor(y + self.rng.random(y.shape)) if self.stochastic else np.rint(y)
            qs.append(np.clip(y, -INT8_MAX, INT8_MAX).astype(np.int8))
        return [*qs, scales]

    def decode(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        if len(arrays) < 1:
            raise UserError("malformed int8 update: it is empty, but must end with the array of scales")
        *qs, scales = arrays
        if not isinstance(scales, np.ndarray) or scales.dtype != np.float32 or scales.shape != (len(qs),):
            raise UserError(f"malformed int8 update: it must end with one float32 scale per tensor ({len(qs)} here), "
                            f"got {getattr(scales, 'dtype', type(scales).__name__)} of shape {np.shape(scales)}")
        if not (np.isfinite(scales).all() and (scales > 0).all()):
            raise UserError("malformed int8 update: the scales must be finite and positive")
        for i, q in enumerate(qs):
            if not isinstance(q, np.ndarray) or q.dtype != np.int8:
                raise UserError(f"malformed int8 update: array {i} is {getattr(q, 'dtype', type(q).__name__)}, "
                                "not int8; client and server must use the same codec")
        return [q.astype(np.float32) * s for q, s in zip(qs, scales, strict=True)]


CODECS: dict[str, Codec] = {"none": NoneCodec(), "int8": Int8Codec()}


def get_codec(name: str) -> Codec:
    """The registered codec called ``name``."""
    try:
        return CODECS[name]
    except KeyError:
        raise UserError(f"unknown update codec {name!r}; choose one of {', '.join(sorted(CODECS))}") from None


def wire_bytes(arrays: list[np.ndarray]) -> int:
    """Bytes the arrays take on Flower's wire: each one ``np.save``-d (header included, no pickle),
    as ``flwr.common.ndarray_to_bytes`` does."""
    total = 0
    for a in arrays:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        total += buf.getbuffer().nbytes
    return total
