"""Every `privlora …` command the docs show must exist, with options that exist.

The README and docs/ are the manual; a renamed flag or sub-command that the docs still show is a
broken manual even though every other test passes. This walks the real click tree of the Typer app
(`typer.main.get_command`), so hidden options (kept as aliases) count as existing, and resolves each
shown line token by token: a word names a sub-command while the current command is a group, an
`--option` must belong to the command it follows, and an option's value is skipped. Placeholders
(`<id>`), comments, pipes, `&&`/`;`/`&` and `\\` continuations are handled; positional values are not
checked (they are data).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from privlora.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_PLACEHOLDER = re.compile(r"<[^<>\n]*>")
_COMMENT = re.compile(r"(^|\s)#.*$")
_SEPARATORS = {"|", "||", "&&", ";", "&"}
_ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def shown_commands(path: Path) -> list[tuple[int, str]]:
    """(line number, command) for every shell line in the fenced code blocks of a markdown file."""
    found: list[tuple[int, str]] = []
    fence, pending, start = False, "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip().startswith("```"):
            fence, pending = not fence, ""
            continue
        if not fence:
            continue
        text = _COMMENT.sub("", line).rstrip()
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        text, pending = pending + text, ""
        if re.search(r"(^|\s)privlora\s", text + " "):
            found.append((start, text.strip()))
    return found


def segments(line: str) -> list[list[str]]:
    """Split one shell line into simple commands (argument lists) at pipes and command separators."""
    lexer = shlex.shlex(_PLACEHOLDER.sub("X", line), posix=True, punctuation_chars="|&;")
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: only command lines we skip anyway (export X=$(python -c "…"))
        tokens = line.split()
    out: list[list[str]] = [[]]
    for token in tokens:
        if token in _SEPARATORS:
            out.append([])
        else:
            out[-1].append(token)
    return [argv for argv in out if argv]


def _option(command: click.Command, name: str) -> click.Option | None:
    for param in command.get_params(click.Context(command)):  # includes the --help option
        if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
            return param
    return None


def problems(line: str, root: click.Command | None = None) -> list[str]:
    """Why a shown command line would not parse: unknown sub-commands and options ([] when it is fine)."""
    root = root or typer.main.get_command(app)
    found: list[str] = []
    for argv in segments(line):
        while argv and (argv[0] == "$" or _ENV_ASSIGNMENT.match(argv[0])):
            argv = argv[1:]
        if not argv or argv[0] != "privlora":
            continue
        command, path, tokens = root, ["privlora"], iter(argv[1:])
        for token in tokens:
            if token.startswith("-") and token != "-":
                name = token.split("=", 1)[0]
                option = _option(command, name)
                if option is None:  # whether it would take a value is unknown: stop reading this command
                    found.append(f"{' '.join(path)}: no option {name}")
                    break
                if not (option.is_flag or option.count) and "=" not in token:
                    for _ in range(option.nargs):
                        next(tokens, None)
            elif isinstance(command, click.Group):
                sub = command.commands.get(token)
                if sub is None:
                    found.append(f"{' '.join(path)}: no sub-command {token!r}")
                    break
                command, path = sub, [*path, token]
        else:
            if isinstance(command, click.Group) and not command.invoke_without_command:
                found.append(f"{' '.join(path)}: a group, needs a sub-command")
    return found


SHOWN = [(path, number, line) for path in DOCS for number, line in shown_commands(path)]


def test_docs_show_commands() -> None:
    # the scan itself must find the manual's commands, or every check below passes vacuously
    assert len(SHOWN) >= 60
    assert {"sanitize", "train", "audit", "federate", "split", "unlearn", "registry", "incident"} <= {
        argv[1] for _, _, line in SHOWN for argv in segments(line) if argv[0] == "privlora" and len(argv) > 1
    }


@pytest.mark.parametrize(
    ("path", "number", "line"), SHOWN, ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _ in SHOWN]
)
def test_shown_command_exists(path: Path, number: int, line: str) -> None:
    assert problems(line) == [], f"{path.relative_to(ROOT)}:{number}: {line}"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("privlora train --no-such-flag", ["privlora train: no option --no-such-flag"]),
        ("privlora nosuch --out x", ["privlora: no sub-command 'nosuch'"]),
        ("privlora registry users --add ana --revoke eve", ["privlora registry users: no option --revoke"]),
        ("privlora split", ["privlora split: a group, needs a sub-command"]),
        ("ls runs | privlora audit --sweep runs --bogus 3  # --alsobogus", ["privlora audit: no option --bogus"]),
    ],
)
def test_checker_rejects_wrong_commands(line: str, expected: list[str]) -> None:
    assert problems(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        'PRIVLORA_REGISTRY_TOKEN=<aud> privlora registry approve 1',
        "privlora train --config=configs/demo-plain.yaml --max-steps 3 --out /tmp/smoke",
        "privlora registry users --add ana --role researcher",  # options of a group that runs by itself
        "privlora audit --run demo/plain --run demo/dp --help",
        "$ privlora base info",
    ],
)
def test_checker_accepts_valid_commands(line: str) -> None:
    assert problems(line) == []


def test_continuation_and_comment_lines_are_joined(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text privlora --nope outside a block\n```bash\n# privlora --nope in a comment\n"
        "privlora train --config c.yaml \\\n    --no-such-flag --out x   # note\n```\n",
        encoding="utf-8",
    )
    shown = shown_commands(page)
    assert shown == [(4, "privlora train --config c.yaml      --no-such-flag --out x")]
    assert problems(shown[0][1]) == ["privlora train: no option --no-such-flag"]


def _hooks():
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "scripts" / "mkdocs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_site_hook_relinks_root_files() -> None:
    """README.md's root-relative links must resolve from docs/ once the site serves it as index.md."""
    relink = _hooks().relink
    text = "[a](docs/guide/audit.md#the-attacks) [b](BENCHMARKS.md) [c](https://x.org/docs/y) [d](#top)"
    assert relink(text) == "[a](guide/audit.md#the-attacks) [b](benchmarks.md) [c](https://x.org/docs/y) [d](#top)"


def test_readme_stays_short() -> None:
    """The README is the front page; the manual lives in docs/guide/ (issue 19)."""
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200
