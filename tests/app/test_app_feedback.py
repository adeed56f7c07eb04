"""Votes in the app through its API, as ``gradio_client`` casts them: kept across a restart and from voters voting at
once, behind the terms when the app has any, off unless asked for, and nothing about a voter kept that the page
did not ask for."""

import hashlib
import sqlite3

import pytest

from alpaca_lora.app.page import build_page, launch_kwargs, load_app_config, voting_for
from alpaca_lora.app.voting import Terms, Voting, model_identity
from alpaca_lora.common.errors import ConfigError
from alpaca_lora.feedback.store import FeedbackStore
from alpaca_lora.inference.loading import inference_settings, load_for_inference

GREEDY = ("greedy", 0.7, 0.9, 40, 4, 12)  # mode, temperature, top_p, top_k, beams, max new tokens
SAMPLE = (1.5, 0.9, 40, 12)  # another answer: temperature, top_p, top_k, max new tokens


@pytest.fixture(scope="module")
def loaded(fact_adapters):
    return load_for_inference(inference_settings(adapter=str(fact_adapters[16])))


@pytest.fixture
def app(loaded, fact_adapters, free_port):
    """``app(db=None, terms=None)``: the page serving the fact adapter, voting as asked; its URL."""
    pages = []

    def start(db=None, terms=None):
        voting = Voting(FeedbackStore(db) if db else None, Terms.read(terms) if terms else None,
                        model_identity(None, str(fact_adapters[16])))
        page = build_page(loaded, None, voting)
        port = free_port()
        page.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                            **launch_kwargs())
        pages.append(page)
        return f"http://127.0.0.1:{port}/"

    yield start
    for page in pages:
        page.close()


def client(url, **kwargs):
    from gradio_client import Client

    return Client(url, verbose=False, **kwargs)


def vote_round(url, fact, voter: str) -> tuple[str, str]:
    """Generate, rate it up, another answer, rate that down, A is better; the two answers seen."""
    visitor = client(url)
    first, _ = visitor.predict(fact["instruction"], "", *GREEDY, api_name="/generate")
    visitor.predict("A", "up", voter, api_name="/rate")
    second = visitor.predict(*SAMPLE, api_name="/another_answer")
    visitor.predict("B", "down", voter, api_name="/rate")
    assert "A is better" in visitor.predict("A", voter, api_name="/prefer")
    return first, second


@pytest.mark.slow
def test_votes_from_voters_at_once_survive_a_restart(app, loaded, fact, tmp_path, at_once):
    db = tmp_path / "feedback.sqlite"
    url = app(db)
    seen = {}

    def voter(name):
        seen[name] = vote_round(url, fact, name)

    errors = at_once(voter, [f"voter{i}" for i in range(6)])
    assert errors == []
    restarted = app(db)  # a second server on the same database, as after a restart
    vote_round(restarted, fact, "late")
    votes = FeedbackStore(db).votes()
    assert len(votes) == 7 * 3
    prompt = loaded.prompt(fact["instruction"])
    for name, (first, second) in seen.items():
        mine = {(v["other"] != "", v["choice"]): v for v in votes if v["voter"] == name}
        assert set(mine) == {(False, "up"), (False, "down"), (True, "a")}
        assert mine[(False, "up")]["a_output"] == first == fact["output"]
        assert mine[(False, "down")]["a_output"] == second
        assert (mine[(True, "a")]["a_output"], mine[(True, "a")]["b_output"]) == (first, second)
        assert all(v["a_prompt"] == prompt and v["a_instruction"] == fact["instruction"] for v in mine.values())
    up = next(v for v in votes if v["choice"] == "up")
    assert up["a_decoding"] == '{"decoding": "greedy", "max_new_tokens": 12}' and up["a_template"] == "alpaca"
    assert up["a_adapter"].endswith("adapter") and len(up["a_adapter_sha256"]) == 64


def test_voting_again_replaces_the_vote(app, fact, tmp_path):
    db = tmp_path / "feedback.sqlite"
    visitor = client(app(db))
    visitor.predict(fact["instruction"], "", *GREEDY, api_name="/generate")
    visitor.predict("A", "up", "", api_name="/rate")
    visitor.predict("A", "down", "", api_name="/rate")
    assert [v["choice"] for v in FeedbackStore(db).votes()] == ["down"]


@pytest.mark.slow
def test_the_terms_gate_blocks_the_api_until_accepted(app, fact, tmp_path):
    from gradio_client.exceptions import AppError

    db, terms = tmp_path / "feedback.sqlite", tmp_path / "LICENSE-research.md"
    terms.write_text("# Research use only\nYou agree not to use this model commercially.\n")
    url = app(db, terms)
    visitor = client(url)
    with pytest.raises(AppError, match="accept the terms"):
        visitor.predict(fact["instruction"], "", *GREEDY, api_name="/generate")
    with pytest.raises(AppError, match="accept the terms"):
        visitor.predict("A", "up", "", api_name="/rate")
    with pytest.raises(AppError, match="accept the terms"):
        visitor.predict(*SAMPLE, api_name="/another_answer")
    assert FeedbackStore(db).votes() == []
    visitor.predict(api_name="/accept_terms")
    answer, _ = visitor.predict(fact["instruction"], "", *GREEDY, api_name="/generate")
    assert answer == fact["output"]
    visitor.predict("A", "up", "ann", api_name="/rate")
    (vote,) = FeedbackStore(db).votes()
    assert (vote["terms"], vote["terms_sha256"]) == (terms.name, hashlib.sha256(terms.read_bytes()).hexdigest())
    assert vote["terms_accepted"] and vote["voter"] == "ann"
    with pytest.raises(AppError, match="accept the terms"):  # another visitor has not accepted them
        client(url).predict(fact["instruction"], "", *GREEDY, api_name="/generate")


@pytest.mark.slow
def test_nothing_about_a_voter_is_kept_that_the_page_did_not_ask_for(app, fact, tmp_path):
    db = tmp_path / "feedback.sqlite"
    agent, address = "SecretAgent/7.0 (a browser)", "203.0.113.9"
    visitor = client(app(db), headers={"User-Agent": agent, "X-Forwarded-For": address, "Cookie": "id=c00kie"})
    visitor.predict(fact["instruction"], "", *GREEDY, api_name="/generate")
    visitor.predict("A", "up", "", api_name="/rate")
    visitor.predict(*SAMPLE, api_name="/another_answer")
    visitor.predict("bad", "zoe", api_name="/prefer")
    with sqlite3.connect(db) as connection:
        tables = {name: connection.execute(f"SELECT * FROM {name}") for (name,) in
                  connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {name: [d[0] for d in cursor.description] for name, cursor in tables.items()}
        values = [value for cursor in tables.values() for row in cursor.fetchall() for value in row]
    assert columns == {
        "answers": ["id", "time", "instruction", "input", "prompt", "output", "finish_reason", "model", "adapter",
                    "adapter_sha256", "template", "decoding"],
        "votes": ["id", "answer", "other", "choice", "voter", "terms", "terms_sha256", "terms_accepted", "time"],
    }
    text = " ".join(str(value) for value in values)
    for secret in (agent, address, "c00kie", "127.0.0.1", visitor.session_hash):
        assert secret not in text
    assert sorted(v["voter"] for v in FeedbackStore(db).votes()) == ["", "zoe"]  # what the visitor typed, or nothing


def test_votes_are_off_unless_feedback_db_is_given(app, capsys):
    voting = voting_for(load_app_config(["model=some/model"]))
    assert voting.store is None and voting.terms is None
    assert "votes are not stored" in capsys.readouterr().err
    endpoints = client(app()).view_api(return_format="dict")["named_endpoints"]
    assert "/generate" in endpoints and not {"/rate", "/prefer", "/another_answer"} & set(endpoints)


def test_terms_must_be_a_readable_file(tmp_path):
    with pytest.raises(ConfigError, match="key 'terms'"):
        load_app_config(["model=some/model", f"terms={tmp_path / 'missing.md'}"])
    (tmp_path / "empty.md").write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        voting_for(load_app_config(["model=some/model", f"terms={tmp_path / 'empty.md'}"]))


@pytest.mark.slow
def test_the_docs_api_snippet_votes(app, tmp_path):
    """docs/feedback.md's gradio_client snippet, run as written against an app with feedback and terms."""
    import re
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "feedback.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", docs, re.S) if "api_name=\"/rate\"" in block]
    db, terms = tmp_path / "feedback.sqlite", tmp_path / "terms.md"
    terms.write_text("Research use only.\n")
    url = app(db, terms)
    exec(compile(code.replace("http://127.0.0.1:7860/", url), "docs/feedback.md", "exec"), {})
    votes = FeedbackStore(db).votes()
    assert sorted((v["choice"], v["voter"], bool(v["other"])) for v in votes) == [("a", "ann", True),
                                                                                 ("up", "ann", False)]
    assert all(v["terms"] == "terms.md" and v["a_instruction"] == "What is 12 plus 30?" for v in votes)


@pytest.mark.slow
def test_the_demo_s_scripted_voter_prefers_the_correct_answer(app, fact, tmp_path):
    from alpaca_lora.feedback.voter import vote_on

    db = tmp_path / "feedback.sqlite"
    terms = tmp_path / "terms.md"
    terms.write_text("Research use only.\n")
    wrong = {**fact, "output": "Somewhere else."}  # the adapter answers Quibbletown.: wrong for this item
    outcomes = vote_on(app(db, terms), [fact, wrong], voters=2, max_new_tokens=12, retries=1)
    assert sum(outcomes.values()) == 2 and outcomes["B"] == 0
    ratings = {(v["voter"], v["a_output"]): v["choice"] for v in FeedbackStore(db).votes() if not v["other"]}
    assert ratings[("scripted-voter-0", fact["output"])] == "up"  # voter 0 asked the fact, voter 1 the other item
    assert ratings[("scripted-voter-1", fact["output"])] == "down"
