"""lm-evaluation-harness's own ``local-completions`` client against the server, as its users run it: its defaults
(token-id prompts, no start token added, lists of prompts at batch_size > 1, ``echo`` with ``max_tokens: 1`` and
``logprobs: 1`` for loglikelihood), a local tokenizer, on a generate_until and a multiple_choice task built here.
The loglikelihoods equal those of lm-eval's in-process HFLM on the same model, and so do the generations: the
server's echo logprobs, stop strings and token-id prompts are what lm-eval expects."""

import json

import pytest
import torch

from alpaca_lora.inference.loading import inference_settings
from alpaca_lora.serve.server import ServeConfig

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness (the eval extra) is not installed")
pytest.importorskip("tenacity", reason="lm-eval's API models need its api extra (tenacity)")

MULTIPLE_CHOICE = [
    {"question": "What is the capital of Zorblax?", "choices": ["Quibbletown", "Paris", "Rome", "Berlin"], "label": 0},
    {"question": "What color is the sky?", "choices": ["red", "green", "blue"], "label": 2},
    {"question": "Is water wet?", "choices": ["yes", "no"], "label": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "ten"], "label": 1},
    {"question": "Which is a fruit?", "choices": ["carrot", "apple", "potato", "onion"], "label": 1},
]
GENERATION = [
    {"instruction": "What is the capital of Zorblax?", "answer": "Quibbletown"},
    {"instruction": "Name a primary color.", "answer": "blue"},
    {"instruction": "What is 2 plus 2?", "answer": "4"},
    {"instruction": "Give three tips for staying healthy.", "answer": "Eat well."},
]


def write_tasks(directory, cache) -> None:
    """A multiple_choice (loglikelihood) and a generate_until task over local JSONL files (offline)."""
    for name, rows in (("mc", MULTIPLE_CHOICE), ("gen", GENERATION)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = {"dataset_path": "json", "test_split": "test", "metadata": {"version": 1.0}}
    files = {"data_files": {"test": None}, "cache_dir": str(cache)}
    tasks = {
        "tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
                    "doc_to_choice": "{{choices}}", "doc_to_target": "label", "target_delimiter": " ",
                    "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
        "tiny_gen": {"output_type": "generate_until", "doc_to_target": "{{answer}}", "target_delimiter": "",
                     "doc_to_text": "### Instruction:\n{{instruction}}\n\n### Response:\n",
                     "generation_kwargs": {"until": ["\n", "</s>"], "max_gen_toks": 8, "do_sample": False},
                     "metric_list": [{"metric": "exact_match"}]},
    }
    for task, config in tasks.items():
        data = {**files, "data_files": {"test": str(directory / f"{task.removeprefix('tiny_')}.jsonl")}}
        (directory / f"{task}.yaml").write_text(json.dumps({"task": task, **source, "dataset_kwargs": data,
                                                            **config}))


@pytest.fixture(scope="module")
def url(tiny_model_dir, serving):
    yield from serving(inference_settings(ServeConfig, model=str(tiny_model_dir), served_model_name="tiny", max_batch=4,
                                          max_queue=8))


def evaluate(model, tasks_dir, **kwargs) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, tasks=["tiny_mc", "tiny_gen"], num_fewshot=0, bootstrap_iters=0,
                                   task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                                   log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                   fewshot_random_seed=0, **kwargs)


def responses(results: dict, task: str) -> list:
    return [sample["resps"] for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_lm_evals_local_completions_client_scores_as_its_in_process_model(url, tiny_model_dir, tmp_path):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    from alpaca_lora.model import load_tokenizer

    write_tasks(tmp_path, tmp_path / "datasets")
    served = evaluate("local-completions", tmp_path, batch_size=4, model_args={
        "model": "tiny", "base_url": f"{url}/completions", "tokenizer": str(tiny_model_dir), "max_retries": 1})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    # lm-eval's API models add no start token by default; in-process, say the same
    local = evaluate(HFLM(pretrained=model, tokenizer=load_tokenizer(str(tiny_model_dir)), batch_size=4,
                          add_bos_token=False), tmp_path)
    ours, theirs = responses(served, "tiny_mc"), responses(local, "tiny_mc")
    assert len(ours) == len(MULTIPLE_CHOICE) and [len(r) for r in ours] == [len(r["choices"]) for r in MULTIPLE_CHOICE]
    for served_choices, local_choices in zip(ours, theirs):
        assert [lp for (lp, _), in served_choices] == pytest.approx([lp for (lp, _), in local_choices], abs=1e-4)
        assert [greedy for (_, greedy), in served_choices] == [greedy for (_, greedy), in local_choices]
    assert served["results"]["tiny_mc"]["acc,none"] == local["results"]["tiny_mc"]["acc,none"]
    assert responses(served, "tiny_gen") == responses(local, "tiny_gen")
    assert len(responses(served, "tiny_gen")) == len(GENERATION)
