"""Self-instruct building blocks: the prompt, reply parsing and filters, seed tasks, the journal,
prices, cleaning, and the keys."""

import json

import pytest

from alpaca_lora.common.errors import UserError
from alpaca_lora.common.journal import Journal
from alpaca_lora.data.self_instruct.clean import clean_records
from alpaca_lora.data.self_instruct.settings import load_builder_config
from alpaca_lora.data.self_instruct.tasks import DEFAULT_PROMPT, encode_prompt, load_seed_tasks, parse_reply
from alpaca_lora.endpoint.client import price_per_million

EXAMPLES = [
    {"instruction": "Suggest  a name\nfor a cat:", "input": "", "output": "Whiskers"},
    {"instruction": "Classify the review.", "input": "Great food!", "output": "Positive"},
]


def test_prompt_in_stanfords_numbered_format_ends_by_opening_the_next_task():
    assert encode_prompt("PROMPT", EXAMPLES) == (
        "PROMPT\n"
        "###\n1. Instruction: Suggest a name for a cat\n1. Input:\n<noinput>\n1. Output:\nWhiskers\n"
        "###\n2. Instruction: Classify the review.\n2. Input:\nGreat food!\n2. Output:\nPositive\n"
        "###\n3. Instruction:")
    assert DEFAULT_PROMPT.endswith("List of 20 tasks:")


def test_stanfords_prompt_file_works_unchanged(shared_data, tmp_path):
    prompt = (shared_data / "self_instruct_prompt.txt").read_text()
    seeds = load_seed_tasks(str(shared_data / "seed_tasks.jsonl"))
    assert len(seeds) == 175
    text = encode_prompt(prompt, seeds[:3])
    assert text.startswith(prompt + "\n###\n1. Instruction: ")
    assert text.endswith("\n###\n4. Instruction:") and "3. Output:\n" in text


TASK = "{n}. Instruction: {i}\n{n}. Input:\n{x}\n{n}. Output:\n{o}\n"


def task(n, i, x="<noinput>", o="An answer."):
    return TASK.format(n=n, i=i, x=x, o=o)


PARSE_CASES = {
    "continues the opened task, with and without input": (
        " Give three tips for staying healthy.\n4. Input:\n<noinput>\n4. Output:\nEat, sleep, move.\n###\n"
        + task(5, "Classify the sentiment of this review.", "I loved it.", "Positive") + "###\n20",
        False,
        [("Give three tips for staying healthy.", "", "Eat, sleep, move."),
         ("Classify the sentiment of this review.", "I loved it.", "Positive")], {}),
    "restates the opened number, multi-line input and output": (
        task(4, "Summarize the paragraph in one sentence.", "Line one.\nLine two.", "First.\n\nSecond.")
        + "###\n" + task(5, "Translate the phrase into French.", "<NoInput>", "Bonjour."),
        False,
        [("Summarize the paragraph in one sentence.", "Line one.\nLine two.", "First.\n\nSecond."),
         ("Translate the phrase into French.", "", "Bonjour.")], {}),
    "inside a code fence, with chatter around": (
        "```\n" + task(4, "List three primary colors please.") + "###\n" + task(5, "Name a famous physicist now.")
        + "###\nI hope these tasks are useful!\n```",
        False,
        [("List three primary colors please.", "", "An answer."), ("Name a famous physicist now.", "", "An answer.")],
        {}),
    "broken numbering: skipped numbers are fine, mixed numbers in one task are not": (
        task(4, "Explain how rainbows are formed.") + "###\n"
        + "7. Instruction: Describe a sunset over the sea.\n8. Input:\n<noinput>\n7. Output:\nRed.\n###\n"
        + task(9, "Recommend a book about history.") + "###\n"
        + "10. Instruction: Give an example of irony.\n10. Output:\nRain on a wedding day.\n",
        False,
        [("Explain how rainbows are formed.", "", "An answer."), ("Recommend a book about history.", "", "An answer.")],
        {"unparseable": 2}),
    "cut by the token limit: the last task is dropped": (
        task(4, "Write a haiku about autumn leaves.") + "###\n" + "5. Instruction: Explain the theory of rel",
        True, [("Write a haiku about autumn leaves.", "", "An answer.")], {"truncated": 1}),
    "every filter, in Stanford's order": (
        "###\n".join([
            task(4, "Say hello there."), task(5, "word " * 151), task(6, "Describe this image of a dog."),
            task(7, "Plot the points on a map."), task(8, "Write a program that sorts numbers."),
            task(9, "\"Quote\" the following famous line."), task(10, "Écris un poème sur la mer."),
            task(11, "Explain what a graphic designer does."), task(12, "Give me a fun fact today.", o="<nooutput>"),
        ]),
        False, [("Explain what a graphic designer does.", "", "An answer.")],
        {"too_short": 1, "too_long": 1, "blacklisted_word": 2, "write_a_program": 1,
         "starts_with_punctuation": 1, "starts_with_non_ascii": 1, "empty_output": 1}),
    "not in the format at all": ("Sure! Here are some ideas for you.", False, [], {"unparseable": 1}),
}


@pytest.mark.parametrize("name", PARSE_CASES)
def test_parse_reply(name):
    text, truncated, records, discarded = PARSE_CASES[name]
    parsed = parse_reply(text, 4, truncated)
    assert [(r["instruction"], r["input"], r["output"]) for r in parsed.records] == records
    assert dict(parsed.discarded) == discarded


def test_seed_task_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "seeds.jsonl"
    good = {"instruction": "Do it.", "instances": [{"input": "", "output": "Done."}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"instruction": "Do it.", "instances": []}) + "\n")
    with pytest.raises(UserError, match=rf"^{path}: line 2: field 'instances' must be a non-empty list"):
        load_seed_tasks(str(path))
    path.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(UserError, match=rf"^{path}: line 2: not valid JSON"):
        load_seed_tasks(str(path))
    path.write_text(json.dumps({"instruction": "Do it.", "instances": [{"input": 3, "output": ""}]}))
    with pytest.raises(UserError, match=r"line 1: field 'instances\[0\].input' must be a string"):
        load_seed_tasks(str(path))


def test_journal_drops_a_torn_last_line_and_appends_after_it(tmp_path):
    journal = Journal(tmp_path / "j.jsonl")
    journal.append({"request": 0, "records": [{"instruction": "a"}]})
    journal.append({"request": 1, "records": []})
    with open(journal.path, "a") as f:
        f.write('{"request": 2, "recor')  # killed mid-write
    assert [e["request"] for e in journal.read()] == [0, 1]
    journal.append({"request": 2, "records": []})
    assert [json.loads(line)["request"] for line in journal.path.read_text().splitlines()] == [0, 1, 2]
    journal.path.write_text('{"request": 0}\nnot json\n{"request": 2}\n')
    with pytest.raises(UserError, match=r"j.jsonl: line 2: not valid JSON"):
        journal.read()


def test_prices_table_snapshots_files_and_overrides(tmp_path):
    assert price_per_million("gpt-4o-mini", None, None, None) == (0.15, 0.60)
    assert price_per_million("gpt-4o-mini-2024-07-18", None, None, None) == (0.15, 0.60)
    assert price_per_million("gpt-4o", None, None, None) == (2.50, 10.00)
    assert price_per_million("my-local-model", None, None, None) is None
    assert price_per_million("gpt-4o-mini", None, 1.0, None) == (1.0, 0.60)
    prices = tmp_path / "prices.yaml"
    prices.write_text("my-local-model: {input: 0.01, output: 0.02}\n")
    assert price_per_million("my-local-model", str(prices), None, None) == (0.01, 0.02)
    with pytest.raises(UserError, match="set both price_input and price_output"):
        price_per_million("my-local-model", None, 0.1, None)
    prices.write_text("my-local-model: 3\n")
    with pytest.raises(UserError, match=rf"^{prices}: expected"):
        price_per_million("my-local-model", str(prices), None, None)


def test_clean_fixes_and_drops_with_reasons():
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},                       # kept
        {"instruction": " Name a color. ", "input": "<noinput>", "output": "Blue."},                   # 2 fixes
        {"instruction": "Name a fruit.", "input": "", "output": "Apple.\n\n###\n10. Instruction: Go"},  # leak cut
        {"instruction": "Name a planet.", "input": "", "output": "Mars.\n##\n5. Input:\nx"},           # leak cut
        {"instruction": "List steps.", "input": "", "output": "1. Input: type.\n2. Output: read."},    # a real list
        {"instruction": "Name a tree.", "input": "", "output": ""},                                    # empty
        {"instruction": "Name a bird.", "input": "", "output": "<nooutput>"},                          # empty
        {"instruction": "Write code.", "input": "", "output": "```python\nprint(1)"},                 # truncated
        {"instruction": "List animals.", "input": "", "output": "Cat, dog,"},                          # truncated
        {"instruction": "Fix the grammar.", "input": "He is here.", "output": "he is here"},           # repeats input
        {"instruction": "Say hi.", "input": "", "output": "Say hi."},  # repeats instruction
        {"instruction": "Tell the time.", "input": "", "output": "As an AI language model, I cannot."},  # refusal
        {"instruction": "Summarize.", "input": "Summarize", "output": "Short."},  # input = instruction
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5 "},  # duplicate after fix
    ]
    report = clean_records(rows, duplicates_already_dropped=2)
    assert [r["instruction"] for r in report.kept] == [
        "Add the numbers.", "Name a color.", "Name a fruit.", "Name a planet.", "List steps.", "Summarize."]
    assert report.kept[1]["input"] == "" and report.kept[2]["output"] == "Apple."
    assert report.kept[3]["output"] == "Mars."
    assert report.kept[5]["input"] == ""
    assert dict(report.dropped) == {"duplicate": 3, "empty_output": 2, "truncated_output": 2, "output_repeats_input": 1,
                                    "output_repeats_instruction": 1, "refusal": 1}
    assert dict(report.fixed) == {"whitespace": 2, "placeholder_input": 1, "leaked_numbering": 2,
                                  "input_repeats_instruction": 1}
    summary = report.as_dict()
    assert summary["rows_in"] == 16 and summary["rows_out"] == 6
    assert summary["examples"]["refusal"][0]["record"] == 11


@pytest.mark.parametrize("overrides, message", [
    (["model=m", "concurrency=0"], "key 'concurrency' must be at least 1"),
    (["model=m", "mode=sample"], "key 'mode' must be one of generate, regenerate, clean"),
    (["target=5"], "key 'model' must be set"),
    (["model=m", "mode=regenerate"], "key 'input' must be set for mode=regenerate"),
    (["model=m", "similarity=1.5"], "key 'similarity' must be between 0 and 1"),
    (["model=m", "colour=red"], "unknown key 'colour' (alpaca-lora data --help"),
    (["model=m", "target=many"], "key 'target'"),
])
def test_bad_keys_are_one_line_errors(overrides, message):
    with pytest.raises(UserError) as error:
        load_builder_config(overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_output_names():
    cfg = load_builder_config(["model=m", "output=out/data.json"])
    assert (str(cfg.journal_path), str(cfg.summary_path)) == ("out/data.journal.jsonl", "out/data.summary.json")
    assert cfg.stop_sequences == ["21. Instruction"]



def test_clean_and_regenerate_write_beside_a_local_input_and_under_outputs_for_a_download():
    """--help says INPUT.clean.json: beside the input, not in the current directory (the folder was dropped)."""
    assert str(load_builder_config(["mode=clean", "input=x/a.json"]).output_path) == "x/a.clean.json"
    assert str(load_builder_config(["mode=regenerate", "model=m", "input=x/y/a.jsonl"]).output_path) == \
        "x/y/a.regenerated.json"
    assert str(load_builder_config(["mode=clean", "input=https://example.com/d/alpaca_data.json"]).output_path) == \
        "outputs/self_instruct/alpaca_data.clean.json"
    assert str(load_builder_config(["mode=clean", "input=tatsu-lab/alpaca"]).output_path) == \
        "outputs/self_instruct/alpaca.clean.json"
