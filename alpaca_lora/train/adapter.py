"""A saved LoRA adapter, checked after training: a run that learned nothing fails loudly."""

from __future__ import annotations

import json
from pathlib import Path

from alpaca_lora.common.errors import AdapterError
from alpaca_lora.common.paths import atomic_write_text


def check_adapter(output_dir: Path) -> int:
    """The adapter's parameter count; fails when it is empty or its LoRA B weights are all zero."""
    from safetensors.torch import load_file

    path = Path(output_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise AdapterError(f"{path} was not written")
    weights = load_file(path)
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    if not lora_b:
        raise AdapterError(f"{path} holds no LoRA B weights: the adapter is empty")
    if all(not t.any() for t in lora_b):
        raise AdapterError(f"{path}: every LoRA B weight is zero, so the adapter changes nothing")
    return sum(t.numel() for t in weights.values())


def name_base_as_given(adapter_dir: Path, model: str) -> None:
    """The adapter (or a checkpoint's) names its base as the user did (a hub id, ``package:...``), not as the path it
    resolved to on this machine (a cache or site-packages directory), so the directory loads wherever it is copied."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():  # a full fine-tune's checkpoint
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("base_model_name_or_path") != model:
        config["base_model_name_or_path"] = model
        atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")  # as peft writes it
