"""Evaluation sets, answers files and ``answer`` (a tiny local model, the project's own server, a
scripted endpoint), the AlpacaEval form read back, the published other side, and the reference judge."""

import json
import threading
import time
from pathlib import Path

import pytest

from alpaca_lora.endpoint.scripted import Canned, ScriptedOpenAI
from alpaca_lora.evaluate.__main__ import main
from alpaca_lora.evaluate.answers import load_answers, pair_answers, published_url
from alpaca_lora.evaluate.sets import NAMED_SETS, fold, load_eval_set

RECORDS = [{"instruction": "Name a color.", "input": "", "output": "Blue."},
           {"instruction": "Reverse the order of the words.", "input": "apple river stone",
            "output": "stone river apple"},
           {"instruction": "What is 2 plus 3?", "input": "", "output": "5"}]


def alpaca_eval_outputs(path: Path) -> list[dict]:
    """AlpacaEval's ``model_outputs``, read as its README documents them: a JSON list of dictionaries, each with
    the keys formatted into its prompts, ``instruction`` and ``output``, and the model's name in ``generator``
    (optional ``input``; ``dataset`` in its evaluation set)."""
    data = json.loads(path.read_text())
    assert isinstance(data, list)
    for row in data:
        assert isinstance(row["instruction"], str) and isinstance(row["output"], str)
        assert isinstance(row.get("generator", ""), str) and isinstance(row.get("dataset", ""), str)
    return data


@pytest.fixture
def alpaca_set(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps(RECORDS))
    return path


def test_the_252_set_from_the_shared_data_and_by_name_from_the_cache(shared_data, seed_download):
    local = load_eval_set(str(shared_data / "user_oriented_instructions.jsonl"))
    assert len(local.items) == 252 and len({item["category"] for item in local.items}) == 71
    first = local.items[0]
    assert (first["id"], first["category"]) == ("user_oriented_task_0", "Grammarly")
    assert first["input"].startswith("If you have any questions") and first["reference"].startswith("If you have")
    assert sum(bool(item["input"]) for item in local.items) == 208
    seed_download(NAMED_SETS["self-instruct-252"], shared_data / "user_oriented_instructions.jsonl")
    assert load_eval_set("self-instruct-252").items == local.items == load_eval_set(None).items


def test_text_davinci_003_is_the_other_side_by_name_or_path(shared_data, seed_download):
    seed_download(published_url("text-davinci-003"), shared_data / "text_davinci_003_predictions.jsonl")
    published = load_answers("text-davinci-003")
    assert published.generator == "text-davinci-003" and len(published.records) == 252
    local = load_answers(str(shared_data / "text_davinci_003_predictions.jsonl"))
    assert [r["output"] for r in local.records] == [r["output"] for r in published.records]
    assert published.records[0]["output"].startswith("Have questions about my rate?")  # the leading space trimmed
    eval_set = load_eval_set(str(shared_data / "user_oriented_instructions.jsonl"))
    assert [r["key"] for r in published.records] == [item["key"] for item in eval_set.items]  # every item pairs


def test_answer_with_a_local_model_resumes_without_answering_twice(alpaca_set, tiny_model_dir, tmp_path):
    output = tmp_path / "answers.jsonl"
    args = ["answer", f"set={alpaca_set}", f"model={tiny_model_dir}", f"output={output}", "max_new_tokens=6",
            "batch_size=2", "generator=tiny", "device=cpu"]
    assert main([*args, "limit=2"]) == 0  # a first run that stops after two items
    assert len(output.read_text().splitlines()) == 2
    assert main(args) == 0
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    journal = [json.loads(line) for line in (tmp_path / "answers.journal.jsonl").read_text().splitlines()]
    answered = [record["id"] for entry in journal for record in entry["records"]]
    assert sorted(answered) == ["0", "1", "2"]  # the third run answered only the item left
    assert [a["instruction"] for a in answers] == [r["instruction"] for r in RECORDS]
    assert answers[1]["input"] == "apple river stone" and answers[1]["reference"] == "stone river apple"
    assert all(a["generator"] == "tiny" and a["decoding"] == {"decoding": "greedy", "max_new_tokens": 6}
               and a["model"] == {"model": str(tiny_model_dir), "adapter": None, "bits": 16, "template": "alpaca"}
               and isinstance(a["output"], str) for a in answers)
    alpaca_eval = alpaca_eval_outputs(tmp_path / "answers.alpaca_eval.json")
    assert [row["instruction"] for row in alpaca_eval] == [fold(r["instruction"], r["input"]) for r in RECORDS]
    assert alpaca_eval[1]["instruction"] == "Reverse the order of the words.\n\napple river stone"
    assert [row["output"] for row in alpaca_eval] == [a["output"] for a in answers]
    assert {row["generator"] for row in alpaca_eval} == {"tiny"}
    assert load_answers(str(tmp_path / "answers.alpaca_eval.json")).records[1]["key"] == answers[1]["key"]


def test_an_item_longer_than_the_context_is_skipped_and_named_the_rest_answered(tiny_model_dir, tmp_path, capsys):
    """Issue 22 item 4: one 9,000-token instruction ended the run with a traceback, and every rerun stopped on it."""
    records = [RECORDS[0], {"instruction": "word " * 9000, "input": "", "output": "x"}, RECORDS[2]]
    eval_set = tmp_path / "set.json"
    eval_set.write_text(json.dumps(records))
    output = tmp_path / "answers.jsonl"
    args = ["answer", f"set={eval_set}", f"model={tiny_model_dir}", f"output={output}", "max_new_tokens=4",
            "batch_size=2", "generator=tiny", "device=cpu"]
    assert main(args) == 1
    assert [a["id"] for a in map(json.loads, output.read_text().splitlines())] == ["0", "2"]
    assert "item 1: the prompt is" in capsys.readouterr().err
    assert main(args) == 1  # the rerun tries only that item again, and says so again
    assert "item 1: the prompt is" in capsys.readouterr().err
    assert len(output.read_text().splitlines()) == 2


def test_a_resume_with_other_settings_is_refused(alpaca_set, tiny_model_dir, tmp_path, capsys):
    args = ["answer", f"set={alpaca_set}", f"model={tiny_model_dir}", f"output={tmp_path / 'a.jsonl'}", "device=cpu",
            "generator=tiny", "limit=1"]
    assert main([*args, "max_new_tokens=4"]) == 0
    with pytest.raises(SystemExit):
        main([*args, "max_new_tokens=5"])
    assert "answers made with decoding {'decoding': 'greedy', 'max_new_tokens': 4} (now {'decoding': 'greedy', " \
           "'max_new_tokens': 5}); use another output=" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "max_new_tokens=4", "quant.bits=8"])
    assert "'bits': 16" in capsys.readouterr().err


@pytest.mark.slow
def test_answer_from_the_projects_own_server(fact_adapters, tmp_path, monkeypatch, fact):
    import uvicorn

    from alpaca_lora.inference.loading import inference_settings, load_for_inference
    from alpaca_lora.serve.server import ServeConfig, create_app

    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    cfg = inference_settings(ServeConfig, adapter=str(fact_adapters[16]), served_model_name="zorblax")
    server = uvicorn.Server(uvicorn.Config(create_app(load_for_inference(cfg), cfg), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        (tmp_path / "set.json").write_text(json.dumps([fact]))
        base_url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
        assert main(["answer", f"set={tmp_path / 'set.json'}", "model=zorblax", f"base_url={base_url}",
                     "max_new_tokens=20", f"output={tmp_path / 'answers.jsonl'}"]) == 0
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    [answer] = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert answer["output"] == "Quibbletown." and answer["generator"] == "zorblax"
    assert answer["decoding"] == {"api": "chat", "system": None, "temperature": 0.0, "max_tokens": 20}
    assert answer["model"] == {"base_url": base_url, "model": "zorblax"}


def test_answer_through_an_endpoint_sends_the_system_prompt_and_resumes(alpaca_set, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    output = tmp_path / "answers.jsonl"

    def echo(body):
        return Canned(f"answer to: {body['messages'][-1]['content']}")

    args = ["answer", f"set={alpaca_set}", "model=gpt-4o-mini", f"output={output}", "system=Be brief.",
            "decoding=sample", "temperature=0.7", "max_new_tokens=50"]
    with ScriptedOpenAI(default=echo) as server:
        assert main([*args, f"base_url={server.base_url}", "limit=1"]) == 0
        assert main([*args, f"base_url={server.base_url}"]) == 0
    assert len(server.received) == 3
    body = next(r["body"] for r in server.received  # requests run concurrently: found by content, not order
                if r["body"]["messages"][-1]["content"].startswith("Reverse"))
    assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Reverse the order of the words.\n\napple river stone"}]
    assert (body["temperature"], body["max_tokens"], body["model"]) == (0.7, 50, "gpt-4o-mini")
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    assert [a["output"] for a in answers] == [f"answer to: {fold(r['instruction'], r['input'])}" for r in RECORDS]


def test_an_alpaca_eval_set_and_a_bad_record_named_in_one_line(tmp_path, capsys):
    rows = [{"instruction": "Write a haiku.", "output": "Leaves fall.", "generator": "text_davinci_003",
             "dataset": "helpful_base"}, {"instruction": "Say hi.", "output": "Hi!", "generator": "text_davinci_003",
                                         "dataset": "koala"}]
    (tmp_path / "eval.json").write_text(json.dumps(rows))
    items = load_eval_set(str(tmp_path / "eval.json")).items
    assert [(i["instruction"], i["input"], i["category"], i["reference"]) for i in items] == \
        [("Write a haiku.", "", "helpful_base", "Leaves fall."), ("Say hi.", "", "koala", "Hi!")]
    (tmp_path / "bad.jsonl").write_text('{"id": "x", "instruction": "Hi", "instances": [{"input": 3}]}\n')
    with pytest.raises(SystemExit):
        main(["answer", f"set={tmp_path / 'bad.jsonl'}", "model=whatever"])
    assert capsys.readouterr().err.strip() == \
        f"error: {tmp_path / 'bad.jsonl'}: line 1: field 'input' must be a string (found int)"


def test_answers_of_different_formats_pair_by_instruction_and_input(tmp_path):
    ours = [{"id": "1", "instruction": "Reverse the words.", "input": "a b", "output": "b a", "generator": "mine"}]
    (tmp_path / "ours.jsonl").write_text(json.dumps(ours[0]) + "\n")
    theirs = [{"instruction": "Reverse the words.\n\na  b", "output": "b a", "generator": "other", "dataset": "x"},
              {"instruction": "Unrelated.", "output": "-", "generator": "other", "dataset": "x"}]
    (tmp_path / "theirs.json").write_text(json.dumps(theirs))
    ours, theirs = load_answers(str(tmp_path / "ours.jsonl")), load_answers(str(tmp_path / "theirs.json"))
    pairs, unmatched = pair_answers(ours, theirs)
    assert [(p.id, p.output_a, p.output_b, p.category) for p in pairs] == [("1", "b a", "b a", "x")] and unmatched == 1


def test_the_reference_judge_scores_exact_matches_offline(tmp_path, capsys):
    def answers(name, outputs):
        path = tmp_path / f"{name}.jsonl"
        rows = [{**r, "id": str(i), "output": o, "reference": r["output"], "generator": name}
                for i, (r, o) in enumerate(zip(RECORDS, outputs))]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path

    after = answers("after", ["Blue.", "stone river apple", "6"])
    before = answers("before", ["Red.", "apple river stone", "6"])
    assert main(["judge", f"a={after}", f"b={before}", "judge=reference", f"output_dir={tmp_path / 'out'}"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {k: report[k] for k in ("a", "b", "wins_a", "wins_b", "ties", "win_rate_a", "position_bias", "usage")} == \
        {"a": "after", "b": "before", "wins_a": 2, "wins_b": 0, "ties": 1, "win_rate_a": pytest.approx(5 / 6, abs=1e-4),
         "position_bias": None, "usage": None}
    assert set(report) >= {"ci95", "per_category", "judge", "summary"} and report["judge"] == "reference (exact match)"
    judgments = [json.loads(line) for line in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()]
    assert [j["correct"] for j in judgments] == [[True, False], [True, False], [False, False]]
    assert (tmp_path / "out" / "report.png").stat().st_size > 5_000
    assert "after wins 2 vs before 0, 1 ties" in capsys.readouterr().out


def test_the_reference_judge_needs_references(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "Hi.", "output": "Hello", "generator": "a"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"instruction": "Hi.", "output": "Hey", "generator": "b"}) + "\n")
    with pytest.raises(SystemExit):
        main(["judge", f"a={tmp_path / 'a.jsonl'}", f"b={tmp_path / 'b.jsonl'}", "judge=reference",
              f"output_dir={tmp_path / 'out'}"])
    assert "item '0' has no reference answer" in capsys.readouterr().err


def test_held_out_items_are_the_validation_split_of_the_training_run(tmp_path):
    from alpaca_lora.data.builtin import skills
    from alpaca_lora.data.examples import split_records

    (tmp_path / "run").mkdir()
    saved = "config:\n  data: builtin:skills\n  val_set_size: 20\n  seed: 7\n"
    (tmp_path / "run" / "training_config.yaml").write_text(saved)
    items = load_eval_set(held_out=str(tmp_path / "run")).items
    _, expected = split_records(skills(), 20, 7)
    assert [(i["instruction"], i["input"], i["reference"]) for i in items] == \
        [(r["instruction"], r["input"], r["output"]) for r in expected]


def test_empty_first_replies_neither_crash_answer_nor_its_rerun(alpaca_set, tmp_path, monkeypatch):
    """Issue 22: an endpoint whose first replies were empty ended ``answer`` in a ZeroDivisionError, and every
    rerun too. An empty reply is an answer (it loses), counted; the rest are answered."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    output = tmp_path / "answers.jsonl"
    args = ["answer", f"set={alpaca_set}", "model=gpt-4o-mini", f"output={output}", "concurrency=2"]
    with ScriptedOpenAI(default=lambda body: Canned("an answer"), script=[Canned(""), Canned("")]) as server:
        assert main([*args, f"base_url={server.base_url}", "limit=2"]) == 0
        assert main([*args, f"base_url={server.base_url}"]) == 0
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    assert [a["output"] for a in answers] == ["", "", "an answer"] and len(server.received) == 3


def test_a_run_stopped_by_max_cost_exits_with_its_own_code_and_the_rerun_finishes(alpaca_set, tmp_path, monkeypatch):
    """Issue 22: a run stopped by max_cost exited 0, as if it had finished."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    args = ["answer", f"set={alpaca_set}", "model=gpt-4o-mini", f"output={tmp_path / 'answers.jsonl'}",
            "concurrency=1", "price_input=10000", "price_output=10000"]
    with ScriptedOpenAI(default=lambda body: Canned("an answer of five words")) as server:
        assert main([*args, f"base_url={server.base_url}", "max_cost=0.15"]) == 3
        assert 1 <= len(server.received) < 3
        assert main([*args, f"base_url={server.base_url}", "max_cost=10"]) == 0
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 3 == len(server.received)


def test_the_alpaca_eval_form_names_the_subset_as_its_dataset(tmp_path, monkeypatch):
    """Issue 21: AlpacaEval's ``dataset`` is the subset (``selfinstruct`` for these 252), not Self-Instruct's
    ``motivation_app``, which stays our category."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    rows = [{"id": f"user_oriented_task_{i}", "motivation_app": app, "instruction": f"Do task {i}.",
             "instances": [{"input": "", "output": "Done."}]} for i, app in enumerate(["Grammarly", "Netflix"])]
    (tmp_path / "user_oriented_instructions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "alpaca.json").write_text(json.dumps(RECORDS[:1]))
    with ScriptedOpenAI(default=lambda body: Canned("Done.")) as server:
        for name in ("user_oriented_instructions.jsonl", "alpaca.json"):
            assert main(["answer", f"set={tmp_path / name}", "model=gpt-4o-mini", f"base_url={server.base_url}",
                         f"output={tmp_path / 'out' / name.split('.')[0]}.jsonl"]) == 0
    subsets = alpaca_eval_outputs(tmp_path / "out" / "user_oriented_instructions.alpaca_eval.json")
    assert [row["dataset"] for row in subsets] == ["selfinstruct", "selfinstruct"]
    assert [row["dataset"] for row in alpaca_eval_outputs(tmp_path / "out" / "alpaca.alpaca_eval.json")] == ["alpaca"]
    ours = (tmp_path / "out" / "user_oriented_instructions.jsonl").read_text().splitlines()
    ours = [json.loads(line) for line in ours]
    assert [a["category"] for a in ours] == ["Grammarly", "Netflix"]
