"""A tamper-evident action log: every entry carries the hash of the one before it.

``hash_i = sha256(canonical JSON of (seq, time, actor, action, target, result, detail) ‖ hash_{i-1})`` with the
genesis ``prev = 64 zeros``. :func:`verify` recomputes the chain and names the first entry that was
edited (its hash no longer matches), removed (sequence gap / broken link) or moved (out of order). What a
chain cannot show on its own: the *last* entries being cut off, or the whole log rewritten by someone
holding the database. Hence signed checkpoints: with a :class:`~privlora.registry.signing.LogSigner`, every
append also writes ``(entries covered, head, Ed25519 signature)`` to ``log_checkpoints`` in the same
transaction, and the latest one to a file beside the key (outside the database, so deleting checkpoint
rows together with the entries they cover still shows). :meth:`Ledger.checkpoint_problems` checks the
signatures and that the chain still reaches the signed head at the signed count. Publishing
:meth:`Ledger.head` elsewhere (``verify-log --expect-head``) remains a second, independent anchor.

Stored with SQLAlchemy Core (SQLite file by default; any SQLAlchemy URL). Appends are serialised by a
process lock and one transaction each, so the chain stays linear under concurrent requests.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privlora.extras import missing_extra

try:  # the 'registry' extra
    import sqlalchemy as sa
except ModuleNotFoundError as e:
    raise (missing_extra(e) or e) from None

if TYPE_CHECKING:
    from privlora.registry.signing import LogSigner

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
CHECKPOINTS = sa.Table(
    "log_checkpoints", _META,
    sa.Column("count", sa.Integer, primary_key=True, autoincrement=False),  # entries 1..count covered
    sa.Column("head", sa.String(64), nullable=False),  # hash of entry ``count``
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("signature", sa.String(128), nullable=False),  # Ed25519 over (count, head), hex
)


def entry_hash(seq: int, when: float, actor: str, action: str, target: str, result: str, detail: str,
               prev_hash: str) -> str:
    body = json.dumps([seq, repr(when), actor, action, target, result, detail], ensure_ascii=False,
                      separators=(",", ":"))
    return hashlib.sha256((body + prev_hash).encode()).hexdigest()


@dataclass(frozen=True)
class Problem:
    seq: int
    kind: str  # edited | removed | reordered | broken | checkpoint
    message: str


class Ledger:
    """Append and read the chained log in the database at ``url`` (e.g. ``sqlite:///registry.db``)."""

    def __init__(self, url: str, signer: LogSigner | None = None) -> None:
        self.engine = sa.create_engine(url)
        _META.create_all(self.engine, tables=[LOG, CHECKPOINTS])
        self.lock = threading.Lock()
        self.signer = signer
        self.head_file = signer.path.with_name(signer.path.name + ".head") if signer else None

    def append(self, actor: str, action: str, target: str, result: str, detail: dict[str, Any] | None = None
               ) -> dict[str, Any]:
        """Record one action (allowed or denied) and return the stored entry."""
        text = json.dumps(detail or {}, sort_keys=True, ensure_ascii=False)
        with self.lock:
            with self.engine.begin() as db:
                last = db.execute(sa.select(LOG.c.seq, LOG.c.hash).order_by(LOG.c.seq.desc()).limit(1)).first()
                seq, prev = (last.seq + 1, last.hash) if last else (1, GENESIS)
                when = time.time()
                row = {"seq": seq, "time": when, "actor": actor, "action": action, "target": target,
                       "result": result, "detail": text, "prev_hash": prev,
                       "hash": entry_hash(seq, when, actor, action, target, result, text, prev)}
                db.execute(LOG.insert().values(**row))
                signing = self.signer is not None and self._extends_signed_head(last)
                if signing:
                    checkpoint = {"count": seq, "head": row["hash"], "time": when,
                                  "signature": self.signer.sign(seq, row["hash"])}
                    db.execute(CHECKPOINTS.insert().values(**checkpoint))
            if signing:
                self._write_head_file(checkpoint)
        return row

    def _signed_head_file(self) -> dict[str, Any] | None:
        """The checkpoint in the file outside the database, if its signature verifies."""
        assert self.signer is not None and self.head_file is not None
        try:
            c = json.loads(self.head_file.read_text())
            return c if self.signer.verifies(int(c["count"]), str(c["head"]), str(c["signature"])) else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _extends_signed_head(self, last: Any) -> bool:
        """Sign a new entry only if the chain still ends at the signed head: otherwise signing would launder an
        edit, a truncation or a rewrite made in the database since (the old checkpoint keeps showing it)."""
        assert self.head_file is not None
        if not self.head_file.exists():
            return True  # a new log, or one from before checkpoints: start signing here
        signed = self._signed_head_file()
        return signed is not None and last is not None and (int(signed["count"]), signed["head"]) == (last.seq,
                                                                                                      last.hash)

    def _write_head_file(self, checkpoint: dict[str, Any]) -> None:
        """The latest checkpoint outside the database (temporary file + rename; never moves backwards)."""
        assert self.head_file is not None
        try:
            if json.loads(self.head_file.read_text())["count"] >= checkpoint["count"]:
                return
        except (OSError, ValueError, KeyError, TypeError):
            pass
        tmp = self.head_file.with_name(f".{self.head_file.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps(checkpoint))
        os.replace(tmp, self.head_file)

    def checkpoints(self) -> list[dict[str, Any]]:
        with self.engine.connect() as db:
            return [dict(r._mapping) for r in db.execute(sa.select(CHECKPOINTS).order_by(CHECKPOINTS.c.count))]

    def checkpoint_problems(self, entries: list[dict[str, Any]]) -> tuple[list[Problem], dict[str, Any] | None]:
        """Problems with the signed checkpoints, and the latest valid one: every stored signature must verify,
        and the chain must still hold the latest signed head at the latest signed count."""
        if self.signer is None:
            return [], None
        problems: list[Problem] = []
        candidates = self.checkpoints()[-1:]
        if self.head_file is not None and self.head_file.exists():
            try:
                candidates.append(json.loads(Path(self.head_file).read_text()))
            except (OSError, ValueError):
                problems.append(Problem(0, "checkpoint", f"the checkpoint file {self.head_file} is unreadable"))
        valid = []
        for c in candidates:
            try:
                ok = self.signer.verifies(int(c["count"]), str(c["head"]), str(c["signature"]))
            except (KeyError, TypeError, ValueError):
                ok = False
            if ok:
                valid.append(c)
            else:
                problems.append(Problem(int(c.get("count", 0)) if isinstance(c.get("count"), int) else 0,
                                        "checkpoint", "a log checkpoint's signature does not verify (forged or "
                                        "edited checkpoint)"))
        if not valid:
            if entries and not problems:
                problems.append(Problem(0, "checkpoint", "no signed checkpoint covers this log"))
            return problems, None
        latest = max(valid, key=lambda c: int(c["count"]))
        count, head = int(latest["count"]), str(latest["head"])
        reached = next((e for e in entries if e["seq"] == count), None)
        if len(entries) < count or reached is None:
            problems.append(Problem(count, "checkpoint", f"the signed checkpoint covers {count} entries but the "
                                    f"log holds {len(entries)} (entries cut off)"))
        elif reached["hash"] != head:
            problems.append(Problem(count, "checkpoint", f"entry {count} is not the signed head {head[:16]}… "
                                    "(log rewritten)"))
        return problems, latest

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
