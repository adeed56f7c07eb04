"""Preference tuning's configuration: the base, bits, template and LoRA shape come from the adapter being tuned, the
dry run shows DPOConfig / KTOConfig as TRL gets them, the memory plan counts both answers of a pair and the frozen
reference adapter, and what preference tuning cannot do is one line naming its key."""

import pytest
import yaml

from alpaca_lora.common.errors import ConfigError
from alpaca_lora.train.config import load_config
from alpaca_lora.train.plan import main as plan
from alpaca_lora.train.run import main
from tests.train.runs import saved_adapter


@pytest.fixture
def adapter(tmp_path):
    return saved_adapter(tmp_path / "sft")


def dry_run(capsys, *args):
    assert main([*args, "dry_run=true"]) is None
    return yaml.safe_load(capsys.readouterr().out)


def test_a_dpo_dry_run_takes_the_base_from_the_adapter_and_shows_dpo_config(adapter, capsys):
    plan = dry_run(capsys, "recipe=dpo", f"adapter={adapter}", "device=cuda")
    assert set(plan) == {"config", "runtime", "dpo_config", "quantization", "lora"}
    config, dpo = plan["config"], plan["dpo_config"]
    assert (config["model"], config["template"], config["method"]) == ("huggyllama/llama-7b", "alpaca", "dpo")
    assert plan["lora"]["adapter"] == str(adapter) and plan["lora"]["r"] == 64  # the adapter's own shape
    assert plan["quantization"]["load_in_4bit"] is True
    assert dpo["beta"] == pytest.approx(0.1) and dpo["learning_rate"] == pytest.approx(5e-6)
    assert dpo["train_sampling_strategy"] == "random" and dpo["per_device_train_batch_size"] == 2
    assert "packing" not in dpo and "completion_only_loss" not in dpo and "loss_type" not in dpo  # TRL's default


def test_a_kto_dry_run_reads_its_rows_in_order_with_its_weights(adapter, capsys):
    plan = dry_run(capsys, "recipe=kto", f"adapter={adapter}", "device=cpu", "preference.desirable_weight=1.5",
                   "preference.loss_type=apo_zero_unpaired", "preference.trl.precompute_ref_log_probs=true")
    kto = plan["kto_config"]
    assert kto["train_sampling_strategy"] == "sequential" and kto["desirable_weight"] == pytest.approx(1.5)
    assert kto["loss_type"] == "apo_zero_unpaired" and kto["precompute_ref_log_probs"] is True
    assert kto["bf16"] is False and kto["use_cpu"] is True


def test_the_memory_plan_counts_both_answers_and_the_reference_adapter(adapter, capsys):
    for method in ("dpo", "kto"):
        assert plan([f"recipe={method}", f"adapter={adapter}", "gpu_memory=24GB"]) == 0
    dpo, kto = capsys.readouterr().out.split("memory plan for kto")
    assert "2 pairs = 4 rows (chosen, rejected) x 1024 tokens" in dpo
    assert "reference: a frozen copy of the SFT adapter" in dpo and "reference: a frozen copy" in kto
    assert "4 x 1024 tokens" in kto


PROBLEMS = [
    (["recipe=qlora", "method=dpo"], "key 'adapter' must be set with method=dpo"),
    (["recipe=qlora", "adapter={adapter}"], "key 'adapter' is for method=dpo or kto"),
    (["recipe=dpo", "adapter={missing}"], "key 'adapter': {missing}: no adapter_config.json there"),
    (["recipe=kto", "adapter={adapter}", "micro_batch_size=1", "batch_size=4"],
     "key 'micro_batch_size' must be at least 2 with method=kto"),
    (["recipe=dpo", "adapter={adapter}", "packing=true"], "key 'packing' must be false with method=dpo"),
    (["recipe=dpo", "adapter={adapter}", "sft.logging_first_step=true"], "key 'sft' holds SFTConfig fields"),
    (["recipe=dpo", "adapter={adapter}", "preference.trl.bogus=1"], "key 'preference.trl.bogus' is not a DPOConfig"),
    (["recipe=dpo", "adapter={adapter}", "preference.loss_type=kto"], "key 'preference.loss_type' must be one of "
                                                                     "sigmoid, hinge"),
    (["recipe=dpo", "adapter={adapter}", "model=other/base"], "key 'model': other/base is not huggyllama/llama-7b"),
    (["recipe=dpo", "adapter={adapter}", "template=alpaca_lora"], "key 'template': alpaca_lora is not alpaca"),
    (["recipe=dpo", "adapter={adapter}", "exact_match_eval=5", "val_set_size=10"],
     "key 'exact_match_eval' must be 0 with method=dpo"),
    (["recipe=dpo", "adapter={adapter}", "preference.beta=0"], "key 'preference.beta' must be positive"),
]


@pytest.mark.parametrize("args, message", PROBLEMS, ids=range(len(PROBLEMS)))
def test_what_preference_tuning_cannot_do_names_its_key(adapter, tmp_path, args, message):
    paths = {"adapter": adapter, "missing": tmp_path / "missing"}
    with pytest.raises(ConfigError) as raised:
        load_config([arg.format(**paths) for arg in args])
    assert message.format(**paths) in str(raised.value)
