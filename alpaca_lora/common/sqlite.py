"""Votes databases (the arena's, the app's feedback): SQLite in WAL mode, one IMMEDIATE transaction per write.

WAL lets readers (a report, an export) run while voters write; ``synchronous=FULL`` makes a vote durable when
the page says it is counted; ``BEGIN IMMEDIATE`` takes the write lock at the start of a transaction, so
concurrent voters queue (up to the 30-second busy timeout) instead of failing half-way. A connection per
operation: nothing is shared between the server's threads.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path


class SqliteStore:
    """A database file with its schema (``SCHEMA``: idempotent ``CREATE ... IF NOT EXISTS`` statements)."""

    SCHEMA = ""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as db:
            db.executescript(self.SCHEMA)

    @contextmanager
    def connect(self):
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a vote is on disk when the page says it is counted
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    @contextmanager
    def transaction(self):
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
