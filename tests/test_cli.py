"""The ``alpaca-lora`` command and the settings every stage shares: free text arrives byte for byte,
every problem is reported, recipes ship inside the package, and the package's imports go one way."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from alpaca_lora.cli import COMMANDS
from alpaca_lora.common.errors import ConfigError
from alpaca_lora.data.templates import get_template
from alpaca_lora.generate import load_generate_config
from alpaca_lora.generate import main as generate
from alpaca_lora.train.config import RECIPES_DIR, load_config, recipe_names
from alpaca_lora.train.run import main as train

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "alpaca_lora"
CONSOLE_SCRIPT = Path(sys.executable).parent / "alpaca-lora"

# Text that YAML (and so OmegaConf's key=value parsing) would change, refuse or interpolate.
AWKWARD_TEXT = [
    "Reverse the words: red green blue", "x # y", "true", "null", "~", "123", "1e3", "0x1F", "[1, 2]",
    "{a: 1}", "'quoted'", '"double"', "a: b: c", "${oc.env:HOME}", "${missing}", "  spaced  ", "line one\nline two",
    "tab\there", "- dash", "? question", "@at", "`tick`", "=", "key=value", "ünïcödé ✓", "\\backslash", "",
]


@pytest.mark.parametrize("text", AWKWARD_TEXT, ids=range(len(AWKWARD_TEXT)))
def test_free_text_reaches_the_prompt_byte_for_byte(text):
    cfg = load_generate_config(["model=some/model", f"instruction={text}", f"input={text}"])
    assert cfg.instruction == text and cfg.input == text
    template = get_template("alpaca")
    assert template.format(cfg.instruction, cfg.input) == template.format(text, text)


@pytest.mark.slow
def test_every_alpaca_record_reaches_the_prompt_unchanged(shared_data):
    """All 999 records' instruction and input through the command line, as the shell passes them."""
    records = json.loads((shared_data / "alpaca_en_demo.json").read_text())
    template = get_template("alpaca")
    changed = []
    for index, record in enumerate(records):
        cfg = load_generate_config(["model=some/model", f"instruction={record['instruction']}",
                                    f"input={record['input']}"])
        if template.format(cfg.instruction, cfg.input) != template.format(record["instruction"], record["input"]):
            changed.append(index)
    assert len(records) == 999 and changed == []


def test_text_keys_stay_text_and_the_others_stay_typed(tmp_path):
    cfg = load_config([f"model={tmp_path}/my model #1", "data=data: file.json", "max_steps=5",
                       "lora.target_modules=[q_proj,v_proj]", "columns.output=response # text"])
    assert cfg.model == f"{tmp_path}/my model #1" and cfg.data == "data: file.json"
    assert cfg.max_steps == 5 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.columns == {"output": "response # text"}


@pytest.mark.slow
def test_the_readme_example_runs_through_the_console_script(fact_adapters):
    proc = subprocess.run([str(CONSOLE_SCRIPT), "generate", f"adapter={fact_adapters[16]}",
                           "instruction=Reverse the words: red green blue", "max_new_tokens=3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr  # was: Cannot convert 'DictConfig' to string
    assert "error" not in proc.stderr


def test_interactive_mode_takes_multi_line_text(fact_adapters, capsys, monkeypatch):
    lines = ['"""Summarize', "the text", 'below."""', '"""', "first line", "second line", '"""', ""]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    seen = []
    monkeypatch.setattr("alpaca_lora.generate.print_streamed", lambda loaded, *args: seen.append(args[:2]))
    assert generate([f"adapter={fact_adapters[16]}", "max_new_tokens=2"]) == 0
    assert seen == [("Summarize\nthe text\nbelow.", "first line\nsecond line")]


def test_a_validation_pass_reports_every_problem(capsys):
    with pytest.raises(SystemExit) as stopped:
        train(["max_length=4", "learning_rate=0", "truncation=chop", "micro_batch_size=0"])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("'")[1] for line in lines] == ["micro_batch_size", "max_length", "truncation", "learning_rate"]
    assert all(line.startswith("error: key '") for line in lines)


def test_a_dry_run_plans_for_the_processes_the_command_would_start(capsys, monkeypatch):
    import yaml

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    train(["recipe=full_fsdp", "device=cuda", "nproc=8", "dry_run=true"])
    plan = yaml.safe_load(capsys.readouterr().out)
    assert plan["runtime"]["world_size"] == 8 and plan["runtime"]["gradient_accumulation_steps"] == 4
    assert plan["sft_config"]["gradient_accumulation_steps"] == 4
    train(["recipe=qlora", "device=cpu", "nproc=2", "dry_run=true"])
    assert yaml.safe_load(capsys.readouterr().out)["runtime"]["world_size"] == 2


@pytest.mark.slow
def test_console_script_lists_every_stage_and_each_has_help():
    proc = subprocess.run([str(CONSOLE_SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for name in ("train", "plan", "recipes", "merge", "generate", "app", "serve", "data", "evaluate", "arena",
                 "export"):
        assert f"\n  {name} " in proc.stdout, name
    for name, (module, _) in COMMANDS.items():  # README: python -m alpaca_lora COMMAND, python -m alpaca_lora.STAGE
        forms = [["alpaca_lora", name]] + ([[module.removesuffix(".__main__")]] if name != "recipes" else [])
        for form in forms:
            stage = subprocess.run([sys.executable, "-m", *form, "--help"], capture_output=True, text=True,
                                   timeout=120)
            assert stage.returncode == 0 and stage.stdout.startswith("usage:"), (form, stage.stderr)
            assert f"alpaca-lora {name}" in stage.stdout[:200], form
    unknown = subprocess.run([str(CONSOLE_SCRIPT), "trian"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "unknown command 'trian'" in unknown.stderr


def test_recipes_lists_each_shipped_recipe_with_its_purpose(capsys):
    from alpaca_lora.cli import main

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in recipe_names():
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert len(line.split()) > 3, f"{name} has no description"
    assert str(RECIPES_DIR / "slurm" / "full_fsdp.sbatch") in out


def test_a_recipe_extends_another(tmp_path):
    thirteen, seven = load_config(["recipe=full_fsdp_13b"]), load_config(["recipe=full_fsdp"])
    assert (thirteen.learning_rate, thirteen.num_epochs, thirteen.model) == (1e-5, 5, "huggyllama/llama-13b")
    assert (thirteen.fsdp, thirteen.fsdp_config, thirteen.batch_size) == (seven.fsdp, seven.fsdp_config, 128)
    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: demo\nmax_steps: 7\n")
    cfg = load_config([f"recipe={mine}"])
    assert cfg.max_steps == 7 and cfg.data == "builtin:skills"
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config([f"recipe={tmp_path / 'a.yaml'}"])


@pytest.mark.slow
def test_the_wheel_carries_the_recipes(tmp_path):
    """A non-editable install (Colab's pip install git+URL, a Docker image) finds every recipe."""
    pytest.importorskip("setuptools", minversion="77")
    source = tmp_path / "source"  # built from a copy: an in-tree build would leave build/ in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv*", ".git", "outputs", "build", "__pycache__",
                                                                "*.egg-info"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PIP_NO_INDEX": "1"})
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("alpaca_lora-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"alpaca_lora/recipes/{name}.yaml" for name in recipe_names()} <= names  # recipes/ at the top here
    assert "alpaca_lora/recipes/slurm/full_fsdp.sbatch" in names
    assert any(name.endswith("entry_points.txt") for name in names)
    installed = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(installed)
    listed = subprocess.run([sys.executable, "-c", "from alpaca_lora.train.config import RECIPES_DIR, recipe_names; "
                             "print(RECIPES_DIR); print(*recipe_names())"], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(installed)}, timeout=120)
    assert listed.stdout.split("\n")[:2] == [str(installed / "alpaca_lora" / "recipes"), " ".join(recipe_names())]
