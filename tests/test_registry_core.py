"""Registry core (issue 8, first part): the access table cell by cell, and the hash-chained log."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from privlora.registry.access import RESOURCES, ROLES, TABLE, decide
from privlora.registry.ledger import Ledger, verify

ACTIONS = {"adapters": ("read", "write", "audit"), "training_data": ("read_sanitized", "read_full", "write"),
           "generation_logs": ("read_metadata", "read_full", "write"), "export": ("request", "approve"),
           "users": ("manage",), "incidents": ("open", "read", "close", "report"), "log": ("read",)}
# the seed's table, transcribed independently of access.TABLE: (role, resource, action) that are allowed
ALLOWED = {
    ("researcher", "adapters", "read"), ("researcher", "adapters", "write"),
    ("researcher", "training_data", "read_sanitized"),
    ("researcher", "generation_logs", "read_metadata"), ("researcher", "generation_logs", "read_full"),
    ("researcher", "export", "request"), ("researcher", "export", "approve"),
    ("engineer", "adapters", "read"), ("engineer", "generation_logs", "read_metadata"),
    ("auditor", "adapters", "read"), ("auditor", "adapters", "audit"), ("auditor", "training_data", "read_sanitized"),
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
    # README's DP demo, audited by the registry; ε as the registry recomputed it
    dp = {"audit": _audit(loss=(0.549, 0.549), pia=(0.609, 0.602)), "audit_by": "registry", "epsilon": 8.0}
    plain = {"audit": _audit(loss=(0.724, 0.549), pia=(0.714, 0.602)), "audit_by": "aud", "epsilon": None}
    assert policy.check(dp) is None
    assert "attack loss: AUC 0.724 is +0.175 over the base model's 0.549" in policy.check(plain)
    assert "0.609 > policy 0.6" in ExportPolicy(max_auc=0.6).check(dp)  # an absolute bound also judges the data
    assert "no audit established" in policy.check({"audit": {}, "epsilon": None})
    assert "no audit established" in policy.check({**dp, "audit_by": None})  # the pusher's numbers never count
    assert "ε 12 (recomputed" in policy.check({**dp, "epsilon": 12.0})
    bare = {"audit": {"attacks": {"loss": {"auc": 0.58}}}, "audit_by": "aud", "epsilon": None}  # no control: chance
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


# --- signed checkpoints (issue 18): truncation and a rewritten chain fail verify-log without --expect-head -----

def _signed_registry(tmp_path):
    from privlora.registry.service import Principal, Registry

    registry = Registry(tmp_path / "reg", log_key=tmp_path / "keys" / "log.key")
    for k in range(6):
        registry.ledger.append("ana", "adapters.read", f"a{k}", "allowed")
    return registry, Principal("aud", "auditor")


def test_the_signing_key_lives_outside_the_database_with_0600(tmp_path):
    registry, auditor = _signed_registry(tmp_path)
    key = tmp_path / "keys" / "log.key"
    assert key.stat().st_mode & 0o777 == 0o600 and b"PRIVATE KEY" in key.read_bytes()
    assert key.read_bytes() not in (tmp_path / "reg" / "registry.db").read_bytes()
    result = registry.verify_log(auditor)
    assert result["intact"] and result["checkpoint"]["count"] == len(registry.ledger.entries())


def test_a_truncated_log_fails_verification(tmp_path):
    registry, auditor = _signed_registry(tmp_path)
    with sqlite3.connect(tmp_path / "reg" / "registry.db") as db:  # cut the tail and its checkpoints
        db.execute("DELETE FROM audit_log WHERE seq > 4")
        db.execute("DELETE FROM log_checkpoints WHERE count > 4")
    assert verify(registry.ledger.entries()) == []  # the chain alone cannot tell
    result = registry.verify_log(auditor)
    assert not result["intact"] and any("entries cut off" in p["message"] for p in result["problems"])


def test_a_rewritten_chain_fails_verification(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from privlora.registry.ledger import GENESIS, entry_hash

    registry, auditor = _signed_registry(tmp_path)
    db_path = tmp_path / "reg" / "registry.db"
    with sqlite3.connect(db_path) as db:  # someone holding the database rewrites every entry consistently
        prev = GENESIS
        rows = db.execute("SELECT seq, time, actor, action, target, result, detail FROM audit_log ORDER BY seq")
        for seq, when, actor, action, target, result, detail in rows.fetchall():
            actor = "nobody" if seq == 2 else actor
            h = entry_hash(seq, when, actor, action, target, result, detail, prev)
            db.execute("UPDATE audit_log SET actor=?, prev_hash=?, hash=? WHERE seq=?", (actor, prev, h, seq))
            prev = h
    assert verify(registry.ledger.entries()) == []  # a consistent chain
    result = registry.verify_log(auditor)
    assert not result["intact"] and any("log rewritten" in p["message"] for p in result["problems"])
    forger = Ed25519PrivateKey.generate()  # re-signing with another key does not help
    with sqlite3.connect(db_path) as db:
        n, head = db.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
        sig = forger.sign(b"privlora-log-checkpoint\x00" + f"{n}:{head}".encode()).hex()
        db.execute("INSERT OR REPLACE INTO log_checkpoints VALUES (?, ?, 0.0, ?)", (n, head, sig))
    result = registry.verify_log(auditor)
    assert not result["intact"] and any("does not verify" in p["message"] for p in result["problems"])


def test_tokens_from_before_expiry_existed_expire_and_old_audits_are_not_trusted(tmp_path):
    """An older registry: users without an expiry, adapters whose audit column holds the pusher's upload."""
    import time

    from privlora.registry.service import ExportPolicy, Refused, Registry
    from privlora.registry.store import token_hash

    root = tmp_path / "old"
    root.mkdir()
    with sqlite3.connect(root / "registry.db") as db:
        db.execute("CREATE TABLE users (name VARCHAR(100) PRIMARY KEY, role VARCHAR(20) NOT NULL, "
                   "token_sha256 VARCHAR(64) NOT NULL UNIQUE, created FLOAT NOT NULL)")
        db.execute("INSERT INTO users VALUES ('old', 'researcher', ?, ?)",
                   (token_hash("t-old"), time.time() - 40 * 86400))
        db.execute("INSERT INTO users VALUES ('new', 'researcher', ?, ?)", (token_hash("t-new"), time.time() - 86400))
        db.execute("CREATE TABLE adapters (id VARCHAR(64) PRIMARY KEY, name VARCHAR(200) NOT NULL, owner VARCHAR(100) "
                   "NOT NULL, created FLOAT NOT NULL, config TEXT NOT NULL, privacy TEXT NOT NULL, "
                   "audit TEXT NOT NULL, "
                   "quarantined BOOLEAN NOT NULL)")
        db.execute("INSERT INTO adapters VALUES ('a1', 'n', 'old', 1.0, '{}', '{\"epsilon\": 1.0}', "
                   "'{\"attacks\": {\"loss\": {\"auc\": 0.5}}}', 0)")
    registry = Registry(root, token_days=30)
    with pytest.raises(Refused, match="token expired on"):
        registry.authenticate("t-old")
    assert registry.authenticate("t-new").name == "new"
    legacy = registry.store.adapter("a1")
    assert "no audit established" in ExportPolicy().check(legacy)  # the uploaded audit was never the registry's


def test_federated_epsilons_are_recomputed_from_their_ledgers():
    from privlora.federated.client_privacy import gaussian_epsilons
    from privlora.registry.claims import ClaimError, verify_privacy

    laplace = {"mechanism": "laplace", "epsilon_per_round": [0.5, 0.75], "delta": 1e-5}
    assert verify_privacy({**laplace, "epsilon": 1.25}).epsilon == pytest.approx(1.25)
    with pytest.raises(ClaimError, match="recomputed by the registry"):
        verify_privacy({**laplace, "epsilon": 0.75})  # the last round's ε, not the composed one
    sigmas, q, delta = [1.1, 1.3, 1.2], 0.4, 1e-5
    eps = gaussian_epsilons([(s, q) for s in sigmas], delta)[-1]
    gaussian = {"mechanism": "gaussian", "effective_noise_multipliers": sigmas, "sample_rate": q, "delta": delta}
    assert verify_privacy({**gaussian, "epsilon": eps}).epsilon == pytest.approx(eps)
    with pytest.raises(ClaimError, match="recomputed by the registry"):
        verify_privacy({**gaussian, "epsilon": eps / 2})
    assert verify_privacy({"mechanism": "none", "epsilon": None}).epsilon is None  # no claim, nothing to check


def test_the_registrys_own_audit_reads_only_built_in_or_allowed_sources(tmp_path):
    """A pushed config is the pusher's input: it must not make the server read its own files."""
    from privlora.errors import UserError
    from privlora.registry.server_audit import check_sources

    allowed = tmp_path / "audit-data"
    (allowed / "faces").mkdir(parents=True)
    check_sources("data: {source: 'demo:faces'}\nbase: embedded\n", ())  # built in: always allowed
    check_sources(f"data: {{source: '{allowed / 'faces'}'}}\n", (allowed,))
    for config in (f"data: {{source: '{tmp_path / 'elsewhere'}'}}\n", "data: {source: /etc}\n",
                   f"data: {{source: '{allowed}/../secrets'}}\n", "base: /root/models/private-unet\n"):
        with pytest.raises(UserError, match="not built in and not under a folder the registry may read"):
            check_sources(config, (allowed,))
