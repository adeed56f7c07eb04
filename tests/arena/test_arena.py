"""The arena's votes database and ``arena report``: tickets, restarts, concurrent voters, several arenas in
one database, tallies, agreement between voters (Cohen's kappa) and with a judge, CSV export."""

import csv
import json
import sqlite3

import pytest

from alpaca_lora.arena.__main__ import main
from alpaca_lora.arena.page import ArenaStore
from alpaca_lora.arena.report import cohen_kappa, voter_agreement
from alpaca_lora.evaluate.answers import load_answers, pair_answers


def answers_file(path, generator, word, items=6):
    path.write_text("".join(json.dumps({"id": str(i), "instruction": f"Question {i}?", "input": "",
                                        "output": f"{word} {i}", "generator": generator,
                                        "category": "odd" if i % 2 else "even"}) + "\n" for i in range(items)))
    return path


@pytest.fixture
def files(tmp_path):
    return {name: answers_file(tmp_path / f"{name}.jsonl", name, word)
            for name, word in (("alpha", "sunny"), ("beta", "rainy"), ("gamma", "windy"))}


def open_arena(db, files, a="alpha", b="beta"):
    first, second = load_answers(str(files[a])), load_answers(str(files[b]))
    return ArenaStore(db).open_arena(first, second, pair_answers(first, second)[0])


def vote_for(arena, voter, wanted):
    """Shows the voter an item and presses the button that makes ``wanted`` ('a', 'b', 'tie', 'bad') win."""
    shown = arena.next_item(voter)
    if wanted in ("tie", "bad"):
        choice = wanted
    else:
        a_first = shown.first.startswith("sunny")
        choice = "1" if (wanted == "a") == a_first else "2"
    assert arena.vote(shown.ticket, choice)
    return shown.instruction


def test_a_voter_gets_every_item_once_and_votes_count_by_ticket(tmp_path, files):
    arena = open_arena(tmp_path / "arena.sqlite", files)
    seen, firsts = [], set()
    while (shown := arena.next_item("ann")) is not None:
        seen.append(shown.instruction)
        firsts.add(shown.first.split()[0])
        assert arena.vote(shown.ticket, "1")
        assert not arena.vote(shown.ticket, "2")  # the same ticket again: not counted twice
    assert sorted(seen) == [f"Question {i}?" for i in range(6)] and arena.next_item("ann") is None
    assert not arena.vote("made-up-ticket", "1")
    votes = arena.store.votes()
    assert len(votes) == 6 and all(v["winner"] == v["first"] for v in votes)  # "Response 1" wins: the one shown first
    assert firsts <= {"sunny", "rainy"}
    with sqlite3.connect(tmp_path / "arena.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_restart_loses_nothing_and_arenas_share_a_database(tmp_path, files):
    db = tmp_path / "arena.sqlite"
    arena = open_arena(db, files)
    voted = {vote_for(arena, "ann", "a") for _ in range(3)}
    restarted = open_arena(db, files)  # a new process would do just this
    assert restarted.id == arena.id and len(restarted.store.votes(arena.id)) == 3
    assert restarted.voted_by("ann") == 3
    rest = set()
    while (shown := restarted.next_item("ann")) is not None:
        rest.add(shown.instruction)
        restarted.vote(shown.ticket, "tie")
    assert not voted & rest and len(voted | rest) == 6  # never an item already voted on
    other = open_arena(db, files, "alpha", "gamma")
    assert other.id != arena.id and other.next_item("ann") is not None  # ann's votes were in the other arena
    assert [a["b"] for a in ArenaStore(db).arenas()] == ["beta", "gamma"]


def test_voters_voting_at_once_lose_nothing(tmp_path, files, at_once):
    db = tmp_path / "arena.sqlite"
    open_arena(db, files)

    def voter(name):
        arena = open_arena(db, files)  # each voter with its own connections, as Gradio's worker threads
        while (shown := arena.next_item(name)) is not None:
            arena.vote(shown.ticket, "bad")

    errors = at_once(voter, [f"voter{i}" for i in range(8)])
    assert errors == []
    votes = ArenaStore(db).votes()
    assert len(votes) == 48 and len({(v["voter"], v["item"]) for v in votes}) == 48


def test_cohens_kappa():
    ratings = [("a", "a"), ("a", "b"), ("b", "b"), ("tie", "tie")]
    assert cohen_kappa(ratings) == pytest.approx((0.75 - 5 / 16) / (1 - 5 / 16), abs=1e-4)
    assert cohen_kappa([("a", "a")] * 3) is None and cohen_kappa([]) is None
    assert cohen_kappa([("a", "b"), ("b", "a")]) == pytest.approx(-1.0)


def test_arena_report_tallies_agreement_judge_and_csv(tmp_path, files, capsys):
    db = tmp_path / "arena.sqlite"
    arena = open_arena(db, files)
    wanted = {"ann": ["a", "a", "b", "tie", "a", "bad"], "bob": ["a", "b", "b", "tie"]}
    order = {}
    for voter, outcomes in wanted.items():
        for outcome in outcomes:
            shown = arena.next_item(voter)
            order.setdefault(voter, []).append(shown.instruction)
            a_first = shown.first.startswith("sunny")
            choice = outcome if outcome in ("tie", "bad") else ("1" if (outcome == "a") == a_first else "2")
            assert arena.vote(shown.ticket, choice)
    # a judge that compared beta (as a) with alpha (as b): its 'b' is this arena's A
    alpha, beta = load_answers(str(files["alpha"])), load_answers(str(files["beta"]))
    judgments = tmp_path / "judgments.jsonl"
    lines = [{"key": p.key, "a": "beta", "b": "alpha", "output_a": p.output_a, "output_b": p.output_b,
              "winner": "b", "judge": "gpt-4o"} for p in pair_answers(beta, alpha)[0]]
    judgments.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["report", f"db={db}", f"judgments={judgments}", f"output_dir={tmp_path / 'report'}"]) == 0

    [report] = json.loads((tmp_path / "report" / "arena_report.json").read_text())
    assert (report["a"], report["b"], report["votes"], report["voters"]) == ("alpha", "beta", 10, ["ann", "bob"])
    assert (report["wins_a"], report["wins_b"], report["ties"], report["both_bad"]) == (4, 3, 3, 1)
    assert report["wins_a"] + report["wins_b"] + report["ties"] == report["votes"] == report["pairs"]
    assert report["win_rate_a"] == pytest.approx(0.55) and len(report["ci95"]) == 2
    assert sum(c["pairs"] for c in report["per_category"].values()) == 10
    decisive = report["position_bias"]["response_1_chosen"] + report["position_bias"]["response_2_chosen"]
    assert decisive == 7
    said = {voter: {instruction: ("tie" if outcome == "bad" else outcome)
                    for instruction, outcome in zip(order[voter], wanted[voter])} for voter in wanted}
    shared = set(said["ann"]) & set(said["bob"])
    agree = sum(said["ann"][i] == said["bob"][i] for i in shared)
    together = report["voter_agreement"]
    assert together["items_compared"] == len(shared) == 4  # bob got the items with the fewest votes: all ann's
    assert together["percent"] == pytest.approx(100 * agree / 4, abs=0.1)
    assert together["pairs_of_voters"][0]["voters"] == ["ann", "bob"]
    assert together == voter_agreement(ArenaStore(db).votes())
    assert report["judge_agreement"]["votes_compared"] == 10
    assert report["judge_agreement"]["percent"] == pytest.approx(40.0)  # the judge said alpha every time: 4 A wins
    with open(tmp_path / "report" / "votes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and {r["voter"] for r in rows} == {"ann", "bob"} and rows[0]["a"] == "alpha"
    assert (tmp_path / "report" / "arena_1.png").stat().st_size > 5_000
    printed = capsys.readouterr().out
    assert "alpha wins 4 vs beta 3, 3 ties" in printed and "Cohen's kappa" in printed


@pytest.mark.parametrize("arguments, message", [
    (["a=x.jsonl"], "key 'b' must be set"),
    (["a=x.jsonl", "b=y.jsonl", "auth_env=ARENA_TEST_UNSET"],
     "key 'auth_env': ARENA_TEST_UNSET must hold user:password"),
    (["a=x.jsonl", "b=y.jsonl", "port=http"], "key 'port'"),
])
def test_bad_arena_arguments_are_one_line_each_before_anything_starts(arguments, message, capsys, monkeypatch):
    monkeypatch.delenv("ARENA_TEST_UNSET", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(arguments)
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and message in err
    assert all(line.startswith("error: ") for line in err.splitlines())  # every problem, a line each


def test_votes_on_answers_edited_in_place_are_reported_apart_never_pooled(tmp_path, files, capsys):
    """Issue 22: 40 votes, then b.jsonl edited in place and the arena restarted, 3 more votes: the Results tab said
    3, ``arena report`` said 43 under "a vs b". Each answer set is its own arena now, reported apart."""
    db = tmp_path / "arena.sqlite"
    before = open_arena(db, files)
    for _ in range(4):
        vote_for(before, "ann", "a")
    answers_file(files["beta"], "beta", "stormy")  # the same file, its answers rewritten
    after = open_arena(db, files)
    assert after.id != before.id
    assert after.next_item("ann") is not None  # the new answers are new to ann too
    for _ in range(2):
        vote_for(after, "bob", "b")
    assert after.results_markdown().startswith("**2 votes**") and before.results_markdown().startswith("**4 votes**")
    capsys.readouterr()
    assert main(["report", f"db={db}", f"output_dir={tmp_path / 'report'}"]) == 0
    reports = json.loads((tmp_path / "report" / "arena_report.json").read_text())
    assert [(r["a"], r["b"], r["votes"], r["wins_a"], r["wins_b"]) for r in reports] == \
        [("alpha", "beta", 4, 4, 0), ("alpha", "beta", 2, 0, 2)]
    assert reports[0]["answers_a"] == reports[1]["answers_a"] and reports[0]["answers_b"] != reports[1]["answers_b"]
    printed = capsys.readouterr().out
    assert f"beta's answers differ from arena {before.id}'s: reported apart" in printed
    with open(tmp_path / "report" / "votes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len({row["answers_b"] for row in rows}) == 2 and len(rows) == 6


OLD_SCHEMA = """
CREATE TABLE arenas (id INTEGER PRIMARY KEY, a TEXT NOT NULL, b TEXT NOT NULL, a_file TEXT, b_file TEXT,
    created TEXT NOT NULL, UNIQUE (a, b));
CREATE TABLE items (arena INTEGER NOT NULL, item TEXT NOT NULL, key TEXT NOT NULL, id TEXT, category TEXT,
    instruction TEXT NOT NULL, input TEXT NOT NULL, output_a TEXT NOT NULL, output_b TEXT NOT NULL,
    PRIMARY KEY (arena, item));
CREATE TABLE shown (ticket TEXT PRIMARY KEY, arena INTEGER NOT NULL, item TEXT NOT NULL, voter TEXT NOT NULL,
    first TEXT NOT NULL, time TEXT NOT NULL);
CREATE TABLE votes (id INTEGER PRIMARY KEY, arena INTEGER NOT NULL, item TEXT NOT NULL, voter TEXT NOT NULL,
    first TEXT NOT NULL, choice TEXT NOT NULL, winner TEXT NOT NULL, time TEXT NOT NULL, UNIQUE (arena, item, voter));
"""


def test_a_database_from_before_answer_sets_were_recorded_keeps_its_votes_apart(tmp_path, files):
    from alpaca_lora.arena.page import item_id

    db = tmp_path / "arena.sqlite"
    with sqlite3.connect(db) as old:
        old.executescript(OLD_SCHEMA)
        old.execute("INSERT INTO arenas VALUES (1, 'alpha', 'beta', 'a.jsonl', 'b.jsonl', '2025-01-01')")
        old.execute("INSERT INTO items VALUES (1, ?, 'k', '0', NULL, 'Q?', '', 'x', 'y')", (item_id("k", "x", "y"),))
        old.execute("INSERT INTO votes VALUES (1, 1, ?, 'ann', 'a', '1', 'a', '2025-01-01')", (item_id("k", "x", "y"),))
    arena = open_arena(db, files)
    vote_for(arena, "ann", "b")
    assert main(["report", f"db={db}", f"output_dir={tmp_path / 'report'}"]) == 0
    reports = json.loads((tmp_path / "report" / "arena_report.json").read_text())
    assert [(r["arena"], r["votes"], r["answers_b"]) for r in reports] == [(1, 1, None), (arena.id, 1, reports[1]
                                                                                            ["answers_b"])]
    assert reports[1]["answers_b"] and arena.id != 1


def test_the_defaults_write_under_outputs_not_into_the_current_directory(tmp_path, files, monkeypatch):
    """Issue 22: ``arena`` and ``arena report`` wrote arena.sqlite and arena-report/ into the repository root."""
    from alpaca_lora.arena.settings import load_arena_config

    work = tmp_path / "repo"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = load_arena_config([f"a={files['alpha']}", f"b={files['beta']}"])
    assert cfg.db == "outputs/arena/arena.sqlite"
    vote_for(open_arena(cfg.db, files), "ann", "a")
    assert main(["report"]) == 0
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file() and "-wal" not in p.name
                  and "-shm" not in p.name) == ["outputs/arena/arena-report/arena_1.json",
                                                "outputs/arena/arena-report/arena_1.png",
                                                "outputs/arena/arena-report/arena_report.json",
                                                "outputs/arena/arena-report/votes.csv", "outputs/arena/arena.sqlite"]


@pytest.fixture
def read_only():
    """``read_only(path)``: the file can no longer be written, even by root (which ignores permissions: an immutable
    file then); undone at the end. Skips where neither is possible."""
    import os
    import subprocess

    made = []

    def make(path):
        if os.geteuid() == 0:
            if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
                pytest.skip("root, and chattr +i is not possible here: a read-only file cannot be made")
        else:
            path.chmod(0o444)
        made.append(path)

    yield make
    for path in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)])
        else:
            path.chmod(0o644)


@pytest.mark.parametrize("fault", ["corrupt", "read-only"])
def test_a_corrupt_or_read_only_database_is_one_line_not_a_traceback(tmp_path, files, fault, read_only):
    import os
    import subprocess
    import sys
    from pathlib import Path

    db = tmp_path / "arena.sqlite"
    if fault == "corrupt":
        db.write_bytes(b"not a database at all " * 200)
    else:
        open_arena(db, files, "alpha", "gamma")  # a database with another arena in it
        read_only(db)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    arena = subprocess.run([sys.executable, "-m", "alpaca_lora.arena", f"a={files['alpha']}", f"b={files['beta']}",
                            f"db={db}", "port=1"], env=env, capture_output=True, text=True, timeout=120)
    assert arena.returncode == 2 and len(arena.stderr.strip().splitlines()) == 1, arena.stderr
    assert arena.stderr.startswith(f"error: {db}: ") and "Traceback" not in arena.stderr
    report = subprocess.run([sys.executable, "-m", "alpaca_lora.arena", "report", f"db={db}",
                             f"output_dir={tmp_path / 'report'}"], env=env, capture_output=True, text=True, timeout=120)
    if fault == "corrupt":
        assert report.returncode == 2 and report.stderr.startswith(f"error: {db}: "), report.stderr
        assert len(report.stderr.strip().splitlines()) == 1
    else:
        assert report.returncode == 0, report.stderr  # reading a read-only database is fine
