"""Where ``--data`` can point: a registry of source readers, each recognising one layout.

Users arrive with data laid out by the tool they used before: a ``datasets`` ``save_to_disk`` folder, a
dataset in the local Hugging Face cache, diffusers' imagefolder (``metadata.jsonl`` / ``metadata.csv``
with ``file_name``), kohya's ``.caption`` / ``.txt`` sidecars and ``N_name`` repeat folders, or a
CSV/JSONL of texts and labels. Each reader turns one layout into :class:`Record` s — (image or text,
caption or label, stable id) — so decoding, splitting and training never care where the data came from.
A new layout is one function and one :data:`READERS` entry.

Ids are what ``splits.json`` names, so they must be stable across runs and unique: a folder's images are
named by their path relative to the folder, a table's rows by an ``id`` column where it has one, else by
row number (``row-<i>``, prefixed ``<split>/`` for a dataset with several splits).

Privlora never downloads: Hugging Face datasets are read from disk or from the local cache only, with
``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` semantics whatever the environment says.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from privlora.data.formats import IMAGE_SUFFIXES
from privlora.data.hf_sources import is_hub_name, is_save_to_disk, read_hf_cache, read_save_to_disk
from privlora.data.records import (  # noqa: F401 - re-exported: the readers' types live in records
    CAPTION_KEYS,
    Columns,
    Kind,
    Listing,
    Reader,
    Record,
    no_column,
    pick_column,
    read_text,
)
from privlora.errors import UserError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
#: kohya's sidecar caption files, in the order they are preferred when an image has both
SIDECAR_SUFFIXES = (".caption", ".txt")
#: kohya's ``train_data_dir`` layout: ``10_name/`` repeats every image below it 10 times per epoch
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


# --- folders of images: imagefolder metadata, kohya sidecars and repeat folders ---------------------------

#: files privlora itself writes into a data folder, and caption files: never images, never worth a warning
NOT_IMAGES = {*METADATA_FILES, "canary.json", "sanitize_report.json", "privacy.json", "synthesize.json"}


def _metadata_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of one ``metadata.jsonl`` (JSON objects) or ``metadata.csv`` (a header row)."""
    raw = read_text(path)
    if path.suffix == ".csv":
        reader = csv.DictReader(raw.splitlines())
        if "file_name" not in (reader.fieldnames or []):
            raise no_column(str(path), "file_name", "Hugging Face imagefolder", list(reader.fieldnames or []))
        return list(reader)
    rows = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row["file_name"]  # noqa: B018 - must be there
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{number} is not a JSON object with 'file_name' and 'text'") from None
        rows.append(row)
    return rows


def metadata_captions(folder: Path, caption_column: str | None = None) -> dict[str, str]:
    """Captions from every ``metadata.jsonl`` / ``metadata.csv`` under ``folder``, keyed by image path
    relative to ``folder``.

    As in Hugging Face's imagefolder, a metadata file names files relative to its own directory
    (``train/metadata.jsonl`` captions ``train/…``); ``./a.png`` and ``a.png`` are the same file. The
    caption is the ``--caption-column`` (default: ``text``, else ``caption`` or ``prompt``); a row that
    lacks it has the empty caption.
    """
    captions: dict[str, str] = {}
    for path in sorted(p for name in METADATA_FILES for p in folder.rglob(name)):
        rows = _metadata_rows(path)
        names = sorted({k for row in rows for k in row})
        column = pick_column(str(path), names, caption_column, CAPTION_KEYS, "--caption-column", required=False)
        base = PurePosixPath(path.parent.relative_to(folder).as_posix())
        for row in rows:
            name = str(row["file_name"]).replace("\\", "/")
            value = row.get(column) if column else None
            captions[(base / PurePosixPath(name)).as_posix()] = "" if value is None else str(value)
    return captions


def sidecar_caption(image: Path) -> str | None:
    """kohya's caption beside an image: ``a.caption`` (preferred) or ``a.txt``, stripped."""
    for suffix in SIDECAR_SUFFIXES:
        sidecar = image.with_suffix(suffix)
        if sidecar.is_file():
            return read_text(sidecar).strip()
    return None


def repeats_of(rel: str) -> int:
    """kohya's repeat count of an image at ``rel``: ``N`` for a top-level ``N_name/`` folder, else 1."""
    parts = PurePosixPath(rel).parts
    match = REPEAT_FOLDER.match(parts[0]) if len(parts) > 1 else None
    if match is None:
        return 1
    count = int(match.group(1))
    if count < 1:
        raise UserError(f"repeat folder {parts[0]!r} asks for {count} repeats; kohya's N_name folders "
                        "need N ≥ 1 (rename it, e.g. 1_" + match.group(2) + ")")
    return count


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES)


def is_folder(source: str, kind: Kind = "image") -> bool:
    return kind == "image" and Path(source).is_dir()


def read_image_folder(source: str, columns: Columns, kind: Kind) -> Listing:
    """Every image under the folder (recursively), captioned by metadata (first), a ``.caption`` or
    ``.txt`` sidecar, or nothing (``target=None``); a top-level ``N_name/`` folder repeats its images."""
    folder = Path(source)
    if columns.image is not None:
        raise UserError(f"--image-column is for Hugging Face datasets; {folder} is a folder of image files")
    meta = metadata_captions(folder, columns.caption)
    listing = Listing(records=[])
    for path in image_files(folder):
        rel = path.relative_to(folder).as_posix()
        caption = meta[rel] if rel in meta else sidecar_caption(path)
        listing.records.append(Record(rel, path, caption, repeats_of(rel)))
    captions = set(SIDECAR_SUFFIXES)
    for p in folder.rglob("*"):
        if (p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES and p.suffix.lower() not in captions
                and p.name not in NOT_IMAGES and not p.name.startswith(".")):
            listing.skipped[p.relative_to(folder).as_posix()] = "not an image file"
    return listing


# --- text files --------------------------------------------------------------------------------------------

def is_text_file(source: str, kind: Kind = "text") -> bool:
    return kind == "text" and Path(source).is_file()


def read_text_file(source: str, columns: Columns, kind: Kind) -> Listing:
    """A CSV/TSV (header row) or JSONL (objects) of texts and labels: ``--text-column`` (default
    ``text``), ``--label-column`` (default ``label``), ids from an ``id`` column or ``row-<line>``."""
    path = Path(source)
    text_col, label_col = columns.text or "text", columns.label or "label"
    suffix = path.suffix.lower()
    raw = read_text(path)
    records = []
    if suffix == ".jsonl":
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise TypeError
            except (json.JSONDecodeError, TypeError):
                raise UserError(f"{path}:{number} is not a JSON object with {text_col!r} and {label_col!r}") from None
            for column, flag in ((text_col, "--text-column"), (label_col, "--label-column")):
                if column not in obj:
                    raise UserError(f"{path}:{number} is not a JSON object with {text_col!r} and {label_col!r} "
                                    f"({flag}); its keys are {', '.join(repr(k) for k in obj) or 'none'}")
            records.append(Record(str(obj.get("id", f"row-{number}")), str(obj[text_col]), str(obj[label_col])))
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(raw.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        names = list(reader.fieldnames or [])
        missing = [c for c in (text_col, label_col) if c not in names]
        if missing:
            raise UserError(f"{path} needs columns {text_col!r} and {label_col!r} (missing "
                            f"{', '.join(missing)}; set --text-column / --label-column); its columns are "
                            f"{', '.join(repr(n) for n in names) or 'none'}")
        for number, row in enumerate(reader, start=2):
            records.append(Record(str(row.get("id") or f"row-{number}"), row[text_col] or "", row[label_col] or ""))
    else:
        raise UserError(f"{path}: expected a .csv, .tsv or .jsonl file with text and label")
    return Listing(records=records)


#: tried in order; the first that recognises the source reads it
READERS: tuple[Reader, ...] = (
    Reader("save_to_disk", is_save_to_disk, read_save_to_disk),
    Reader("folder", is_folder, read_image_folder),
    Reader("text_file", is_text_file, read_text_file),
    Reader("hf_cache", is_hub_name, read_hf_cache),
)


def read_source(source: str, kind: Kind, columns: Columns | None = None) -> Listing:
    """The records of ``source`` (anything but ``demo:…``), from the first reader that recognises it.

    Raises :class:`UserError` for a missing path, an unknown layout, a bad column or duplicate ids.
    """
    columns = columns or Columns()
    reader = next((r for r in READERS if r.recognises(source, kind)), None)
    if reader is None:
        path = Path(source)
        if not path.exists():
            what = "image folder" if kind == "image" else "text dataset"
            raise UserError(f"{what} {source} does not exist")
        if kind == "image":
            raise UserError(f"{source} is not a folder of images (nor a Hugging Face save_to_disk folder)")
        raise UserError(f"{source}: expected a .csv, .tsv or .jsonl file with text and label, or a Hugging "
                        "Face save_to_disk folder")
    if kind == "image" and (columns.text is not None or columns.label is not None):
        raise UserError("--text-column and --label-column are for text data (--task text)")
    if kind == "text" and (columns.image is not None or columns.caption is not None):
        raise UserError("--image-column and --caption-column are for image data (--task image)")
    listing = reader.read(source, columns, kind)
    seen: set[str] = set()
    for record in listing.records:
        if record.id in seen:
            raise UserError(f"{source}: the id {record.id!r} names two samples; ids must be unique "
                            "(splits.json refers to them)")
        seen.add(record.id)
    return listing
