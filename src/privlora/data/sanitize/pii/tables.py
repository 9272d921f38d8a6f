"""PII in text datasets, one file at a time: CSV, TSV, JSONL, and plain text (line by line).

:func:`sanitize_table` reads a file, scrubs the chosen string fields with a :class:`PiiScrubber`, reports
each finding (row, column, offsets into the original field value — never the value), and writes the
result atomically, or nothing on a dry run. The input is never modified.

Only what changed is rewritten: a record without findings keeps its exact bytes, and within a changed
record only the changed values are re-encoded (a JSONL line keeps its key order, spacing and every other
value byte for byte; a CSV record is re-quoted in the file's dialect). A file that cannot be parsed —
bad UTF-8, a malformed JSON line, a CSV record with the wrong number of fields — raises
:class:`SkipFile` naming the place; a requested column the file lacks is a :class:`UserError`.

``row`` in a finding is the 0-based record index: the line for JSONL and text, the data record after the
header for CSV/TSV. ``columns`` selects CSV columns or JSONL top-level keys (default: every string field);
plain text has no columns and is always scanned whole.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from privlora.data.sanitize.report import FileReport, Finding, SkipFile
from privlora.errors import UserError
from privlora.runs import atomic_file

if TYPE_CHECKING:
    from privlora.data.sanitize.pii.engine import PiiScrubber

_BOM = "\ufeff"
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()

# A format reads the decoded text and returns the new text plus findings ``(row, column, Finding)``.
Format = Callable[[str, "PiiScrubber", str, "Sequence[str] | None"], tuple[str, list[Finding]]]
FORMATS: dict[str, Format] = {}


def register_format(*suffixes: str):
    def add(fn: Format) -> Format:
        for suffix in suffixes:
            FORMATS[suffix] = fn
        return fn

    return add


def sanitize_table(src: Path, dst: Path | None, *, scrubber: PiiScrubber, rel: str,
                   columns: Sequence[str] | None = None) -> FileReport:
    """Scrub PII in one text dataset file; ``dst=None`` is a dry run (analyse and report, write nothing)."""
    src = Path(src)
    fmt = FORMATS.get(src.suffix.lower())
    if fmt is None:
        raise ValueError(f"{rel}: not a text table ({', '.join(sorted(FORMATS))})")
    if dst is not None and Path(dst).resolve() == src.resolve():
        raise UserError(f"{rel}: the output would overwrite the input; write to another folder")
    data = src.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipFile(f"not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
    bom = text.startswith(_BOM)
    new, findings = fmt(text[1:] if bom else text, scrubber, rel, columns)
    report = FileReport(path=rel, kind="text")
    for finding in findings:
        report.add(finding)
    if dst is not None:
        with atomic_file(dst) as tmp:
            tmp.write_bytes(data if not findings else ((_BOM if bom else "") + new).encode("utf-8"))
    return report


def context_words(name: str) -> list[str]:
    """Words of a column or key name, for Presidio's context boost: ``phoneNumber`` → ``phone``, ``number``."""
    return [w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[^\x00-\x7f]+", name)]


def _lines(text: str) -> list[tuple[str, str]]:
    """``(content, line ending)`` pairs; only ``\\n`` and ``\\r\\n`` end a line (JSON may hold U+2028)."""
    *ended, last = text.split("\n")
    out = [(raw[:-1], "\r\n") if raw.endswith("\r") else (raw, "\n") for raw in ended]
    return out + [(last, "")] if last else out


def _scrub_cells(cells: list[tuple[int, str, str]],
                 scrubber: PiiScrubber) -> tuple[dict[tuple[int, str], str], list[Finding]]:
    """Scrub ``(row, column, value)`` cells column by column (the column name is context).

    Returns the new values of changed cells and the findings, each located by row, column and offsets.
    """
    by_column: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for row, column, value in cells:
        by_column[column].append((row, value))
    changed, findings = {}, []
    for column, items in by_column.items():
        results = scrubber.scrub_many([v for _, v in items], context=context_words(column))
        for (row, _), (new, found) in zip(items, results, strict=True):
            for f in found:  # a bare JSON string line has no column
                f.where = {"row": row, **({"column": column} if column else {}), **f.where}
                findings.append(f)
            if found:
                changed[row, column] = new
    findings.sort(key=lambda f: (f.where["row"], f.where["start"]))
    return changed, findings


@register_format(".txt")
def _text(text: str, scrubber: PiiScrubber, rel: str, columns: Sequence[str] | None):
    lines = _lines(text)
    results = scrubber.scrub_many([content for content, _ in lines])
    out, findings = [], []
    for row, ((content, end), (new, found)) in enumerate(zip(lines, results, strict=True)):
        for f in found:
            f.where = {"row": row, **f.where}
            findings.append(f)
        out.append((new if found else content) + end)
    return "".join(out), findings


@register_format(".jsonl")
def _jsonl(text: str, scrubber: PiiScrubber, rel: str, columns: Sequence[str] | None):
    lines = _lines(text)
    cells, spans, seen = [], {}, set()
    for row, (content, _) in enumerate(lines):
        if not content.strip():
            continue
        try:
            value = json.loads(content)
        except json.JSONDecodeError as e:
            raise SkipFile(f"line {row + 1}: not valid JSON ({e.msg}, column {e.colno})") from None
        if isinstance(value, dict):
            for key, start, end in _value_spans(content):
                seen.add(key)
                if columns is None or key in columns:
                    raw = json.loads(content[start:end])
                    if isinstance(raw, str):
                        cells.append((row, key, raw))
                        spans[row, key] = (start, end)
        elif isinstance(value, str) and columns is None:
            cells.append((row, "", value))
            spans[row, ""] = (_WS.match(content).end(), len(content.rstrip(" \t\r")))
    missing = [c for c in columns or () if c not in seen]
    if missing and lines:
        raise UserError(f"{rel}: no line has the key {', '.join(map(repr, missing))}")
    changed, findings = _scrub_cells(cells, scrubber)
    edits: dict[int, list[tuple[tuple[int, int], str]]] = defaultdict(list)
    for (row, key), new in changed.items():
        edits[row].append((spans[row, key], new))
    out = []
    for row, (content, end) in enumerate(lines):
        for (start, stop), new in sorted(edits.get(row, ()), reverse=True):  # right to left: offsets hold
            ascii_file = content[start:stop].isascii() and not json.loads(content[start:stop]).isascii()
            content = content[:start] + json.dumps(new, ensure_ascii=ascii_file) + content[stop:]
        out.append(content + end)
    return "".join(out), findings


def _value_spans(line: str) -> list[tuple[str, int, int]]:
    """``(key, start, end)`` of every top-level value in a JSON object line (valid JSON, already checked)."""
    spans = []
    i = _WS.match(line, _WS.match(line).end() + 1).end()  # past "{"
    while line[i] != "}":
        key, i = _DECODER.raw_decode(line, i)
        i = _WS.match(line, _WS.match(line, i).end() + 1).end()  # past ":"
        _, end = _DECODER.raw_decode(line, i)
        spans.append((key, i, end))
        i = _WS.match(line, end).end()
        if line[i] == ",":
            i = _WS.match(line, i + 1).end()
    return spans


@register_format(".csv", ".tsv")
def _csv(text: str, scrubber: PiiScrubber, rel: str, columns: Sequence[str] | None):
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    delimiter = "\t" if rel.lower().endswith(".tsv") else _sniff_delimiter(text)
    reader = csv.reader(iter(lines), delimiter=delimiter, quotechar='"', doublequote=True, strict=False)
    records: list[tuple[list[str], int, int]] = []  # fields, first line, end line (exclusive)
    try:
        for fields in reader:
            first = records[-1][2] if records else 0
            records.append((fields, first, reader.line_num))
    except csv.Error as e:
        raise SkipFile(f"line {reader.line_num}: unreadable CSV ({e})") from None
    if not records:
        return text, []
    header = records[0][0]
    for fields, first, _ in records[1:]:
        if fields and len(fields) != len(header):
            raise SkipFile(f"line {first + 1}: {len(fields)} fields where the header has {len(header)}")
    missing = [c for c in columns or () if c not in header]
    if missing:
        raise UserError(f"{rel}: no column {', '.join(map(repr, missing))} (columns: {', '.join(header)})")
    wanted = [i for i, name in enumerate(header) if columns is None or name in columns]
    cells = [(row, header[i], fields[i]) for row, (fields, _, _) in enumerate(records[1:]) if fields
             for i in wanted]
    changed, findings = _scrub_cells(cells, scrubber)
    quote_all = lines[0].rstrip("\r\n").startswith('"') and lines[0].rstrip("\r\n").endswith('"')
    out = [lines[0:records[0][2]]]
    for row, (fields, first, stop) in enumerate(records[1:]):
        raw = lines[first:stop]
        new = [changed.get((row, header[i]), value) for i, value in enumerate(fields)]
        if new != fields:
            ending = re.search(r"\r?\n?$", raw[-1]).group()
            buf = io.StringIO()  # "\r\n" as terminator makes the writer quote any field holding a line break
            csv.writer(buf, delimiter=delimiter, quotechar='"', lineterminator="\r\n",
                       quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL).writerow(new)
            raw = [buf.getvalue()[:-2] + ending]
        out.append(raw)
    return "".join(line for chunk in out for line in chunk), findings


def _sniff_delimiter(text: str) -> str:
    """``,`` unless the header line has none and uses ``;``, ``|`` or a tab (European spreadsheets) instead."""
    header = re.sub(r'"[^"]*"', "", text.split("\n", 1)[0])
    return next((d for d in ",;|\t" if d in header), ",")


#: File suffixes :func:`sanitize_table` reads (matched case-insensitively).
TABLE_SUFFIXES: set[str] = set(FORMATS)
