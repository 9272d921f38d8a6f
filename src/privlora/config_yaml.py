"""Reading YAML that may be hostile, and quoting it in one-line errors.

Config files, ``--set`` values and the ``config.yaml`` of a run pushed to the registry all pass through
:func:`safe_yaml`: a bound on alias expansion ("billion laughs") before any object is built. :func:`clip`
and :func:`quote` keep a huge value from becoming a huge error line. :mod:`privlora.config` re-exports
every public name here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from privlora.errors import UserError

#: most nodes that YAML aliases (and ``<<`` merges) may add to a document once expanded. A config has a few
#: hundred nodes; nine levels of nine aliases ("billion laughs") would add 387 million, which the parser
#: holds as shared references but validation and error messages expand — gigabytes before any check.
MAX_ALIAS_NODES = 10_000
#: the longest value an error message quotes (a 10 MB string in a wrong field must not become a 10 MB line)
MAX_QUOTE = 200


def clip(text: str, limit: int = MAX_QUOTE) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis and the full length when it was longer."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def quote(value: Any, limit: int = MAX_QUOTE) -> str:
    """``repr(value)`` for an error message, cut by :func:`clip`."""
    return clip(repr(value), limit)


class AliasBomb(yaml.YAMLError):
    """A document whose aliases expand too far (or into themselves)."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node, limit: int = MAX_ALIAS_NODES) -> None:
    """Refuse a composed document whose aliases add more than ``limit`` nodes once expanded, or refer to
    a node that contains them. The walk visits each distinct node once (sizes memoised), so it costs
    what the file holds, not what it would expand to."""
    size: dict[int, int] = {}
    open_: set[int] = set()  # nodes on the current path: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in _children(node))
            if size[key] - len(size) > limit:
                raise AliasBomb(f"its aliases expand to more than {limit:,} extra nodes (an alias bomb?)")
            continue
        if key in size:
            continue
        if key in open_:
            raise AliasBomb("an alias refers to a node that contains it (a recursive document)")
        open_.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in size)


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that checks alias expansion after composing, before any object is built."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _check_expansion(node)
        return node


def safe_yaml(text: str) -> Any:
    """``yaml.safe_load`` with a bound on alias expansion; raises ``yaml.YAMLError`` (alias bombs included)
    or RecursionError (absurdly deep nesting)."""
    return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass



def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing or malformed file."""
    try:
        data = safe_yaml(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except AliasBomb as e:
        raise UserError(f"config file {path} is refused: {e}") from None
    except RecursionError:
        raise UserError(f"config file {path} is nested too deeply to be a config") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {clip(str(e).splitlines()[0])}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data
