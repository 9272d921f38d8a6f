"""Errors a user can fix.

Anything raised as :class:`UserError` is printed by the CLI as one line and exits with code 2;
every other exception is a bug in privlora and keeps its traceback — except failed file operations
(:func:`file_error`: a full or read-only disk is the machine's state, not a bug).
"""

from __future__ import annotations

import errno
import os
import re


class UserError(Exception):
    """Bad input: the message says what was wrong and how to fix it."""

    exit_code = 2


#: errno → what it means for the output, for failures that can only come from writing
_WRITE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EFBIG: "the file is too large for the file system",
}
#: how torch's C++ writer and safetensors' Rust writer report the OS error they hit
_OS_ERROR_CODE = re.compile(r"os error (\d+)")
_TORCH_STRERROR = re.compile(r"strerror: ([^\n]+)")


def file_error(exc: BaseException) -> UserError | None:
    """The one-line :class:`UserError` for a failed file operation (full or read-only disk, no permission,
    a missing folder), or None when ``exc`` is not one.

    Why here and not at every ``write``: output is written by Python, torch (``torch.save``: a RuntimeError
    from its C++ writer) and safetensors (a SafetensorError from Rust); they report the same ENOSPC three
    ways. The CLI turns whatever it recognises here into ``error: ...`` and exit 2; the writers stay atomic
    (temporary name + rename), so a failure leaves the old state, never half a file.
    """
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        reason = _WRITE_ERRNOS.get(exc.errno) if exc.errno is not None else None
        if reason is not None:
            return UserError(f"cannot write{where}: {reason} ({exc.strerror})")
        detail = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        return UserError(f"{detail}:{where}" if where else detail)
    text = str(exc)
    torch_writer = isinstance(exc, RuntimeError) and "inline_container" in text and any(
        marker in text for marker in ("unexpected pos", "PytorchStreamWriter", "file write failed", "open file"))
    if type(exc).__name__ == "SafetensorError" or torch_writer:
        code = _OS_ERROR_CODE.search(text)
        if code is not None and int(code.group(1)) in _WRITE_ERRNOS:
            number = int(code.group(1))
            return UserError(f"cannot write a tensor file: {_WRITE_ERRNOS[number]} ({os.strerror(number)})")
        strerror = _TORCH_STRERROR.search(text)
        if strerror is not None:
            return UserError(f"cannot write a tensor file: {strerror.group(1).strip()}")
        if torch_writer:  # torch's writer without a reason ("unexpected pos …")
            return UserError(f"cannot write a tensor file (is the disk full?): {text.splitlines()[0][:200]}")
    return None
