"""Registry core (issue 8, first part): the access table cell by cell, and the hash-chained log."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from privlora.registry.access import RESOURCES, ROLES, TABLE, decide
from privlora.registry.ledger import Ledger, verify

ACTIONS = {"adapters": ("read", "write"), "training_data": ("read_sanitized", "read_full", "write"),
           "generation_logs": ("read_metadata", "read_full", "write"), "export": ("request", "approve"),
           "users": ("manage",), "incidents": ("open", "read", "close", "report"), "log": ("read",)}
# the seed's table, transcribed independently of access.TABLE: (role, resource, action) that are allowed
ALLOWED = {
    ("researcher", "adapters", "read"), ("researcher", "adapters", "write"),
    ("researcher", "training_data", "read_sanitized"),
    ("researcher", "generation_logs", "read_metadata"), ("researcher", "generation_logs", "read_full"),
    ("researcher", "export", "request"), ("researcher", "export", "approve"),
    ("engineer", "adapters", "read"), ("engineer", "generation_logs", "read_metadata"),
    ("auditor", "adapters", "read"), ("auditor", "training_data", "read_sanitized"),
    ("auditor", "training_data", "read_full"), ("auditor", "generation_logs", "read_metadata"),
    ("auditor", "generation_logs", "read_full"), ("auditor", "export", "approve"),
    ("admin", "users", "manage"),
    ("researcher", "incidents", "open"), ("auditor", "incidents", "open"), ("auditor", "incidents", "close"),
    ("researcher", "incidents", "read"), ("auditor", "incidents", "read"), ("auditor", "incidents", "report"),
    ("auditor", "log", "read"),
    ("researcher", "training_data", "write"), ("researcher", "generation_logs", "write"),
    ("engineer", "generation_logs", "write"),
}
CELLS = [(role, resource, action) for role in ROLES for resource in RESOURCES for action in ACTIONS[resource]]


@pytest.mark.parametrize("role, resource, action", CELLS)
def test_every_cell_of_the_access_table(role, resource, action):
    decision = decide(role, resource, action)
    assert decision.allowed == ((role, resource, action) in ALLOWED), decision


def test_conditions_beyond_the_table():
    assert not decide("researcher", "adapters", "read", quarantined=True).allowed
    assert not decide("engineer", "adapters", "read", quarantined=True).allowed
    assert decide("auditor", "adapters", "read", quarantined=True).allowed
    assert not decide("researcher", "export", "approve", actor="ana", requester="ana").allowed
    assert decide("auditor", "export", "approve", actor="bo", requester="ana").allowed
    assert not decide("intern", "adapters", "read").allowed and not decide("admin", "secrets", "read").allowed
    assert all("users" not in TABLE[r] for r in ("researcher", "engineer", "auditor"))
    assert set(TABLE["admin"]) == {"users"}  # the admin reads no data


@pytest.fixture()
def ledger(tmp_path):
    path = tmp_path / "registry.db"
    log = Ledger(f"sqlite:///{path}")
    for k in range(6):
        log.append(f"user{k % 2}", "pull", f"adapter-{k}", "denied" if k == 3 else "allowed", {"n": k})
    return log, path


def _sql(path, statement, *args):
    with sqlite3.connect(path) as db:
        db.execute(statement, args)


def test_intact_chain_verifies(ledger):
    log, _ = ledger
    entries = log.entries()
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5, 6] and verify(entries) == []
    assert entries[0]["prev_hash"] == "0" * 64 and log.head() == entries[-1]["hash"]
    assert entries[3]["result"] == "denied"  # denied attempts are logged like the rest


@pytest.mark.parametrize("tamper, kind, seq", [
    ("UPDATE audit_log SET target='adapter-x' WHERE seq=3", "edited", 3),
    ("UPDATE audit_log SET result='allowed' WHERE seq=4", "edited", 4),
    ("DELETE FROM audit_log WHERE seq=2", "removed", 3),
])
def test_edits_and_removals_are_detected(ledger, tamper, kind, seq):
    log, path = ledger
    _sql(path, tamper)
    problems = verify(log.entries())
    assert problems and problems[0].kind == kind and problems[0].seq == seq, problems


def test_reordering_is_detected(ledger):
    """Swapping two entries' places (their sequence numbers: seq is SQLite's row order) breaks the chain."""
    log, path = ledger
    with sqlite3.connect(path) as db:
        db.execute("UPDATE audit_log SET seq=-2 WHERE seq=2")
        db.execute("UPDATE audit_log SET seq=2 WHERE seq=3")
        db.execute("UPDATE audit_log SET seq=3 WHERE seq=-2")
    problems = verify(log.entries())
    assert problems and problems[0].seq == 2, problems


def test_rehashing_one_entry_breaks_the_next_link(ledger):
    """An editor who recomputes the edited entry's own hash still breaks the link of the entry after it."""
    from privlora.registry.ledger import entry_hash

    log, path = ledger
    e = log.entries()[2]
    forged = entry_hash(e["seq"], e["time"], e["actor"], e["action"], "adapter-forged", e["result"], e["detail"],
                        e["prev_hash"])
    _sql(path, "UPDATE audit_log SET target='adapter-forged', hash=? WHERE seq=3", forged)
    problems = verify(log.entries())
    assert problems and problems[0].seq == 4 and problems[0].kind == "broken", problems


def test_concurrent_appends_lose_nothing(tmp_path):
    log = Ledger(f"sqlite:///{tmp_path / 'r.db'}")
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(25):
                log.append(f"user{k}", "push", f"a{k}-{i}", "allowed")
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    entries = log.entries()
    assert len(entries) == 200 and verify(entries) == []
    assert {e["target"] for e in entries} == {f"a{k}-{i}" for k in range(8) for i in range(25)}


def _audit(**attacks: tuple[float, float]) -> dict:
    return {"attacks": {k: {"adapter": {"auc": a}, "base_control": {"auc": b}} for k, (a, b) in attacks.items()}}


def test_export_policy_bounds_what_the_adapter_adds_over_its_control():
    from privlora.registry.service import ExportPolicy

    policy = ExportPolicy()  # the server's defaults: +0.05 AUC over the base model, ε ≤ 10
    dp = {"audit": _audit(loss=(0.549, 0.549), pia=(0.609, 0.602)), "privacy": {"epsilon": 8.0}}  # README's DP demo
    plain = {"audit": _audit(loss=(0.724, 0.549), pia=(0.714, 0.602)), "privacy": {"mechanism": "none"}}
    assert policy.check(dp) is None
    assert "attack loss: AUC 0.724 is +0.175 over the base model's 0.549" in policy.check(plain)
    assert "0.609 > policy 0.6" in ExportPolicy(max_auc=0.6).check(dp)  # an absolute bound also judges the data
    assert "no audit attached" in policy.check({"audit": {}, "privacy": {}})
    assert "ε 12 > policy 10" in policy.check({**dp, "privacy": {"epsilon": 12.0}})
    bare = {"audit": {"attacks": {"loss": {"auc": 0.58}}}, "privacy": {}}  # no control: measured against chance
    assert "over chance (0.5)" in policy.check(bare)
    assert ExportPolicy(max_auc_gain=None, max_epsilon=None).check(bare) is None


def test_a_registry_from_an_older_version_gains_the_new_tables_and_columns(tmp_path):
    from privlora.registry.store import Store

    with sqlite3.connect(tmp_path / "registry.db") as db:  # the datasets table as the first version made it
        db.execute("CREATE TABLE datasets (id VARCHAR(64) PRIMARY KEY, name VARCHAR(200) NOT NULL, "
                   "kind VARCHAR(20) NOT NULL, owner VARCHAR(100) NOT NULL, created FLOAT NOT NULL)")
        db.execute("INSERT INTO datasets VALUES ('old', 'tweets', 'sanitized', 'ana', 1.0)")
    store = Store(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path)
    new = store.put_dataset(b"rows", name="faces", kind="full", owner="ana", fmt="tar")
    assert store.dataset("old")["format"] is None and store.dataset(new)["format"] == "tar"
    with sqlite3.connect(tmp_path / "registry.db") as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"adapter_files", "incident_reports", "audit_log"} <= tables
