"""The memory planner, validated against published peak-memory measurements (like for like: each
source's own settings), and its command line."""


from dataclasses import replace

import pytest

from alpaca_lora.common.errors import ConfigError
from alpaca_lora.train.architectures import ARCHITECTURES, find_architecture
from alpaca_lora.train.config import load_config
from alpaca_lora.train.plan import GIB, Setup, estimate, main, parse_memory


def planned(**changes) -> Setup:
    """The planner's view of the default recipe (the built-in defaults), with ``changes``."""
    return replace(Setup.from_config(load_config(["model=llama-2-7b"]), gpus=1), **changes)


ATTENTION_AND_MLP = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PUBLISHED = {
    # torchtune README, Llama-3.1-8B QLoRA on one RTX 4090: 7.4 GiB peak. Its qlora_single_device config:
    # NF4 base with double-quantized scales, LoRA r8 on q/v/output projections and the MLP, no dropout,
    # bf16 LoRA weights and AdamW states, batch 2 packed to 2048 tokens, activation checkpointing, and
    # its chunked cross-entropy (bf16 logits, fp32 one chunk in 8 at a time).
    "torchtune llama-3.1-8b": ("llama-3.1-8b", planned(
        bits=4, lora_r=8, lora_targets=ATTENTION_AND_MLP, lora_dropout=0.0, adapter_bytes=2, micro_batch=2,
        seq_len=2048, checkpointing=True, loss="chunked"), 7.4 * GIB),
    # AnswerDotAI fsdp_qlora benchmarks, Llama-2-7B QLoRA on 2 GPUs, batch 1: 4.98 GiB (context 512) and
    # 5.21 GiB (context 2048) per GPU. train.py defaults: bnb NF4 with double quantization, LoRA r64 on all
    # linear layers with dropout 0.1, fp32 LoRA weights, AdamW, gradient checkpointing, FSDP full shard.
    "fsdp_qlora llama-2-7b 512": ("llama-2-7b", planned(
        bits=4, lora_r=64, lora_dropout=0.1, micro_batch=1, seq_len=512, checkpointing=True, gpus=2, fsdp=True),
        4.98 * GIB),
    "fsdp_qlora llama-2-7b 2048": ("llama-2-7b", planned(
        bits=4, lora_r=64, lora_dropout=0.1, micro_batch=1, seq_len=2048, checkpointing=True, gpus=2, fsdp=True),
        5.21 * GIB),
    # LitGPT resource table, config_hub/finetune/llama-2-7b/qlora.yaml on one A10G: 13.68 GB. That config:
    # bnb.nf4 without double quantization, LoRA r32 on query and value only, dropout 0.05, bf16-true (bf16
    # LoRA weights and AdamW states), micro batch 2, 512 tokens, no activation checkpointing.
    "litgpt llama-2-7b": ("llama-2-7b", planned(
        bits=4, double_quant=False, lora_r=32, lora_targets=("q_proj", "v_proj"), lora_dropout=0.05,
        adapter_bytes=2, micro_batch=2, seq_len=512, checkpointing=False), 13.68e9),
}


@pytest.mark.parametrize("source", PUBLISHED)
def test_estimate_is_within_25_percent_of_the_published_peak(source):
    model, setup, published = PUBLISHED[source]
    predicted = estimate(ARCHITECTURES[model], setup).total
    assert abs(predicted / published - 1) <= 0.25, f"{source}: {predicted / GIB:.2f} vs {published / GIB:.2f} GiB"


def test_parameter_counts_match_the_models():
    counts = {"llama-2-7b": 6.74e9, "llama-3.1-8b": 8.03e9, "llama-2-70b": 68.98e9, "mistral-7b": 7.24e9,
              "qwen2.5-7b": 7.62e9, "qwen2.5-0.5b": 0.49e9, "smollm2-135m": 0.135e9}
    for name, expected in counts.items():
        # biases (Qwen's q/k/v) are left out: under 0.1% of the parameters
        assert estimate(ARCHITECTURES[name], planned()).parameters == pytest.approx(expected, rel=0.01), name


def test_architecture_from_names_and_config_files(tiny_model_dir, tmp_path):
    assert find_architecture("meta-llama/Llama-2-7b-hf") == ARCHITECTURES["llama-2-7b"]
    assert find_architecture("huggyllama/llama-7b") == ARCHITECTURES["llama-7b"]
    assert find_architecture("mistralai/Mistral-7B-v0.1") == ARCHITECTURES["mistral-7b"]
    assert find_architecture("Qwen/Qwen2.5-72B-Instruct") == ARCHITECTURES["qwen2.5-72b"]
    assert find_architecture("meta-llama/Meta-Llama-3.1-8B-Instruct") == ARCHITECTURES["llama-3.1-8b"]
    assert find_architecture("someone/unknown-model") is None
    tiny = find_architecture(str(tiny_model_dir))
    assert (tiny.hidden, tiny.layers, tiny.kv_heads, tiny.layer_class) == (64, 2, 2, "LlamaDecoderLayer")


def test_what_each_setting_changes():
    a = ARCHITECTURES["llama-2-7b"]
    base = estimate(a, planned()).total
    assert estimate(a, planned(checkpointing=False)).total > base + 3 * GIB  # activations of every layer
    assert estimate(a, planned(bits=16)).total > base + 8.5 * GIB  # 13.5 GB of bf16 weights for 3.6 of NF4
    assert estimate(a, planned(optimizer="adamw_8bit")).total < base
    sharded = estimate(a, planned(gpus=2, fsdp=True))
    assert sharded.total < base and any("FSDP" in label for label, _ in sharded.rows)
    full = estimate(a, planned(finetune="full", bits=16, weight_bytes=4, gpus=8, fsdp=True))
    assert full.trainable == full.parameters and full.total < 80 * GIB  # Stanford's 8x A100 80 GB run fits


def test_plan_command(capsys, tmp_path):
    assert main(["recipe=qlora", "model=llama-2-7b", "gpu_memory=24GB"]) == 0
    out = capsys.readouterr().out
    assert "memory plan for qlora: llama-2-7b (6.74B parameters), 1 GPU x 24.0 GiB, micro batch 4 x 512 tokens" in out
    for part in ("4-bit NF4 + quantization constants", "LoRA r64 on 7 projections", "optimizer states",
                 "activations: checkpointed", "logits and loss", "runtime overhead", "fits in 24.0 GiB",
                 "largest micro batch at 512 tokens:"):
        assert part in out
    assert main(["recipe=qlora_fsdp", "gpus=1", "gpu_memory=24GB", "fsdp="]) == 1  # 70B on one GPU
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["recipe=qlora_fsdp", "gpus=2", "gpu_memory=24GB"]) == 0
    assert parse_memory("80GB") == parse_memory("80GiB") == 80 * GIB and parse_memory("512MB") == 512 * 1024**2
    with pytest.raises(SystemExit):
        main(["recipe=qlora", "model=someone/unknown", "gpu_memory=24GB"])
    assert "not a built-in architecture" in capsys.readouterr().err


@pytest.mark.parametrize("memory, on", [(80 * GIB, False), (8 * GIB, True)])
def test_auto_checkpointing_is_off_only_when_the_plan_without_it_fits(memory, on):
    from alpaca_lora.train.plan import plan_run

    cfg = load_config(["recipe=qlora", "model=llama-2-7b", "micro_batch_size=4", "max_length=512"])
    assert cfg.gradient_checkpointing == "auto"
    decided, why, run = plan_run(cfg, cfg.model, 1, memory)
    assert run.setup.checkpointing is on and run.plan == estimate(run.architecture, run.setup)
    assert decided.gradient_checkpointing is on and why.startswith(f"gradient checkpointing {'on' if on else 'off'}")
    without = estimate(ARCHITECTURES["llama-2-7b"], replace(planned(micro_batch=4, seq_len=512), checkpointing=False))
    assert (without.total > 0.7 * memory) is on  # the rule: off only under 70% of the memory


def test_checkpointing_set_by_hand_or_without_a_plan_is_on_or_as_set(tmp_path):
    from alpaca_lora.train.plan import plan_run

    for value in (True, False):
        cfg = load_config(["model=llama-2-7b", f"gradient_checkpointing={str(value).lower()}"])
        assert plan_run(cfg, cfg.model, 1, 1e15)[0].gradient_checkpointing is value
    unknown = load_config([f"model={tmp_path}/no-such-model"])
    assert plan_run(unknown, unknown.model, 1, 1e15)[0].gradient_checkpointing is True
    assert plan_run(unknown, unknown.model, 1, 1e15)[2] is None


def test_checkpointing_key_is_checked():
    with pytest.raises(ConfigError, match="gradient_checkpointing.*true, false or auto"):
        load_config(["gradient_checkpointing=sometimes"])


def test_plan_command_says_what_auto_checkpointing_chose(capsys):
    main(["model=llama-2-7b", "gpu_memory=80GB"])
    out = capsys.readouterr().out
    assert out.startswith("gradient checkpointing off (auto") and "every layer kept (no checkpointing)" in out


def test_a_runs_memory_plan_is_estimated_once(monkeypatch, capsys):
    """``plan`` (and ``train`` on a GPU) estimated the run's plan twice: once to settle gradient_checkpointing=auto,
    once more for the table or the out-of-memory check. (The table's "largest micro batch" lines estimate other
    configurations; those are not the run's.)"""
    from alpaca_lora.train import plan

    estimated, searching = [], []
    real_estimate, real_largest = plan.estimate, plan.largest

    def estimate(a, s):
        if not searching:
            estimated.append(s)
        return real_estimate(a, s)

    def largest(*args):
        searching.append(True)
        try:
            return real_largest(*args)
        finally:
            searching.clear()

    monkeypatch.setattr(plan, "estimate", estimate)
    monkeypatch.setattr(plan, "largest", largest)
    assert main(["recipe=qlora", "model=llama-2-7b", "gpu_memory=80GB"]) == 0
    assert "gradient checkpointing off" in capsys.readouterr().out
    run = Setup.from_config(load_config(["recipe=qlora", "model=llama-2-7b", "gradient_checkpointing=false"]), 1)
    assert estimated.count(run) == 1


def test_a_gpu_runs_out_of_memory_check_reads_the_plan_it_was_settled_with(monkeypatch):
    """What ``train`` does on a GPU: the plan settles gradient_checkpointing=auto, then the out-of-memory check reads
    that plan (it estimated the run a second time, and searched the largest batch for a table no one saw)."""
    from alpaca_lora.train import plan

    cfg = load_config(["recipe=qlora", "model=llama-2-7b"])
    cfg, _, run = plan.plan_run(cfg, cfg.model, 1, 24 * GIB)
    monkeypatch.setattr(plan, "estimate", lambda a, s: pytest.fail("estimated again"))
    plan.check_memory(run, cfg, 24 * GIB)
