"""On-disk cache of the frozen encoders' outputs (VAE latents, text-encoder states) for ``--cache-latents``.

The Stable Diffusion path spends most of a small-batch step in the frozen VAE and text encoder, whose
outputs never change during training. Each output is stored in its own file,
``<root>/latents/<key>.safetensors`` or ``<root>/text/<key>.safetensors``, where ``key`` is a SHA-256 of

* the encoder's identity: its class, its config and a checksum of every weight (not the base's path: a
  copied folder holds the same model), and the numerics it ran with (dtype, device type, autocast);
* the exact input: the preprocessed pixel tensor (so the image bytes, resolution, crop and flip are all
  in it — a flipped image is another entry) or the caption's token ids.

An entry can therefore never be stale: a changed image, crop, resolution or model is another key, and
runs on the same data and base reuse each other's entries. Each file carries a SHA-256 of its tensor;
a file that does not parse or whose checksum disagrees is recomputed and rewritten, never an error.
Random crops are refused in :mod:`privlora.config`: every step would add new entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from privlora.errors import UserError

FORMAT = "privlora-encoder-cache/1"


def default_root() -> Path:
    """``$XDG_CACHE_HOME/privlora`` (``~/.cache/privlora`` when unset): shared by all runs of this user."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "privlora"


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (bf16 and friends included: hashed as raw bytes)."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def module_identity(module: nn.Module) -> str:
    """SHA-256 of a frozen encoder's class, config and every parameter and buffer, in name order."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_digest(tensor).encode())
    return h.hexdigest()


def numerics(device: torch.device, dtype: torch.dtype) -> str:
    """What besides the weights changes an encoder's output bits: its dtype, device type and autocast."""
    kind = device.type
    autocast = (f"autocast:{torch.get_autocast_dtype(kind)}" if torch.is_autocast_enabled(kind)
                else "no-autocast")
    return f"{dtype}|{kind}|{autocast}"


class EncoderCache:
    """One encoder's entries under ``<root>/<kind>/``: :meth:`lookup` fills what is missing from ``make``."""

    def __init__(self, root: Path, kind: str, identity: str) -> None:
        self.folder = Path(root) / kind
        self.identity = identity
        self.hits = self.misses = self.rebuilt = 0
        self._writable = True
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the latent cache folder {self.folder}: {e.strerror or e}; "
                            "pass another --cache-dir") from None

    def key(self, tag: str, payload: torch.Tensor) -> str:
        """The entry's name: this encoder, its numerics ``tag`` and the exact input ``payload``."""
        return hashlib.sha256(f"{FORMAT}|{self.identity}|{tag}|{tensor_digest(payload)}".encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def lookup(self, keys: list[str], make: Callable[[list[int]], torch.Tensor],
               expected_shape: tuple[int, ...]) -> list[torch.Tensor]:
        """The tensor of every key, in order; ``make([position])`` computes each one not (validly) on disk,
        which is then written for the next run.

        One input at a time: batched convolutions differ from single ones in the last bits (~2e-7 on the
        test VAE), so an entry is then a function of its input alone, never of the batch that first
        needed it — a run on a warm cache repeats the run that filled it exactly."""
        found: list[torch.Tensor | None] = [self._read(k, expected_shape) for k in keys]
        for i, tensor in enumerate(found):
            if tensor is None:
                self.misses += 1
                found[i] = tensor = make([i])[0]
                self._write(keys[i], tensor)
            else:
                self.hits += 1
        return [t for t in found if t is not None]

    def _read(self, key: str, expected_shape: tuple[int, ...]) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensor = load_file(str(path))["value"]
            ok = (meta.get("format") == FORMAT and meta.get("key") == key
                  and tuple(tensor.shape) == tuple(expected_shape) and meta.get("sha256") == tensor_digest(tensor))
        except Exception:  # truncated, not safetensors, missing tensor: all the same — recompute it
            ok = False
        if not ok:
            self.rebuilt += 1
            if self.rebuilt == 1:
                print(f"note: rebuilding a corrupt latent cache entry ({path.name})", file=sys.stderr, flush=True)
            return None
        return tensor

    def _write(self, key: str, tensor: torch.Tensor) -> None:
        """Atomic (temporary file + rename, unique per writer, so concurrent runs cannot tear an entry).
        A failed write (full or read-only disk) costs the cache, not the run: caching stops with a note."""
        if not self._writable:
            return
        value = tensor.detach().to("cpu").contiguous()
        final = self.path(key)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            save_file({"value": value}, str(tmp),
                      metadata={"format": FORMAT, "key": key, "sha256": tensor_digest(value)})
            tmp.replace(final)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self._writable = False
            print(f"note: the latent cache in {self.folder} is not writable ({e.strerror or e}); "
                  "training continues without writing it", file=sys.stderr, flush=True)

    def stats(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "rebuilt": self.rebuilt}


def attach_cache(task: Any, *, enabled: bool, cache_dir: Path | None) -> None:
    """``--cache-latents``: give a Task with frozen encoders (Stable Diffusion) its disk cache.

    A pixel-space base has no encoder to cache; it trains as it would without the flag, with a note."""
    if not enabled:
        return
    if not hasattr(task, "enable_encoder_cache"):
        print("note: --cache-latents has nothing to cache on a pixel-space base (no VAE or text encoder)",
              file=sys.stderr, flush=True)
        return
    task.enable_encoder_cache(Path(cache_dir) if cache_dir is not None else default_root())
