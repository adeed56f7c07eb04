"""Model shapes for the memory planner and FSDP's wrapped layer class: from a local config.json, or a
built-in table of common architectures, before any weights load."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Architecture:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    layer_class: str = "LlamaDecoderLayer"


_LLAMA1 = {"7b": (4096, 11008, 32, 32), "13b": (5120, 13824, 40, 40), "30b": (6656, 17920, 60, 52),
           "33b": (6656, 17920, 60, 52), "65b": (8192, 22016, 80, 64)}
ARCHITECTURES: dict[str, Architecture] = {
    **{f"llama-{size}": Architecture(h, i, n, a, a, 32000) for size, (h, i, n, a) in _LLAMA1.items()},
    "llama-2-7b": Architecture(4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": Architecture(5120, 13824, 40, 40, 40, 32000),
    "llama-2-70b": Architecture(8192, 28672, 80, 64, 8, 32000),
    "llama-3-8b": Architecture(4096, 14336, 32, 32, 8, 128256),
    "llama-3-70b": Architecture(8192, 28672, 80, 64, 8, 128256),
    "llama-3.1-8b": Architecture(4096, 14336, 32, 32, 8, 128256),
    "llama-3.1-70b": Architecture(8192, 28672, 80, 64, 8, 128256),
    "mistral-7b": Architecture(4096, 14336, 32, 32, 8, 32000, layer_class="MistralDecoderLayer"),
    **{f"qwen2.5-{size}": Architecture(h, i, n, a, kv, v, tied, "Qwen2DecoderLayer")
       for size, (h, i, n, a, kv, v, tied) in {
        "0.5b": (896, 4864, 24, 14, 2, 151936, True), "1.5b": (1536, 8960, 28, 12, 2, 151936, True),
        "3b": (2048, 11008, 36, 16, 2, 151936, True), "7b": (3584, 18944, 28, 28, 4, 152064, False),
        "14b": (5120, 13824, 48, 40, 8, 152064, False), "32b": (5120, 27648, 64, 40, 8, 152064, False),
        "72b": (8192, 29568, 80, 64, 8, 152064, False)}.items()},
    "smollm2-135m": Architecture(576, 1536, 30, 9, 3, 49152, True),
    "smollm2-360m": Architecture(960, 2560, 32, 15, 5, 49152, True),
    "smollm2-1.7b": Architecture(2048, 8192, 24, 32, 32, 49152, True),
}


def find_architecture(model: str) -> Architecture | None:
    """From a local config.json (file or directory, or a hub model's cached one), else the table by name:
    ``llama-2-7b``, ``meta-llama/Llama-2-7b-hf``, ``huggyllama/llama-7b``, ``Qwen/Qwen2.5-7B-Instruct`` ..."""
    path = Path(_cached_config(model)).expanduser()
    config = path / "config.json" if path.is_dir() else path
    if config.is_file() and config.suffix == ".json":
        c = json.loads(config.read_text())
        heads = c["num_attention_heads"]
        return Architecture(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], heads,
                            c.get("num_key_value_heads") or heads, c["vocab_size"], bool(c.get("tie_word_embeddings")),
                            _layer_class(c))
    name = model.rsplit("/", 1)[-1].lower().replace("meta-llama-", "llama-").replace("_", "-")
    name = re.sub(r"-(hf|instruct|chat|base|v0\.\d|v\d)$", "", re.sub(r"-(hf|instruct|chat)(-hf)?$", "", name))
    longest_first = sorted(ARCHITECTURES.items(), key=lambda kv: -len(kv[0]))
    return ARCHITECTURES.get(name) or next((arch for key, arch in longest_first if name.startswith(key + "-")), None)


def _layer_class(config: dict) -> str:
    """The decoder layer class FSDP wraps, named after the model class: LlamaForCausalLM -> LlamaDecoderLayer."""
    return f"{(config.get('architectures') or ['LlamaForCausalLM'])[0].removesuffix('ForCausalLM')}DecoderLayer"


def _cached_config(spec: str) -> str:
    """A hub model's config.json when the hub cache holds it, else ``spec`` itself."""
    if Path(spec).expanduser().exists():
        return spec
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
        return cached if isinstance(cached, str) else spec
    except Exception:  # not a hub id
        return spec
