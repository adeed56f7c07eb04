"""Merge under bad input (issue 14): an output that would destroy the adapter or the base is refused
whatever overwrite says; a model that is neither on disk nor reachable is one line, in merge,
training and the model loaders alike."""

from __future__ import annotations

import hashlib
import json
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
