"""The registry's records (SQLAlchemy Core: SQLite file by default, any SQLAlchemy URL) and blobs on disk.

Adapters are content-addressed: the id is the sha256 of ``adapter_model.safetensors``; the blob is
written to ``<root>/blobs/<id>.safetensors`` through a temporary file and a rename, so a failed or
concurrent push never leaves half a file, and the same adapter pushed twice is stored once. The run
files an audit needs (``config.yaml``, ``splits.json``) are blobs too (``<sha256>.file``), listed per
adapter in ``adapter_files``. API tokens are stored as their sha256 only.

Schema changes are additive (new tables, new nullable columns) and applied on open, so a registry
created by an earlier version keeps working.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from privlora.extras import missing_extra

try:  # the 'registry' extra
    import sqlalchemy as sa
except ModuleNotFoundError as e:
    raise (missing_extra(e) or e) from None

from privlora.registry.ledger import _META  # one metadata: the log lives in the same database

USERS = sa.Table(
    "users", _META,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("role", sa.String(20), nullable=False),
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("expires", sa.Float, nullable=True),  # the token's expiry (unix time); None: issued before expiry
    sa.Column("revoked", sa.Float, nullable=True),  # when an admin revoked the token
)
ADAPTERS = sa.Table(
    "adapters", _META,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("owner", sa.String(100), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("config", sa.Text, nullable=False),  # adapter_config.json
    sa.Column("privacy", sa.Text, nullable=False),  # privacy.json ({} if none)
    sa.Column("audit", sa.Text, nullable=False),  # latest *established* audit results.json ({} if none)
    sa.Column("quarantined", sa.Boolean, nullable=False, default=False),
    sa.Column("audit_by", sa.String(100), nullable=True),  # "registry" or the auditor; None: no audit of ours
    sa.Column("claimed_audit", sa.Text, nullable=True),  # the pusher's results.json: stored, never trusted
    sa.Column("audit_flags", sa.Text, nullable=True),  # JSON list: where the claim disagrees with the audit
    sa.Column("epsilon", sa.Float, nullable=True),  # ε recomputed from the recorded mechanism (claims.py)
)
EXPORTS = sa.Table(
    "exports", _META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("adapter", sa.String(64), nullable=False),
    sa.Column("requester", sa.String(100), nullable=False),
    sa.Column("approver", sa.String(100), nullable=True),
    sa.Column("status", sa.String(20), nullable=False),  # requested | approved
    sa.Column("created", sa.Float, nullable=False),
)
DATASETS = sa.Table(
    "datasets", _META,
    sa.Column("id", sa.String(64), primary_key=True),  # sha256 of the bytes
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),  # sanitized | full
    sa.Column("owner", sa.String(100), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("format", sa.String(10), nullable=True),  # file | tar (a folder, packed); None: file
)
GENERATIONS = sa.Table(
    "generations", _META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("adapter", sa.String(64), nullable=False),
    sa.Column("actor", sa.String(100), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("params", sa.Text, nullable=False),  # metadata: seed, steps, … (no content)
    sa.Column("prompt", sa.Text, nullable=False),  # content: only full readers see it
    sa.Column("image_sha256", sa.String(64), nullable=True),  # content blob (blobs/<sha>.bin)
)
INCIDENTS = sa.Table(
    "incidents", _META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("adapter", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("opened_by", sa.String(100), nullable=False),
    sa.Column("opened", sa.Float, nullable=False),
    sa.Column("resolution", sa.Text, nullable=True),
    sa.Column("closed_by", sa.String(100), nullable=True),
    sa.Column("closed", sa.Float, nullable=True),
)
ADAPTER_FILES = sa.Table(
    "adapter_files", _META,
    sa.Column("adapter", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(100), primary_key=True),  # config.yaml | splits.json
    sa.Column("sha256", sa.String(64), nullable=False),
)
INCIDENT_REPORTS = sa.Table(
    "incident_reports", _META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("incident", sa.Integer, nullable=False),
    sa.Column("by", sa.String(100), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # audited | not_audited
    sa.Column("report", sa.Text, nullable=False),  # results.json of the re-audit, or {"reason": …}
)


def _add_missing_columns(engine: sa.Engine) -> None:
    """Add the nullable columns a newer version declares to tables an older one created."""
    inspector = sa.inspect(engine)
    with engine.begin() as db:
        for table in _META.sorted_tables:
            have = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in have and column.nullable:
                    kind = column.type.compile(dialect=engine.dialect)
                    db.execute(sa.text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Store:
    """Rows in the database at ``url``; adapter blobs under ``root``."""

    def __init__(self, url: str, root: Path) -> None:
        self.engine = sa.create_engine(url)
        _META.create_all(self.engine)
        _add_missing_columns(self.engine)
        self.blobs = Path(root) / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)

    # users
    def add_user(self, name: str, role: str, token: str, *, expires: float | None) -> None:
        with self.engine.begin() as db:
            db.execute(USERS.insert().values(name=name, role=role, token_sha256=token_hash(token), created=time.time(),
                                             expires=expires))

    def user_by_token(self, token: str) -> dict[str, Any] | None:
        with self.engine.connect() as db:
            row = db.execute(sa.select(USERS.c.name, USERS.c.role, USERS.c.created, USERS.c.expires,
                                       USERS.c.revoked).where(
                USERS.c.token_sha256 == token_hash(token))).first()
        return dict(row._mapping) if row else None

    def users(self) -> list[dict[str, Any]]:
        cols = [USERS.c.name, USERS.c.role, USERS.c.created, USERS.c.expires, USERS.c.revoked]
        with self.engine.connect() as db:
            return [dict(r._mapping) for r in db.execute(sa.select(*cols))]

    def revoke_user(self, name: str) -> None:
        with self.engine.begin() as db:
            db.execute(USERS.update().where(USERS.c.name == name).values(revoked=time.time()))

    def has_user(self, name: str) -> bool:
        with self.engine.connect() as db:
            return db.execute(sa.select(USERS.c.name).where(USERS.c.name == name)).first() is not None

    # adapters
    def put_adapter(self, weights: bytes, *, name: str, owner: str, config: dict[str, Any],
                    privacy: dict[str, Any], claimed_audit: dict[str, Any], epsilon: float | None,
                    files: dict[str, bytes] | None = None) -> tuple[str, bool]:
        """Store (idempotently) with its run files; returns (id, created). A re-push adds files it lacked.
        The pusher's audit is kept as ``claimed_audit``; ``audit`` (what the policy reads) starts empty."""
        digest = self.put_blob(weights, ".safetensors")
        stored = {name: self.put_blob(data, ".file") for name, data in (files or {}).items()}
        with self.engine.begin() as db:
            created = not db.execute(sa.select(ADAPTERS.c.id).where(ADAPTERS.c.id == digest)).first()
            if created:
                db.execute(ADAPTERS.insert().values(id=digest, name=name, owner=owner, created=time.time(),
                                                    config=json.dumps(config), privacy=json.dumps(privacy),
                                                    audit="{}", claimed_audit=json.dumps(claimed_audit),
                                                    epsilon=epsilon, quarantined=False))
            have = {r.name for r in db.execute(sa.select(ADAPTER_FILES.c.name).where(
                ADAPTER_FILES.c.adapter == digest))}
            for file_name, sha in stored.items():
                if file_name not in have:
                    db.execute(ADAPTER_FILES.insert().values(adapter=digest, name=file_name, sha256=sha))
        return digest, created

    def adapter_files(self, adapter_id: str) -> dict[str, str]:
        """Run file name → sha256 of its blob."""
        with self.engine.connect() as db:
            return {r.name: r.sha256 for r in db.execute(sa.select(ADAPTER_FILES).where(
                ADAPTER_FILES.c.adapter == adapter_id))}

    def adapter(self, adapter_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as db:
            row = db.execute(sa.select(ADAPTERS).where(ADAPTERS.c.id == adapter_id)).first()
        if row is None:
            return None
        out = dict(row._mapping)
        for key, empty in (("config", "{}"), ("privacy", "{}"), ("audit", "{}"), ("claimed_audit", "{}"),
                           ("audit_flags", "[]")):
            out[key] = json.loads(out[key] or empty)
        return out

    def adapters(self) -> list[dict[str, Any]]:
        cols = [ADAPTERS.c.id, ADAPTERS.c.name, ADAPTERS.c.owner, ADAPTERS.c.created, ADAPTERS.c.quarantined]
        with self.engine.connect() as db:
            return [dict(r._mapping) for r in db.execute(sa.select(*cols).order_by(ADAPTERS.c.created))]

    def put_blob(self, data: bytes, suffix: str) -> str:
        """Content-addressed blob (temporary file + rename); returns its sha256."""
        digest = hashlib.sha256(data).hexdigest()
        final = self.blobs / f"{digest}{suffix}"
        if not final.exists():
            fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".upload-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        return digest

    def blob(self, digest: str, suffix: str) -> bytes:
        return (self.blobs / f"{digest}{suffix}").read_bytes()

    # datasets and generation logs
    def put_dataset(self, data: bytes, *, name: str, kind: str, owner: str, fmt: str = "file") -> str:
        digest = self.put_blob(data, ".data")
        with self.engine.begin() as db:
            if not db.execute(sa.select(DATASETS.c.id).where(DATASETS.c.id == digest)).first():
                db.execute(DATASETS.insert().values(id=digest, name=name, kind=kind, owner=owner, created=time.time(),
                                                    format=fmt))
        return digest

    def dataset(self, dataset_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as db:
            row = db.execute(sa.select(DATASETS).where(DATASETS.c.id == dataset_id)).first()
        return dict(row._mapping) if row else None

    def datasets(self) -> list[dict[str, Any]]:
        with self.engine.connect() as db:
            return [dict(r._mapping) for r in db.execute(sa.select(DATASETS).order_by(DATASETS.c.created))]

    def add_generation(self, *, adapter: str, actor: str, prompt: str, params: dict[str, Any],
                       image: bytes | None) -> int:
        image_sha = self.put_blob(image, ".bin") if image else None
        with self.engine.begin() as db:
            result = db.execute(GENERATIONS.insert().values(adapter=adapter, actor=actor, created=time.time(),
                                                            params=json.dumps(params), prompt=prompt,
                                                            image_sha256=image_sha))
            return int(result.inserted_primary_key[0])

    def generations(self) -> list[dict[str, Any]]:
        with self.engine.connect() as db:
            rows = [dict(r._mapping) for r in db.execute(sa.select(GENERATIONS).order_by(GENERATIONS.c.id))]
        for r in rows:
            r["params"] = json.loads(r["params"])
        return rows

    def weights(self, adapter_id: str) -> bytes:
        return (self.blobs / f"{adapter_id}.safetensors").read_bytes()

    def set_quarantine(self, adapter_id: str, value: bool) -> None:
        with self.engine.begin() as db:
            db.execute(ADAPTERS.update().where(ADAPTERS.c.id == adapter_id).values(quarantined=value))

    def set_audit(self, adapter_id: str, audit: dict[str, Any], *, by: str, flags: list[str]) -> None:
        """The adapter's established audit (the registry's own run, or an auditor's) and where the pusher's
        claim disagrees with it."""
        with self.engine.begin() as db:
            db.execute(ADAPTERS.update().where(ADAPTERS.c.id == adapter_id).values(
                audit=json.dumps(audit), audit_by=by, audit_flags=json.dumps(flags)))

    # exports
    def request_export(self, adapter_id: str, requester: str) -> int:
        with self.engine.begin() as db:
            result = db.execute(EXPORTS.insert().values(adapter=adapter_id, requester=requester, status="requested",
                                                        created=time.time()))
            return int(result.inserted_primary_key[0])

    def export(self, export_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as db:
            row = db.execute(sa.select(EXPORTS).where(EXPORTS.c.id == export_id)).first()
        return dict(row._mapping) if row else None

    def approve_export(self, export_id: int, approver: str) -> None:
        with self.engine.begin() as db:
            db.execute(EXPORTS.update().where(EXPORTS.c.id == export_id).values(approver=approver, status="approved"))

    # incidents
    def open_incident(self, adapter_id: str, reason: str, by: str) -> int:
        with self.engine.begin() as db:
            result = db.execute(INCIDENTS.insert().values(adapter=adapter_id, reason=reason, opened_by=by,
                                                          opened=time.time()))
            return int(result.inserted_primary_key[0])

    def incident(self, incident_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as db:
            row = db.execute(sa.select(INCIDENTS).where(INCIDENTS.c.id == incident_id)).first()
        return dict(row._mapping) if row else None

    def close_incident(self, incident_id: int, resolution: str, by: str) -> None:
        with self.engine.begin() as db:
            db.execute(INCIDENTS.update().where(INCIDENTS.c.id == incident_id).values(
                resolution=resolution, closed_by=by, closed=time.time()))

    def incidents(self) -> list[dict[str, Any]]:
        with self.engine.connect() as db:
            return [dict(r._mapping) for r in db.execute(sa.select(INCIDENTS).order_by(INCIDENTS.c.id))]

    def add_report(self, incident_id: int, *, by: str, status: str, report: dict[str, Any]) -> int:
        with self.engine.begin() as db:
            result = db.execute(INCIDENT_REPORTS.insert().values(incident=incident_id, by=by, created=time.time(),
                                                                 status=status, report=json.dumps(report)))
            return int(result.inserted_primary_key[0])

    def reports(self, incident_id: int) -> list[dict[str, Any]]:
        with self.engine.connect() as db:
            rows = [dict(r._mapping) for r in db.execute(sa.select(INCIDENT_REPORTS).where(
                INCIDENT_REPORTS.c.incident == incident_id).order_by(INCIDENT_REPORTS.c.id))]
        for r in rows:
            r["report"] = json.loads(r["report"])
        return rows

    def open_incidents(self, adapter_id: str) -> int:
        with self.engine.connect() as db:
            return len(db.execute(sa.select(INCIDENTS.c.id).where(
                (INCIDENTS.c.adapter == adapter_id) & INCIDENTS.c.closed.is_(None))).all())
