"""MkDocs hook: serve README.md and BENCHMARKS.md, which live at the repository root, as site pages.

MkDocs reads only `docs_dir`, and copying the two files into docs/ would give each two sources that
drift apart. Instead docs/index.md and docs/benchmarks.md are short stubs (they point GitHub readers
to the root files) whose markdown this hook replaces, at build time, with the root file's text. Links
in the root files are written relative to the repository root (`docs/guide/x.md`), so they are
rewritten relative to docs/ (`guide/x.md`); `mkdocs build --strict` then checks them like any other.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# site page (relative to docs/) → the repository-root file it shows
MIRRORS: dict[str, str] = {"index.md": "README.md", "benchmarks.md": "BENCHMARKS.md"}
_PAGE_OF = {root_file: page for page, root_file in MIRRORS.items()}
_LINK = re.compile(r"\]\((?!https?:|mailto:|#)([^)\s]+)\)")


def relink(markdown: str) -> str:
    """Rewrite repository-root-relative link targets so that they resolve from docs/."""

    def target(match: re.Match[str]) -> str:
        path, _, anchor = match.group(1).partition("#")
        if path.startswith("docs/"):
            path = path[len("docs/"):]
        else:
            path = _PAGE_OF.get(path, path)
        return f"]({path}{'#' + anchor if anchor else ''})"

    return _LINK.sub(target, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 (MkDocs' hook signature)
    source = MIRRORS.get(page.file.src_uri)
    if source is None:
        return markdown
    return relink((ROOT / source).read_text(encoding="utf-8"))
