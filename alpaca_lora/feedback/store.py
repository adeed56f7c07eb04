"""The app's feedback database: each voted answer as the model made it, and each vote.

An answer is stored once it is voted on, never before (a visitor who only reads leaves nothing behind), with
what makes it training data later: the prompt exactly as the model was sent it (the rendered template), the
instruction and input it was made from, the answer, the model, the adapter (its path and a hash of its
weights), the template and the decoding settings. A vote is a rating (``up`` or ``down``) of one answer or a
comparison of two answers to the same prompt (``a``, ``b``, ``tie`` or ``bad``: both are bad), with the voter's
name when the visitor typed one and, where the app asked for it, the terms the visitor accepted (the file's
name, its SHA-256 and when). Nothing else about a voter is written: no address, no browser, no session.

A visitor's latest vote on an answer (or on a pair) is the one that counts: voting again replaces it. SQLite in
WAL mode, one transaction per vote (``common.sqlite``): a restart loses nothing, voters voting at once lose
nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from alpaca_lora.common.sqlite import SqliteStore

RATINGS = ("up", "down")
COMPARISONS = ("a", "b", "tie", "bad")

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (id TEXT PRIMARY KEY, time TEXT NOT NULL, instruction TEXT NOT NULL,
    input TEXT NOT NULL, prompt TEXT NOT NULL, output TEXT NOT NULL, finish_reason TEXT, model TEXT, adapter TEXT,
    adapter_sha256 TEXT, template TEXT NOT NULL, decoding TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS votes (id INTEGER PRIMARY KEY, answer TEXT NOT NULL REFERENCES answers (id),
    other TEXT NOT NULL DEFAULT '', choice TEXT NOT NULL, voter TEXT NOT NULL DEFAULT '', terms TEXT,
    terms_sha256 TEXT, terms_accepted TEXT, time TEXT NOT NULL, UNIQUE (answer, other));
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Answer:
    """One answer as the model made it (``decoding``: the settings that reached the model)."""

    id: str
    time: str
    instruction: str
    input: str
    prompt: str
    output: str
    template: str
    decoding: dict
    model: str | None = None
    adapter: str | None = None
    adapter_sha256: str | None = None
    finish_reason: str | None = None

    def row(self) -> dict:
        return {**asdict(self), "decoding": json.dumps(self.decoding, sort_keys=True)}


@dataclass
class Acceptance:
    """The terms a visitor accepted: the file's name, its SHA-256 and when."""

    terms: str
    terms_sha256: str
    terms_accepted: str


class FeedbackStore(SqliteStore):
    SCHEMA = SCHEMA

    def rate(self, answer: Answer, rating: str, voter: str = "", accepted: Acceptance | None = None) -> None:
        """``up`` or ``down`` for one answer; a second rating of the same answer replaces the first."""
        if rating not in RATINGS:
            raise ValueError(f"rating must be one of {RATINGS}, not {rating!r}")
        self._vote([answer], answer.id, "", rating, voter, accepted)

    def compare(self, a: Answer, b: Answer, choice: str, voter: str = "", accepted: Acceptance | None = None) -> None:
        """Which of two answers to one prompt is better (``a``, ``b``), ``tie``, or ``bad`` (both are bad)."""
        if choice not in COMPARISONS:
            raise ValueError(f"choice must be one of {COMPARISONS}, not {choice!r}")
        if a.prompt != b.prompt:
            raise ValueError("a comparison is between two answers to the same prompt")
        self._vote([a, b], a.id, b.id, choice, voter, accepted)

    def _vote(self, answers: list[Answer], answer: str, other: str, choice: str, voter: str,
              accepted: Acceptance | None) -> None:
        terms = asdict(accepted) if accepted else {"terms": None, "terms_sha256": None, "terms_accepted": None}
        with self.transaction() as db:
            for made in answers:
                row = made.row()
                db.execute(f"INSERT OR IGNORE INTO answers ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                           tuple(row.values()))
            db.execute("INSERT INTO votes (answer, other, choice, voter, terms, terms_sha256, terms_accepted, time) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (answer, other) DO UPDATE SET choice = excluded."
                       "choice, voter = excluded.voter, terms = excluded.terms, terms_sha256 = excluded.terms_sha256, "
                       "terms_accepted = excluded.terms_accepted, time = excluded.time",
                       (answer, other, choice, (voter or "").strip(), terms["terms"], terms["terms_sha256"],
                        terms["terms_accepted"], now()))

    def votes(self) -> list[dict]:
        """Every vote with its answer (``a_*``) and, for a comparison, the other answer (``b_*``)."""
        columns = ("instruction", "input", "prompt", "output", "model", "adapter", "adapter_sha256", "template",
                   "decoding")
        selected = ", ".join([f"a.{c} AS a_{c}" for c in columns] + [f"b.{c} AS b_{c}" for c in ("output", "model",
                                                                                                "adapter")])
        with self.connect() as db:
            rows = db.execute(f"SELECT v.*, {selected} FROM votes v JOIN answers a ON a.id = v.answer "
                              "LEFT JOIN answers b ON b.id = v.other ORDER BY v.id").fetchall()
        return [dict(row) for row in rows]
