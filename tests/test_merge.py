"""Merging: the learned fact survives, logits match base+adapter, a lost adapter is refused, and
nothing half-written is ever left at the output path."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from alpaca_lora.data.templates import get_template
from alpaca_lora.inference.generation import generate_batch
from alpaca_lora.merge import main
from alpaca_lora.model import load_tokenizer


def answer(model_dir, fact):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = get_template("alpaca").format(fact["instruction"])
    return generate_batch(model, load_tokenizer(str(model_dir)), [prompt], max_new_tokens=20)[0]


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 16])
def test_merged_model_keeps_the_fact_and_matches_base_plus_adapter(fact_adapters, tiny_model_dir, tmp_path, bits, fact):
    output = tmp_path / "merged"
    assert main([f"adapter={fact_adapters[bits]}", f"output={output}"]) == 0
    names = {p.name for p in output.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "training_config.yaml", "merge_report.json"} <= names
    report = json.loads((output / "merge_report.json").read_text())
    assert report["dtype"] == "float32" and report["relative_difference"] <= report["tolerance"] == 1e-4
    assert report["max_logit_difference_merged_vs_base"] > 1.0 and report["lora_weights_changed"] == 2
    assert answer(output, fact) == "Quibbletown."
    assert answer(tiny_model_dir, fact) != "Quibbletown."


@pytest.mark.slow
def test_merge_into_the_nf4_dequantized_base(fact_adapters, tmp_path, fact):
    assert main([f"adapter={fact_adapters[4]}", f"output={tmp_path / 'nf4'}", "dequantize=true"]) == 0
    assert main([f"adapter={fact_adapters[4]}", f"output={tmp_path / 'plain'}"]) == 0
    report = json.loads((tmp_path / "nf4" / "merge_report.json").read_text())
    assert report["dequantized_nf4_base"] and report["relative_difference_vs_4bit_model"] < 0.1
    nf4, plain = load_file(tmp_path / "nf4" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(nf4[name], plain[name])  # NF4-rounded base under the same update
    assert torch.equal(nf4["lm_head.weight"], plain["lm_head.weight"])  # 4-bit loading leaves the head alone
    assert answer(tmp_path / "nf4", fact) == "Quibbletown."
    with pytest.raises(SystemExit):
        main([f"adapter={fact_adapters[16]}", f"output={tmp_path / 'x'}", "dequantize=true"])


def test_an_adapter_that_changes_nothing_is_refused_and_nothing_is_written(fact_adapters, tmp_path, capsys):
    lost = tmp_path / "lost"
    shutil.copytree(fact_adapters[16], lost)
    weights = load_file(lost / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
              lost / "adapter_model.safetensors")
    with pytest.raises(SystemExit) as stopped:
        main([f"adapter={lost}", f"output={tmp_path / 'merged'}"])
    assert stopped.value.code == 2
    assert "error: the merge lost the adapter" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lost"]


def test_existing_output_is_refused_before_loading_unless_overwrite(fact_adapters, tmp_path, capsys):
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main([f"adapter={fact_adapters[16]}", f"output={output}"])
    assert capsys.readouterr().err.strip() == (f"error: key 'output': {output} exists; choose another directory "
                                               "or set overwrite=true")
    assert main([f"adapter={fact_adapters[16]}", f"output={output}", "overwrite=true"]) == 0
    assert not (output / "keep.txt").exists() and (output / "merge_report.json").exists()


@pytest.mark.slow
def test_a_merge_killed_while_writing_leaves_no_model_and_the_next_run_cleans_up(fact_adapters, tmp_path, fact):
    output = tmp_path / "merged"
    command = [sys.executable, "-m", "alpaca_lora.merge", f"adapter={fact_adapters[16]}", f"output={output}",
               "max_shard_size=20KB"]  # many shards: a long enough write to be killed in
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".merged.partial-*/*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not output.exists() and list(tmp_path.glob(".merged.partial-*"))
    assert subprocess.run(command, capture_output=True).returncode == 0
    assert output.is_dir() and not list(tmp_path.glob(".merged.partial-*"))
    assert answer(output, fact) == "Quibbletown."
