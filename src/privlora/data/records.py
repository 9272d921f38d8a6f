"""The types every ``--data`` reader shares (privlora.data.sources): which columns hold what, one
sample before decoding, what a reader found, and the one error for a column that is not there."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from privlora.errors import UserError

Kind = Literal["image", "text"]

#: caption columns tried, in order, when ``--caption-column`` is not given
CAPTION_KEYS = ("text", "caption", "prompt")


@dataclass(frozen=True)
class Columns:
    """Which table columns hold what; ``None``: privlora's defaults (see each reader)."""

    image: str | None = None
    caption: str | None = None
    text: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class Record:
    """One sample before decoding: ``item`` is an image file, encoded image bytes, or the text itself."""

    id: str
    item: Path | bytes | str
    #: caption (images; ``None``: the source gave none) or label name (text)
    target: str | None
    #: kohya repeat count: how often one epoch shows this image (privacy: still one sample, see train.data)
    repeats: int = 1


@dataclass
class Listing:
    """What a reader found: the records, and files it saw but could not use (path → why)."""

    records: list[Record]
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Reader:
    name: str
    recognises: Callable[[str, Kind], bool]
    read: Callable[[str, Columns, Kind], Listing]


def read_text(path: Path) -> str:
    """A caption or metadata file's text (UTF-8, a byte-order mark allowed); anything else is the user's."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None


def no_column(source: str, column: str, flag: str, columns: list[str]) -> UserError:
    """The one error for a column that is not there: it lists the ones that are."""
    have = ", ".join(repr(c) for c in columns) or "none"
    return UserError(f"{source} has no column {column!r} ({flag}); its columns are {have}")




def pick_column(source: str, names: list[str], given: str | None, defaults: tuple[str, ...], flag: str,
          required: bool) -> str | None:
    """``given`` if the table has it (else the one error), or the first default present."""
    if given is not None:
        if given not in names:
            raise no_column(source, given, flag, names)
        return given
    found = next((n for n in defaults if n in names), None)
    if found is None and required:
        raise no_column(source, defaults[0], flag, names)
    return found


