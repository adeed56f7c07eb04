"""Merge under bad input: an output that would destroy the adapter or the base is refused
whatever overwrite says; a model that is neither on disk nor reachable is one line, in merge,
training and the model loaders alike."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from alpaca_lora.common.errors import ModelError
from alpaca_lora.merge import main

UNCACHED = "alpaca-lora-tests/no-such-model-anywhere"


def fingerprint(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def inputs(fact_adapters, tiny_model_dir, tmp_path) -> dict[str, Path]:
    """Copies of the base and of an adapter trained on it, side by side (a failing merge may destroy them)."""
    base = shutil.copytree(tiny_model_dir, tmp_path / "work" / "base")
    adapter = shutil.copytree(fact_adapters[16], tmp_path / "work" / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    saved = yaml.safe_load((adapter / "training_config.yaml").read_text())
    saved["config"]["model"] = str(base)  # the base merge takes by default
    (adapter / "training_config.yaml").write_text(yaml.safe_dump(saved))
    return {"base": base, "adapter": adapter, "work": tmp_path / "work", "tmp": tmp_path}


# (output, overwrite, what the message says the output is)
DESTRUCTIVE = [
    pytest.param("{adapter}", False, "is the adapter", id="adapter"),
    pytest.param("{adapter}", True, "is the adapter", id="adapter-overwrite"),
    pytest.param("{work}/../work/adapter/", True, "is the adapter", id="adapter-spelled-differently"),
    pytest.param("{tmp}/link-to-adapter", True, "is the adapter", id="symlink-to-adapter"),
    pytest.param("{adapter}/merged", False, "is inside the adapter", id="inside-adapter"),
    pytest.param("{adapter}/checkpoint-40", True, "is inside the adapter", id="inside-adapter-overwrite"),
    pytest.param("{base}", True, "is the base model", id="base-overwrite"),
    pytest.param("{tmp}/link-to-base", True, "is the base model", id="symlink-to-base"),
    pytest.param("{base}/merged", False, "is inside the base model", id="inside-base"),
    pytest.param("{work}", True, "contains the adapter", id="parent-overwrite"),
]


@pytest.mark.parametrize("output, overwrite, relation", DESTRUCTIVE)
def test_an_output_that_would_destroy_the_adapter_or_the_base_is_refused(inputs, capsys, output, overwrite,
                                                                         relation):
    (inputs["tmp"] / "link-to-adapter").symlink_to(inputs["adapter"])
    (inputs["tmp"] / "link-to-base").symlink_to(inputs["base"])
    output = output.format(**{k: str(v) for k, v in inputs.items()})
    before = fingerprint(inputs["work"])
    with pytest.raises(SystemExit) as stopped:
        main([f"adapter={inputs['adapter']}", f"output={output}", f"overwrite={str(overwrite).lower()}"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()  # one line per input the output would destroy
    assert err and all(line.startswith("error: key 'output': ") for line in err) and relation in err[0], err
    assert all("overwrite=true does not change this" in line for line in err)
    assert fingerprint(inputs["work"]) == before  # nothing touched


def test_an_uncached_hub_model_offline_is_one_line(inputs, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as stopped:
        main([f"adapter={inputs['adapter']}", f"output={inputs['tmp'] / 'merged'}", f"model={UNCACHED}"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: model '{UNCACHED}': neither on disk nor reachable"), err
    assert "not a local path" in err[0] and "Hugging Face cache" in err[0] and "HF_HUB_OFFLINE" in err[0]
    assert not (inputs["tmp"] / "merged").exists()


@pytest.mark.parametrize("loader", ["resolve_model", "load_tokenizer", "load_model", "train"])
def test_an_uncached_hub_model_offline_is_one_line_wherever_it_is_loaded(loader, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from alpaca_lora import model

    if loader == "train":
        from alpaca_lora.train.run import main as train

        data = tmp_path / "data.json"
        data.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."}]))
        with pytest.raises(SystemExit):
            train([f"model={UNCACHED}", f"data={data}", f"output_dir={tmp_path / 'out'}", "device=cpu",
                   "val_set_size=0"])
        message = capsys.readouterr().err.strip().splitlines()[-1].removeprefix("error: ")
    else:
        call = {"resolve_model": lambda: model.resolve_model(UNCACHED),
                "load_tokenizer": lambda: model.load_tokenizer(UNCACHED),
                "load_model": lambda: model.load_model(UNCACHED, model.ModelArguments(model=UNCACHED), "cpu")}[loader]
        with pytest.raises(ModelError) as exc_info:
            call()
        message = str(exc_info.value)
    assert message.startswith(f"model '{UNCACHED}': neither on disk nor reachable") and "\n" not in message


# --- a broken adapter, or an output that cannot be written: one line, before any model loads -----------------


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


BROKEN_ADAPTERS = [
    # peft asked the hub for the weights: LocalEntryNotFoundError (offline) or HFValidationError
    pytest.param(lambda a: (a / "adapter_model.safetensors").unlink(), "has adapter_config.json but no "
                 "adapter_model.safetensors", id="no-weights"),
    pytest.param(lambda a: _truncated(a / "adapter_model.safetensors"), "adapter_model.safetensors: not a readable "
                 "safetensors file", id="truncated-weights"),  # SafetensorError
    pytest.param(lambda a: (a / "adapter_model.safetensors").write_bytes(b"\\x00" * 64), "adapter_model.safetensors: "
                 "not a readable safetensors file", id="corrupt-weights"),
    pytest.param(lambda a: (a / "adapter_config.json").write_text("{bad"), "adapter_config.json: not valid JSON",
                 id="bad-json"),  # JSONDecodeError
    pytest.param(lambda a: (a / "adapter_config.json").unlink(), "has no adapter_config.json", id="no-config"),
]


def _stage_main(stage: str):
    from alpaca_lora.export import main as export
    from alpaca_lora.generate import main as generate

    return {"merge": main, "export": export, "generate": generate}[stage]


@pytest.mark.parametrize("stage", ["merge", "export", "generate"])
@pytest.mark.parametrize("damage, message", BROKEN_ADAPTERS)
def test_a_broken_adapter_is_one_line_naming_the_file_before_any_model_loads(inputs, capsys, stage, damage,
                                                                            message):
    damage(inputs["adapter"])
    output = {"merge": ["output=" + str(inputs["tmp"] / "merged")], "generate": ["instruction=Hi"],
              "export": ["format=gguf", "output=" + str(inputs["tmp"] / "x.gguf")]}[stage]
    with pytest.raises(SystemExit) as stopped:
        _stage_main(stage)([f"adapter={inputs['adapter']}", *output])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: key 'adapter': ") and message in err[0], err


def test_a_truncated_model_is_one_line(inputs, capsys):
    from alpaca_lora.generate import main as generate

    _truncated(inputs["base"] / "model.safetensors")
    with pytest.raises(SystemExit):
        generate([f"model={inputs['base']}", "instruction=Hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: model '{inputs['base']}': cannot load it: "), err


def test_merging_into_a_read_only_folder_is_refused_before_the_merge(inputs, read_only_dir, capsys):
    """It failed with PermissionError after the whole merge."""
    with pytest.raises(SystemExit):
        main([f"adapter={inputs['adapter']}", f"output={read_only_dir / 'merged'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: key 'output': cannot write in {read_only_dir} ("), err
    assert err[0].endswith("); choose another directory")


def test_a_merged_model_is_readable_as_plain_writes_would_be_and_replaces_a_file_without_leftovers(inputs):
    """With umask 022 the merged folder was 0700 and model.safetensors 0600; ``output=EXISTING_FILE overwrite=true``
    left a hidden ``.EXISTING_FILE.old-PID`` behind."""
    umask = os.umask(0o077)
    os.umask(umask)
    output = inputs["tmp"] / "merged"
    output.write_text("a file in the way")
    assert main([f"adapter={inputs['adapter']}", f"output={output}", "overwrite=true"]) == 0
    assert sorted(p.name for p in inputs["tmp"].iterdir() if p.name.startswith(".")) == []
    assert output.stat().st_mode & 0o777 == 0o777 & ~umask
    for name in ("model.safetensors", "training_config.yaml", "merge_report.json", "tokenizer.json"):
        assert (output / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
