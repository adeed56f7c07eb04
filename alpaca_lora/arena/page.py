"""``arena a=FILE b=FILE [db=outputs/arena/arena.sqlite] [port=7861]``: blind human evaluation in the browser.

Each voter sees an instruction (and its input) and the two answers in random order, labelled only
"Response 1" and "Response 2", votes, and gets the next item. Which answer came from which file never
reaches the browser: the page holds the texts and an opaque ticket; the server keeps what the ticket
stands for in SQLite.

SQLite in WAL mode, one transaction per vote: restarting the arena loses nothing, voters voting at
once lose nothing, a voter never gets an item they already voted on, and several arenas (other a/b
pairs) can share one database. An arena is two answer files' names with their very answers (a content
hash of each side, recorded with the arena): editing an answers file in place makes a new arena, so
votes on answers that are no longer the file's are never pooled with votes on the new ones. Binds
127.0.0.1; ``share=true`` and basic auth are opt-in.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from alpaca_lora.common.auth import basic_auth
from alpaca_lora.common.logs import get_logger
from alpaca_lora.common.sqlite import SqliteStore
from alpaca_lora.evaluate.answers import Answers, Pair
from alpaca_lora.evaluate.report import tally

CHOICES = (("1", "Response 1 is better"), ("2", "Response 2 is better"), ("tie", "Tie"), ("bad", "Both are bad"))
# The voter's name is kept in the browser's localStorage under this key (encrypted by Gradio with this
# fixed secret, so that it survives a restart of the arena).
VOTER_STORAGE = ("alpaca_lora_arena_voter", "alpaca-lora-arena")

SCHEMA = """
CREATE TABLE IF NOT EXISTS arenas (id INTEGER PRIMARY KEY, a TEXT NOT NULL, b TEXT NOT NULL, a_file TEXT,
    b_file TEXT, created TEXT NOT NULL, answers_a TEXT, answers_b TEXT, UNIQUE (a, b, answers_a, answers_b));
CREATE TABLE IF NOT EXISTS items (arena INTEGER NOT NULL, item TEXT NOT NULL, key TEXT NOT NULL, id TEXT,
    category TEXT, instruction TEXT NOT NULL, input TEXT NOT NULL, output_a TEXT NOT NULL, output_b TEXT NOT NULL,
    PRIMARY KEY (arena, item));
CREATE TABLE IF NOT EXISTS shown (ticket TEXT PRIMARY KEY, arena INTEGER NOT NULL, item TEXT NOT NULL,
    voter TEXT NOT NULL, first TEXT NOT NULL, time TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS votes (id INTEGER PRIMARY KEY, arena INTEGER NOT NULL, item TEXT NOT NULL,
    voter TEXT NOT NULL, first TEXT NOT NULL, choice TEXT NOT NULL, winner TEXT NOT NULL, time TEXT NOT NULL,
    UNIQUE (arena, item, voter));
"""
# A database written before answer sets were recorded: an arena was its two names alone (UNIQUE (a, b)), so votes
# on answers edited in place were pooled. Its arenas keep their votes, with no answer set (reported as such).
MIGRATION = """
CREATE TABLE arenas_with_answers (id INTEGER PRIMARY KEY, a TEXT NOT NULL, b TEXT NOT NULL, a_file TEXT,
    b_file TEXT, created TEXT NOT NULL, answers_a TEXT, answers_b TEXT, UNIQUE (a, b, answers_a, answers_b));
INSERT INTO arenas_with_answers (id, a, b, a_file, b_file, created) SELECT id, a, b, a_file, b_file, created
    FROM arenas;
DROP TABLE arenas;
ALTER TABLE arenas_with_answers RENAME TO arenas;
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def item_id(key: str, output_a: str, output_b: str) -> str:
    """An item of an arena is an instruction with these two very answers: a changed answer is a new item."""
    return hashlib.sha256("\n".join([key, output_a, output_b]).encode()).hexdigest()[:16]


def answer_set(pairs: list[Pair], side: str) -> str:
    """The content hash of one side's answers to the arena's items: an arena is two names with these very answer
    sets, so a file edited in place makes a new arena whose votes are never pooled with the old ones."""
    answers = sorted((pair.key, pair.output_a if side == "a" else pair.output_b) for pair in pairs)
    return hashlib.sha256(json.dumps(answers, ensure_ascii=False).encode()).hexdigest()[:16]


def winner_of(choice: str, first: str) -> str:
    """The answer ('a', 'b') a button names, given which was shown first; or 'tie', 'bad'."""
    if choice == "1":
        return first
    if choice == "2":
        return "b" if first == "a" else "a"
    return choice


class ArenaStore(SqliteStore):
    """The votes database (see ``common.sqlite``: WAL, a connection per operation, each write one transaction)."""

    SCHEMA = SCHEMA
    KIND = "an arena database"

    def migrate(self, db) -> None:
        """Arenas made before answer sets were part of an arena's identity."""
        if "answers_a" not in {row[1] for row in db.execute("PRAGMA table_info(arenas)")}:
            db.executescript(f"BEGIN IMMEDIATE; {MIGRATION} COMMIT;")

    def open_arena(self, a: Answers, b: Answers, pairs: list[Pair]) -> Arena:
        """The arena of generators a and b with these very answers (made on first use), these pairs its items."""
        answers = (answer_set(pairs, "a"), answer_set(pairs, "b"))
        with self.errors(), self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO arenas (a, b, a_file, b_file, created, answers_a, answers_b) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (a.generator, b.generator, a.source, b.source, now(), *answers))
            arena_id = db.execute("SELECT id FROM arenas WHERE a = ? AND b = ? AND answers_a = ? AND answers_b = ?",
                                  (a.generator, b.generator, *answers)).fetchone()[0]
            items = []
            for pair in pairs:
                item = item_id(pair.key, pair.output_a, pair.output_b)
                db.execute("INSERT OR IGNORE INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (arena_id, item, pair.key, pair.id, pair.category, pair.instruction, pair.input,
                            pair.output_a, pair.output_b))
                items.append(item)
        return Arena(self, arena_id, items)

    def votes(self, arena: int | None = None) -> list[dict]:
        """Every vote (of one arena, or all) with its item (both answers) and the arena's generators."""
        query = ("SELECT v.id, v.arena, r.a, r.b, r.answers_a, r.answers_b, v.voter, v.item, i.key, i.id AS item_id, "
                 "i.category, i.instruction, i.input, i.output_a, i.output_b, v.first, v.choice, v.winner, v.time "
                 "FROM votes v JOIN arenas r ON r.id = v.arena JOIN items i ON i.arena = v.arena AND i.item = v.item")
        with self.errors(), self.connect() as db:
            rows = db.execute(query + (" WHERE v.arena = ?" if arena is not None else "") + " ORDER BY v.id",
                              (arena,) if arena is not None else ()).fetchall()
        return [dict(row) for row in rows]

    def arenas(self) -> list[dict]:
        with self.errors(), self.connect() as db:
            return [dict(row) for row in db.execute("SELECT * FROM arenas ORDER BY id").fetchall()]


@dataclass
class Shown:
    ticket: str
    instruction: str
    input: str
    first: str  # the text shown as Response 1
    second: str


class Arena:
    def __init__(self, store: ArenaStore, arena_id: int, items: list[str]):
        self.store, self.id, self.items = store, arena_id, items
        self.random = random.Random()

    def progress(self, voter: str, done: bool = False) -> str:
        """The voter's line above the item: how many voted, or thanks when none is left."""
        if done:
            return f"**{voter}**: you have voted on all {len(self.items)} items. Thank you!"
        return f"**{voter}**: {self.voted_by(voter)} of {len(self.items)} items voted."

    def voted_by(self, voter: str) -> int:
        with self.store.connect() as db:
            voted = {row[0] for row in db.execute("SELECT item FROM votes WHERE arena = ? AND voter = ?",
                                                  (self.id, voter))}
        return len(voted & set(self.items))

    def next_item(self, voter: str) -> Shown | None:
        """An item this voter has not voted on, among those with the fewest votes; None when none is left."""
        with self.store.transaction() as db:
            counts = dict(db.execute("SELECT item, COUNT(*) FROM votes WHERE arena = ? GROUP BY item", (self.id,)))
            voted = {row[0] for row in db.execute("SELECT item FROM votes WHERE arena = ? AND voter = ?",
                                                  (self.id, voter))}
            left = [item for item in self.items if item not in voted]
            if not left:
                return None
            fewest = min(counts.get(item, 0) for item in left)
            item = self.random.choice([item for item in left if counts.get(item, 0) == fewest])
            first = self.random.choice("ab")
            ticket = secrets.token_urlsafe(16)
            db.execute("INSERT INTO shown VALUES (?, ?, ?, ?, ?, ?)", (ticket, self.id, item, voter, first, now()))
            row = db.execute("SELECT * FROM items WHERE arena = ? AND item = ?", (self.id, item)).fetchone()
        outputs = (row["output_a"], row["output_b"]) if first == "a" else (row["output_b"], row["output_a"])
        return Shown(ticket, row["instruction"], row["input"], *outputs)

    def vote(self, ticket: str, choice: str) -> bool:
        """Records the vote on the item the ticket showed; False for an unknown ticket or a repeated vote."""
        with self.store.transaction() as db:
            shown = db.execute("SELECT * FROM shown WHERE ticket = ? AND arena = ?", (ticket, self.id)).fetchone()
            if shown is None:
                return False
            inserted = db.execute(
                "INSERT OR IGNORE INTO votes (arena, item, voter, first, choice, winner, time) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (self.id, shown["item"], shown["voter"], shown["first"], choice, winner_of(choice, shown["first"]),
                 now())).rowcount
            db.execute("DELETE FROM shown WHERE ticket = ?", (ticket,))
        return inserted == 1

    def results_markdown(self) -> str:
        """The tallies so far with neutral labels: which generator is A is not shown in the page."""
        votes = [vote for vote in self.store.votes(self.id) if vote["item"] in set(self.items)]
        if not votes:
            return "No votes yet."
        result = tally(["tie" if v["winner"] == "bad" else v["winner"] for v in votes])
        bad = sum(v["winner"] == "bad" for v in votes)
        low, high = result["ci95"]
        return (f"**{len(votes)} votes** from {len({v['voter'] for v in votes})} voters on "
                f"{len({v['item'] for v in votes})} of {len(self.items)} items.\n\n"
                f"Answers A win {result['wins_a']} vs answers B {result['wins_b']}, {result['ties']} ties "
                f"({bad} of them both bad).\n\nWin rate of A: {result['win_rate_a']:.1%} "
                f"(95% CI {low:.1%} to {high:.1%}), ties counted half.\n\n"
                "Which model wrote A stays hidden here; `arena report` names them.")


def build_arena_page(arena: Arena):
    import gradio as gr

    def show(voter: str):
        voter = (voter or "").strip()
        if not voter:
            return ["", "", "", "", "", "Enter your name and press **Start**."] + [gr.update(interactive=False)] * 4
        shown = arena.next_item(voter)
        if shown is None:
            return ["", "", "", "", "", arena.progress(voter, done=True)] + [gr.update(interactive=False)] * 4
        return [shown.ticket, shown.instruction, shown.input or "(none)", shown.first, shown.second,
                arena.progress(voter)] + [gr.update(interactive=True)] * 4

    def start(voter: str):
        return [(voter or "").strip()] + show(voter)

    def restore(remembered: str):  # on page load: a name typed meanwhile is left alone
        return start(remembered) if remembered else [gr.update()] + show("")

    def cast(choice: str):
        def handler(ticket: str, voter: str):
            if ticket and not arena.vote(ticket, choice):
                gr.Warning("That item was already voted on; here is the next one.")
            return show(voter)
        handler.__name__ = f"vote_{choice}"
        return handler

    with gr.Blocks(title="Blind comparison") as page:
        memory = gr.BrowserState("", storage_key=VOTER_STORAGE[0], secret=VOTER_STORAGE[1])
        ticket = gr.Textbox(visible=False, elem_id="ticket")
        with gr.Tab("Vote"):
            gr.Markdown("## Which response follows the instruction better?\nTwo models answered each instruction; "
                        "their responses are shown in random order.")
            with gr.Row():
                voter = gr.Textbox(label="Your name (remembered in this browser)", elem_id="voter", scale=3)
                start_button = gr.Button("Start", elem_id="start", scale=1)
            progress = gr.Markdown(elem_id="status")
            instruction = gr.Textbox(label="Instruction", interactive=False, lines=2, elem_id="instruction")
            input_box = gr.Textbox(label="Input", interactive=False, elem_id="input")
            with gr.Row():
                first = gr.Textbox(label="Response 1", interactive=False, lines=8, elem_id="response-1")
                second = gr.Textbox(label="Response 2", interactive=False, lines=8, elem_id="response-2")
            with gr.Row():
                buttons = [gr.Button(label, elem_id=f"vote-{choice}", interactive=False) for choice, label in CHOICES]
        with gr.Tab("Results") as results_tab:
            refresh = gr.Button("Refresh", elem_id="refresh")
            results = gr.Markdown(elem_id="results")

        shown = [ticket, instruction, input_box, first, second, progress, *buttons]
        page.load(restore, memory, [voter, *shown])
        start_button.click(start, voter, [memory, *shown])
        voter.submit(start, voter, [memory, *shown])
        for (choice, _label), button in zip(CHOICES, buttons):
            button.click(cast(choice), [ticket, voter], shown)
        results_tab.select(arena.results_markdown, None, results)
        refresh.click(arena.results_markdown, None, results)
    return page


def run_arena(cfg) -> int:
    from alpaca_lora.evaluate.answers import load_answers, pair_answers

    auth = basic_auth(cfg.auth_env)
    a, b = load_answers(cfg.a), load_answers(cfg.b)
    pairs, unmatched = pair_answers(a, b)
    store = ArenaStore(cfg.db)
    arena = store.open_arena(a, b, pairs)
    page = build_arena_page(arena)
    log = get_logger(__name__).info
    log(f"arena {arena.id}: {len(pairs)} items ({a.generator} vs {b.generator}, hidden from voters)"
        + (f", {unmatched} answered by one side only left out" if unmatched else "")
        + f"; votes in {cfg.db}; http://{cfg.host}:{cfg.port}/")
    earlier = [r["id"] for r in store.arenas() if (r["a"], r["b"]) == (a.generator, b.generator)
               and r["id"] != arena.id]
    if earlier:
        log(f"the same names with other answers: arena {', '.join(map(str, earlier))} (the files changed since); "
            "their votes are kept and reported apart")
    page.queue(default_concurrency_limit=8).launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share,
                                                   auth=auth)
    return 0
