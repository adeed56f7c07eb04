"""``feedback export``: exactly the pairs (DPO) and labelled answers (KTO) the votes imply, with ties, both-bad,
disagreeing voters and the arena's blind positions handled as documented, and the prompt in the template the
adapter was trained with."""

import json
import random

import pytest

from alpaca_lora.arena.page import ArenaStore
from alpaca_lora.data.templates import get_template
from alpaca_lora.evaluate.answers import load_answers, pair_answers
from alpaca_lora.feedback.__main__ import main
from alpaca_lora.feedback.store import Answer, FeedbackStore

ALPACA = get_template("alpaca")


def answer(instruction: str, output: str, template: str = "alpaca", input_text: str = "") -> Answer:
    """An answer as the app records it (a fresh id: every generation is its own answer)."""
    prompt = get_template(template).format(instruction, input_text)
    return Answer(f"{instruction}|{output}|{random.random()}", "2025-01-01T00:00:00.000+00:00", instruction,
                  input_text, prompt, f"{output}\n", template, {"decoding": "greedy", "max_new_tokens": 8})


def app_votes(db) -> None:
    store = FeedbackStore(db)
    # Q1: two visitors compare the same two answers (a greedy answer comes out the same for both) and agree.
    store.compare(answer("Q1", "Paris"), answer("Q1", "Lyon"), "a", "ann")
    store.compare(answer("Q1", "Lyon"), answer("Q1", "Paris"), "b", "bob")
    store.compare(answer("Q1", "Paris"), answer("Q1", "Lyon"), "tie", "")  # 2 of 3: still a majority
    store.compare(answer("Q2", "4"), answer("Q2", "four"), "tie", "ann")  # a tie
    store.compare(answer("Q3", "x"), answer("Q3", "y"), "bad", "ann")  # both bad
    store.compare(answer("Q4", "up"), answer("Q4", "down"), "a", "ann")  # split: one each way
    store.compare(answer("Q4", "down"), answer("Q4", "up"), "a", "bob")
    store.compare(answer("Q5", "same"), answer("Q5", "same"), "a", "ann")  # identical answers
    for voter in ("ann", "bob"):  # Q6: ratings alone, by majority
        store.rate(answer("Q6", "good"), "up", voter)
        store.rate(answer("Q6", "bad"), "down", voter)
    store.rate(answer("Q6", "bad"), "up", "cat")
    store.rate(answer("Q7", "meh"), "up", "ann")  # Q7: split ratings
    store.rate(answer("Q7", "meh"), "down", "bob")
    store.rate(answer("Q8", "other template"), "up", "ann")
    store.rate(answer("Q8", "other template", template="alpaca_lora"), "up", "bob")  # sent in another template


def arena_votes(tmp_path, db) -> list[str]:
    """Two voters vote for the answer '42' over '41' on one item, whatever position the arena showed it in."""
    rows = {"a": "42", "b": "41"}
    for side, output in rows.items():
        (tmp_path / f"{side}.jsonl").write_text(json.dumps({"id": "0", "instruction": "Q9", "input": "six times seven",
                                                            "output": output, "generator": side}) + "\n")
    a, b = load_answers(str(tmp_path / "a.jsonl")), load_answers(str(tmp_path / "b.jsonl"))
    arena = ArenaStore(db).open_arena(a, b, pair_answers(a, b)[0])
    arena.random = random.Random(3)
    firsts = []
    for voter in ("carl", "dana", "emil"):
        shown = arena.next_item(voter)
        firsts.append("a" if shown.first == "42" else "b")
        assert arena.vote(shown.ticket, "1" if shown.first == "42" else "2")
    return firsts


def export(tmp_path, *args: str) -> tuple[list[dict], list[dict], dict]:
    out = tmp_path / "out"
    assert main(["export", *args, f"output_dir={out}"]) == 0
    read = [[json.loads(line) for line in (out / name).read_text().splitlines()] for name in ("dpo.jsonl", "kto.jsonl")]
    return read[0], read[1], json.loads((out / "summary.json").read_text())


def test_export_gives_exactly_the_pairs_and_labels_the_votes_imply(tmp_path):
    app_votes(tmp_path / "app.sqlite")
    firsts = arena_votes(tmp_path, tmp_path / "arena.sqlite")
    assert set(firsts) == {"a", "b"}  # the answer '42' was shown as Response 1 and as Response 2
    dpo, kto, summary = export(tmp_path, f"feedback_db={tmp_path / 'app.sqlite'}",
                               f"arena_db={tmp_path / 'arena.sqlite'}")
    assert [(r["prompt"], r["chosen"], r["rejected"], r["source"]) for r in dpo] == sorted([
        (ALPACA.format("Q1"), "Paris", "Lyon", "app"),
        (ALPACA.format("Q6"), "good", "bad", "ratings"),
        (ALPACA.format("Q9", "six times seven"), "42", "41", "arena"),
    ])
    by_chosen = {r["chosen"]: r for r in dpo}
    assert by_chosen["Paris"]["votes"] == {"chosen": 2, "rejected": 0, "tie": 1, "bad": 0}
    assert (by_chosen["42"]["instruction"], by_chosen["42"]["input"]) == ("Q9", "six times seven")
    assert by_chosen["42"]["votes"] == {"chosen": 3, "rejected": 0, "tie": 0, "bad": 0}  # every position mapped back
    assert summary["dpo"]["pairs_left_out"] == {"tie": 1, "both bad": 1, "split: no majority": 1,
                                                "identical answers": 1}
    labelled = {(r["instruction"], r["completion"]): r["label"] for r in kto}
    assert labelled == {("Q1", "Paris"): True, ("Q1", "Lyon"): False, ("Q3", "x"): False, ("Q3", "y"): False,
                        ("Q6", "good"): True, ("Q6", "bad"): False, ("Q8", "other template"): True,
                        ("Q9", "42"): True, ("Q9", "41"): False}
    assert len(kto) == len(labelled) and all(r["prompt"] == ALPACA.format(r["instruction"], r["input"]) for r in kto)
    assert summary["kto"]["answers_left_out"] == {"ties only": 3, "split: no majority": 3}
    assert summary["votes_left_out"] == {"app: prompt sent in another template than alpaca": 1}
    assert summary["read"]["arena"]["votes"] == 3 and summary["read"]["app"]["votes"] == 17


def test_without_ratings_pairs_only_comparisons_count(tmp_path):
    app_votes(tmp_path / "app.sqlite")
    dpo, _, summary = export(tmp_path, f"feedback_db={tmp_path / 'app.sqlite'}", "pair_ratings=false")
    assert [r["chosen"] for r in dpo] == ["Paris"] and summary["dpo"]["by_source"] == {"app": 1}


def test_the_prompt_is_in_the_template_the_adapter_was_trained_with(tmp_path):
    app_votes(tmp_path / "app.sqlite")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "training_config.yaml").write_text("config:\n  model: some/base\n  template: alpaca_lora\n")
    dpo, kto, summary = export(tmp_path, f"feedback_db={tmp_path / 'app.sqlite'}", f"adapter={adapter}")
    assert summary["template"] == "alpaca_lora"
    assert [r["completion"] for r in kto] == ["other template"]  # the one vote on a prompt sent in that template
    assert dpo == [] and summary["votes_left_out"] == {
        "app: prompt sent in another template than alpaca_lora": 16}


@pytest.mark.parametrize("args, message", [
    ([], "key 'feedback_db' or arena_db must be set"),
    (["feedback_db=nowhere.sqlite"], "key 'feedback_db': nowhere.sqlite: no such database"),
    (["arena_db=a.sqlite", "template=nope"], "unknown template 'nope'"),
])
def test_bad_keys_are_one_line_errors(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.sqlite").touch()
    with pytest.raises(SystemExit):
        main(["export", *args])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()
