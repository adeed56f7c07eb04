"""python -m alpaca_lora.generate: the training template, each decoding mode, explicit errors,
interactive use and resumable batches, with adapters on 4- and 16-bit bases and a merged model."""

import io
import json
import shutil

import pytest
import yaml

from alpaca_lora.generate import main
from alpaca_lora.inference.loading import inference_settings, load_for_inference


@pytest.fixture
def ask(fact) -> str:
    """The fact's question as the instruction key."""
    return f"instruction={fact['instruction']}"


@pytest.mark.parametrize("bits", [4, 16])
def test_adapter_answers_with_the_learned_fact_and_stops(fact_adapters, capsys, bits, ask):
    assert main([f"adapter={fact_adapters[bits]}", ask, "max_new_tokens=20"]) == 0
    assert capsys.readouterr().out == "Quibbletown.\n"


def test_merged_model_and_base_with_adapter_agree(fact_adapters, tiny_model_dir, tmp_path, capsys, ask):
    from alpaca_lora.merge import main as merge

    merge([f"adapter={fact_adapters[16]}", f"output={tmp_path / 'merged'}"])
    capsys.readouterr()
    main([f"model={tmp_path / 'merged'}", ask, "max_new_tokens=20"])
    main([f"model={tiny_model_dir}", f"adapter={fact_adapters[16]}", "quant.bits=8", ask, "max_new_tokens=20"])
    assert capsys.readouterr().out == "Quibbletown.\nQuibbletown.\n"


def test_each_decoding_mode(fact_adapters, capsys, ask):
    adapter = f"adapter={fact_adapters[16]}"
    main([adapter, ask, "decoding=beam", "num_beams=3", "max_new_tokens=20"])
    assert capsys.readouterr().out == "Quibbletown.\n"
    sampled = []
    for seed in (1, 1, 2):
        main([adapter, "instruction=Tell me something.", "decoding=sample", "temperature=1.5", "top_k=50",
              "max_new_tokens=12", f"seed={seed}"])
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1] != sampled[2]  # sampling really samples, and the seed pins it


@pytest.mark.parametrize("overrides, message", [
    (["temperature=0.7"], "key 'temperature' has no effect with decoding=greedy; use decoding=sample"),
    (["decoding=sample", "num_beams=4"], "key 'num_beams' has no effect with decoding=sample; use decoding=beam"),
    (["decoding=beam", "top_p=0.9"], "key 'top_p' has no effect with decoding=beam; use decoding=sample"),
    (["decoding=nucleus"], "key 'decoding' must be one of greedy, sample, beam"),
    (["decoding=sample", "top_p=1.5"], "key 'top_p' must be in (0, 1]"),
    (["input_file=x.json"], "key 'output_file' must be set with input_file"),
])
def test_meaningless_settings_are_errors_before_any_model_loads(capsys, overrides, message):
    with pytest.raises(SystemExit) as stopped:
        main(["model=/nonexistent/model", "instruction=Hi", *overrides])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}")
    assert all(line.startswith("error: key '") for line in err.splitlines())  # every problem, a line each


def test_interactive_prompt(fact_adapters, capsys, monkeypatch, fact):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{fact['instruction']}\n\nSay hi.\nto Bob\n\n"))
    assert main([f"adapter={fact_adapters[16]}", "max_new_tokens=20"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("instruction> input> Quibbletown.\ninstruction> input> ")
    assert out.endswith("\ninstruction> ")


def test_batch_file_is_resumable_and_checked(fact_adapters, tmp_path, capsys, fact):
    rows = [fact, {"instruction": "Say something.", "input": "hello"}, {"instruction": "Name a color."}]
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "answers.jsonl"
    args = [f"adapter={fact_adapters[16]}", f"input_file={source}", f"output_file={output}", "batch_size=2",
            "max_new_tokens=20"]
    assert main(args) == 0
    first = [json.loads(line) for line in output.read_text().splitlines()]
    assert [a["index"] for a in first] == [0, 1, 2] and first[0]["output"] == "Quibbletown."
    lines = output.read_text().splitlines()
    output.write_text("\n".join(lines[:1]) + '\n{"index": 1, "instr')  # killed mid-write after the first
    assert main(args) == 0
    again = [json.loads(line) for line in output.read_text().splitlines()]
    assert again == first  # greedy: the same answers, each once
    source.write_text(json.dumps({"instruction": "Something else."}) + "\n")
    with pytest.raises(SystemExit):
        main(args)
    assert "is not the one in" in capsys.readouterr().err


def test_template_comes_from_the_training_config(fact_adapters, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(fact_adapters[16], adapter)
    saved = yaml.safe_load((adapter / "training_config.yaml").read_text())
    saved["config"]["template"] = "alpaca_lora"
    (adapter / "training_config.yaml").write_text(yaml.safe_dump(saved))
    assert load_for_inference(inference_settings(adapter=str(adapter))).template.name == "alpaca_lora"
    assert load_for_inference(inference_settings(adapter=str(adapter), template="alpaca")).template.name == "alpaca"
    (adapter / "training_config.yaml").rename(adapter / "config.yaml")  # an adapter written before the rename
    assert load_for_inference(inference_settings(adapter=str(adapter))).template.name == "alpaca_lora"


LONG = "Summarize: " + "the quick brown fox jumps over the lazy dog " * 200  # far past the tiny model's 512 tokens


def test_a_prompt_longer_than_the_context_is_skipped_and_reported_and_the_rest_done(fact_adapters, tmp_path, capsys,
                                                                                    fact):
    rows = [fact, {"instruction": LONG}, {"instruction": "Name a color."}]
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "answers.jsonl"
    args = [f"adapter={fact_adapters[16]}", f"input_file={source}", f"output_file={output}", "batch_size=2",
            "max_new_tokens=20"]
    for _ in range(2):  # a rerun answers nothing new and reports the same record again
        assert main(args) == 1
        answers = [json.loads(line) for line in output.read_text().splitlines()]
        assert [a["index"] for a in answers] == [0, 2] and answers[0]["output"] == "Quibbletown."
        err = capsys.readouterr().err
        assert "error: record [1]: the prompt is" in err and "longer than the model's context of 512" in err
        assert "Traceback" not in err


def test_one_instruction_longer_than_the_context_is_one_error_line(fact_adapters, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([f"adapter={fact_adapters[16]}", f"instruction={LONG}", "max_new_tokens=20"])
    assert stopped.value.code == 2
    assert "longer than the model's context of 512" in capsys.readouterr().err
