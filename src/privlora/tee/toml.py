"""A small TOML writer for Gramine manifests: nested tables, strings, ints, bools, arrays of those and
arrays of inline tables — exactly the shapes a manifest uses, nothing more.

Why not ``tomli-w``: one dependency fewer for ~60 lines, and the layout stays readable (one ``[section]``
per manifest area, one line per mount and per trusted file). Correctness is checked by round-tripping
through ``tomllib`` (tests/test_tee.py), including paths with quotes, backslashes, control characters and
non-ASCII names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from privlora.errors import UserError

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def quote(text: str) -> str:
    """A TOML basic string. Control characters become escapes; other Unicode is written as UTF-8.

    A path that is not valid Unicode (undecodable bytes surface as lone surrogates from ``os.fsdecode``)
    cannot be named in TOML at all, so it is refused with a message instead of written wrongly.
    """
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            raise UserError(f"{text!r} is not valid UTF-8 (a file name with undecodable bytes); a Gramine "
                            "manifest cannot name it — rename the file or folder")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else quote(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        if not value:
            return "[]"
        if any(isinstance(v, (Mapping, list, tuple)) for v in value) or len(value) > 3:
            return "[\n" + "".join(f"  {_value(v)},\n" for v in value) + "]"
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dumps(tree: Mapping[str, Any], header: str = "") -> str:
    """Serialise ``tree``: values of each table first, then its sub-tables as ``[dotted.name]`` sections."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]

    def table(node: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        plain = [(k, v) for k, v in node.items() if not isinstance(v, Mapping) or not v]
        subs = [(k, v) for k, v in node.items() if isinstance(v, Mapping) and v]
        if plain and prefix:
            lines.append("")
            lines.append("[" + ".".join(_key(p) for p in prefix) + "]")
        for k, v in plain:
            lines.append(f"{_key(k)} = {_value(v)}")
        for k, v in subs:
            table(v, (*prefix, k))

    table(tree, ())
    return "\n".join(lines).lstrip("\n") + "\n"
