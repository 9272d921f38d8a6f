"""Instruction data for ``task: causal-lm``: JSONL records or the built-in ``demo:support``.

A JSONL file holds one JSON object per line, in one of two shapes:

* ``{"prompt": "...", "response": "..."}`` — one user turn and the answer to learn;
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` — a chat whose *last*
  message is the assistant's answer to learn; everything before it is the prompt.

An optional ``id`` field names the record (else ``<file>:<line>``). How the prompt is rendered into text
(the tokenizer's chat template, or privlora's plain ``### User:`` template) is the Task's business, not
the data's: one file trains any base.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privlora.errors import UserError

Message = tuple[str, str]  # (role, content)
ROLES = ("system", "user", "assistant")


@dataclass
class InstructionSet:
    """Ids, prompts (message tuples) and responses; ``pii`` lists what a demo record planted (else empty)."""

    ids: list[str]
    prompts: list[tuple[Message, ...]]
    responses: list[str]
    pii: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: list[int]) -> InstructionSet:
        return InstructionSet([self.ids[i] for i in indices], [self.prompts[i] for i in indices],
                              [self.responses[i] for i in indices],
                              [self.pii[i] for i in indices] if self.pii else [])

    def by_ids(self, wanted: list[str]) -> InstructionSet:
        """Subset by id, in the order given."""
        position = {sample_id: i for i, sample_id in enumerate(self.ids)}
        missing = [w for w in wanted if w not in position]
        if missing:
            raise UserError(f"the data has no record {missing[0]!r} ({len(missing)} of the split's ids are "
                            "missing: was the data source changed since the split was made?)")
        return self.subset([position[w] for w in wanted])

    def concat(self, other: InstructionSet) -> InstructionSet:
        pii = self.pii + other.pii if self.pii and other.pii else []
        return InstructionSet(self.ids + other.ids, self.prompts + other.prompts, self.responses + other.responses,
                              pii)

    def batch(self, indices: list[int]) -> dict[str, Any]:
        """The Task's batch: prompts (message tuples) and responses."""
        return {"prompts": [self.prompts[i] for i in indices], "responses": [self.responses[i] for i in indices]}


def _messages(value: Any, where: str) -> tuple[tuple[Message, ...], str]:
    """A chat ``messages`` list → (prompt messages, the final assistant answer)."""
    if not isinstance(value, list) or len(value) < 2:
        raise UserError(f"{where}: 'messages' must be a list of at least two messages (a prompt and the answer)")
    turns: list[Message] = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: messages[{k}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: messages[{k}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        turns.append((m["role"], m["content"]))
    if turns[-1][0] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's answer to learn, "
                        f"not a {turns[-1][0]!r} message")
    if not turns[-1][1].strip():
        raise UserError(f"{where}: the assistant's answer is empty")
    return tuple(turns[:-1]), turns[-1][1]


def _record(row: Any, where: str) -> tuple[tuple[Message, ...], str]:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return _messages(row["messages"], where)
    if "prompt" in row and "response" in row:
        prompt, response = row["prompt"], row["response"]
        if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
            raise UserError(f"{where}: 'prompt' and 'response' must be strings and the response non-empty")
        return (("user", prompt),), response
    found = ", ".join(repr(k) for k in row) or "none"
    raise UserError(f"{where}: expected 'prompt' and 'response' fields or a chat 'messages' list; "
                    f"found fields: {found}")


def load_jsonl(path: str | Path) -> InstructionSet:
    """Every non-blank line of ``path`` as one record (see the module docstring for the shapes)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"instruction data {path} does not exist (give a .jsonl file or demo:support)")
    if path.suffix.lower() != ".jsonl":
        raise UserError(f"{path}: instruction data must be a .jsonl file (one JSON object per line)")
    ids, prompts, responses = [], [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        prompt, response = _record(row, where)
        ids.append(str(row["id"]) if isinstance(row.get("id"), (str, int)) else f"{path.name}:{number}")
        prompts.append(prompt)
        responses.append(response)
    if not ids:
        raise UserError(f"{path} holds no records")
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: record ids repeat (e.g. {next(i for i in ids if ids.count(i) > 1)!r}); "
                        "every record needs its own id for the member / non-member splits")
    return InstructionSet(ids, prompts, responses)


def support(n: int | None = None, seed: int = 0) -> InstructionSet:
    """``demo:support`` (:mod:`privlora.data.support`): invented customer-service records with planted PII."""
    from privlora.data.support import DEFAULT_SIZE, support_records

    records = support_records(n or DEFAULT_SIZE, seed)
    return InstructionSet([str(r["id"]) for r in records], [(("user", str(r["prompt"])),) for r in records],
                          [str(r["response"]) for r in records], [dict(r["pii"]) for r in records])


#: the built-in instruction sets (``data.source: demo:…``) beside demo.BUILTIN's image sets
INSTRUCTION_DEMOS: dict[str, Callable[[], InstructionSet]] = {"demo:support": support}


def load_instruction_dataset(source: str, *, limit: int | None = None) -> InstructionSet:
    """A built-in set or a JSONL file; ``limit`` keeps a fixed random sample (seed 0, file order kept), as
    image data's ``data.limit``: reference adapters under other seeds must see the same population."""
    if source in INSTRUCTION_DEMOS:
        data = INSTRUCTION_DEMOS[source]()
    elif source.startswith("demo:"):
        raise UserError(f"unknown instruction demo {source!r}; the built-in one is {', '.join(INSTRUCTION_DEMOS)}")
    else:
        data = load_jsonl(source)
    if limit is None or limit >= len(data):
        return data
    return data.subset(sorted(random.Random(0).sample(range(len(data)), limit)))
