"""A tamper-evident action log: every entry carries the hash of the one before it.

``hash_i = sha256(canonical JSON of (seq, time, actor, action, target, result, detail) ‖ hash_{i-1})`` with the
genesis ``prev = 64 zeros``. :func:`verify` recomputes the chain and names the first entry that was
edited (its hash no longer matches), removed (sequence gap / broken link) or moved (out of order). What a
chain cannot show on its own: the *last* entries being cut off, or the whole log rewritten by someone
holding the database — publish :meth:`Ledger.head` elsewhere (a ticket, a signed mail) to anchor it.

Stored with SQLAlchemy Core (SQLite file by default; any SQLAlchemy URL). Appends are serialised by a
process lock and one transaction each, so the chain stays linear under concurrent requests.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

GENESIS = "0" * 64
_META = sa.MetaData()
LOG = sa.Table(
    "audit_log", _META,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(100), nullable=False),
    sa.Column("target", sa.String(300), nullable=False),
    sa.Column("result", sa.String(40), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)


def entry_hash(seq: int, when: float, actor: str, action: str, target: str, result: str, detail: str,
               prev_hash: str) -> str:
    body = json.dumps([seq, repr(when), actor, action, target, result, detail], ensure_ascii=False,
                      separators=(",", ":"))
    return hashlib.sha256((body + prev_hash).encode()).hexdigest()


@dataclass(frozen=True)
class Problem:
    seq: int
    kind: str  # edited | removed | reordered | broken
    message: str


class Ledger:
    """Append and read the chained log in the database at ``url`` (e.g. ``sqlite:///registry.db``)."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url)
        _META.create_all(self.engine, tables=[LOG])
        self._lock = threading.Lock()

    def append(self, actor: str, action: str, target: str, result: str, detail: dict[str, Any] | None = None
               ) -> dict[str, Any]:
        """Record one action (allowed or denied) and return the stored entry."""
        text = json.dumps(detail or {}, sort_keys=True, ensure_ascii=False)
        with self._lock, self.engine.begin() as db:
            last = db.execute(sa.select(LOG.c.seq, LOG.c.hash).order_by(LOG.c.seq.desc()).limit(1)).first()
            seq, prev = (last.seq + 1, last.hash) if last else (1, GENESIS)
            when = time.time()
            row = {"seq": seq, "time": when, "actor": actor, "action": action, "target": target, "result": result,
                   "detail": text, "prev_hash": prev,
                   "hash": entry_hash(seq, when, actor, action, target, result, text, prev)}
            db.execute(LOG.insert().values(**row))
        return row

    def entries(self) -> list[dict[str, Any]]:
        """All entries in sequence order (moving an entry means changing its seq, which its hash covers)."""
        with self.engine.connect() as db:
            return [dict(r._mapping) for r in db.execute(sa.select(LOG).order_by(LOG.c.seq))]

    def head(self) -> str:
        """Hash of the last entry: publish it to anchor the log against truncation."""
        entries = self.entries()
        return entries[-1]["hash"] if entries else GENESIS


def verify(entries: list[dict[str, Any]]) -> list[Problem]:
    """Every break in the chain, first one first; an empty list means the log is intact."""
    problems: list[Problem] = []
    prev_hash, expected_seq = GENESIS, 1
    for e in entries:
        recomputed = entry_hash(e["seq"], e["time"], e["actor"], e["action"], e["target"], e["result"], e["detail"],
                                e["prev_hash"])
        if recomputed != e["hash"]:
            problems.append(Problem(e["seq"], "edited", f"entry {e['seq']} does not match its hash (edited)"))
        if e["seq"] < expected_seq:
            problems.append(Problem(e["seq"], "reordered", f"entry {e['seq']} appears after entry "
                                                           f"{expected_seq - 1} (moved)"))
        elif e["seq"] > expected_seq:
            problems.append(Problem(e["seq"], "removed", f"entries {expected_seq}..{e['seq'] - 1} are missing "
                                                         "(removed)"))
        elif e["prev_hash"] != prev_hash:
            problems.append(Problem(e["seq"], "broken", f"entry {e['seq']} does not link to the entry before it"))
        prev_hash, expected_seq = e["hash"], max(expected_seq, e["seq"] + 1)
    return problems
