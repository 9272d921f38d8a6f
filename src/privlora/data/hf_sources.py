"""Hugging Face datasets as ``--data``: ``save_to_disk`` folders and datasets in the local cache by name.

Read with ``datasets`` where it is installed (``load_from_disk`` / ``load_dataset``), a ``save_to_disk``
folder with pyarrow alone where it is not. Never online: ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``
semantics whatever the environment says. Every split is used; privlora makes its own members / aux /
eval split. Rows become :class:`Record` s named by an ``id`` column where it names every row once, else
``row-<i>`` (``<split>/…`` for a dataset with several splits).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from privlora.data.records import CAPTION_KEYS, Columns, Kind, Listing, Record, no_column, pick_column, read_text
from privlora.errors import UserError

TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl")
#: a Hugging Face dataset name (``owner/name`` or a canonical ``name``), never a path that exists
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

#: (split or None, features as in dataset_info.json, pyarrow.Table)
Part = tuple[str | None, dict[str, Any], Any]


@contextmanager
def _offline(datasets: Any) -> Iterator[None]:
    """Run ``datasets`` as if ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``: only the local cache. Its
    "using the cached version" log lines and progress bars are silenced, so a user error stays one line."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    flag = getattr(datasets.config, "HF_HUB_OFFLINE", None)
    log = datasets.utils.logging
    verbosity, bars = log.get_verbosity(), datasets.is_progress_bar_enabled()
    os.environ.update({k: "1" for k in saved})
    if flag is not None:
        datasets.config.HF_HUB_OFFLINE = True
    log.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        log.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if flag is not None:
            datasets.config.HF_HUB_OFFLINE = flag


def _import_datasets() -> Any | None:
    try:
        import datasets
    except ImportError:
        return None
    return datasets


def _parts_of(loaded: Any) -> list[Part]:
    """A ``Dataset`` or ``DatasetDict`` → its splits as arrow tables (indices applied) with their features."""
    splits = list(loaded.items()) if isinstance(loaded, dict) else [(None, loaded)]
    return [(split, ds.features.to_dict(), ds.with_format("arrow")[:]) for split, ds in splits]


def _json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _arrow_split(folder: Path) -> tuple[dict[str, Any], Any]:
    """One ``Dataset.save_to_disk`` folder read with pyarrow alone: ``state.json`` names the arrow stream
    files, ``dataset_info.json`` holds the features (e.g. which column is an ``Image``)."""
    import pyarrow as pa

    state, info = _json(folder / "state.json"), _json(folder / "dataset_info.json")
    try:
        files = [folder / f["filename"] for f in state["_data_files"]]
        tables = [pa.ipc.open_stream(str(f)).read_all() for f in files]
    except (KeyError, TypeError, OSError, pa.ArrowInvalid) as e:
        raise UserError(f"{folder} is not a readable save_to_disk folder ({type(e).__name__}: {e})") from None
    return (info.get("features") or {}) if isinstance(info, dict) else {}, pa.concat_tables(tables)


def _arrow_from_disk(path: Path) -> list[Part]:
    try:
        import pyarrow  # noqa: F401 - only to say what is missing
    except ImportError:
        raise UserError(f"{path} is a Hugging Face save_to_disk folder; reading it needs the 'datasets' "
                        "package (or 'pyarrow'), which is not installed") from None
    if (path / "dataset_dict.json").is_file():
        splits = _json(path / "dataset_dict.json").get("splits", [])
        return [(str(s), *_arrow_split(path / str(s))) for s in splits]
    return [(None, *_arrow_split(path))]


def is_save_to_disk(source: str, kind: Kind = "image") -> bool:
    path = Path(source)
    return path.is_dir() and ((path / "dataset_dict.json").is_file()
                              or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()))


def read_save_to_disk(source: str, columns: Columns, kind: Kind) -> Listing:
    """``datasets.load_from_disk`` (or pyarrow when ``datasets`` is missing): a Dataset or DatasetDict;
    every split is used, privlora makes its own members / aux / eval split."""
    datasets = _import_datasets()
    if datasets is None:
        return _table_records(source, _arrow_from_disk(Path(source)), columns, kind)
    try:
        with _offline(datasets):
            loaded = datasets.load_from_disk(source)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{source} is not a readable save_to_disk folder: {str(e).splitlines()[0]}") from None
    return _table_records(source, _parts_of(loaded), columns, kind)


def is_hub_name(source: str, kind: Kind = "image") -> bool:
    return (not source.startswith("demo:") and not Path(source).exists() and HUB_NAME.match(source) is not None
            and Path(source).suffix.lower() not in TEXT_SUFFIXES)


def read_hf_cache(source: str, columns: Columns, kind: Kind) -> Listing:
    """``datasets.load_dataset(name)`` from the local cache only; a name not there is one clear line."""
    missing = (f"{source} does not exist as a file or folder, and no dataset of that name is in the local "
               "Hugging Face cache")
    datasets = _import_datasets()
    if datasets is None:
        raise UserError(f"{missing} (reading the cache needs the 'datasets' package, which is not installed)")
    try:
        with _offline(datasets):
            loaded = datasets.load_dataset(source)
    except (OSError, ValueError, ConnectionError) as e:  # DatasetNotFoundError is a FileNotFoundError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{missing} (privlora reads datasets offline; fetch it once with "
                        f"datasets.load_dataset({source!r}) where the network is allowed): {first}") from None
    return _table_records(source, _parts_of(loaded), columns, kind)


def _image_column(source: str, features: dict[str, Any], names: list[str], given: str | None) -> str:
    if given is not None:
        if given not in names:
            raise no_column(source, given, "--image-column", names)
        return given
    typed = [n for n in names if isinstance(features.get(n), dict) and features[n].get("_type") == "Image"]
    found = typed or [n for n in ("image", "img") if n in names]
    if not found:
        raise UserError(f"{source} has no image column (no Image feature, no 'image'); pass --image-column, "
                        f"its columns are {', '.join(repr(n) for n in names) or 'none'}")
    return found[0]


def _row_ids(table: Any, split: str | None) -> list[str]:
    """The ``id`` column where it names every row once, else row numbers; a split prefix keeps them apart."""
    n = table.num_rows
    ids = [f"row-{i}" for i in range(n)]
    if "id" in table.column_names:
        given = table.column("id").to_pylist()
        if None not in given and len({str(v) for v in given}) == n:
            ids = [str(v) for v in given]
    return [f"{split}/{i}" for i in ids] if split is not None else ids


def _image_item(value: Any) -> Path | bytes | None:
    """An ``Image`` feature's cell (``{bytes, path}``), raw bytes, or a path string → what decoding opens."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str) and Path(value).is_file():
        return Path(value)
    return None


def _label_names(features: dict[str, Any], column: str) -> list[str] | None:
    feature = features.get(column)
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel":
        return [str(n) for n in feature.get("names", [])]
    return None


def _table_records(source: str, parts: list[Part], columns: Columns, kind: Kind) -> Listing:
    listing = Listing(records=[])
    for split, features, table in parts:
        where = source if split is None else f"{source} (split {split!r})"
        names = list(table.column_names)
        ids = _row_ids(table, split)
        if kind == "image":
            image = _image_column(where, features, names, columns.image)
            caption = pick_column(where, names, columns.caption, CAPTION_KEYS, "--caption-column", required=False)
            captions = table.column(caption).to_pylist() if caption else [None] * table.num_rows
            for sample_id, value, text in zip(ids, table.column(image).to_pylist(), captions, strict=True):
                item = _image_item(value)
                if item is None:
                    listing.skipped[sample_id] = f"column {image!r} holds no image bytes or readable path"
                    continue
                listing.records.append(Record(sample_id, item, None if text is None else str(text)))
        else:
            text_col = pick_column(where, names, columns.text, ("text", "sentence"), "--text-column", required=True)
            label_col = pick_column(where, names, columns.label, ("label",), "--label-column", required=True)
            classes = _label_names(features, label_col or "")
            labels = table.column(label_col).to_pylist()
            for sample_id, text, label in zip(ids, table.column(text_col).to_pylist(), labels, strict=True):
                if label is not None and classes is not None and isinstance(label, int) and 0 <= label < len(classes):
                    label = classes[label]
                listing.records.append(Record(sample_id, "" if text is None else str(text),
                                              None if label is None else str(label)))
    return listing


