"""A saved LoRA adapter, checked after training: a run that learned nothing fails loudly."""

from __future__ import annotations

from pathlib import Path

from alpaca_lora.common.errors import AdapterError


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
