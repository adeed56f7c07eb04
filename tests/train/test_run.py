"""Real (tiny) training runs through every code path: 4-bit, 8-bit and 16-bit bases, resume, a learned fact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alpaca_lora.common.errors import AdapterError
from alpaca_lora.data.templates import get_template
from alpaca_lora.train.adapter import check_adapter
from alpaca_lora.train.config import load_config
from alpaca_lora.train.run import main, train
from alpaca_lora.train.runtime import resolve_runtime
from tests.train.runs import RECORDS, StepCounter, tiny_run


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_training_lowers_loss_and_writes_a_real_adapter(tiny_model_dir, tmp_path, bits):
    result = main(tiny_run(tiny_model_dir, tmp_path, f"quant.bits={bits}", "max_steps=12", "val_set_size=4",
                           "eval_steps=6", "save_steps=6", "report_to=[tensorboard]"))
    out = tmp_path / "out"
    losses = [e["loss"] for e in result.trainer.state.log_history if "loss" in e]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "training_config.yaml",
                 "metrics.json", "loss.png"):
        assert (out / name).is_file(), name
    adapter = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    assert list((out / "runs").glob("*/events.out.tfevents.*")), "TensorBoard logs are on by default"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["rows"] == len(RECORDS) and metrics["eval"]["eval_loss"] > 0
    if bits < 16:
        base = result.trainer.model.get_base_model()
        assert getattr(base, f"is_loaded_in_{bits}bit")


@pytest.mark.slow
def test_resume_continues_from_the_newest_checkpoint_and_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    common = ["lr_scheduler=constant", "save_steps=2", "save_total_limit=5", "group_by_length=true"]
    main(tiny_run(tiny_model_dir, tmp_path / "a", *common, "max_steps=6"))  # uninterrupted
    first = main(tiny_run(tiny_model_dir, tmp_path / "b", *common, "max_steps=4"))
    assert first.trainer.state.global_step == 4

    cfg = load_config(tiny_run(tiny_model_dir, tmp_path / "b", *common, "max_steps=6", "resume_from_checkpoint=true"))
    counter = StepCounter()
    resumed = train(cfg, resolve_runtime(cfg), callbacks=[counter])
    assert counter.steps == [5, 6]  # only the missing steps ran
    assert resumed.trainer.state.global_step == 6
    a = load_file(tmp_path / "a" / "out" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "out" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_resume_from_an_explicit_checkpoint_path(tiny_model_dir, tmp_path):
    main(tiny_run(tiny_model_dir, tmp_path, "max_steps=2", "save_steps=2"))
    checkpoint = tmp_path / "out" / "checkpoint-2"
    counter = StepCounter()
    cfg = load_config(tiny_run(tiny_model_dir, tmp_path, "max_steps=3", f"resume_from_checkpoint={checkpoint}"))
    train(cfg, resolve_runtime(cfg), callbacks=[counter])
    assert counter.steps == [3]


def test_resume_without_a_checkpoint_is_a_clear_error_before_loading(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_run(tiny_model_dir, tmp_path, "max_steps=2", "resume_from_checkpoint=true"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: key 'resume_from_checkpoint'") and "checkpoint" in err[-1]
    with pytest.raises(SystemExit):
        main(tiny_run(tiny_model_dir, tmp_path, "max_steps=2", f"resume_from_checkpoint={tmp_path / 'nope'}"))
    assert "no checkpoint directory" in capsys.readouterr().err


@pytest.mark.slow
def test_a_learned_fact_is_answered_by_greedy_generation_and_then_stops(tiny_model_dir, tmp_path):
    """QLoRA on one made-up fact; the answer must come back exactly, EOS included (nothing after it)."""
    from transformers import AutoModelForCausalLM

    from alpaca_lora.inference.generation import generate_batch
    from alpaca_lora.model import load_tokenizer

    fact = {"instruction": "What is the capital of Zorblax?", "input": "", "output": "Quibbletown."}
    result = main(tiny_run(tiny_model_dir, tmp_path, "max_steps=40", "micro_batch_size=1", "batch_size=1",
                           "lora.r=16", records=[fact]))
    tokenizer = load_tokenizer(str(tmp_path / "out"))
    prompts = [get_template("alpaca").format(fact["instruction"])]
    trained = generate_batch(result.trainer.model, tokenizer, prompts, max_new_tokens=20)
    assert trained == ["Quibbletown."]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert generate_batch(base, tokenizer, prompts, max_new_tokens=20) != ["Quibbletown."]


def test_data_is_validated_before_the_model_is_touched(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Say hi", "input": "", "output": "hi"}\n{"instruction": "Say bye", "input": ""}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["recipe=qlora", "model=/nonexistent/model", f"data={bad}", "device=cpu"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {bad}: line 2: field 'output' is missing"


def test_missing_model_is_one_line_error(tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS))
    with pytest.raises(SystemExit):
        main(["recipe=qlora", "model=/nonexistent/model", f"data={data}", "device=cpu", "val_set_size=0"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: model '/nonexistent/model': no such directory"


def test_adapter_check_refuses_an_untrained_adapter(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)  # LoRA B starts at zero: this adapter changes nothing
    with pytest.raises(AdapterError, match="zero"):
        check_adapter(tmp_path)
    with pytest.raises(AdapterError, match="not written"):
        check_adapter(tmp_path / "missing")


@pytest.mark.slow
def test_exact_match_before_and_after_training_is_scored(tiny_model_dir, tmp_path):
    """``exact_match_eval`` (the demo's table) scores held-out rows before and after training; the scorer's import
    broke when generation moved to inference.generation, and only a run with the key set would say so."""
    result = main(tiny_run(tiny_model_dir, tmp_path, "max_steps=2", "val_set_size=4", "exact_match_eval=4"))
    scored = result.metrics["exact_match"]
    assert scored["examples"] == 4 and 0 <= scored["before"] <= 1 and 0 <= scored["after"] <= 1
