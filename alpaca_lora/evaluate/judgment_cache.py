"""The user's judgment cache: every verdict a judge gave, kept across runs and output directories, as AlpacaEval
keeps its annotations, so a rerun anywhere, the swapped pair (B vs A shows the very prompts A vs B showed, the
other way round) or a new checkpoint whose answers are mostly unchanged pays only for what was never judged.

A judgment is keyed by what decides it: the judge model, the endpoint it is served at, the sampling settings and
the whole prompt (the judge's instructions, the instruction, both responses in the order shown). Only real
verdicts are kept (a reply without one is asked again elsewhere). The output directory's journal stays the
record of a run: a judgment taken from here is journaled there too.

SQLite in WAL mode, one transaction per write, so judges running at once share it safely. Nothing read back is
trusted blindly: an entry whose checksum or verdict does not hold is skipped (and asked again), and a file that
is not a readable database is set aside and a new one begun. The cache never stops a run: when it cannot be
used, the run judges without it and says so.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from alpaca_lora.common.logs import get_logger
from alpaca_lora.common.paths import cache_dir

SCHEMA = """CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, judge_model TEXT NOT NULL,
    verdict TEXT NOT NULL, reply TEXT NOT NULL, created TEXT NOT NULL, checksum TEXT NOT NULL)"""
warn = get_logger(__name__).warning


def cache_key(request_hash: str, base_url: str, sampling: dict) -> str:
    """The key of one judgment: the journal's hash of (judge model, prompt) with where and how it was sampled."""
    return hashlib.sha256(json.dumps([request_hash, base_url, sampling], sort_keys=True).encode()).hexdigest()


def checksum(key: str, verdict: str, reply: str) -> str:
    return hashlib.sha256(json.dumps([key, verdict, reply], ensure_ascii=False).encode()).hexdigest()


class JudgmentCache:
    """``parse`` is the judge's own reading of a reply: an entry is used only if it still gives the stored verdict."""

    def __init__(self, parse: Callable[[str], str | None], path: Path | None = None):
        self.parse = parse
        self.path = Path(path) if path else cache_dir("judge") / "judgments.sqlite"
        self.usable = self._prepare()

    def _prepare(self) -> bool:
        """The table made on first use; a file that is not a readable database set aside (once) for a new one."""
        try:
            return self._open()
        except sqlite3.DatabaseError as exc:
            if not self.path.is_file() or not ("not a database" in str(exc) or "malformed" in str(exc)):
                warn(f"warning: judgment cache {self.path}: cannot be used ({exc}); judging without it")
                return False
            problem = exc
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        try:
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self.path.rename(aside)
            usable = self._open()
        except (OSError, sqlite3.Error) as exc:
            warn(f"warning: judgment cache {self.path}: not a readable database ({problem}) and cannot be replaced "
                 f"({exc}); judging without it")
            return False
        warn(f"warning: {self.path} is not a readable judgment cache ({problem}): set aside as {aside.name}, "
             "a new one begun")
        return usable

    def _open(self) -> bool:
        with self._connect() as db:
            db.execute(SCHEMA)
            db.execute("SELECT COUNT(*) FROM judgments").fetchone()
        return True

    @contextmanager
    def _connect(self):
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            yield db
        finally:
            db.close()

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        """{key: {"verdict", "reply"}} for the keys held here whose entries pass their check."""
        if not self.usable or not keys:
            return {}
        found, failed = {}, 0
        try:
            with self._connect() as db:
                for start in range(0, len(keys), 500):
                    chunk = keys[start:start + 500]
                    rows = db.execute(f"SELECT key, verdict, reply, checksum FROM judgments WHERE key IN "
                                      f"({','.join('?' * len(chunk))})", chunk).fetchall()
                    for key, verdict, reply, stored in rows:
                        if stored == checksum(key, verdict, reply) and self.parse(reply) == verdict:
                            found[key] = {"verdict": verdict, "reply": reply}
                        else:
                            failed += 1
        except sqlite3.Error as exc:
            warn(f"warning: judgment cache {self.path}: cannot be read ({exc}); judging without it")
            return {}
        if failed:
            warn(f"warning: judgment cache {self.path}: {failed} cached judgment{'s' if failed > 1 else ''} failed "
                 f"{'their' if failed > 1 else 'its'} check and {'were' if failed > 1 else 'was'} skipped "
                 "(judged again)")
        return found

    def put_many(self, judge_model: str, judgments: dict[str, dict]) -> None:
        """Keeps ``{key: {"verdict", "reply"}}`` (replacing an entry that failed its check), in one transaction."""
        if not self.usable or not judgments:
            return
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        rows = [(key, judge_model, j["verdict"], j["reply"], created, checksum(key, j["verdict"], j["reply"]))
                for key, j in judgments.items()]
        try:
            with self._connect() as db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany("INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?, ?)", rows)
                db.execute("COMMIT")
        except sqlite3.Error as exc:
            warn(f"warning: judgment cache {self.path}: cannot be written ({exc}); these judgments stay in the "
                 "output directory's journal only")

