"""Governed adapter registry (issue 8, in progress): the access table and the tamper-evident log.

Built so far: ``access`` (the seed's role × resource table as data, one ``decide`` for every endpoint) and
``ledger`` (hash-chained action log on SQLAlchemy — SQLite by default — with verification). The HTTP
service, adapter store, approvals and incidents are not built yet.
"""
