"""``sanitize(src, out)``: a cleaned copy of a dataset folder and a report of everything found.

Every file under ``src`` is classified once: images go through :class:`ImageSanitizer`; tables (CSV,
TSV, JSONL, plain text) and captions (``metadata.jsonl``, ``.txt`` beside an image) through the PII
scrubber; privlora's own sidecars are copied; anything else is reported and left out. The copy is built
in a temporary sibling of ``out`` and renamed into place at the end, so ``out`` is either complete or
absent, and ``src`` is only ever read.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from privlora.data.formats import IMAGE_SUFFIXES
from privlora.data.sanitize.dedup import DEFAULT_DISTANCE, Signature, clusters, distance
from privlora.data.sanitize.images import ImageOptions, ImageSanitizer
from privlora.data.sanitize.report import CLEAN, DUPLICATE, SKIPPED, FileReport, Finding, SkipFile
from privlora.data.sanitize.workers import default_workers, sanitize_images
from privlora.errors import UserError
from privlora.progress import progress_bar
from privlora.runs import atomic_dir, write_json_atomic

REPORT = "sanitize_report.json"
CAPTIONS = "metadata.jsonl"
#: privlora's own sidecars: no personal data, copied as they are
COPIED = {"canary.json"}


@dataclass(frozen=True)
class TextOptions:
    """PII in tables and captions: which entities, which operator (replace | mask | hash), which columns."""

    enabled: bool = True
    entities: Sequence[str] | None = None
    operator: str = "replace"
    salt: str | None = None
    threshold: float = 0.5
    columns: Sequence[str] | None = None


@dataclass(frozen=True)
class SanitizeOptions:
    images: ImageOptions = field(default_factory=ImageOptions)
    text: TextOptions = field(default_factory=TextOptions)
    dedup: bool = False
    dedup_distance: int = DEFAULT_DISTANCE
    dry_run: bool = False
    overwrite: bool = False
    workers: int = field(default_factory=default_workers)


@dataclass
class SanitizeResult:
    """What :func:`sanitize` did: one :class:`FileReport` per input file, and where the copy went."""

    src: Path
    out: Path | None
    files: list[FileReport]
    options: SanitizeOptions

    def counts(self) -> dict[str, dict[str, int]]:
        """Per kind of finding (face, text, metadata, pii:PERSON, duplicate, …) → files and items."""
        items: Counter[str] = Counter()
        files: Counter[str] = Counter()
        for report in self.files:
            seen = set()
            for f in report.findings:
                key = f"pii:{f.label}" if f.kind == "pii" else f.kind
                items[key] += 1
                seen.add(key)
            files.update(seen)
        return {k: {"files": files[k], "items": items[k]} for k in sorted(items)}

    def statuses(self) -> dict[str, int]:
        return dict(Counter(r.status for r in self.files))

    def read_back(self) -> dict[str, Any] | None:
        """The read-back over all images (None when it did not run): images re-read, words missed by the
        first pass and re-redacted, images where the last pass still read an input word, seconds spent."""
        ran = [r for r in self.files if r.read_back is not None]
        if not ran:
            return None
        return {"images": len(ran), "misses": sum(r.read_back["misses"] for r in ran),  # type: ignore[index]
                "images_with_misses": sum(bool(r.read_back["misses"]) for r in ran),  # type: ignore[index]
                "still_legible": [r.path for r in ran if not r.read_back["clean"]],  # type: ignore[index]
                "seconds": round(sum(r.read_back_seconds for r in ran), 3)}

    def to_json(self) -> dict[str, Any]:
        opts = self.options
        options = {"images": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(opts.images).items()},
                   "text": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(opts.text).items()
                            if k != "salt"},
                   "dedup": opts.dedup, "dedup_distance": opts.dedup_distance}
        options["text"]["salted"] = opts.text.salt is not None
        return {"input": str(self.src), "output": str(self.out) if self.out else None,
                "dry_run": opts.dry_run, "options": options, "statuses": self.statuses(),
                "found": self.counts(), **({"read_back": rb} if (rb := self.read_back()) else {}),
                "files": [r.to_json() for r in self.files]}


def _classify(src: Path, only: Path | None = None) -> list[tuple[str, Path]]:
    """(role, path) for every file under ``src`` (or just ``only``): image | captions | sidecar | table |
    copy | other."""
    from privlora.data.sanitize.pii import TABLE_SUFFIXES

    files = [only] if only is not None else sorted(p for p in src.rglob("*") if p.is_file())
    images = {p.with_suffix("") for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    roles = []
    for p in files:
        suffix = p.suffix.lower()
        if any(part.startswith(".") for part in p.relative_to(src).parts):
            role = "other"
        elif suffix in IMAGE_SUFFIXES:
            role = "image"
        elif p.name == CAPTIONS:
            role = "captions"
        elif suffix == ".txt" and p.with_suffix("") in images:
            role = "sidecar"
        elif p.name in COPIED:
            role = "copy"
        elif suffix in TABLE_SUFFIXES and p.name != REPORT:
            role = "table"
        else:
            role = "other"
        roles.append((role, p))
    return roles


def _check_paths(src: Path, out: Path, options: SanitizeOptions) -> None:
    if not src.exists():
        raise UserError(f"input {src} does not exist")
    if not (src.is_dir() or src.is_file()):
        raise UserError(f"{src} is neither a folder nor a file")
    if options.dry_run:
        return
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise UserError(f"output {out} must be outside the input {src} (the input is never modified)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not options.overwrite:
            raise UserError(f"{out} already exists; choose a new folder or pass --overwrite")
        if not (out / REPORT).exists():
            raise UserError(f"{out} is not a sanitize output (no {REPORT}); refusing to overwrite it")


def _drop_removed_captions(out: Path, removed: set[str]) -> None:
    """Remove caption rows and sidecars of images that are not in the copy (skipped or deduplicated)."""
    for meta in out.rglob(CAPTIONS):
        base = PurePosixPath(meta.parent.relative_to(out).as_posix())
        kept = []
        for line in meta.read_text(encoding="utf-8").splitlines():
            try:
                name = (base / PurePosixPath(str(json.loads(line)["file_name"]).replace("\\", "/"))).as_posix()
            except (json.JSONDecodeError, KeyError, TypeError):
                name = None
            if name not in removed:
                kept.append(line)
        meta.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    for rel in removed:
        (out / rel).with_suffix(".txt").unlink(missing_ok=True)


def sanitize(src: str | Path, out: str | Path | None = None, *, options: SanitizeOptions | None = None,
             quiet: bool = False) -> SanitizeResult:
    """Make a sanitized copy of the dataset folder ``src`` at ``out`` with ``sanitize_report.json``.

    ``src`` may also be one file (a CSV, a JSONL, an image): ``out`` is then a folder holding its cleaned
    copy and the report. With ``options.dry_run`` nothing is written (``out`` may be None) and the
    result says what would be.
    """
    options = options or SanitizeOptions()
    src = Path(src)
    if out is None and not options.dry_run:
        raise UserError("give an output folder (or --dry-run)")
    out_path = Path(out) if out is not None else None
    _check_paths(src, out_path or src, options)
    images = ImageSanitizer(options.images)  # bad detector / redaction names fail here, before any work
    scrubber = None
    if options.text.enabled:
        from privlora.data.sanitize.pii import PiiScrubber

        scrubber = PiiScrubber(entities=options.text.entities, operator=options.text.operator,
                               salt=options.text.salt, threshold=options.text.threshold)
    root = src.parent if src.is_file() else src
    roles = _classify(root, src if src.is_file() else None)
    if not roles:
        raise UserError(f"{src} holds no files to sanitize")
    if options.dry_run:
        files = _process(root, None, roles, images, scrubber, options, quiet)
        return SanitizeResult(src, None, files, options)
    assert out_path is not None
    with atomic_dir(out_path) as tmp:
        files = _process(root, tmp, roles, images, scrubber, options, quiet)
        result = SanitizeResult(src, out_path, files, options)
        write_json_atomic(tmp / REPORT, result.to_json())
    return result


def _process(src: Path, tmp: Path | None, roles: list[tuple[str, Path]], images: ImageSanitizer,
             scrubber: Any, options: SanitizeOptions, quiet: bool) -> list[FileReport]:
    """Images first (in worker processes when there are many), then text files; reports in path order."""
    reports: dict[int, FileReport] = {}
    hashes: list[tuple[int, Signature]] = []  # (index into reports, pHash signature)
    jobs: list[tuple[int, tuple[Path, Path | None, str]]] = []
    for index, (role, path) in enumerate(roles):
        rel = path.relative_to(src).as_posix()
        dst = tmp / rel if tmp is not None else None
        if dst is not None:
            dst.parent.mkdir(parents=True, exist_ok=True)
        if role == "image":
            jobs.append((index, (path, dst, rel)))
    with progress_bar("sanitize", total=len(roles), quiet=quiet) as bar:
        for (index, _), (report, image_hash) in zip(jobs, sanitize_images([j for _, j in jobs], images,
                                                                            options.workers), strict=True):
            reports[index] = report
            if image_hash is not None:
                hashes.append((index, image_hash))
            bar.advance(1)
        for index, (role, path) in enumerate(roles):
            if role != "image":
                rel = path.relative_to(src).as_posix()
                reports[index] = _process_other(role, path, tmp / rel if tmp is not None else None, rel,
                                                scrubber, options)
                bar.advance(1)
    ordered = [reports[i] for i in range(len(roles))]
    _mark_duplicates(ordered, sorted(hashes), options, tmp)
    if tmp is not None:
        removed = {r.path for r in ordered if r.kind == "image" and r.status in (SKIPPED, DUPLICATE)}
        _drop_removed_captions(tmp, removed)
    return ordered


def _process_other(role: str, path: Path, dst: Path | None, rel: str, scrubber: Any,
                   options: SanitizeOptions) -> FileReport:
    """A file that is not an image: captions and tables are scrubbed, sidecars copied, the rest left out."""
    from privlora.data.sanitize.pii import sanitize_table

    try:
        if role in ("captions", "sidecar", "table") and scrubber is not None:
            columns = ["text"] if role == "captions" else options.text.columns
            if role == "sidecar":
                return _scrub_sidecar(path, dst, scrubber, rel)
            return sanitize_table(path, dst, scrubber=scrubber, rel=rel, columns=columns)
        if role in ("captions", "sidecar", "table", "copy"):
            if dst is not None:
                shutil.copyfile(path, dst)
            return FileReport(rel, "text" if role != "copy" else "other", CLEAN,
                              reason="copied unchanged (text scanning is off)" if role != "copy" else
                              "privlora sidecar, copied unchanged")
        return FileReport(rel, "other", SKIPPED, reason="not an image or a text dataset; not copied")
    except SkipFile as e:
        if dst is not None:
            dst.unlink(missing_ok=True)
        return FileReport(rel, "text", SKIPPED, reason=str(e))


def _scrub_sidecar(path: Path, dst: Path | None, scrubber: Any, rel: str) -> FileReport:
    """A caption ``.txt`` beside an image: the whole text is one caption."""
    report = FileReport(rel, "text")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise SkipFile(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    cleaned, found = scrubber.scrub(text)
    for f in found:
        report.add(f)
    if dst is not None:
        dst.write_text(cleaned, encoding="utf-8")
    return report


def _mark_duplicates(reports: list[FileReport], hashes: list[tuple[int, Signature]], options: SanitizeOptions,
                     tmp: Path | None) -> None:
    for group in clusters([h for _, h in hashes], options.dedup_distance):
        keep_index, keep_hash = hashes[group[0]]
        kept = reports[keep_index].path
        for member in group[1:]:
            index, member_hash = hashes[member]
            d = distance(keep_hash, member_hash)
            report = reports[index]
            where = {"of": kept, "distance": d}
            if options.dedup:
                report.findings.append(Finding("duplicate", "near-duplicate", "phash", where, "dropped"))
                report.status, report.reason = DUPLICATE, f"near-duplicate of {kept} (pHash distance {d})"
                if tmp is not None:
                    (tmp / report.path).unlink(missing_ok=True)
            else:
                report.add(Finding("duplicate", "near-duplicate", "phash", where, "reported"))
