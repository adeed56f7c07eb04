"""``evaluate harness``: lm-evaluation-harness's own evaluator on the model as it was trained (the tiny model's 4-bit
base with the adapter that learned the Zorblax fact), on local task YAMLs built here (a generate_until task and a
multiple_choice one, scored by log-likelihood), against the base with the adapter disabled; offline."""

import json
import sys
from pathlib import Path

import pytest

from alpaca_lora.evaluate.__main__ import main

pytest.importorskip("lm_eval", reason="lm-evaluation-harness (the eval extra) is not installed")

DISTRACTORS = ["Paris.", "Seven kilometers.", "Blue."]


def write_tasks(directory: Path, fact: dict) -> Path:
    """A task directory: ``zorblax_gen`` (generate_until, exact match) and ``zorblax_mc`` (multiple choice)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "gen.jsonl").write_text(json.dumps({"instruction": fact["instruction"], "answer": fact["output"]})
                                         + "\n")
    (directory / "mc.jsonl").write_text(json.dumps({"question": fact["instruction"],
                                                    "choices": [fact["output"], *DISTRACTORS], "label": 0}) + "\n")
    cache = directory / "hf-datasets"  # datasets' own cache, kept out of the user's
    (directory / "zorblax_gen.yaml").write_text(f"""task: zorblax_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / 'gen.jsonl'}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "{{{{instruction}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    (directory / "zorblax_mc.yaml").write_text(f"""task: zorblax_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / 'mc.jsonl'}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
""")
    return directory


def samples(out: Path, run: str, task: str) -> list[dict]:
    return [s for s in map(json.loads, (out / f"samples_{run}.jsonl").read_text().splitlines()) if s["task"] == task]


@pytest.mark.slow
def test_the_adapter_as_trained_against_its_base_on_local_tasks(fact_adapters, fact, tmp_path, capsys):
    tasks = write_tasks(tmp_path / "tasks", fact)
    out = tmp_path / "out"
    assert main(["harness", f"adapter={fact_adapters[4]}", f"tasks={tasks}", "compare_base=true", "device=cpu",
                 "batch_size=2", f"output_dir={out}"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["evaluated"] == "adapter on its 4-bit base, as trained and served"
    assert report["adapter"] == str(fact_adapters[4]) and report["bits"] == 4 and report["chat_template"] is True
    assert set(report["runs"]) == {"adapter", "base"} and report["tasks"] == ["zorblax_gen", "zorblax_mc"]
    adapter, base = report["runs"]["adapter"], report["runs"]["base"]
    assert adapter["zorblax_gen"]["metrics"]["exact_match"]["value"] == 1.0  # it learned the fact
    assert base["zorblax_gen"]["metrics"]["exact_match"]["value"] == 0.0     # the base never knew it
    assert adapter["zorblax_gen"]["n"] == 1 and adapter["zorblax_mc"]["version"] == 2.0
    assert adapter["zorblax_mc"]["metrics"]["acc"]["value"] == 1.0
    [answer] = samples(out, "adapter", "zorblax_gen")
    assert answer["response"] == [fact["output"]] and answer["prompt"].rstrip().endswith("### Response:")
    # the same documents scored twice: the adapter puts more log-likelihood on the right choice than the base
    [with_adapter], [without] = samples(out, "adapter", "zorblax_mc"), samples(out, "base", "zorblax_mc")
    assert with_adapter["loglikelihoods"][0] > without["loglikelihoods"][0]
    assert max(with_adapter["loglikelihoods"]) == with_adapter["loglikelihoods"][0]
    table = (out / "report.md").read_text()
    assert "| task | metric | adapter | base | Δ |" in table
    assert "| zorblax_gen | exact_match | 1.000 | 0.000 | +1.000 |" in table
    assert table in capsys.readouterr().out


def test_a_model_without_adapter_and_a_task_yaml_file(tiny_model_dir, fact, tmp_path):
    tasks = write_tasks(tmp_path / "tasks", fact)
    out = tmp_path / "out"
    assert main(["harness", f"model={tiny_model_dir}", f"tasks={tasks / 'zorblax_gen.yaml'}", "limit=1",
                 "device=cpu", f"output_dir={out}"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["evaluated"] == "model as stored (a merged or fully trained model, or a base)"
    assert list(report["runs"]) == ["model"] and report["chat_template"] is False  # the tiny tokenizer has none
    assert report["runs"]["model"]["zorblax_gen"]["metrics"]["exact_match"]["value"] == 0.0
    assert report["limit"] == 1


@pytest.mark.parametrize("arguments, message", [
    (["model=x"], "key 'tasks' must be set"),
    (["model=x", "tasks=a", "compare_base=true"], "key 'compare_base' needs adapter= (the base is the adapter's"),
    (["model=x", "tasks=a", "limit=0"], "key 'limit' must be positive"),
    (["model=x", "tasks=./no/such/tasks.yaml"], "key 'tasks': ./no/such/tasks.yaml: no such file or directory"),
])
def test_bad_harness_arguments_are_one_line_each_before_anything_loads(arguments, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["harness", *arguments])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and message in err
    assert all(line.startswith("error: ") for line in err.splitlines())


@pytest.mark.slow
def test_an_unknown_task_is_one_line_before_the_model_loads(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["harness", f"model={tmp_path / 'not-loaded'}", "tasks=no_such_task_xyz"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: key 'tasks': no_such_task_xyz is neither a task lm-eval knows "
                                               "(lm_eval ls tasks lists them) nor a task YAML file or directory")


def test_without_lm_eval_installed_one_line_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed: its import fails
    with pytest.raises(SystemExit) as stopped:
        main(["harness", "model=x", "tasks=arc_easy"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: evaluate harness needs lm-evaluation-harness: pip install "
                                               "'alpaca-lora[eval]'")
