"""Governed adapter registry (issue 8): who may read, write and export which adapter and which data.

``access`` (the seed's role × resource table as data, one ``decide`` for every action), ``ledger``
(hash-chained action log on SQLAlchemy — SQLite by default, PostgreSQL by URL), ``safety`` and ``bases``
(adapter bytes checked before any tensor is built, shapes against the base when it ships here),
``store`` (rows + content-addressed blobs), ``service`` (decide → log → act, one method per action),
``server`` / ``client`` (HTTP), ``reaudit`` (an incident's re-audit on the auditor's side).
"""
