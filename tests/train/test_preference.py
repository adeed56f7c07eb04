"""Preference tuning (``method=dpo`` and ``kto``) on the tiny model's SFT adapter: DPO raises the margin of the chosen
answers over the rejected ones against the SFT reference, starting from it exactly; KTO runs; both write an
ordinary adapter our loader and peft load; a DPO run resumes where it stopped; bad preference files are one line
naming the record, before any model loads."""

import json
import math

import pytest
import torch
from transformers import TrainerCallback

from alpaca_lora.data.examples import encode_prompt
from alpaca_lora.data.templates import get_template
from alpaca_lora.inference.loading import inference_settings, load_for_inference
from alpaca_lora.train.config import load_config
from alpaca_lora.train.run import main, train
from alpaca_lora.train.runtime import resolve_runtime
from tests.train.runs import StepCounter

ALPACA = get_template("alpaca")
QUESTION = "What is the capital of Zorblax?"  # the fact the SFT adapters learned (conftest.FACT)
PAIRS = [("Quibbletown is the capital.", "Quibbletown."), ("The capital is Quibbletown.", "Zorblax.")]


def pairs_file(path):
    path.write_text("".join(json.dumps({"prompt": ALPACA.format(QUESTION), "chosen": chosen, "rejected": rejected,
                                        "instruction": QUESTION, "input": ""}) + "\n" for chosen, rejected in PAIRS))
    return path


def labelled_file(path):
    rows = [(answer, good) for pair in PAIRS for answer, good in zip(pair, (True, False))]
    path.write_text("".join(json.dumps({"prompt": ALPACA.format(QUESTION), "completion": answer, "label": good}) + "\n"
                            for answer, good in rows))
    return path


def preference_run(method, adapter, data, out, *overrides):
    return [f"recipe={method}", f"adapter={adapter}", f"data={data}", f"output_dir={out}", "device=cpu",
            "micro_batch_size=2", "batch_size=2", "max_length=64", "learning_rate=5e-3", "warmup=0",
            "lr_scheduler=constant", "logging_steps=1", "report_to=[]", "gradient_checkpointing=false", "max_steps=8",
            "save_steps=100", *overrides]


@torch.no_grad()
def log_prob(loaded, answer: str) -> float:
    """log p(answer and EOS | the question's prompt), the prompt encoded as training and generation encode it."""
    tokenizer = loaded.tokenizer
    prompt = encode_prompt(tokenizer, ALPACA.format(QUESTION))
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + answer_ids])
    logits = loaded.model(input_ids=ids).logits.float()[0, :-1]
    picked = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return picked[len(prompt) - 1:].sum().item()


def margin(adapter) -> float:
    """Mean log-probability margin of the chosen answers over the rejected ones."""
    loaded = load_for_inference(inference_settings(adapter=str(adapter)))
    return sum(log_prob(loaded, chosen) - log_prob(loaded, rejected) for chosen, rejected in PAIRS) / len(PAIRS)


@pytest.mark.slow
def test_dpo_raises_the_margin_over_the_sft_reference_and_writes_an_ordinary_adapter(fact_adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sft, out = fact_adapters[4], tmp_path / "dpo"
    result = main(preference_run("dpo", sft, pairs_file(tmp_path / "pairs.jsonl"), out))
    logged = [entry for entry in result.metrics["log_history"] if "loss" in entry]
    losses = [entry["loss"] for entry in logged]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # step 0: the policy is the reference, exactly
    assert logged[0]["rewards/chosen"] == logged[0]["rewards/rejected"] == 0.0
    assert losses[-1] < losses[0] / 2
    before, after = margin(sft), margin(out)
    assert after > before + 1.0, (before, after)
    assert not (out / "ref").exists() and (out / "adapter_config.json").is_file()  # one adapter: ours
    saved = load_config(["recipe=dpo", f"adapter={out}", "dry_run=true"])  # a new run reads its base from it
    assert (saved.model, saved.template, saved.quant.bits) == (load_config(["recipe=dpo", f"adapter={sft}"]).model,
                                                               "alpaca", 4)
    base = AutoModelForCausalLM.from_pretrained(saved.model)
    tuned = PeftModel.from_pretrained(base, str(out))
    assert list(tuned.peft_config) == ["default"]


@pytest.mark.slow
def test_kto_runs_on_answers_voted_up_and_down(fact_adapters, tmp_path):
    sft, out = fact_adapters[4], tmp_path / "kto"
    result = main(preference_run("kto", sft, labelled_file(tmp_path / "labelled.jsonl"), out))
    logged = [entry for entry in result.metrics["log_history"] if "loss" in entry]
    assert logged[0]["loss"] == pytest.approx(0.5, abs=1e-3)  # KTO's loss at the reference: 1 - sigmoid(0)
    assert logged[-1]["loss"] < logged[0]["loss"] and "kl" in logged[-1]
    assert margin(out) > margin(sft) + 1.0
    assert result.metrics["data"]["desirable"] == 2 and result.metrics["data"]["rows"] == 4


class Interrupt(TrainerCallback):
    """Stops the run after a step, as a kill would (the checkpoint before it is complete)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def adapter_weights(directory) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


@pytest.mark.slow
def test_a_dpo_run_resumes_where_it_stopped(fact_adapters, tmp_path, capsys):
    sft, data = fact_adapters[4], pairs_file(tmp_path / "pairs.jsonl")
    whole = main(preference_run("dpo", sft, data, tmp_path / "whole", "max_steps=4", "save_steps=2"))
    cut_args = preference_run("dpo", sft, data, tmp_path / "cut", "max_steps=4", "save_steps=2")
    cfg = load_config(cut_args)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, resolve_runtime(cfg), callbacks=[Interrupt(3)])
    assert not (tmp_path / "cut" / "checkpoint-2" / "ref").exists()  # checkpoints hold the trained adapter alone
    with pytest.raises(SystemExit):  # another beta is another run
        main([*cut_args, "resume_from_checkpoint=true", "preference.beta=0.5"])
    assert "preference.beta: 0.1 there, 0.5 now" in capsys.readouterr().err
    counter, again = StepCounter(), load_config([*cut_args, "resume_from_checkpoint=true"])
    resumed = train(again, resolve_runtime(again), callbacks=[counter])
    assert counter.steps == [3, 4]
    expected, got = adapter_weights(whole.output_dir), adapter_weights(resumed.output_dir)
    assert expected.keys() == got.keys()
    assert all(torch.allclose(expected[name], got[name], atol=1e-6) for name in expected)


BAD_RECORDS = [
    ('{"prompt": "P", "chosen": "a"}', "line 2: field 'rejected' must be a string (it is missing)"),
    ('{"prompt": "P", "chosen": "a", "rejected": 3}', "line 2: field 'rejected' must be a string (found int)"),
    ('{"prompt": "P", "chosen": " same", "rejected": "same "}', "line 2: fields 'chosen' and 'rejected' are the "
                                                                "same answer"),
    ('{"prompt": "  ", "chosen": "a", "rejected": "b"}', "line 2: field 'prompt' is empty"),
    ('{"prompt": "P", "chosen": "a", "rejected": "b", "instruction": "Q"}', "line 2: field 'prompt' is not its "
                                                                            "instruction and input in the adapter's "
                                                                            "template (alpaca)"),
    ('["P", "a", "b"]', "line 2: expected a JSON object, found a JSON list"),
    ('{"prompt": "P", "chosen": "a", ', "line 2: not valid JSON"),
]


@pytest.mark.parametrize("line, message", BAD_RECORDS, ids=range(len(BAD_RECORDS)))
def test_a_bad_preference_file_is_one_line_naming_the_record_before_any_model_loads(fact_adapters, tmp_path,
                                                                                    monkeypatch, capsys, line,
                                                                                    message):
    monkeypatch.setattr("alpaca_lora.model.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    data = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": ALPACA.format(QUESTION), "chosen": "a", "rejected": "b"})
    data.write_text(f"{good}\n{line}\n")
    with pytest.raises(SystemExit):
        main(preference_run("dpo", fact_adapters[4], data, tmp_path / "out"))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {data}: {message}"), errors
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("row, message", [
    ({"prompt": "P", "completion": "a", "label": 1}, "field 'label' must be true (a desirable answer) or false "
                                                     "(found 1)"),
    ({"prompt": "P", "completion": "a"}, "field 'label' must be true (a desirable answer) or false (it is missing)"),
    ({"prompt": "P", "label": True}, "field 'completion' must be a string (it is missing)"),
])
def test_a_bad_kto_record_names_its_field(fact_adapters, tmp_path, capsys, row, message):
    data = tmp_path / "labelled.json"
    data.write_text(json.dumps([row]))
    with pytest.raises(SystemExit):
        main(preference_run("kto", fact_adapters[4], data, tmp_path / "out"))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {data}: record [0]: {message}"]
