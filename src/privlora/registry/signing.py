"""The key that signs the action log's checkpoints (Ed25519, ``cryptography``), kept in a file outside the
database.

Why a signature: a hash chain shows edits, removals and swaps, but not its own last entries cut off, nor a
whole chain recomputed by someone holding the database. A checkpoint ``(entries covered, head hash)``
signed with a key the database does not hold pins the head: a truncated chain no longer reaches it, a
rewritten one reaches a different hash, and a forged checkpoint does not verify.

The key is generated on first use (mode 0600, created exclusively so two processes cannot race); its path
comes from ``--log-key`` / ``PRIVLORA_REGISTRY_LOG_KEY`` or defaults to ``<root>/log-signing.key``.
"""

from __future__ import annotations

import os
from pathlib import Path

from privlora.extras import missing_extra

try:  # the 'registry' extra
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
except ModuleNotFoundError as e:
    raise (missing_extra(e) or e) from None

from privlora.errors import UserError

KEY_ENV = "PRIVLORA_REGISTRY_LOG_KEY"
KEY_FILE = "log-signing.key"
_CONTEXT = b"privlora-log-checkpoint\x00"


def checkpoint_message(count: int, head: str) -> bytes:
    return _CONTEXT + f"{count}:{head}".encode()


class LogSigner:
    """Sign and verify log checkpoints with the Ed25519 key at ``path`` (created if absent)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._key = self._load_or_create()
        self.public = self._key.public_key()

    def _load_or_create(self) -> Ed25519PrivateKey:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return self._create()
        except OSError as e:
            raise UserError(f"cannot read the log signing key {self.path}: {e.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise UserError(f"{self.path} is not an Ed25519 private key (PEM); restore it from your backup — "
                            "a new key would not verify the existing checkpoints") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise UserError(f"{self.path} holds a {type(key).__name__}, not an Ed25519 key")
        return key

    def _create(self) -> Ed25519PrivateKey:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            return self._load_or_create()
        except OSError as e:
            raise UserError(f"cannot create the log signing key {self.path}: {e.strerror}") from None
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return key

    def sign(self, count: int, head: str) -> str:
        return self._key.sign(checkpoint_message(count, head)).hex()

    def verifies(self, count: int, head: str, signature: str) -> bool:
        try:
            self.public.verify(bytes.fromhex(signature), checkpoint_message(count, head))
        except (InvalidSignature, ValueError):
            return False
        return True

    def public_hex(self) -> str:
        return self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def key_path(root: Path, given: Path | str | None = None) -> Path:
    """``given``, else ``$PRIVLORA_REGISTRY_LOG_KEY``, else ``<root>/log-signing.key``."""
    return Path(given or os.environ.get(KEY_ENV) or Path(root) / KEY_FILE)
