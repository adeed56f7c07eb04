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

from alpaca_lora.common.errors import DataError


@contextmanager
def one_line_errors(path: Path, kind: str = "a votes database"):
    """SQLite's errors (a corrupt file, a read-only one, a full disk) as one line naming the database."""
    try:
        yield
    except sqlite3.Error as exc:
        hint = {"file is not a database": f"not {kind} (or a damaged one)",
                "attempt to write a readonly database": "read-only: votes cannot be recorded there"}
        raise DataError(f"{path}: {hint.get(str(exc), str(exc))} (sqlite3: {exc})") from None


class SqliteStore:
    """A database file with its schema (``SCHEMA``: idempotent ``CREATE ... IF NOT EXISTS`` statements; ``migrate``
    brings a database an earlier version made up to date)."""

    SCHEMA = ""
    KIND = "a votes database"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.errors(), self.connect() as db:
            db.executescript(self.SCHEMA)
            self.migrate(db)

    def migrate(self, db: sqlite3.Connection) -> None:
        """Nothing to bring up to date unless a store says so."""

    def errors(self):
        return one_line_errors(self.path, self.KIND)

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
