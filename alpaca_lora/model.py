"""Finding and loading the base model: a hub id, a local directory, or a GGUF file.

A GGUF file (also one shipped inside an installed Python package, ``package:MODULE/FILE.gguf``)
is converted once into a standard Hugging Face directory in the cache, keyed by the file's hash,
so quantized loading, training and saving all work on it like on any other model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from alpaca_lora.errors import UserError
from alpaca_lora.paths import cache_dir


class ModelError(UserError):
    pass


def resolve_model(spec: str) -> str:
    """A path or hub id that ``from_pretrained`` accepts; GGUF files are converted (once) first."""
    if spec.startswith("package:"):
        module, _, filename = spec.removeprefix("package:").partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise ModelError(f"model '{spec}': Python package '{module}' is not installed")
        spec = str(Path(next(iter(found.submodule_search_locations))) / filename)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model '{spec}': no such GGUF file")
        return str(convert_gguf(path))
    if spec.startswith((".", "/", "~")) and not path.exists():
        raise ModelError(f"model '{spec}': no such directory")
    return spec


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(path: Path) -> Path:
    """Dequantizes a GGUF checkpoint into a cached safetensors directory (with its tokenizer).

    A GGUF-loaded model cannot ``save_pretrained`` directly, so it is rebuilt from its config and
    state dict. The directory appears atomically, so an interrupted conversion is simply redone.
    """
    target = cache_dir("gguf") / f"{path.stem}-{_sha256(path)[:16]}"
    if (target / "config.json").is_file():
        return target
    print(f"converting {path.name} to a Hugging Face model directory (once) in {target}", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized now: a plain checkpoint
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer with a pad token (falling back to EOS; labels still keep EOS, see data.examples)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model '{path}': cannot load its tokenizer: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def compute_dtype_for(device: str) -> str:
    """bf16 on a GPU; float32 on CPU, where bf16 matmuls are about 2x slower."""
    return "bfloat16" if device == "cuda" else "float32"


def four_bit_quantization(quant_type: str, double_quant: bool, compute_dtype: str) -> dict:
    """BitsAndBytesConfig arguments of a QLoRA base: the one place they are spelled out."""
    return {"load_in_4bit": True, "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": compute_dtype}


def train_adapters_in_float32(model) -> None:
    """TRL stores QLoRA adapters in bf16 (the paper's GPU setting); on CPU, bf16 matmuls are about 2x
    slower than fp32, so without a GPU the trainable parameters are kept in float32."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()


def load_model(path: str, quantization: dict | None, compute_dtype: str, device: str, trust_remote_code: bool = False,
               sharded: bool = False):
    """The base: quantized through bitsandbytes when ``quantization`` is given, else in ``compute_dtype``.

    ``sharded`` (FSDP) leaves placement to FSDP; otherwise each process loads onto its own GPU.
    """
    dtype = DTYPES[compute_dtype]
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if quantization:
        kwargs["quantization_config"] = BitsAndBytesConfig(**{
            k: DTYPES.get(v, v) if k in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage") else v
            for k, v in quantization.items()
        })
    if device == "cuda" and not sharded:
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    elif quantization and device == "cpu":
        kwargs["device_map"] = {"": "cpu"}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
