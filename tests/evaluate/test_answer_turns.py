"""A multi-turn evaluation set (MT-Bench's question format): one item per turn, each later turn answered with the
generator's own earlier answers in the conversation (a local model, an endpoint), and judged by the same judge,
which sees the user's earlier messages and each side's own earlier answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from alpaca_lora.common.errors import DataError
from alpaca_lora.endpoint.scripted import Canned, ScriptedOpenAI
from alpaca_lora.evaluate.__main__ import main
from alpaca_lora.evaluate.sets import load_eval_set

QUESTIONS = [{"question_id": 81, "category": "recall", "turns": ["Name a planet.", "What is its capital?"],
              "reference": ["Zorblax.", "Quibbletown."]},
             {"question_id": 82, "category": "recall", "turns": ["Name a country.", "What is its capital?"]}]


@pytest.fixture
def mt_bench(tmp_path) -> Path:
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(question) + "\n" for question in QUESTIONS))
    return path


def _answers(path: Path) -> dict[str, dict]:
    return {record["id"]: record for record in map(json.loads, path.read_text().splitlines())}


def test_an_mt_bench_file_is_one_item_per_turn(mt_bench):
    items = load_eval_set(str(mt_bench)).items
    assert [item["id"] for item in items] == ["81.1", "81.2", "82.1", "82.2"]
    assert [item["instruction"] for item in items] == ["Name a planet.", "What is its capital?", "Name a country.",
                                                       "What is its capital?"]
    assert items[0]["input"] == "" and items[0]["previous"] is None and items[0]["turns"] == ["Name a planet."]
    assert "earlier, the user said:\n\n[User, turn 1]\nName a planet." in items[1]["input"]
    assert items[1]["previous"] == items[0]["key"] and items[1]["turns"] == QUESTIONS[0]["turns"]
    assert items[1]["key"] != items[3]["key"]  # the same second question, told apart by the conversation before it
    assert [item["reference"] for item in items] == ["Zorblax.", "Quibbletown.", None, None]
    assert {item["category"] for item in items} == {"recall"}


@pytest.mark.parametrize("bad, needle", [({"turns": []}, "'turns'"), ({"turns": ["Hi", 3]}, "'turns'"),
                                         ({"turns": ["Hi", " "]}, "'turns'"),
                                         ({"turns": ["Hi"], "reference": "Hello"}, "'reference'")],
                         ids=["no-turns", "a-number", "an-empty-turn", "reference-not-a-list"])
def test_a_bad_question_is_one_line(tmp_path, bad, needle):
    path = tmp_path / "question.jsonl"
    path.write_text(json.dumps(QUESTIONS[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as exc_info:
        load_eval_set(str(path))
    message = str(exc_info.value)
    assert "\n" not in message and f"{path}: line 2: field {needle}" in message


@pytest.mark.slow
def test_a_local_model_answers_the_second_turn_after_its_own_first_answer(mt_bench, conversation_adapter,
                                                                          tmp_path):
    """The adapter that learned the two-turn facts: its second answers depend on its own first ones."""
    output = tmp_path / "answers.jsonl"
    args = ["answer", f"set={mt_bench}", f"adapter={conversation_adapter}", f"output={output}", "device=cpu",
            "max_new_tokens=12", "generator=chat"]
    assert main(args) == 0
    answers = _answers(output)
    assert [answers[key]["answer"] for key in ("81.1", "81.2", "82.1", "82.2")] == \
        ["Zorblax.", "Quibbletown.", "Velvet.", "Copper harbor."]
    assert answers["81.1"]["output"] == "Zorblax."
    assert answers["81.2"]["output"] == ("[Assistant, turn 1]\nZorblax.\n\n"
                                         "[Assistant, turn 2: the answer to this instruction]\nQuibbletown.")
    journal = [json.loads(line) for line in (tmp_path / "answers.journal.jsonl").read_text().splitlines()]
    order = [record["id"] for entry in journal for record in entry["records"]]
    assert order.index("81.1") < order.index("81.2") and order.index("82.1") < order.index("82.2")
    assert main(args) == 0  # a rerun answers nothing twice
    assert len((tmp_path / "answers.journal.jsonl").read_text().splitlines()) == len(journal)


def test_an_endpoint_gets_the_history_and_the_judge_sees_each_sides_own(mt_bench, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")

    def assistant(name):
        def reply(body):
            messages = body["messages"]
            said = [m["content"] for m in messages if m["role"] == "assistant"]
            return Canned(f"{name} on '{messages[-1]['content']}' after {said}")
        return reply

    for name in ("alpha", "beta"):
        with ScriptedOpenAI(default=assistant(name)) as server:
            assert main(["answer", f"set={mt_bench}", f"model={name}", f"base_url={server.base_url}",
                         f"output={tmp_path / name}.jsonl", "system=Be brief."]) == 0
        second = next(r["body"]["messages"] for r in server.received if len(r["body"]["messages"]) > 2
                      and "planet" in r["body"]["messages"][1]["content"])
        assert second == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a planet."},
                          {"role": "assistant", "content": f"{name} on 'Name a planet.' after []"},
                          {"role": "user", "content": "What is its capital?"}]

    def fair(body):
        return Canned("Both are fine. [[C]]")

    with ScriptedOpenAI(default=fair) as judge:
        assert main(["judge", f"a={tmp_path / 'alpha.jsonl'}", f"b={tmp_path / 'beta.jsonl'}", "judge_model=j",
                     f"base_url={judge.base_url}", f"output_dir={tmp_path / 'judged'}"]) == 0
    assert len(judge.received) == 8  # four items paired across the two files, two orders each
    later = [r["body"]["messages"][-1]["content"] for r in judge.received
             if "turn 2 of a conversation" in r["body"]["messages"][-1]["content"]]
    assert len(later) == 4 and all("[User, turn 1]\nName a " in prompt for prompt in later)
    for planet_or_country, judged in (("planet", [p for p in later if "Name a planet." in p]),
                                      ("country", [p for p in later if "Name a country." in p])):
        expected = set()
        for name in ("alpha", "beta"):  # each side's own first answer, then its second, made after it
            first = f"{name} on 'Name a {planet_or_country}.' after []"
            expected.add(f"[Assistant, turn 1]\n{first}\n\n[Assistant, turn 2: the answer to this instruction]\n"
                         f"{name} on 'What is its capital?' after {[first]!r}")
        shown = r"Start of Assistant [AB]'s Response\]\n(.*?)\n\[The End"
        assert len(judged) == 2 and all(set(re.findall(shown, prompt, re.S)) == expected
                                        for prompt in judged)
